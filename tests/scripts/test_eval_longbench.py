"""scripts/eval_longbench.py: fixture in LongBench's format, then a tiny run over it."""

from __future__ import annotations

import json


def test_eval_longbench_fixture_and_run(tmp_path, load_script):
    mod = load_script("eval_longbench")
    fix = tmp_path / "fixture"
    mod.main(["--model", "tiny", "--make-fixture", str(fix), "--fixture-examples", "2",
              "--fixture-paragraphs", "3"])
    assert sorted(p.name for p in fix.iterdir()) == [
        "multifieldqa_en.jsonl", "passage_count.jsonl", "passage_retrieval_en.jsonl"]
    out = tmp_path / "lb"
    payload = mod.main(["--model", "tiny", "--data-dir", str(fix), "--methods",
                        "full,polar:paper,kivi-4", "--max-new-tokens", "3", "--threads", "1",
                        "--limit", "1", "--out", str(out)])
    assert not payload["errors"]
    assert payload["examples"] == {"multifieldqa_en": 1, "passage_count": 1,
                                   "passage_retrieval_en": 1}
    names = [m["name"] for m in payload["methods"]]
    assert names == ["full", "polar:paper", "kivi-4"]
    for m in payload["methods"]:
        assert set(m["scores"]) == set(payload["examples"])
        assert all(0 <= v <= 100 for v in m["scores"].values())
    assert len(payload["records"]) == 3 * 3
    data = json.loads((out / "longbench.json").read_text())
    assert data["command"].startswith("python")
