"""scripts/gluon_offline_stats.py: its variant syntax (the traces themselves run in
tests/kernels/test_decode_attention_gluon.py)."""

from __future__ import annotations

import pytest


def test_parse_variant(load_script):
    mod = load_script("gluon_offline_stats")
    assert mod.parse_variant("16:4") == dict(trans=False, prefetch=False, block_n=16, group=4,
                                             maxnreg=None)
    assert mod.parse_variant("tr:pf:16:4:200") == dict(trans=True, prefetch=True, block_n=16,
                                                       group=4, maxnreg=200)
    assert mod.parse_variant("pf:32:16")["prefetch"] is True
    for bad in ("16", "tr:x:4", "16:4:200:1", "pf:tr"):
        with pytest.raises(ValueError, match=r"\[tr:\]\[pf:\]block_n:group"):
            mod.parse_variant(bad)
