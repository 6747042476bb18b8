"""scripts/distortion.py in its tiny mode: outputs written and sane (well under a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def test_distortion_quick(tmp_path: Path, load_script) -> None:
    mod = load_script("distortion")
    res = mod.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "distortion.json").read_text())
    md = (tmp_path / "distortion.md").read_text()
    assert data["unit"].keys() == {"64"} and res["unit"].keys() == {"64"}
    assert "model" not in data
    sec = data["unit"]["64"]
    kinds = {r["kind"] for r in sec["rows"]}
    assert {"paper", "preset", "frontier"} <= kinds
    for r in sec["rows"]:
        assert 0 < r["mse"] < 1 and 1.5 <= r["bpc"] <= 6
        # the empirical MSE matches the analytic value, and nothing beats Shannon's bound
        assert abs(r["mse"] - r["mse_theory"]) < 0.1 * r["mse_theory"] + 2e-3, r
        assert r["ratio_shannon"] > 1.0, r
        assert abs(r["ip_err"] - r["mse"]) < 0.25 * r["mse"] + 2e-3, r  # d*E[ip^2] ~ MSE
        assert 0.8 < r["ip_slope"] <= 1.0 + 1e-3, r  # MSE quantizers shrink: slope < 1
    paper = next(r for r in sec["rows"] if r["kind"] == "paper")
    assert paper["bpc"] == 3.875 and abs(paper["mse"] - 0.032) < 0.004
    # the analytic frontier is a Pareto set: bits up, MSE down
    front = sec["frontier"]
    assert len(front) > 5
    assert all(
        a["bpc"] < b["bpc"] and a["mse_theory"] > b["mse_theory"] for a, b in zip(front, front[1:])
    )
    # ...and no frontier point is beaten by the paper preset
    best = mod.best_under([dict(f, bits=tuple(f["bits"])) for f in front], paper["bpc"])
    assert best["mse_theory"] <= paper["mse_theory"] + 1e-12
    for needle in (
        "Unit vectors, d = 64",
        "TurboQuant 3b (published)",
        "Shannon bound",
        "MSE/4^-b",
        "--quick",
        "torch",
    ):
        assert needle in md, needle
    assert data["meta"]["torch"] == torch.__version__
