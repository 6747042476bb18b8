"""scripts/sweep_decode_launch.py --splits sweep: which split counts it times and what each row
records, with a stand-in for the launch (the timing itself needs CUDA graphs: left to the
script)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def sdl(load_script):
    mod = load_script("sweep_decode_launch")
    mod.save = lambda rows: None  # no result file from a test
    return mod


def fake_launch(asked, bn=128, per_sm=3, library=43):
    """``ours(**kw)`` as the script builds it: the default launch records, as the patched
    library rules do, its keys per step and resident programs, then the rule's count."""
    def ours(**kw):
        def run():
            if "num_splits" not in kw:
                asked.extend([(bn, per_sm), library])
            return torch.full((2,), float(kw.get("num_splits") or 0))
        return run
    return ours


def test_every_distinct_step_count_down_to_an_eighth(sdl):
    rows, asked = [], []
    n = 32768                                    # 256 steps of 128 keys; at most 64 splits
    sdl.sweep_splits(rows, fake_launch(asked), torch.zeros(2), lambda fn: 1.0, 0.5, asked,
                     dict(model="llama3.1-8b", preset="paper", batch=1, context=n), n, 132)
    counts = [r["splits"] for r in rows]
    assert counts[0] == "auto"
    swept = counts[1:]
    # one count per number of steps per split, from 8 (= 64 // 8) up to 64, each one a
    # count the launch keeps (its last split is not empty)
    assert swept == sorted(set(swept)) and swept[0] == 8 and swept[-1] == 64
    steps = [r["steps_per_split"] for r in rows[1:]]
    assert len(set(steps)) == len(steps)
    assert all(-(-256 // -(-256 // s)) == s for s in swept)
    assert 32 in swept and 43 in swept
    # what the default launch used is recorded on every row
    assert {(r["block_n"], r["per_sm"], r["library_asked"], r["library_splits"])
            for r in rows} == {(128, 3, 43, 43)}
    # the explicit launches' outputs differ from the reference by their count here
    assert rows[1]["max_diff"] == 8.0 and rows[0]["x_vs_cudnn"] == 0.5


def test_a_launch_that_does_not_split_is_skipped(sdl, capsys):
    rows, asked = [], []

    def ours(**kw):
        return lambda: torch.zeros(2)            # no split rule consulted: a single split

    sdl.sweep_splits(rows, ours, torch.zeros(2), lambda fn: 1.0, 0.5, asked,
                     dict(model="llama3.1-8b", preset="paper", batch=32, context=4096),
                     4096, 132)
    assert rows == [] and "did not split" in capsys.readouterr().out
