"""LongBench metrics, prompts and the fixture format."""

from __future__ import annotations

import json

import pytest

from polartensor.eval import longbench as lb


def test_metrics_match_longbench_definitions():
    assert lb.qa_f1_score("The Eiffel Tower", "eiffel tower") == 1.0
    assert lb.qa_f1_score("Paris France", "Paris") == pytest.approx(2 / 3)
    assert lb.rouge_score("a b c d", "a b x d") == pytest.approx(0.75)
    assert lb.retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert lb.retrieval_score("Paragraph 3 or 7", "Paragraph 7") == 0.5
    assert lb.count_score("There are 4", 4) == 1.0
    assert lb.classification_score("Location", "Location", all_classes=["Location", "Entity"]) \
        == 1.0
    assert lb.code_sim_score("x = 1\n", "x = 1") == 1.0
    # few-shot datasets keep only the first line
    assert lb.score_one("triviaqa", "\nParis\nLondon", ["Paris"]) == 1.0
    assert lb.score_dataset("hotpotqa", ["yes", "no"], [{"answers": ["yes"]},
                                                         {"answers": ["yes"]}]) == 50.0


def test_split_prompt_puts_question_after_context():
    doc = {"input": "Who?", "context": "CONTEXT", "answers": ["x"]}
    for name in lb.PROMPTS:
        head, tail = lb.split_prompt(name, doc)
        assert head.endswith("CONTEXT")
        assert lb.PROMPTS[name].format(context="CONTEXT", input="Who?") == head + tail


def test_fixture_format(tmp_path):
    texts = ["First sentence here is long enough to count. " * 30,
             "Another text with Other words inside it. " * 30]
    names = lb.make_fixture(tmp_path, texts, n=2, paragraphs=4)
    assert set(names) == {"passage_retrieval_en", "passage_count", "multifieldqa_en"}
    keys = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
    for name in names:
        rows = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(set(r) == keys and r["dataset"] == name for r in rows)
    docs = lb.load_dataset(tmp_path, "passage_count", limit=1)
    assert len(docs) == 1
    with pytest.raises(FileNotFoundError, match="jsonl"):
        lb.load_dataset(tmp_path, "hotpotqa")
