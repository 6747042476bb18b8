"""scripts/eval_ppl.py on tiny settings: table, JSON, frontier plot, every method family."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")


def test_eval_ppl_tiny(tmp_path, load_script):
    mod = load_script("eval_ppl")
    methods = "kivi-2,polar:paper,polar:polar-4"
    try:
        import optimum.quanto  # noqa: F401

        methods += ",quanto-2"
    except ImportError:
        pass
    out = tmp_path / "ppl"
    payload = mod.main(["--model", "tiny", "--text", "pydoc", "--methods", methods,
                        "--context", "160", "--score", "32", "--windows", "2", "--threads", "1",
                        "--out", str(out)])
    rows = {r["name"]: r for r in payload["rows"]}
    assert list(rows)[0] == "full" and rows["full"]["kl"] == 0.0
    assert rows["full"]["bits_per_element"] == 16
    for name in methods.split(","):
        assert rows[name]["kl"] > 0 and rows[name]["bits_per_element"] < 16
        assert rows[name]["ppl"] > 1
    assert not payload["errors"]
    data = json.loads((out / "ppl.json").read_text())
    assert data["command"].startswith("python") and len(data["rows"]) == len(rows)
    md = (out / "ppl.md").read_text()
    assert "Command:" in md and "| polar:paper |" in md
    assert (out / "ppl_frontier.png").stat().st_size > 1000
