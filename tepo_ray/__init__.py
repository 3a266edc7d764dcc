"""tepo_ray: TEPO (entropy-reduction policy optimization) for tool-using LLM agents on Ray."""

__version__ = "0.1.0"
