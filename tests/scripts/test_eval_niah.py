"""scripts/eval_niah.py on tiny settings: grid of scores, heatmap per method, JSON."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")


def test_eval_niah_tiny(tmp_path, load_script):
    mod = load_script("eval_niah")
    out = tmp_path / "niah"
    payload = mod.main(["--model", "tiny", "--text", "pydoc", "--methods",
                        "full,polar:paper,kivi-2", "--contexts", "384,512", "--depths",
                        "0,50,100", "--max-new-tokens", "3", "--threads", "1",
                        "--out", str(out)])
    assert not payload["errors"]
    assert len(payload["cells"]) == 3 * 2 * 3
    for m in payload["methods"]:
        assert len(m["grid"]) == 3 and len(m["grid"][0]) == 2
        assert all(0 <= v <= 1 for row in m["grid"] for v in row)
    for name in ("full", "polar_paper", "kivi-2"):
        assert (out / f"niah_{name}.png").stat().st_size > 1000
    data = json.loads((out / "niah.json").read_text())
    assert data["command"].startswith("python")
    assert "| polar:paper |" in (out / "niah.md").read_text()
