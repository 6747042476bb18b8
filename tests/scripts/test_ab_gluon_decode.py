"""scripts/ab_gluon_decode.py needs CUDA; here its table is checked on a small result of the
same shape (ratios against the same run's Triton kernel and cuDNN)."""

from __future__ import annotations


def test_render_markdown_ratios(load_script):
    mod = load_script("ab_gluon_decode")
    meta = dict(gpu="GPU", torch="t", triton="tr", python="3.12",
                command="python3 scripts/ab_gluon_decode.py")
    ms = {"triton": 0.3, "cudnn": 0.36, "gluon_bn16_cap0_ps8": 0.24}
    rows = [dict(preset="paper", batch=8, context=32768, ms=ms, best="gluon_bn16_cap0_ps8",
                 best_vs_triton=0.3 / 0.24, best_vs_cudnn=0.36 / 0.24,
                 triton_vs_cudnn=0.36 / 0.3,
                 checks={"gluon_bn16_cap0_ps8": dict(registers=222)}),
            # a shape whose every launch failed its check: no best, no row
            dict(preset="paper", batch=1, context=64, ms={"triton": 0.01, "cudnn": 0.01},
                 best=None)]
    md = mod.render_markdown(dict(meta=meta, rows=rows))
    assert "| paper | 8 | 32768 | 0.3600 | 0.3000 | gluon_bn16_cap0_ps8 | 0.2400 | 1.25x | " \
           "1.50x | 1.20x | 222 |" in md
    assert "| paper | 1 | 64 |" not in md
    assert "- command: `python3 scripts/ab_gluon_decode.py`" in md


def test_parse_variant(load_script):
    import pytest

    mod = load_script("ab_gluon_decode")
    off = (False,) * 6          # pr, kp, ls, sg, st, fd
    assert mod.parse_variant("16:0") == (16, 0, False, False) + off + (0,)
    assert mod.parse_variant("16:0:pf") == (16, 0, True, False) + off + (0,)
    assert mod.parse_variant("16:200:pf:tr") == (16, 200, True, True) + off + (0,)
    assert mod.parse_variant("32:168:tr") == (32, 168, False, True) + off + (0,)
    assert mod.parse_variant("16:0:pf:tr:pr") == (16, 0, True, True, True) + off[1:] + (0,)
    assert mod.parse_variant("16:0:tr:kp") == (16, 0, False, True, False, True) + off[2:] + (0,)
    assert mod.parse_variant("16:0:ls").lshift
    assert mod.parse_variant("16:0:pf:tr:pr:kp:ls").name == "gluon_bn16_cap0_pf_tr_pr_kp_ls"
    with pytest.raises(ValueError, match="16:0:pf:tr"):
        mod.parse_variant("16:0:prefetch")
    assert mod.parse_variant("16:0:pf:sg").stagger
    assert mod.parse_variant("16:0:pf:tr:sg@12").per_sm == 12
    assert mod.parse_variant("16:0:pf:tr:sg@12").name == "gluon_bn16_cap0_pf_tr_sg"
    # the result names gluon_bench reads: programs per SM after the cap
    assert mod.parse_variant("16:0:pf:tr:sg").label(12) == "gluon_bn16_cap0_ps12_pf_tr_sg"
    with pytest.raises(ValueError, match="@N"):
        mod.parse_variant("16:0:pf@x")
    # the codes staged in shared memory, in place of the prefetch
    assert mod.parse_variant("16:0:tr:kp:ls:st").staged
    assert mod.parse_variant("16:0:tr:st").label(12) == "gluon_bn16_cap0_ps12_tr_st"
    # levels 3 and 2 folded
    assert mod.parse_variant("16:0:tr:kp:ls:st:fd@12").fold
    assert mod.parse_variant("16:0:tr:st:fd").label(12) == "gluon_bn16_cap0_ps12_tr_st_fd"
    for bad in ("16", "x:0", "16:cap:pf", "16:0:pr", "16:0:tr:pr", "16:0:tr:sg",
                "16:0:pf:tr:st"):
        with pytest.raises(ValueError, match="block_n:maxnreg"):
            mod.parse_variant(bad)
