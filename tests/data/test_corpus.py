"""Synthetic wiki-18 corpus: format, determinism, made-up names, questions that need their hops; jsonl loader."""

from __future__ import annotations

import json
import re

import pytest

from tepo_ray.data.corpus import (CorpusFormatError, World, corpus_fingerprint, generate_corpus,
                                  generate_multihop_questions, generate_single_hop_questions, generate_world,
                                  iter_corpus, iter_corpus_lines, parse_contents, validate_doc, write_corpus)


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(num_docs=2000, seed=7)


def _doc(world: World, doc_id: str) -> dict:
    return world.docs[int(doc_id)]


def test_docs_are_wiki18_records(world: World) -> None:
    assert len(world.docs) == 2000
    for i, d in enumerate(world.docs):
        assert set(d) == {"id", "contents"}
        assert d["id"] == str(i)
        assert validate_doc(d) is None
        first, _, text = d["contents"].partition("\n")
        assert first.startswith('"') and first.endswith('"') and len(first) > 2
        assert text and "\n" not in text


def test_same_seed_same_corpus_other_seed_differs() -> None:
    a = generate_corpus(num_docs=300, seed=1)
    assert a == generate_corpus(num_docs=300, seed=1)
    b = generate_corpus(num_docs=300, seed=2)
    assert {d["contents"] for d in a}.isdisjoint({d["contents"] for d in b})


def test_entity_names_are_unique_made_up_words(world: World) -> None:
    titles = [parse_contents(d["contents"])[0] for d in world.docs]
    assert len(set(titles)) == len(titles)
    # The distinctive (last) word of each title is made of the syllable alphabet only and is not a
    # word used anywhere in the template text of *other* documents' sentences.
    name_words = {t.split()[-1].lower() if not t.endswith(("Industries", "Works", "Company", "Holdings",
                                                           "Manufacturing", "House")) else t.split()[0].lower()
                  for t in titles}
    assert all(re.fullmatch(r"[a-z]+", w) for w in name_words)
    template_words = {"city", "born", "country", "company", "invented", "founded", "engine", "capital"}
    assert not (name_words & template_words)


def test_multihop_questions_need_both_documents(world: World) -> None:
    qs = generate_multihop_questions(world, n=200, seed=3)
    assert len(qs) == 200 and len({q["question"] for q in qs}) == 200
    templates = {q["template"] for q in qs}
    assert len(templates) >= 5
    for q in qs:
        assert set(q) >= {"id", "question", "answers", "task_type", "hops"}
        assert q["task_type"] == "qa" and len(q["hops"]) == 2 and q["hops"][0] != q["hops"][1]
        first, second = _doc(world, q["hops"][0])["contents"], _doc(world, q["hops"][1])["contents"]
        title1 = parse_contents(first)[0]
        title2 = parse_contents(second)[0]
        assert title1 in q["question"]  # hop 1 is found from the question
        assert title2 in first  # hop 1's document names the bridge entity (hop 2's title)
        assert any(a in second for a in q["answers"])  # hop 2 holds the answer
        assert not any(a in first for a in q["answers"])  # ...and hop 1 alone does not


def test_single_hop_answer_in_its_document(world: World) -> None:
    qs = generate_single_hop_questions(world, n=100, seed=3)
    for q in qs:
        assert len(q["hops"]) == 1 and q["task_type"] == "qa"
        assert any(a in _doc(world, q["hops"][0])["contents"] for a in q["answers"])


def test_question_seeds_are_deterministic_and_distinct(world: World) -> None:
    a = generate_multihop_questions(world, n=50, seed=1)
    assert a == generate_multihop_questions(world, n=50, seed=1)
    b = generate_multihop_questions(world, n=50, seed=2)
    assert [q["question"] for q in a] != [q["question"] for q in b]


def test_too_many_questions_fails_clearly() -> None:
    w = generate_world(num_docs=5, seed=0)
    with pytest.raises(ValueError, match="distinct questions"):
        generate_single_hop_questions(w, n=500, seed=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_docs"):
        generate_corpus(num_docs=3, seed=0)
    with pytest.raises(TypeError, match="World"):
        generate_multihop_questions([{"id": "0", "contents": "x"}], n=1, seed=0)  # type: ignore[arg-type]


def test_scales_to_100k_docs() -> None:
    docs = generate_corpus(num_docs=100_000, seed=0)
    assert len(docs) == 100_000
    assert len({parse_contents(d["contents"])[0] for d in docs}) == 100_000


def test_write_then_iter_roundtrip(tmp_path, world: World) -> None:
    path = tmp_path / "c.jsonl"
    assert write_corpus(path, world.docs[:50]) == 50
    assert list(iter_corpus(path)) == world.docs[:50]


def _bad_corpus(tmp_path):
    lines = [
        json.dumps({"id": "a", "contents": '"A"\nfirst'}),
        "{not json",
        json.dumps({"contents": "no id"}),
        "",
        json.dumps({"id": "b", "contents": ["not", "a", "string"]}),
        json.dumps({"id": "a", "contents": '"A2"\nduplicate'}),
        json.dumps({"id": 7, "contents": '"Seven"\nint id'}),
        json.dumps(["a", "list"]),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "x", "contents": "\xff\xfe"}\n')
    return path


def test_iter_corpus_strict_names_file_and_line(tmp_path) -> None:
    path = _bad_corpus(tmp_path)
    with pytest.raises(CorpusFormatError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_corpus(path))


def test_iter_corpus_lenient_skips_bad_lines(tmp_path) -> None:
    docs = list(iter_corpus(_bad_corpus(tmp_path), strict=False))
    assert [d["id"] for d in docs] == ["a", "7"]


def test_iter_corpus_lines_reports_every_problem(tmp_path) -> None:
    errors = {line.line_no: line.error for line in iter_corpus_lines(_bad_corpus(tmp_path)) if line.error}
    assert sorted(errors) == [2, 3, 5, 8, 9]
    assert "invalid JSON" in errors[2]
    assert "missing field 'id'" in errors[3]
    assert "'contents' must be a string" in errors[5]
    assert "JSON object" in errors[8]
    assert "UTF-8" in errors[9]


def test_iter_corpus_lines_resume_from_offset(tmp_path, world: World) -> None:
    path = tmp_path / "c.jsonl"
    write_corpus(path, world.docs[:20])
    lines = list(iter_corpus_lines(path))
    mid = lines[9]
    rest = list(iter_corpus_lines(path, start_offset=mid.end_offset, start_line=mid.line_no))
    assert [x.line_no for x in rest] == list(range(11, 21))
    assert [x.doc for x in rest] == [x.doc for x in lines[10:]]


def test_missing_corpus_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_corpus(tmp_path / "nope.jsonl"))


def test_fingerprint_changes_on_append(tmp_path, world: World) -> None:
    path = tmp_path / "c.jsonl"
    write_corpus(path, world.docs[:10])
    fp = corpus_fingerprint(path)
    assert fp == corpus_fingerprint(path)
    with open(path, "a") as f:
        f.write(json.dumps(world.docs[10]) + "\n")
    assert corpus_fingerprint(path) != fp


def test_parse_contents() -> None:
    assert parse_contents('"Ashkeli"\nAshkeli is a city.\nSecond line.') == ("Ashkeli", "Ashkeli is a city.\nSecond line.")
    assert parse_contents("No quotes\ntext") == ("No quotes", "text")
    assert parse_contents("only title") == ("only title", "")
