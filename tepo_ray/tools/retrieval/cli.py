"""``tepo-ray index ...``: build and query search indexes from the command line.

    tepo-ray index synth corpus.jsonl --docs 10000 --seed 0      # fictional-entity corpus
    tepo-ray index build corpus.jsonl --out runs/index [--backend bm25|chroma|faiss] [--batch-size N]
    tepo-ray index build wiki-18.jsonl --out runs/e5 --backend faiss --index-type HNSW --embedding-model DIR
    tepo-ray index import-faiss e5_Flat.index wiki-18.jsonl --out DIR --embedding-model e5-base-v2-DIR
    tepo-ray index query runs/index "founder of Zarkel Industries" --top-k 3

Mounted by the main CLI as the ``index`` group; ``python -m tepo_ray.tools.retrieval.cli`` runs it alone.
User errors (missing corpus, wrong directory, unknown backend) print one line and exit with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tepo_ray.tools.retrieval.base import IndexBuildError, IndexNotFoundError, format_hits, open_retriever
from tepo_ray.tools.retrieval.build import DEFAULT_BATCH_SIZE, build_index

__all__ = ["index_app"]

index_app = typer.Typer(help="Build and query search indexes over wiki-18-format jsonl corpora.",
                        no_args_is_help=True, add_completion=False)
_err = Console(stderr=True, soft_wrap=True)
_USER_ERRORS = (FileNotFoundError, IndexBuildError, IndexNotFoundError, ValueError, ModuleNotFoundError)


def _fail(e: BaseException) -> None:
    _err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
    raise typer.Exit(code=2)


@index_app.command("build")
def build_cmd(
    corpus: Path = typer.Argument(..., help="wiki-18 jsonl corpus: one {\"id\", \"contents\"} object per line"),
    out: Path = typer.Option(..., "--out", "-o", help="index directory (created; a partial build here is resumed)"),
    backend: str = typer.Option("bm25", "--backend", "-b", help="bm25 | chroma | faiss"),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="corpus lines per committed batch"),
    embedding_model: Optional[Path] = typer.Option(None, "--embedding-model",
                                                   help="chroma: local sentence-transformers dir "
                                                        "(default: the packaged all-MiniLM-L6-v2)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    shard_docs: Optional[int] = typer.Option(None, "--shard-docs", min=1,
                                             help="bm25: passages per build shard (memory ~ shard size)"),
    index_type: Optional[str] = typer.Option(None, "--index-type", help="faiss: Flat | HNSW | IVF-PQ"),
    device: Optional[str] = typer.Option(None, "--device", help="faiss: encoder device (cpu, cuda, cuda:N)"),
) -> None:
    """Build, resume or top up an index (re-running never adds a document twice)."""
    options = {k: v for k, v in (("shard_docs", shard_docs), ("index_type", index_type), ("device", device))
               if v is not None}
    try:
        report = build_index(corpus, out, backend=backend, batch_size=batch_size, progress=progress,
                             embedding_model=embedding_model, writer_options=options)
    except _USER_ERRORS as e:
        _fail(e)
    console = Console(soft_wrap=True)
    console.print(report.summary(), highlight=False)
    if report.bad_lines:
        table = Table(title=f"bad lines (skipped): {report.bad_lines_total}"
                            + (f", first {len(report.bad_lines)} shown" if report.bad_lines_total > len(report.bad_lines) else ""))
        table.add_column("line", justify="right")
        table.add_column("problem")
        for b in report.bad_lines:
            table.add_row(str(b.line_no), b.reason)
        console.print(table)


@index_app.command("import-faiss")
def import_faiss_cmd(
    index_file: Path = typer.Argument(..., help="a prebuilt faiss index, e.g. Search-R1's e5_Flat.index"),
    corpus: Path = typer.Argument(..., help="its passages, same order: wiki-18.jsonl"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the manifest and line offsets"),
    embedding_model: Optional[Path] = typer.Option(None, "--embedding-model",
                                                   help="local sentence-transformers dir of the index's encoder"),
    query_prefix: Optional[str] = typer.Option(None, "--query-prefix", help='default: "query: " for e5 models'),
) -> None:
    """Serve a prebuilt dense index without re-embedding (one pass over the corpus for line offsets)."""
    from tepo_ray.tools.retrieval.dense_faiss import import_prebuilt

    try:
        m = import_prebuilt(index_file, corpus, out, embedding_model=embedding_model, query_prefix=query_prefix)
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(f"{out}: {m['num_docs']} passages, {m['index_type']} index, encoder {m['embedding_model']}")


@index_app.command("query")
def query_cmd(
    index_dir: Path = typer.Argument(..., help="a directory made by `index build`"),
    question: str = typer.Argument(..., help="the search query"),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1),
    max_chars: int = typer.Option(300, "--max-chars", min=4, help="characters of text per doc"),
    as_json: bool = typer.Option(False, "--json", help="print hits as a JSON list instead of the observation text"),
) -> None:
    """Search an index and print what the model would see (or the raw hits with --json)."""
    try:
        with open_retriever(index_dir) as r:
            hits = r.search([question], top_k=top_k)[0]
    except _USER_ERRORS as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps([{"doc_id": h.doc_id, "title": h.title, "text": h.text, "score": h.score}
                               for h in hits], ensure_ascii=False))
    else:
        typer.echo(format_hits(hits, max_chars=max_chars))


@index_app.command("synth")
def synth_cmd(
    out: Path = typer.Argument(..., help="jsonl file to write"),
    docs: int = typer.Option(10_000, "--docs", min=5, help="number of documents (one per entity)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a synthetic corpus of fictional entities in the wiki-18 format."""
    from tepo_ray.data.corpus import generate_corpus, write_corpus

    n = write_corpus(out, generate_corpus(num_docs=docs, seed=seed))
    typer.echo(f"wrote {n} docs to {out}")


if __name__ == "__main__":
    index_app()
