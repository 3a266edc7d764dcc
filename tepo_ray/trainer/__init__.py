"""Learner, behaviour-version entropy scorer, checkpoints and SFT (plain classes; actors/ wraps them).

* `EntropyScorer.score(trajectories)`: exact token entropies, behaviour log-probs, ΔH_k / I_{i,k}.
* `Learner.train_step(trajectories)`: rewards -> advantages -> clipped surrogate -> weights v{N+1}.
* `save_checkpoint` / `load_latest`: crash-safe checkpoints with a `latest` pointer.
* `sft_train`: masked cross-entropy warm-start, saved as an HF model dir.
"""

from tepo_ray.trainer.checkpoint import LoadedCheckpoint, load_latest, save_checkpoint
from tepo_ray.trainer.learner import Learner, LearnerMetric
from tepo_ray.trainer.scorer import EntropyScorer, fill_delta_entropy
from tepo_ray.trainer.sft import sft_train

__all__ = [
    "EntropyScorer",
    "fill_delta_entropy",
    "Learner",
    "LearnerMetric",
    "LoadedCheckpoint",
    "load_latest",
    "save_checkpoint",
    "sft_train",
]
