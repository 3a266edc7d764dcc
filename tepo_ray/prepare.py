"""Everything a run needs before actors start: corpus, search index, task splits, model, SFT warm start.

It sits above `tepo_ray.data`, `tepo_ray.tools`, `tepo_ray.models` and `tepo_ray.trainer` (it uses all
of them), next to the driver, eval, sweep and pilot that call `prepare_data` first.

All of it is cached under `model.cache_dir`, keyed by the config that made it,
so a second `make demo` reuses it. Nothing is downloaded: the corpus is
generated (or read from `data.corpus_path`), the tokenizer is trained on the
task text, the model is built from config (or read from `model.path`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tepo_ray.data.tasks import DEMO_VERSION, Piece, TaskError, demonstration, make_items, render_prompt

__all__ = ["PreparedData", "prepare_data", "tokenize_pieces", "build_demonstrations"]

DEMO_CORPUS_DOCS = 2000


@dataclass
class PreparedData:
    model_path: str
    train_items: list[dict[str, Any]]
    eval_items: list[dict[str, Any]]
    index_dir: str | None
    corpus_path: str | None


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _corpus(cfg: Any, cache: Path) -> tuple[Path, Any]:
    """Corpus path and (for the generated corpus) its World, for question generation."""
    from tepo_ray.data.corpus import generate_world, write_corpus

    if cfg.data.corpus_path:
        return Path(cfg.data.corpus_path), None
    world = generate_world(num_docs=DEMO_CORPUS_DOCS, seed=cfg.data.seed)
    path = cache / f"corpus-{DEMO_CORPUS_DOCS}-{cfg.data.seed}.jsonl"
    if not path.exists():
        write_corpus(path, world.docs)
    return path, world


def _index(cfg: Any, corpus_path: Path, cache: Path, *, progress: bool) -> Path:
    from tepo_ray.data.corpus import corpus_fingerprint
    from tepo_ray.tools.retrieval import build_index

    scfg = cfg.tools.search
    if scfg.index_dir:
        out = Path(scfg.index_dir)
    else:
        out = cache / f"index-{scfg.backend}-{corpus_fingerprint(corpus_path)[:12]}"
    if not (out / "manifest.json").exists() or not json.loads((out / "manifest.json").read_text()).get("complete"):
        build_index(corpus_path, out, backend=scfg.backend, progress=progress, embedding_model=scfg.embedding_model)
    return out


def _split_items(cfg: Any, world: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    d = cfg.data

    def multihop(n: int, seed: int) -> list[dict[str, Any]]:
        from tepo_ray.data.corpus import generate_multihop_questions, generate_single_hop_questions

        if world is None:
            raise ValueError("data.task needs generated multihop questions but data.corpus_path is a user corpus; "
                             "use data.task=jsonl with data.train_path for your own questions")
        n1 = n // 2
        return generate_single_hop_questions(world, n=n1, seed=seed) + generate_multihop_questions(
            world, n=n - n1, seed=seed)

    fmt = dict(format=d.format, fields=d.jsonl_fields)

    def items(key: str, path: str | None, n: int, seed: int) -> list[dict[str, Any]]:
        try:
            return make_items(task=d.task, n=n, seed=seed, path=path, multihop_source=multihop, **fmt)
        except TaskError as exc:
            if d.task != "jsonl" or not path:
                raise
            raise type(exc)(f"{key}: {exc}; set {key} to a readable {d.format}-format file on the machine that "
                            f"runs the driver (with `tepo-ray submit`: a path on the cluster)") from None

    train = items("data.train_path", d.train_path, d.num_train, d.seed)
    eval_key = "data.eval_path" if d.eval_path else "data.train_path"
    eval_ = items(eval_key, d.eval_path or d.train_path, d.num_eval, d.seed + 10_000) if d.num_eval else []
    seen = {it["question"] for it in train}
    # Held-out = unseen questions; items that need no tool (one-digit sums, too few to hold out) stay, so the
    # held-out split also measures calls made where none is needed.
    eval_ = [it for it in eval_ if it["question"] not in seen or d.task == "jsonl" or it.get("needs_tool") is False]
    return train, eval_


def _doc_titles(corpus_path: Path | None) -> dict[str, str]:
    if corpus_path is None:
        return {}
    from tepo_ray.data.corpus import iter_corpus, parse_contents

    return {doc["id"]: parse_contents(doc["contents"])[0] for doc in iter_corpus(corpus_path, strict=False)}


def build_demonstrations(items: list[dict[str, Any]], *, cfg: Any, index_dir: Path | None,
                         titles: dict[str, str]) -> list[list[Piece]]:
    """Tool-use demonstrations whose observations come from the real tools."""
    from tepo_ray.tools.python_sandbox import PythonSandbox, format_observation

    search: Callable[[str], str] | None = None
    if index_dir is not None:
        from tepo_ray.tools.retrieval import format_hits, open_retriever

        retriever = open_retriever(index_dir)
        scfg = cfg.tools.search

        def search(query: str) -> str:
            hits = retriever.search([query], top_k=scfg.top_k)[0]
            return format_hits(hits, max_chars=scfg.max_doc_chars)[: cfg.tools.max_observation_chars]

    demos = []
    with PythonSandbox.from_config(cfg.tools.python) as sandbox:
        def run_python(code: str) -> str:
            res = sandbox.run(code)
            return format_observation(res, max_chars=cfg.tools.python.max_output_chars)[: cfg.tools.max_observation_chars]

        title_list = sorted(set(titles.values()))
        for it in items:
            if it.get("hops") and titles:
                hop_titles = [titles[h] for h in it["hops"] if h in titles]
                others = [t for t in title_list if t not in hop_titles]
                wrong = random.Random(f"wrong-{it['id']}").choice(others) if others else None
                it = {**it, "hop_queries": hop_titles, "wrong_query": wrong}
            demos.append(demonstration(it, run_python=run_python, search=search))
    return demos


def tokenize_pieces(tokenizer: Any, pieces: list[Piece]) -> dict[str, list[int]]:
    """Token ids and loss mask, tokenising each piece on its own exactly as the agent loop does."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trainable in pieces:
        enc = tokenizer.encode(text, add_special_tokens=False)
        ids += enc
        mask += [int(trainable)] * len(enc)
    return {"token_ids": ids, "loss_mask": mask}


def prepare_search_index(cfg: Any, *, progress: bool = True) -> str:
    """The search index a config uses: `tools.search.index_dir`, else built (cached) from `data.corpus_path`
    or the generated corpus, as `prepare_data` does for a run."""
    if cfg.tools.search.index_dir:
        return str(cfg.tools.search.index_dir)
    cache = Path(cfg.model.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    corpus_path, _ = _corpus(cfg, cache)
    return str(_index(cfg, corpus_path, cache, progress=progress))


def prepare_data(cfg: Any, *, progress: bool = True) -> PreparedData:
    from tepo_ray.models.tiny import ensure_model

    cache = Path(cfg.model.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    corpus_path = world = index_dir = None
    from tepo_ray.topology import needs_search

    if needs_search(cfg) or cfg.data.task in ("multihop", "mixed"):
        corpus_path, world = _corpus(cfg, cache)
        index_dir = _index(cfg, corpus_path, cache, progress=progress)
    train, eval_ = _split_items(cfg, world)
    titles = _doc_titles(corpus_path) if world is not None else {}

    # Tokenizer corpus: prompts + demonstration text + documents (only used to build the tiny model).
    rng = random.Random(cfg.data.seed)
    sample = rng.sample(train, min(len(train), 512))
    texts = [render_prompt(it["question"]) + " ".join(it["answers"]) for it in sample]
    texts += ["<think>about 5.6e4, too hard to do exactly</think><python>print(123 * 456)</python>",
              "<result>56088\n</result><think>the tool says 56088</think><answer>56088</answer>",
              "<think>look it up</think><search>x</search><think>found it</think>", "error: Traceback timeout"]
    if corpus_path is not None:
        from tepo_ray.data.corpus import iter_corpus

        texts += [d["contents"] for _, d in zip(range(3000), iter_corpus(corpus_path, strict=False))]
    model_path = ensure_model(cfg.model, corpus_texts=texts)

    if cfg.data.sft_path and cfg.trainer.sft_steps > 0:
        model_path = _chat_sft_warm_start(cfg, model_path=model_path, cache=cache, progress=progress)
    elif cfg.model.path is None and cfg.trainer.sft_steps > 0:
        model_path = _sft_warm_start(cfg, model_path=model_path, train=train, index_dir=index_dir, titles=titles,
                                     cache=cache, progress=progress)
    return PreparedData(model_path=str(model_path), train_items=train, eval_items=eval_,
                        index_dir=str(index_dir) if index_dir else None,
                        corpus_path=str(corpus_path) if corpus_path else None)


def _sft_warm_start(cfg: Any, *, model_path: str, train: list[dict[str, Any]], index_dir: Path | None,
                    titles: dict[str, str], cache: Path, progress: bool) -> str:
    """SFT on demonstrations of the train split (cached): the warm start every RL arm shares."""
    from transformers import AutoTokenizer

    from tepo_ray.trainer.sft import sft_train

    t = cfg.trainer
    out = cache / f"sft-{_key(str(model_path), t.sft_steps, t.sft_lr, t.sft_batch_size, t.seed, cfg.data.task, len(train), DEMO_VERSION)}"
    if (out / "config.json").exists():
        return str(out)
    items = train[: max(256, min(len(train), t.sft_steps * t.sft_batch_size // 4))]
    demos = build_demonstrations(items, cfg=cfg, index_dir=index_dir, titles=titles)
    tok = AutoTokenizer.from_pretrained(model_path)
    examples = [tokenize_pieces(tok, d) for d in demos]
    sft_train(model_path, examples=examples, steps=t.sft_steps, lr=t.sft_lr, batch_size=t.sft_batch_size,
              out_dir=str(out), seed=t.seed, progress=progress)
    return str(out)


def _chat_sft_warm_start(cfg: Any, *, model_path: str, cache: Path, progress: bool) -> str:
    """SFT of any model on the chat-message demonstrations at `data.sft_path` (cached by content and config)."""
    from transformers import AutoTokenizer

    from tepo_ray.agent.prompts import PromptBuilder
    from tepo_ray.trainer.sft import load_chat_demonstrations
    from tepo_ray.trainer.sft_group import run_sft

    t = cfg.trainer
    tok = AutoTokenizer.from_pretrained(str(model_path))
    builder = PromptBuilder.from_config(tok, cfg.prompt)
    sft_sha = hashlib.sha256(Path(cfg.data.sft_path).read_bytes()).hexdigest()[:16]
    key = _key(str(model_path), sft_sha, t.sft_steps, t.sft_lr, t.sft_batch_size, t.seed, builder.mode,
               builder.system_prompt)
    out = cache / f"sft-chat-{key}"
    if (out / "config.json").exists():
        return str(out)
    examples = load_chat_demonstrations(cfg.data.sft_path, builder=builder)
    lr_topo = cfg.topology.learner  # the learner's ranks and devices: FSDP2 when > 1 rank or on GPU
    sharded = int(lr_topo.replicas) > 1 or float(lr_topo.num_gpus) > 0
    run_sft(str(model_path), examples=examples, replicas=int(lr_topo.replicas), num_cpus=float(lr_topo.num_cpus),
            num_gpus=float(lr_topo.num_gpus), steps=t.sft_steps, lr=t.sft_lr, batch_size=t.sft_batch_size,
            out_dir=str(out), seed=t.seed, progress=progress,
            dtype=str(cfg.model.dtype) if sharded else "float32")  # sharded: fp32 masters, compute in model.dtype
    return str(out)
