"""scripts/ab_kernels.py imports another revision's kernels beside the working tree's and
compares their outputs: a copy of the package must give the same outputs bit for bit, and a
copy whose kernels were changed must be seen as different (decode outputs, encode codes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# appended to the changed copy's modules: wrappers that alter what the kernels return
_BAD_DECODE = """
_ab_launch = launch_attention


def launch_attention(*args, **kwargs):
    return _ab_launch(*args, **kwargs) * 2
"""
_BAD_ENCODE = """
_ab_encode = encode_into_triton


def encode_into_triton(x, rot, mids, codes_out, *args, **kwargs):
    ok = _ab_encode(x, rot, mids, codes_out, *args, **kwargs)
    codes_out.bitwise_xor_(1)
    return ok
"""


def _skip_unless_interpreter_runs():
    """ab_kernels --check runs the kernels under TRITON_INTERPRET=1 in a subprocess: skip,
    naming why, where this machine's interpreter cannot (polartensor's own check: Triton 3.6
    with numpy >= 2.4, as on the GPU machine)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", "from polartensor.kernels.common import "
                           "check_interpreter; check_interpreter()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1]
        if "cannot run a loop" in last:
            pytest.skip(last)
        raise AssertionError(proc.stderr)


def test_revisions_load_beside_the_working_tree(tmp_path):
    pytest.importorskip("triton")
    _skip_unless_interpreter_runs()
    same, bad = tmp_path / "same", tmp_path / "bad"
    for dest in (same, bad):
        shutil.copytree(ROOT / "polartensor", dest / "polartensor",
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(bad / "polartensor" / "kernels" / "decode_attention.py", "a") as fh:
        fh.write(_BAD_DECODE)
    with open(bad / "polartensor" / "kernels" / "encode.py", "a") as fh:
        fh.write(_BAD_ENCODE)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "ab_kernels.py"), "--check",
                    "--rev", f"same={same}", "--rev", f"bad={bad}", "--presets", "paper",
                    "--decode", "smollm2-135m:1:40", "--encode", "smollm2-135m:1:16",
                    "--warm", "on", "--out", str(tmp_path / "out")], check=True, env=env,
                   capture_output=True, timeout=600)
    res = json.loads((tmp_path / "out" / "ab_kernels.json").read_text())
    # the warm-up workers ran every revision's kernels (twice per worker for some)
    assert res["warm_errors"] == []
    rows = res["rows"]
    by = {(r["kind"], r["variant"]): r for r in rows}
    assert set(by) == {(k, v) for k in ("decode", "encode") for v in ("work", "same", "bad")}
    assert by["decode", "same"]["bit_equal"] and by["decode", "same"]["max_abs_diff"] == 0
    assert not by["decode", "bad"]["bit_equal"] and by["decode", "bad"]["max_abs_diff"] > 0
    assert by["encode", "same"]["codes_equal"] == 1.0
    assert by["encode", "same"]["radii_equal"] == 1.0
    assert by["encode", "bad"]["codes_equal"] == 0.0
    assert by["encode", "bad"]["radii_equal"] == 1.0


def test_revision_without_kernels_is_refused(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ab_kernels.py"), "--check",
                           "--rev", f"empty={tmp_path}", "--decode", "", "--encode", ""],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no polartensor/kernels under it" in proc.stderr


def test_render_lists_every_row(load_script):
    ab = load_script("ab_kernels")
    dec = dict(kind="decode", model="llama3.1-8b", batch=8, context=32768, d=128,
               preset="paper", cudnn_ms=0.37, bit_equal=True, max_abs_diff=0.0)
    enc = dict(kind="encode", model="llama3.1-8b", batch=8, context=32768, d=128,
               preset="paper", codes_equal=1.0, radii_equal=1.0, radii_max_rel_diff=0.0)
    rows = [dict(dec, variant="work", ms=0.40, x_vs_work=1.0, x_vs_cudnn=0.925),
            dict(dec, variant="main", ms=0.50, x_vs_work=0.8, x_vs_cudnn=0.74),
            dict(enc, variant="work", ms=0.60, x_vs_work=1.0, gbps=1111.0, pct_copy=36.8),
            dict(enc, variant="main", ms=0.72, x_vs_work=0.833, gbps=926.0, pct_copy=30.7)]
    md = ab.render(dict(command="c", device="GPU", versions="v", revisions=["main"],
                        revisions_at={"main": "main 123"}, rounds=3, copy_bw=3.02e12,
                        rows=rows))
    assert "| llama3.1-8b | 8 | 32768 | paper | main | 0.5000 | 0.800 | 0.74 | True |" in md
    assert "| llama3.1-8b | 8 | 32768 | paper | main | 0.7200 | 0.833 | 926 | 30.7 |" in md
    assert "3.02 TB/s" in md
