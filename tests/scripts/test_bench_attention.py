"""scripts/bench_attention.py needs an H200 to run; here its markdown rendering is checked on a
small result of the same shape (ratios are computed against the same run's baselines)."""

from __future__ import annotations

from polartensor.config import get_preset


def test_render_markdown_ratios(load_script):
    mod = load_script("bench_attention")
    env = dict(command="python scripts/bench_attention.py", gpu="GPU", sms=132, torch="t",
               triton="tr", cuda="c", cudnn=1, python="3.12", date="d")
    dec = dict(model="m", batch=8, context=32768)
    res = dict(
        env=env, copy_bw=4e12, elapsed_s=1.0, sweep=[], encode=[], errors=["x skipped"],
        decode=[dict(dec, method="sdpa_bf16_cudnn", preset=None, ms=0.4, tbps=2.0),
                dict(dec, method="sdpa_bf16_flash", preset=None, ms=0.2, tbps=3.0),
                dict(dec, method="polar_triton", preset="paper", ms=0.1, tbps=1.0),
                dict(dec, method="dequant_then_sdpa", preset="paper", ms=0.5, tbps=0.2),
                dict(dec, method="polar_triton_joined", preset="paper", ms=0.125, tbps=0.8,
                     max_abs_diff_vs_default=0.003),
                dict(dec, method="polar_triton_per_sm_splits", preset="paper", ms=0.12,
                     tbps=0.9),
                dict(dec, method="polar_triton_joint12", preset="paper", ms=0.08, tbps=1.25,
                     max_abs_diff_vs_default=0.002),
                dict(dec, method="polar_triton_kernel", preset="paper", ms=0.13, tbps=0.7,
                     max_abs_diff_vs_default=0.001),
                dict(dec, method="polar_gluon_prefetch", preset="paper", ms=0.11, tbps=0.9,
                     max_abs_diff_vs_default=0.0),
                dict(dec, method="polar_triton_again", preset="paper", ms=0.095, tbps=1.05,
                     max_abs_diff_vs_default=0.0)],
        prefill=[dict(model="m", method="sdpa_bf16_cudnn", ms=2.0, tflops=100.0),
                 dict(model="m", method="polar_dequant_sdpa", causal=True, ms=4.0,
                      tflops=20.0),
                 dict(model="m", method="polar_triton", causal=False, error="boom")],
    )
    md = mod.render_markdown(res)
    # decode: cuDNN 0.4 / ours 0.1 = 4.00x; flash 2.00x; dequant 5.00x
    assert "| m | 8 | 32K | paper | 0.1000 | 1.00 | 0.4000 | 0.2000 | 0.5000 | 4.00 | 2.00 | " \
           "5.00 |" in md
    # float32 decode: 0.125 / ours 0.1 = 1.25x; cuDNN 0.4 / 0.125 = 3.20x
    assert "| m | 8 | 32K | paper | 0.1000 | 0.1250 | 1.25 | 3.20 | 3.00e-03 |" in md
    # joint table: 0.08 / ours 0.1 = 0.80x; cuDNN 0.4 / 0.08 = 5.00x
    assert "| m | 8 | 32K | paper | 0.1000 | 0.0800 | 0.80 | 5.00 | 2.00e-03 |" in md
    # the Triton kernel beside the default's Gluon decode: 0.13 / 0.1 = 1.30x; 0.4 / 0.13
    assert "| m | 8 | 32K | paper | 0.1000 | 0.1300 | 1.30 | 3.08 | 1.00e-03 |" in md
    assert "vs the Triton kernel (`POLARTENSOR_DECODE_GLUON=0`)" in md
    # the register prefetch beside the staged default: 0.11 / 0.1 = 1.10x; 0.4 / 0.11 = 3.64x
    assert "| m | 8 | 32K | paper | 0.1000 | 0.1100 | 1.10 | 3.64 | 0.00e+00 |" in md
    assert "vs its register prefetch (`POLARTENSOR_GLUON_STAGED=0`)" in md
    # the default timed again after the other rows: 0.095 / 0.1 = 0.95x; 0.4 / 0.095 = 4.21x
    assert "| m | 8 | 32K | paper | 0.1000 | 0.0950 | 0.95 | 4.21 | 0.00e+00 |" in md
    assert "vs the same launch timed again after every other row" in md
    # split rule: per-SM rule 0.12 / ours 0.1 = 1.20x
    assert "| m | 8 | 32K | paper | 0.1000 | 0.1200 | 1.20 |" in md
    assert "| m | polar_dequant_sdpa | True | 4.000 | 20.0 | 0.50 |" in md
    assert "| m | polar_triton | False | — | — | — |" in md
    assert "- x skipped" in md


def test_preset_pairs(load_script):
    """``--presets`` entries name one preset for keys and values, or KEY/VALUE (the
    transformers integration's default cache is polar-4/polar-3); a malformed pair is refused
    with the form to use, and an unknown preset by the preset lookup."""
    import pytest

    mod = load_script("bench_attention")
    k, v = mod.preset_pair("polar-4/polar-3", 128)
    assert (k.bits, v.bits) == (get_preset("polar-4", head_dim=128).bits,
                                get_preset("polar-3", head_dim=128).bits)
    k, v = mod.preset_pair("paper", 64)
    assert k == v == get_preset("paper", head_dim=64)
    for bad in ("polar-4/", "/polar-3", "paper/polar-3/polar-4"):
        with pytest.raises(ValueError, match="use one preset or KEY/VALUE"):
            mod.preset_pair(bad, 128)
    with pytest.raises((KeyError, ValueError), match="polar-9"):
        mod.preset_pair("polar-4/polar-9", 128)
    # a pair's rows render under its name, with ratios against the same run's baselines
    env = dict(command="c", gpu="GPU", sms=132, torch="t", triton="tr", cuda="c", cudnn=1,
               python="3.12", date="d")
    dec = dict(model="m", batch=8, context=32768)
    md = mod.render_markdown(dict(
        env=env, copy_bw=4e12, elapsed_s=1.0, sweep=[], encode=[], errors=[], prefill=[],
        decode=[dict(dec, method="sdpa_bf16_cudnn", preset=None, ms=0.4, tbps=2.0),
                dict(dec, method="sdpa_bf16_flash", preset=None, ms=0.2, tbps=3.0),
                dict(dec, method="polar_triton", preset="polar-4/polar-3", ms=0.5, tbps=1.0),
                dict(dec, method="dequant_then_sdpa", preset="polar-4/polar-3", ms=0.8,
                     tbps=0.2)]))
    assert ("| m | 8 | 32K | polar-4/polar-3 | 0.5000 | 1.00 | 0.4000 | 0.2000 | 0.8000 | "
            "0.80 | 0.40 | 1.60 |") in md
