"""Data-set loaders on small fixtures written in each public format; bad input names file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tepo_ray.data.loaders import DatasetError, LoaderName, load_dataset, loader_names

FIX = Path(__file__).parent / "fixtures"


def _check_shape(items):
    for it in items:
        assert set(it) == {"id", "question", "answers", "task_type"}
        assert isinstance(it["id"], str) and it["question"] and it["answers"]
        assert all(isinstance(a, str) and a for a in it["answers"])


def test_every_built_in_name_is_registered():
    assert sorted(n.value for n in LoaderName) == loader_names()
    with pytest.raises(DatasetError, match="valid names: .*hotpotqa"):
        load_dataset("squad", FIX / "bamboogle.csv")


def test_hotpotqa_and_2wiki_arrays():
    res = load_dataset("hotpotqa", FIX / "hotpotqa_dev_distractor.json")
    _check_shape(res.items)
    assert [it["id"] for it in res.items] == ["5a8b57f25542995d1e6f1371", "5a8c7595554299585d9e36b6"]
    assert res.items[1]["answers"] == ["Chief of Protocol"] and res.items[0]["task_type"] == "qa"
    two = load_dataset("2wikimultihopqa", FIX / "2wikimultihopqa_dev.json")
    assert two.items[1]["answers"] == ["Małgorzata Braunek"] and two.items[0]["id"].startswith("13f5ad2c")


def test_musique_keeps_aliases_and_counts_unanswerable():
    res = load_dataset("musique", FIX / "musique_ans_v1.0_dev.jsonl")
    _check_shape(res.items)
    assert [it["id"] for it in res.items] == ["2hop__460946_294723", "3hop1__9285_5188_23307"]
    assert res.items[0]["answers"] == ["Miquette Giraudy", "Miquette"]
    assert res.skipped == {"unanswerable": 1}


@pytest.mark.parametrize("name", ["bamboogle.csv", "bamboogle.jsonl"])
def test_bamboogle_csv_and_jsonl(name):
    res = load_dataset("bamboogle", FIX / name)
    _check_shape(res.items)
    assert res.items[0]["answers"] == ["james madison"]
    assert res.items[0]["question"].startswith("Who was president")


def test_aime_jsonl_and_parquet():
    a24 = load_dataset("aime", FIX / "aime_2024.jsonl")
    assert [it["answers"] for it in a24.items] == [["204"], ["25"]] and a24.items[0]["id"] == "2024-I-1"
    assert all(it["task_type"] == "math" for it in a24.items)
    pytest.importorskip("pyarrow")
    a25 = load_dataset("aime", FIX / "aime_2025.parquet")
    _check_shape(a25.items)
    assert [it["answers"] for it in a25.items] == [["70"], ["588"]] and a25.items[1]["id"] == "2025-I-2"


def test_math500_and_gsm8k():
    m = load_dataset("math500", FIX / "math500_test.jsonl")
    assert m.items[0]["answers"] == ["\\left( 3, \\frac{\\pi}{2} \\right)"]
    assert m.items[1]["id"] == "test/algebra/2592.json" and m.items[1]["task_type"] == "math"
    g = load_dataset("gsm8k", FIX / "gsm8k_test.jsonl")
    assert [it["answers"] for it in g.items] == [["18"], ["3"], ["70000"]]


def test_gaia_skips_and_counts_items_with_attachments_or_hidden_answers():
    res = load_dataset("gaia", FIX / "gaia_metadata.jsonl")
    assert [it["answers"] for it in res.items] == [["egalitarian"], ["3"]]
    assert res.items[0]["id"] == "c61d22de-5f6c-4958-a7f6-5e9707bd3466"
    assert res.skipped == {"has_attachment": 1, "answer_hidden": 1}


def test_jsonl_with_a_field_mapping():
    fields = {"question": "input.text", "answers": "target", "id": "qid", "task_type": "math"}
    res = load_dataset("jsonl", FIX / "custom_mapped.jsonl", fields=fields)
    assert [(it["id"], it["question"], it["answers"]) for it in res.items] == [
        ("7", "What is 6 * 7?", ["42"]), ("8", "Capital of France?", ["Paris", "paris"])]
    with pytest.raises(DatasetError, match=r"custom_mapped.jsonl:1: field 'prompt' \(data.jsonl_fields.question\)"):
        load_dataset("jsonl", FIX / "custom_mapped.jsonl", fields={"question": "prompt"})


# --------------------------------------------------------------------------- bad input
def _copy_with(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_truncated_jsonl_names_file_and_line(tmp_path):
    good = (FIX / "musique_ans_v1.0_dev.jsonl").read_text().splitlines()
    p = _copy_with(tmp_path, "m.jsonl", [good[0], good[2][:40]])  # a download cut mid-line
    with pytest.raises(DatasetError, match=r"m.jsonl:2: invalid JSON"):
        load_dataset("musique", p)


def test_missing_field_names_file_line_and_field(tmp_path):
    rec = json.loads((FIX / "gsm8k_test.jsonl").read_text().splitlines()[0])
    del rec["question"]
    p = _copy_with(tmp_path, "g.jsonl", [json.dumps({"question": "q", "answer": "#### 1"}), json.dumps(rec)])
    with pytest.raises(DatasetError, match=r"g.jsonl:2: missing field 'question'"):
        load_dataset("gsm8k", p)


def test_aime_answer_must_be_an_integer(tmp_path):
    p = _copy_with(tmp_path, "a.jsonl", [json.dumps({"problem": "p", "answer": "3/4"})])
    with pytest.raises(DatasetError, match=r"a.jsonl:1: field 'answer' must be an integer"):
        load_dataset("aime", p)


def test_truncated_json_array_names_the_file_and_line(tmp_path):
    text = (FIX / "hotpotqa_dev_distractor.json").read_text()
    p = tmp_path / "h.json"
    p.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"h.json:\d+: invalid JSON .*truncated"):
        load_dataset("hotpotqa", p)


def test_hotpot_record_without_answer_names_its_index(tmp_path):
    recs = json.loads((FIX / "hotpotqa_dev_distractor.json").read_text())
    del recs[1]["answer"]
    p = tmp_path / "h.json"
    p.write_text(json.dumps(recs))
    with pytest.raises(DatasetError, match=r"h.json: record 1: missing field 'answer'"):
        load_dataset("hotpotqa", p)


def test_csv_row_with_missing_answer(tmp_path):
    p = _copy_with(tmp_path, "b.csv", ["Question,Answer", "q1,a1", "q2,"])
    with pytest.raises(DatasetError, match=r"b.csv:3: field 'Answer' is empty"):
        load_dataset("bamboogle", p)


def test_wrong_file_type_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=r"file type .jsonl not supported here; expected .json"):
        load_dataset("hotpotqa", FIX / "musique_ans_v1.0_dev.jsonl")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("gsm8k", tmp_path / "nope.jsonl")


def test_a_file_with_only_skipped_items_is_an_error(tmp_path):
    p = _copy_with(tmp_path, "m.jsonl", [json.dumps({"id": "x", "question": "q", "answer": "a",
                                                     "answerable": False})])
    with pytest.raises(DatasetError, match=r"no usable items .*unanswerable"):
        load_dataset("musique", p)


def test_config_selects_the_loader_for_task_jsonl():
    from tepo_ray.config import ConfigError, load_config
    from tepo_ray.data.tasks import make_items

    cfg = load_config([], ["data.task=jsonl", "data.format=musique",
                           f"data.train_path={FIX / 'musique_ans_v1.0_dev.jsonl'}"])
    d = cfg.data
    items = make_items(task=d.task, n=10, seed=0, path=d.train_path, format=d.format, fields=d.jsonl_fields)
    assert [it["answers"][0] for it in items] == ["Miquette Giraudy", "mid-June"]
    with pytest.raises(ConfigError, match=r"data.format='squad' is invalid; expected .*hotpotqa"):
        load_config([], ["data.format=squad"])
    with pytest.raises(ConfigError, match=r"data.jsonl_fields.task_type"):
        load_config([], ["data.jsonl_fields.task_type=code"])
