"""Loaders for public QA and math data sets in their published file formats, by name.

Every loader reads a local file (nothing is downloaded) and returns task items in
the one shape the rollout uses (`tepo_ray.data.tasks`)::

    {"id": str, "question": str, "answers": [str, ...], "task_type": "qa" | "math"}

| name | file | fields read |
|---|---|---|
| `hotpotqa` | JSON array (distractor / fullwiki) | `_id`, `question`, `answer` |
| `2wikimultihopqa` | JSON array | `_id`, `question`, `answer` |
| `musique` | jsonl | `id`, `question`, `answer`, `answer_aliases`; `answerable: false` skipped, counted |
| `bamboogle` | csv or jsonl | `Question`, `Answer` |
| `aime` | jsonl or parquet | `problem`, integer `answer` (also `Problem` / `Answer`, `id` / `ID`) |
| `math500` | jsonl | `problem`, `answer`, `unique_id` |
| `gsm8k` | jsonl | `question`, `answer` (gold after `####`) |
| `gaia` | `metadata.jsonl` | `task_id`, `Question`, `Final answer`, `file_name` (items with an attachment, or the test split's hidden `?` answers, skipped and counted) |
| `tasks` | jsonl | this project's own format (`question`, `answers`, `task_type`) |
| `jsonl` | jsonl | any fields, mapped by `data.jsonl_fields` (`question`, `answers`, `id`, `task_type`) |

A file is read whole before any item is returned: a bad line, a missing or
mistyped field raises `DatasetError` naming the file, the line (or array index /
csv row) and the field, so a run never starts on a half-read file. Skipped items
(unanswerable, with attachments) are counted in `LoadResult.skipped`, never
dropped silently. A new format is a function registered with `register_loader`.
"""

from __future__ import annotations

import csv
import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from tepo_ray.data.tasks import TaskError

__all__ = [
    "DatasetError",
    "LoaderName",
    "LoadResult",
    "register_loader",
    "get_loader",
    "loader_names",
    "load_dataset",
]


class DatasetError(TaskError):
    """A data file cannot be read as its format; the message names file, line and field."""


class LoaderName(str, enum.Enum):
    HOTPOTQA = "hotpotqa"
    TWOWIKI = "2wikimultihopqa"
    MUSIQUE = "musique"
    BAMBOOGLE = "bamboogle"
    AIME = "aime"
    MATH500 = "math500"
    GSM8K = "gsm8k"
    GAIA = "gaia"
    TASKS = "tasks"
    JSONL = "jsonl"


@dataclass
class LoadResult:
    """Items of one file, and how many records were skipped and why."""

    path: str
    items: list[dict[str, Any]]
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


Loader = Callable[..., LoadResult]
_LOADERS: dict[str, Loader] = {}


def register_loader(name: str | LoaderName) -> Callable[[Loader], Loader]:
    """Decorator: register `fn(path: Path, *, fields: Mapping | None) -> LoadResult` under `name`."""
    key = name.value if isinstance(name, LoaderName) else str(name)

    def deco(fn: Loader) -> Loader:
        if key in _LOADERS and _LOADERS[key] is not fn:
            raise ValueError(f"data loader {key!r} is already registered")
        _LOADERS[key] = fn
        return fn

    return deco


def get_loader(name: str | LoaderName) -> Loader:
    key = name.value if isinstance(name, LoaderName) else str(name)
    try:
        return _LOADERS[key]
    except KeyError:
        raise DatasetError(f"unknown data set format {key!r}; valid names: {sorted(_LOADERS)}") from None


def loader_names() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(name: str | LoaderName, path: str | Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """Read `path` with the loader registered as `name`; raises DatasetError on any bad record."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{path}: data file not found (format {name})")
    result = get_loader(name)(p, fields=fields)
    if not result.items:
        raise DatasetError(f"{path}: no usable items (format {name}; skipped: {result.skipped or 'none'})")
    return result


# --------------------------------------------------------------------------- readers
def iter_jsonl_objects(path: Path, *, error: type[Exception] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", object) per non-empty line; a line that is not a JSON object raises `error`
    (default `DatasetError`) naming file:line. Shared by the data-set loaders and SFT's chat jsonl."""
    error = error or DatasetError
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _json_array(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                           f"expected one JSON array of records (a truncated download?)") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, obj in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def _csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DatasetError(f"{where}: more cells than the header has columns {reader.fieldnames}")
            yield where, row


def _parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install 'tepo-ray[data]')") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"{path}: cannot read parquet ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(rows):
        yield f"{path}: row {i}", row


def _records(path: Path, *, allowed: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    kinds = {".jsonl": iter_jsonl_objects, ".json": _json_array, ".csv": _csv, ".parquet": _parquet}
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise DatasetError(f"{path}: file type {suffix or '(none)'} not supported here; expected {'|'.join(allowed)}")
    return kinds[suffix](path)


def _field(where: str, obj: Mapping[str, Any], *names: str, kind: type | tuple[type, ...] = str,
           required: bool = True) -> Any:
    """The first of `names` present in `obj`, type-checked; a missing/mistyped field raises naming it."""
    for name in names:
        if name in obj and obj[name] is not None:
            value = obj[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise DatasetError(f"{where}: field '{name}' must be {want}, got {type(value).__name__} {value!r:.60}")
            if isinstance(value, str) and required and not value.strip():
                raise DatasetError(f"{where}: field '{name}' is empty")
            return value
    if required:
        raise DatasetError(f"{where}: missing field '{names[0]}'"
                           + (f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""))
    return None


def _item(id_: Any, question: str, answers: list[str], task_type: str) -> dict[str, Any]:
    return {"id": str(id_), "question": question.strip(), "answers": [a.strip() for a in answers],
            "task_type": task_type}


# --------------------------------------------------------------------------- formats
def _multihop_array(path: Path) -> LoadResult:
    res = LoadResult(str(path), [])
    for where, obj in _records(path, allowed=(".json",)):
        res.items.append(_item(_field(where, obj, "_id", "id"), _field(where, obj, "question"),
                               [_field(where, obj, "answer")], "qa"))
    return res


@register_loader(LoaderName.HOTPOTQA)
def load_hotpotqa(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """HotpotQA distractor / fullwiki JSON array (`_id`, `question`, `answer`, context ignored)."""
    return _multihop_array(path)


@register_loader(LoaderName.TWOWIKI)
def load_2wikimultihopqa(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """2WikiMultihopQA JSON array, HotpotQA-shaped (`_id`, `question`, `answer`)."""
    return _multihop_array(path)


@register_loader(LoaderName.MUSIQUE)
def load_musique(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """MuSiQue jsonl; gold = `answer` + `answer_aliases`; `answerable: false` items skipped and counted."""
    res = LoadResult(str(path), [])
    for where, obj in _records(path, allowed=(".jsonl",)):
        answerable = obj.get("answerable", True)
        if not isinstance(answerable, bool):
            raise DatasetError(f"{where}: field 'answerable' must be true or false, got {answerable!r}")
        if not answerable:
            res.skip("unanswerable")
            continue
        aliases = _field(where, obj, "answer_aliases", kind=list, required=False) or []
        if not all(isinstance(a, str) for a in aliases):
            raise DatasetError(f"{where}: field 'answer_aliases' must be a list of strings")
        answers = [_field(where, obj, "answer")] + [a for a in aliases if a.strip()]
        res.items.append(_item(_field(where, obj, "id"), _field(where, obj, "question"),
                               list(dict.fromkeys(answers)), "qa"))
    return res


@register_loader(LoaderName.BAMBOOGLE)
def load_bamboogle(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """Bamboogle csv or jsonl (`Question`, `Answer`); ids are `bamboogle-<n>`."""
    res = LoadResult(str(path), [])
    for n, (where, obj) in enumerate(_records(path, allowed=(".csv", ".jsonl"))):
        res.items.append(_item(f"bamboogle-{n}", _field(where, obj, "Question", "question"),
                               [_field(where, obj, "Answer", "answer")], "qa"))
    return res


def _integer_answer(where: str, obj: Mapping[str, Any]) -> str:
    value = _field(where, obj, "answer", "Answer", kind=(int, str))
    text = str(value).strip()
    if not re.fullmatch(r"-?\d+", text):
        raise DatasetError(f"{where}: field 'answer' must be an integer, got {value!r}")
    return str(int(text))


@register_loader(LoaderName.AIME)
def load_aime(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """AIME 2024 / 2025 jsonl or parquet: `problem` (or `Problem`) and an integer `answer` (or `Answer`)."""
    res = LoadResult(str(path), [])
    for n, (where, obj) in enumerate(_records(path, allowed=(".jsonl", ".parquet"))):
        id_ = _field(where, obj, "id", "ID", kind=(str, int), required=False)
        res.items.append(_item(id_ if id_ is not None else f"aime-{n}", _field(where, obj, "problem", "Problem"),
                               [_integer_answer(where, obj)], "math"))
    return res


@register_loader(LoaderName.MATH500)
def load_math500(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """MATH-500 jsonl (`problem`, `answer` as LaTeX, `unique_id`)."""
    res = LoadResult(str(path), [])
    for n, (where, obj) in enumerate(_records(path, allowed=(".jsonl",))):
        id_ = _field(where, obj, "unique_id", "id", required=False)
        res.items.append(_item(id_ or f"math500-{n}", _field(where, obj, "problem"), [_field(where, obj, "answer")],
                               "math"))
    return res


@register_loader(LoaderName.GSM8K)
def load_gsm8k(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """GSM8K jsonl: the gold answer is what follows `####` in `answer` (thousands commas removed)."""
    res = LoadResult(str(path), [])
    for n, (where, obj) in enumerate(_records(path, allowed=(".jsonl",))):
        solution = _field(where, obj, "answer")
        if "####" not in solution:
            raise DatasetError(f"{where}: field 'answer' has no '#### <gold>' line")
        gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if not gold:
            raise DatasetError(f"{where}: field 'answer' has nothing after '####'")
        res.items.append(_item(f"gsm8k-{n}", _field(where, obj, "question"), [gold], "math"))
    return res


@register_loader(LoaderName.GAIA)
def load_gaia(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """GAIA `metadata.jsonl`, text-only: items with an attachment (`file_name`) are skipped and counted."""
    res = LoadResult(str(path), [])
    for where, obj in _records(path, allowed=(".jsonl",)):
        if _field(where, obj, "file_name", required=False):
            res.skip("has_attachment")
            continue
        answer = _field(where, obj, "Final answer")
        if answer.strip() == "?":  # the test split hides its answers
            res.skip("answer_hidden")
            continue
        res.items.append(_item(_field(where, obj, "task_id"), _field(where, obj, "Question"), [answer], "qa"))
    return res


@register_loader(LoaderName.TASKS)
def load_tasks(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """This project's jsonl (`question`, `answers` or `answer`, optional `id`, `task_type`)."""
    from tepo_ray.data.tasks import load_jsonl_items

    try:
        return LoadResult(str(path), load_jsonl_items(path))
    except TaskError as exc:
        raise DatasetError(str(exc)) from None


def _get(obj: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


@register_loader(LoaderName.JSONL)
def load_mapped_jsonl(path: Path, *, fields: Mapping[str, Any] | None = None) -> LoadResult:
    """Any jsonl, fields named by `fields` (`data.jsonl_fields`): `question`, `answers` (a string or a list
    of strings; dotted paths reach nested fields), optional `id`, and the `task_type` of every item."""
    f = dict(fields or {})
    q_key, a_key, id_key = f.get("question", "question"), f.get("answers", "answers"), f.get("id")
    task_type = f.get("task_type", "qa")
    if task_type not in ("qa", "math"):
        raise DatasetError(f"data.jsonl_fields.task_type={task_type!r}; expected qa or math")
    res = LoadResult(str(path), [])
    for n, (where, obj) in enumerate(_records(path, allowed=(".jsonl",))):
        q = _get(obj, q_key)
        if not isinstance(q, str) or not q.strip():
            raise DatasetError(f"{where}: field '{q_key}' (data.jsonl_fields.question) must be a non-empty string")
        a = _get(obj, a_key)
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        answers = [a] if isinstance(a, str) else a
        if not isinstance(answers, list) or not answers or not all(isinstance(x, str) and x.strip() for x in answers):
            raise DatasetError(f"{where}: field '{a_key}' (data.jsonl_fields.answers) must be a non-empty string "
                               f"or list of strings, got {a!r:.60}")
        id_ = _get(obj, id_key) if id_key else None
        res.items.append(_item(id_ if id_ is not None else f"{path.stem}-{n}", q, answers, task_type))
    return res
