"""Prompt building: the tokenizer's chat template for instruct models, the plain format for the tiny model.

One code path builds every prompt (`PromptBuilder`), for RL rollouts, evaluation
and SFT demonstrations alike, so what SFT trains on is what RL samples from:

* **chat** — the tokenizer has a `chat_template` (stock instruct models):
  `apply_chat_template([system, user], add_generation_prompt=True)` as text, then
  encoded once. The system prompt describes the tools and the tag protocol;
  the default is `experiments/prompts/agent_system.txt`, replaced by the file at
  `prompt.system_prompt_path`.
* **plain** — no chat template (the embedded tiny model): `Question: …\\n`, the
  format `tepo_ray.data.tasks.render_prompt` defines; the system prompt is unused.

`prompt.use_chat_template`: `auto` (chat when the tokenizer has a template),
`true` (required: a tokenizer without one is an error), `false` (plain always).

The whole agent response (reasoning, tool calls, `<result>` observations, the
answer) lives in the one assistant turn the generation prompt opens: the agent
loop appends observation tokens to that turn. `encode_chat_example` renders a
chat-message demonstration the same way: tool messages become `<result>…</result>`
observations inside the assistant turn (loss mask 0), assistant messages are
trained (loss mask 1). Each piece is tokenised on its own, exactly as the agent
loop appends generated ids and observation ids.

Relative prompt paths are looked up in the current directory, then in the
project root (where `experiments/` lives, and what `tepo-ray submit` ships).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ChatFormatError",
    "resolve_prompt_path",
    "load_system_prompt",
    "PromptBuilder",
    "encode_chat_example",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SYSTEM_PROMPT = "experiments/prompts/agent_system.txt"
ROLES = ("system", "user", "assistant", "tool")
_MODES = ("auto", "true", "false")


class ChatFormatError(ValueError):
    """A demonstration or prompt that does not fit the chat format (names the field)."""


def resolve_prompt_path(path: str | None) -> Path:
    """The system prompt file: `path` (absolute, or relative to cwd, else to the project root) or the default."""
    raw = path or DEFAULT_SYSTEM_PROMPT
    p = Path(raw).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"prompt.system_prompt_path={raw!r}: no such file (looked at {tried})")


def load_system_prompt(path: str | None) -> str:
    text = resolve_prompt_path(path).read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"prompt.system_prompt_path={path or DEFAULT_SYSTEM_PROMPT!r} is empty")
    return text


class PromptBuilder:
    """Question -> prompt token ids, with the chat template or the plain format (see module docstring)."""

    def __init__(self, tokenizer: Any, *, system_prompt: str | None, use_chat_template: str | bool = "auto"):
        mode = str(use_chat_template).lower()
        if mode not in _MODES:
            raise ValueError(f"prompt.use_chat_template={use_chat_template!r} is invalid; expected auto|true|false")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "true" and not has_template:
            raise ValueError("prompt.use_chat_template=true but the tokenizer has no chat_template; set "
                             "prompt.use_chat_template=auto or false to use the plain 'Question: …' format")
        self.tok = tokenizer
        self.chat = has_template and mode != "false"
        self.system_prompt = system_prompt
        if self.chat and not system_prompt:
            raise ValueError("a chat-template prompt needs a system prompt (prompt.system_prompt_path)")

    @classmethod
    def from_config(cls, tokenizer: Any, prompt_cfg: Any | None) -> "PromptBuilder":
        """From a `PromptConfig` (None: defaults). The system prompt file is read only in chat mode."""
        path = getattr(prompt_cfg, "system_prompt_path", None)
        mode = getattr(prompt_cfg, "use_chat_template", "auto")
        wants_chat = str(mode).lower() != "false" and bool(getattr(tokenizer, "chat_template", None))
        return cls(tokenizer, system_prompt=load_system_prompt(path) if wants_chat else None, use_chat_template=mode)

    @property
    def mode(self) -> str:
        return "chat" if self.chat else "plain"

    def render(self, question: str, *, system: str | None = None) -> str:
        """Prompt text ending where the model starts its response."""
        if not self.chat:
            from tepo_ray.data.tasks import render_prompt

            return render_prompt(question)
        messages = [{"role": "system", "content": system or self.system_prompt},
                    {"role": "user", "content": question}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def prompt_ids(self, question: str, *, system: str | None = None) -> list[int]:
        return self.encode(self.render(question, system=system))


def encode_chat_example(builder: PromptBuilder, messages: Sequence[Mapping[str, Any]], *,
                        where: str = "messages") -> tuple[list[int], list[int]]:
    """(token_ids, loss_mask) of one chat-message demonstration, formatted as the agent loop formats rollouts.

    `messages`: an optional system message, one user message (the question), then
    assistant / tool messages alternating as the agent produced them (the first
    after the user is an assistant message). Tool messages are observations
    (`<result>content</result>`, mask 0). Raises `ChatFormatError` naming `where`
    and the field.
    """
    from tepo_ray.agent.protocol import format_observation

    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ChatFormatError(f"{where}: field 'messages' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ChatFormatError(f"{where}: messages[{i}].role={m.get('role')!r}; expected one of {list(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(f"{where}: messages[{i}].content must be a string")
    i = 0
    system = None
    if messages[0]["role"] == "system":
        system, i = messages[0]["content"], 1
    if i >= len(messages) or messages[i]["role"] != "user":
        raise ChatFormatError(f"{where}: messages[{i}].role must be 'user' (the question) after the optional system")
    question = messages[i]["content"]
    rest = list(messages[i + 1:])
    if not rest or rest[0]["role"] != "assistant":
        raise ChatFormatError(f"{where}: messages[{i + 1}] must be an 'assistant' message (the demonstration)")
    ids = builder.prompt_ids(question, system=system)
    mask = [0] * len(ids)
    for j, m in enumerate(rest, start=i + 1):
        if m["role"] not in ("assistant", "tool"):
            raise ChatFormatError(f"{where}: messages[{j}].role={m['role']!r}; after the question only "
                                  f"'assistant' and 'tool' messages may follow")
        if m["role"] == "assistant" and not m["content"]:
            raise ChatFormatError(f"{where}: messages[{j}].content is empty (an assistant turn to learn from)")
        text = m["content"] if m["role"] == "assistant" else format_observation(m["content"])
        piece = builder.encode(text)
        ids += piece
        mask += [1 if m["role"] == "assistant" else 0] * len(piece)
    return ids, mask
