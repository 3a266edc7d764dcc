"""Synthetic wiki-18-style corpus of fictional entities, and a streaming wiki-18 loader.

The search tool's embedded task (DESIGN.md section 4) needs questions a model
cannot answer from memory: every entity name here is made of random syllables,
so the only way to know that *Zorvan Keltiru* was born in *Ashkeli* is to
search for it.

The world is a small knowledge graph::

    Country ──capital──► City ◄──born in── Person ◄──founded by── Company
                           ▲                  ▲                      │
                           └── located in ────┼── headquartered in ──┘
                                              └──invented by── Invention

Each entity is one document. A person's document states their birth city and
year but never what they founded or invented; a company's document names its
founder but not where the founder was born. So "In which city was the founder
of Zarkel Industries born?" needs two searches (company doc, then person doc),
and the question records those two doc ids in ``hops``.

Document format is Search-R1's wiki-18 jsonl: one JSON object per line,
``{"id": "17", "contents": "\\"Title\\"\\nText ..."}`` with the quoted title on the
first line of ``contents``.

Everything is deterministic in ``(num_docs, seed)`` (Python's ``random.Random``),
and 100k documents generate in about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

__all__ = [
    "CorpusFormatError",
    "CorpusLine",
    "World",
    "generate_world",
    "generate_corpus",
    "write_corpus",
    "generate_multihop_questions",
    "generate_single_hop_questions",
    "iter_corpus",
    "iter_corpus_lines",
    "parse_contents",
    "validate_doc",
    "corpus_fingerprint",
]


class CorpusFormatError(ValueError):
    """A corpus line is not a valid wiki-18 record; the message names file and line."""


# --------------------------------------------------------------------------- names
_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "th", "sh", "kr", "dr", "br", "gl", "st", "tr", "vr", "zh", "qu", "",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ae", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "k", "m", "x")

_OCCUPATIONS = (
    "chemist", "painter", "architect", "engineer", "astronomer", "merchant", "composer",
    "cartographer", "physician", "novelist", "botanist", "mathematician", "sculptor",
    "shipwright", "geologist", "philosopher",
)
_INDUSTRIES = (
    "shipping", "textile", "mining", "publishing", "brewing", "railway", "optics",
    "clockmaking", "glassworks", "aviation", "pharmaceutical", "banking",
)
_COMPANY_SUFFIXES = ("Industries", "Works", "Company", "Holdings", "Manufacturing", "Trading House")
_DEVICE_KINDS = (
    "mechanical device", "measuring instrument", "optical instrument", "engine",
    "loom", "printing press", "navigation aid", "water pump", "signal lamp",
)
_PURPOSES = (
    "measuring tides", "weaving wool", "grinding grain", "mapping coastlines",
    "purifying water", "sending signals at night", "counting coins", "observing stars",
    "lifting stone", "preserving fruit",
)
_TOPICS = (
    "river trade", "glass lenses", "folk music", "star charts", "bridge design",
    "medicinal herbs", "coastal maps", "clock mechanisms", "dye making", "salt mining",
)
_LANDMARKS = (
    "a covered market", "an old stone bridge", "a lighthouse", "a botanical garden",
    "a clock tower", "a harbour", "a salt marsh", "hot springs", "a cathedral",
)
_GEOGRAPHY = ("mountains", "lakes", "river valleys", "coastal cliffs", "forests", "plains")

# Words used by the templates below: a generated name must never be one of them,
# or BM25 would confuse an entity with template text.
_TEMPLATE_TEXT = " ".join(
    (*_OCCUPATIONS, *_INDUSTRIES, *_COMPANY_SUFFIXES, *_DEVICE_KINDS, *_PURPOSES, *_TOPICS,
     *_LANDMARKS, *_GEOGRAPHY,
     "born was is a an the in of by and from city country capital founded company headquarters "
     "invented inventor population about people known for its their career working on spent "
     "most located largest region notable founder year years used which who what where "
     "during later moved studied lived there other first built this that it has had with "
     "famous trade centre center")
).lower().split()
_RESERVED = frozenset(_TEMPLATE_TEXT)


class _NameMaker:
    """Unique made-up words from random syllables (e.g. ``Thakrim``, ``Vraelos``).

    Every word handed out is unique across the whole world, so an entity's name
    token identifies it (first names, drawn from a shared pool, are the exception).
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _word(self, n_syll: int) -> str:
        r = self.rng
        parts = []
        for i in range(n_syll):
            onset = r.choice(_ONSETS) if i == 0 or r.random() < 0.8 else ""
            parts.append(onset + r.choice(_VOWELS) + (r.choice(_CODAS) if i == n_syll - 1 or r.random() < 0.3 else ""))
        return "".join(parts)

    def make(self, *, min_syll: int = 2, max_syll: int = 3, suffix: str = "") -> str:
        for _ in range(1000):
            w = self._word(self.rng.randint(min_syll, max_syll)) + suffix
            if len(w) >= 5 and w not in self.used and w not in _RESERVED:
                self.used.add(w)
                return w.capitalize()
        raise RuntimeError("name space exhausted; raise max_syll")  # programmer error: cannot happen at 1M names


# --------------------------------------------------------------------------- world
@dataclass
class Country:
    name: str
    capital: int = -1  # index into World.cities
    geography: str = ""
    doc_id: str = ""


@dataclass
class City:
    name: str
    country: int  # index into World.countries
    founded: int
    population: int
    landmark: str
    doc_id: str = ""


@dataclass
class Person:
    first: str
    last: str
    birth_city: int  # index into World.cities
    birth_year: int
    occupation: str
    topic: str
    doc_id: str = ""

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class Company:
    core: str  # the made-up part of the name
    suffix: str
    founder: int  # index into World.people
    hq_city: int
    founded: int
    industry: str
    doc_id: str = ""

    @property
    def name(self) -> str:
        return f"{self.core} {self.suffix}"


@dataclass
class Invention:
    name: str
    inventor: int  # index into World.people
    year: int
    kind: str
    purpose: str
    doc_id: str = ""


@dataclass
class World:
    """The structured facts behind a generated corpus (see the module docstring)."""

    num_docs: int
    seed: int
    countries: list[Country] = field(default_factory=list)
    cities: list[City] = field(default_factory=list)
    people: list[Person] = field(default_factory=list)
    companies: list[Company] = field(default_factory=list)
    inventions: list[Invention] = field(default_factory=list)
    docs: list[dict] = field(default_factory=list)  # wiki-18 records, ``docs[i]["id"] == str(i)``


def _counts(num_docs: int) -> tuple[int, int, int, int, int]:
    """Entities per kind: (countries, cities, people, companies, inventions), each >= 1, summing to num_docs."""
    countries = max(1, num_docs // 100)
    cities = max(1, (num_docs * 15) // 100)
    companies = max(1, (num_docs * 20) // 100)
    inventions = max(1, (num_docs * 15) // 100)
    people = num_docs - countries - cities - companies - inventions
    return countries, cities, people, companies, inventions


def _a(word: str) -> str:
    """Indefinite article + word ("an engine", "a loom")."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _person_text(w: World, p: Person, v: int) -> str:
    city = w.cities[p.birth_city].name
    if v == 0:
        return (f"{p.name} (born {p.birth_year}) is {_a(p.occupation)} born in {city}. "
                f"{p.last} spent most of their career working on {p.topic}.")
    if v == 1:
        return (f"{p.name} was {_a(p.occupation)}. {p.last} was born in {city} in {p.birth_year} "
                f"and is known for work on {p.topic}.")
    return (f"{p.name} is {_a(p.occupation)} known for studies of {p.topic}. "
            f"Born in {p.birth_year} in the city of {city}, {p.last} later moved abroad.")


def _company_text(w: World, c: Company, v: int) -> str:
    founder = w.people[c.founder].name
    hq = w.cities[c.hq_city].name
    if v == 0:
        return (f"{c.name} is {_a(c.industry)} company founded in {c.founded} by {founder}. "
                f"Its headquarters are in {hq}.")
    if v == 1:
        return (f"{c.name} was founded by {founder} in {c.founded}. The {c.industry} company "
                f"is headquartered in {hq}.")
    return (f"Headquartered in {hq}, {c.name} is {_a(c.industry)} company. "
            f"It was founded in {c.founded}; its founder is {founder}.")


def _invention_text(w: World, inv: Invention, v: int) -> str:
    inventor = w.people[inv.inventor].name
    if v == 0:
        return (f"The {inv.name} is {_a(inv.kind)} used for {inv.purpose}. "
                f"It was invented by {inventor} in {inv.year}.")
    return (f"The {inv.name}, {_a(inv.kind)} for {inv.purpose}, was invented in {inv.year}. "
            f"Its inventor is {inventor}.")


def _city_text(w: World, c: City, v: int) -> str:
    country = w.countries[c.country].name
    if v == 0:
        return (f"{c.name} is a city in {country}. It was founded in {c.founded} and has a "
                f"population of about {c.population:,} people. The city is known for {c.landmark}.")
    return (f"{c.name} is located in {country}. Founded in {c.founded}, the city has about "
            f"{c.population:,} people and is famous for {c.landmark}.")


def _country_text(w: World, c: Country, v: int) -> str:
    capital = w.cities[c.capital].name
    return (f"{c.name} is a country whose capital is {capital}. "
            f"The country is known for its {c.geography}.")


def _contents(title: str, text: str) -> str:
    return f'"{title}"\n{text}'


def generate_world(*, num_docs: int, seed: int) -> World:
    """Build a random world with exactly ``num_docs`` entities (one document each).

    Proportions: 1% countries, 15% cities, 20% companies, 15% inventions, the rest
    people (each kind at least one). Documents are shuffled (seeded) and their ids
    are ``"0" .. str(num_docs - 1)`` in file order, like wiki-18.
    """
    if not isinstance(num_docs, int) or num_docs < 5:
        raise ValueError(f"num_docs must be an int >= 5 (one entity of each kind), got {num_docs!r}")
    rng = random.Random(seed)
    names = _NameMaker(rng)
    n_countries, n_cities, n_people, n_companies, n_inventions = _counts(num_docs)
    w = World(num_docs=num_docs, seed=seed)

    for _ in range(n_countries):
        w.countries.append(Country(name=names.make(min_syll=2, max_syll=2, suffix=rng.choice(("ia", "land", "or", "ar"))),
                                   geography=rng.choice(_GEOGRAPHY)))
    for i in range(n_cities):
        country = i if i < n_countries else rng.randrange(n_countries)  # every country gets a city
        w.cities.append(City(name=names.make(), country=country, founded=rng.randint(700, 1700),
                             population=rng.randrange(5_000, 2_000_000, 1_000), landmark=rng.choice(_LANDMARKS)))
    by_country: list[list[int]] = [[] for _ in range(n_countries)]
    for i, c in enumerate(w.cities):
        by_country[c.country].append(i)
    for k, country in enumerate(w.countries):
        country.capital = rng.choice(by_country[k])

    first_pool = [names.make(min_syll=2, max_syll=2) for _ in range(max(8, min(2000, n_people // 10)))]
    for _ in range(n_people):
        w.people.append(Person(first=rng.choice(first_pool), last=names.make(), birth_city=rng.randrange(n_cities),
                               birth_year=rng.randint(1700, 1990), occupation=rng.choice(_OCCUPATIONS),
                               topic=rng.choice(_TOPICS)))
    for _ in range(n_companies):
        founder = rng.randrange(n_people)
        lo = w.people[founder].birth_year + 20
        w.companies.append(Company(core=names.make(), suffix=rng.choice(_COMPANY_SUFFIXES), founder=founder,
                                   hq_city=rng.randrange(n_cities), founded=rng.randint(lo, lo + 40),
                                   industry=rng.choice(_INDUSTRIES)))
    for _ in range(n_inventions):
        inventor = rng.randrange(n_people)
        lo = w.people[inventor].birth_year + 18
        w.inventions.append(Invention(name=names.make(min_syll=2, max_syll=3, suffix=rng.choice(("tron", "scope", "graph", "ine", ""))),
                                      inventor=inventor, year=rng.randint(lo, lo + 50), kind=rng.choice(_DEVICE_KINDS),
                                      purpose=rng.choice(_PURPOSES)))

    entities: list[tuple[object, str, str]] = []  # (entity, title, text)
    for c in w.countries:
        entities.append((c, c.name, _country_text(w, c, 0)))
    for c in w.cities:
        entities.append((c, c.name, _city_text(w, c, rng.randrange(2))))
    for p in w.people:
        entities.append((p, p.name, _person_text(w, p, rng.randrange(3))))
    for c in w.companies:
        entities.append((c, c.name, _company_text(w, c, rng.randrange(3))))
    for inv in w.inventions:
        entities.append((inv, inv.name, _invention_text(w, inv, rng.randrange(2))))
    rng.shuffle(entities)
    for i, (ent, title, text) in enumerate(entities):
        ent.doc_id = str(i)  # type: ignore[attr-defined]
        w.docs.append({"id": str(i), "contents": _contents(title, text)})
    assert len(w.docs) == num_docs
    return w


def generate_corpus(*, num_docs: int, seed: int) -> list[dict]:
    """``num_docs`` wiki-18 records ``{"id", "contents"}`` of a fictional world (see `generate_world`)."""
    return generate_world(num_docs=num_docs, seed=seed).docs


def write_corpus(path: str | os.PathLike, docs: Iterable[dict]) -> int:
    """Write records as jsonl (atomically: temp file + rename). Returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False))
            f.write("\n")
            n += 1
    os.replace(tmp, path)
    return n


# --------------------------------------------------------------------------- questions
def _person_answers(p: Person) -> list[str]:
    return [p.name, p.last]


def _multihop(w: World, rng: random.Random) -> dict:
    """One random two-hop question: ``hops`` lists the doc ids in the order they must be found."""
    kind = rng.randrange(6)
    if kind == 0:
        c = rng.choice(w.companies); p = w.people[c.founder]
        return dict(question=f"In which city was the founder of {c.name} born?",
                    answers=[w.cities[p.birth_city].name], hops=[c.doc_id, p.doc_id], template="company_founder_birth_city")
    if kind == 1:
        c = rng.choice(w.companies); p = w.people[c.founder]
        return dict(question=f"In what year was the founder of {c.name} born?",
                    answers=[str(p.birth_year)], hops=[c.doc_id, p.doc_id], template="company_founder_birth_year")
    if kind == 2:
        inv = rng.choice(w.inventions); p = w.people[inv.inventor]
        return dict(question=f"In which city was the inventor of the {inv.name} born?",
                    answers=[w.cities[p.birth_city].name], hops=[inv.doc_id, p.doc_id], template="inventor_birth_city")
    if kind == 3:
        inv = rng.choice(w.inventions); p = w.people[inv.inventor]
        return dict(question=f"What was the occupation of the inventor of the {inv.name}?",
                    answers=[p.occupation], hops=[inv.doc_id, p.doc_id], template="inventor_occupation")
    if kind == 4:
        p = rng.choice(w.people); city = w.cities[p.birth_city]
        return dict(question=f"In which country was {p.name} born?",
                    answers=[w.countries[city.country].name], hops=[p.doc_id, city.doc_id], template="person_birth_country")
    c = rng.choice(w.companies); city = w.cities[c.hq_city]
    return dict(question=f"In which country is {c.name} headquartered?",
                answers=[w.countries[city.country].name], hops=[c.doc_id, city.doc_id], template="company_hq_country")


def _single_hop(w: World, rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        p = rng.choice(w.people)
        return dict(question=f"In which city was {p.name} born?", answers=[w.cities[p.birth_city].name],
                    hops=[p.doc_id], template="person_birth_city")
    if kind == 1:
        c = rng.choice(w.companies)
        return dict(question=f"Who founded {c.name}?", answers=_person_answers(w.people[c.founder]),
                    hops=[c.doc_id], template="company_founder")
    if kind == 2:
        inv = rng.choice(w.inventions)
        return dict(question=f"Who invented the {inv.name}?", answers=_person_answers(w.people[inv.inventor]),
                    hops=[inv.doc_id], template="inventor")
    if kind == 3:
        c = rng.choice(w.cities)
        return dict(question=f"In which country is the city of {c.name}?", answers=[w.countries[c.country].name],
                    hops=[c.doc_id], template="city_country")
    if kind == 4:
        c = rng.choice(w.companies)
        return dict(question=f"In what year was {c.name} founded?", answers=[str(c.founded)],
                    hops=[c.doc_id], template="company_founded_year")
    c = rng.choice(w.countries)
    return dict(question=f"What is the capital of {c.name}?", answers=[w.cities[c.capital].name],
                hops=[c.doc_id], template="country_capital")


def _questions(world: World, *, n: int, seed: int, make, prefix: str) -> list[dict]:
    if not isinstance(world, World):
        raise TypeError(f"expected a World from generate_world(...), got {type(world).__name__}; "
                        "regenerate it with the corpus's (num_docs, seed)")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{prefix}:{world.seed}:{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    for _ in range(50 * n + 100):
        if len(out) == n:
            break
        q = make(world, rng)
        if q["question"] in seen:
            continue
        if len(q["hops"]) > 1 and any(a in world.docs[int(q["hops"][0])]["contents"] for a in q["answers"]):
            continue  # the first document would already give the answer away: not a real two-hop question
        seen.add(q["question"])
        qid = f"{prefix}-{seed}-{len(out)}"
        out.append({"id": qid, "question": q["question"], "answers": q["answers"], "task_type": "qa",
                    "hops": q["hops"], "template": q["template"]})
    if len(out) < n:
        raise ValueError(f"the world has only {len(out)} distinct questions of this kind, {n} requested; "
                         "generate a larger corpus")
    return out


def generate_multihop_questions(world: World, *, n: int, seed: int) -> list[dict]:
    """``n`` distinct two-hop questions over ``world``.

    Each is ``{"id", "question", "answers": [aliases], "task_type": "qa", "hops": [doc_id_1, doc_id_2],
    "template"}``; ``hops[0]`` holds the entity named in the question, ``hops[1]`` the fact asked for.
    Different ``seed`` values give different (possibly overlapping) question sets; use disjoint
    seeds for train/eval splits and de-duplicate by ``question`` if overlap matters.
    """
    return _questions(world, n=n, seed=seed, make=_multihop, prefix="mh")


def generate_single_hop_questions(world: World, *, n: int, seed: int) -> list[dict]:
    """``n`` distinct one-hop questions (same record layout, ``hops`` has one doc id)."""
    return _questions(world, n=n, seed=seed, make=_single_hop, prefix="sh")


# --------------------------------------------------------------------------- loading
def parse_contents(contents: str) -> tuple[str, str]:
    """Split wiki-18 ``contents`` into (title, text): first line, surrounding quotes removed; the rest.

    >>> parse_contents('"Ashkeli"\\nAshkeli is a city.')
    ('Ashkeli', 'Ashkeli is a city.')
    """
    title, _, text = contents.partition("\n")
    title = title.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    return title, text


def validate_doc(obj: object) -> str | None:
    """None if ``obj`` is a valid wiki-18 record, else the reason (what was expected)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "id" not in obj:
        return "missing field 'id'"
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        return f"field 'id' must be a string, got {type(obj['id']).__name__}"
    if "contents" not in obj:
        return "missing field 'contents'"
    if not isinstance(obj["contents"], str):
        return f"field 'contents' must be a string, got {type(obj['contents']).__name__}"
    if str(obj["id"]) == "":
        return "field 'id' is empty"
    return None


@dataclass(frozen=True)
class CorpusLine:
    """One physical line of a jsonl corpus.

    ``line_no`` is 1-based; ``end_offset`` is the byte offset just past the line (a
    resume point). Exactly one of ``doc`` (normalised: ``id`` is a str) and ``error`` is set,
    except for blank lines, which have neither.
    """

    line_no: int
    end_offset: int
    doc: dict | None
    error: str | None


def iter_corpus_lines(path: str | os.PathLike, *, start_offset: int = 0, start_line: int = 0) -> Iterator[CorpusLine]:
    """Stream a jsonl corpus from byte ``start_offset`` (line number ``start_line`` already read).

    Never raises on a bad line: it is yielded with ``error`` set (invalid UTF-8, invalid JSON,
    missing/ill-typed ``id`` or ``contents``). Duplicate ids are not checked here (see `iter_corpus`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    offset, line_no = start_offset, start_line
    with open(path, "rb") as f:
        f.seek(start_offset)
        for raw in f:
            offset += len(raw)
            line_no += 1
            stripped = raw.strip()
            if not stripped:
                yield CorpusLine(line_no, offset, None, None)
                continue
            try:
                obj = json.loads(stripped.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield CorpusLine(line_no, offset, None, f"invalid UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield CorpusLine(line_no, offset, None, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            reason = validate_doc(obj)
            if reason is not None:
                yield CorpusLine(line_no, offset, None, reason)
                continue
            obj["id"] = str(obj["id"])
            yield CorpusLine(line_no, offset, obj, None)


def iter_corpus(path: str | os.PathLike, *, strict: bool = True, check_duplicates: bool = True) -> Iterator[dict]:
    """Stream validated wiki-18 records ``{"id": str, "contents": str, ...}`` from a jsonl file.

    With ``strict`` a bad line raises `CorpusFormatError` naming ``path:line`` and what was
    expected; otherwise bad lines are skipped. Blank lines are always skipped. Duplicate ids
    are bad lines when ``check_duplicates`` (costs a set of all ids in memory).
    """
    seen: set[str] = set()
    for line in iter_corpus_lines(path):
        error = line.error
        if line.doc is not None and check_duplicates:
            if line.doc["id"] in seen:
                error = f"duplicate id {line.doc['id']!r}"
            else:
                seen.add(line.doc["id"])
        if error is not None:
            if strict:
                raise CorpusFormatError(f"{path}:{line.line_no}: {error}; expected one JSON object per line "
                                        'with string fields "id" and "contents"')
            continue
        if line.doc is not None:
            yield line.doc


def corpus_fingerprint(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Cheap identity of a corpus file: size + sha256 of its first and last MiB.

    Reads at most 2 MiB, so it is instant on the 14 GB wiki-18 file; it detects any
    append, truncation or edit near either end (not an edit in the middle).
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return f"size={size};sha256={h.hexdigest()[:32]}"

