"""The structured-output benchmark (`benchmarks/structured.py`) on a tiny model: every method's row,
answers equal to plain constrained decoding, and the extraction workload's schema check."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def structured(benchmark_script):
    return benchmark_script("structured")


def test_a_whole_run_on_a_tiny_model(structured, tiny_model_dirs, tmp_path):
    structured.main(["--model", str(tiny_model_dirs["llama"]), "--tasks", "2", "--drafts", "ngram",
                     "--max-tokens", "48", "--batch-repeats", "1", "--out", str(tmp_path), "--name", "run"])
    lines = (tmp_path / "run.md").read_text().splitlines()
    methods = ["constrained", "grammar", "ngram-no-grammar-drafts", "ngram"]
    rows = [line for line in lines if line.startswith(tuple(f"| {m} |" for m in methods))]
    assert len(rows) == len(methods) and all(row.endswith("| 2/2 |") for row in rows)  # lossless
    raw = json.loads((tmp_path / "run.json").read_text())
    by_name = {m["method"]: m for m in raw["methods"]}
    assert by_name["constrained"]["spec_decode"]["grammar_draft_tokens"] == 0
    assert by_name["grammar"]["spec_decode"]["accepted_grammar_tokens"] > 0
    assert by_name["ngram-no-grammar-drafts"]["spec_decode"]["grammar_draft_tokens"] == 0
    assert len({m["valid"] for m in raw["methods"]}) == 1  # equal answers, equal validity
    assert set(raw["batch"]) == {"none", "free", "structured", "structured, no grammar drafts"}
    assert all(r[0] > 0 for r in raw["batch"].values())
    assert "| structured |" in (tmp_path / "run.md").read_text()


def test_the_workload_has_fifty_checkable_tasks(benchmark_script):
    extraction = benchmark_script("extraction")
    work = extraction.tasks()
    assert len(work) == 50 and len({t.paragraph for t in work}) == 50
    person = work[0]
    assert extraction.check(person, '{"name": "Maria Lopez", "age": 34, "city": "Madrid", "employed": true}')
    assert not extraction.check(person, '{"name": "Maria Lopez", "age": 340, "city": "Madrid", "employed": true}')
    assert not extraction.check(person, '{"name": "Maria Lopez"')
    assert "Maria Lopez" in person.messages[0]["content"]
