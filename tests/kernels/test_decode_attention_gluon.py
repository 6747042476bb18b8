"""The Gluon decode attention (kernels/decode_attention_gluon.py) == reference polar_sdpa.

The operand permutations are checked everywhere; the kernel itself only on CUDA (Gluon
compiles for the GPU and has no interpreter)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polartensor import polar_sdpa, quantize
from polartensor.config import get_preset
from polartensor.kernels.common import trig_table
from polartensor.kernels.decode_attention_gluon import (
    gluon_decode_supported,
    k_permutation,
    launch_attention_gluon,
    v_permutation,
)
from polartensor.rotation import rotation_matrix

ON_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="the Gluon kernel compiles for CUDA only; "
                               "Triton's interpreter cannot run Gluon")


def test_k_permutation_is_the_mma_operand_order():
    """Column kappa of S = Q K^T's B operand (mma m16n8k16: k = 16 t + 8 h + 2 (lane % 4) +
    e in each thread) holds block 2 (lane % 4) + (t >> 2), coordinate (t & 3) h e of it:
    each thread's 32 columns are two whole 16-coordinate blocks."""
    perm = k_permutation()
    assert sorted(perm.tolist()) == list(range(128))
    for kap in range(128):
        e, tig, h, t = kap & 1, (kap >> 1) & 3, (kap >> 3) & 1, kap >> 4
        assert perm[kap] == 16 * (2 * tig + (t >> 2)) + ((t & 3) << 2 | h << 1 | e)
    for tig in range(4):
        cols = [16 * t + 8 * h + 2 * tig + e for t in range(8) for h in range(2)
                for e in range(2)]
        assert sorted(perm[cols].tolist()) == list(range(32 * tig, 32 * tig + 32))


def test_v_permutation_is_the_mma_operand_order():
    """Column nu = lane // 4 + 8 u of O = P V's B operand holds block lane // 4, coordinate u:
    each thread's 16 columns are one whole block."""
    perm = v_permutation()
    assert sorted(perm.tolist()) == list(range(128))
    for g in range(8):
        assert perm[[g + 8 * u for u in range(16)]].tolist() == list(range(16 * g, 16 * g + 16))


def test_supported_scope():
    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    paper = get_preset("paper", head_dim=128)
    polar4 = get_preset("polar-4", head_dim=128)
    # (on the CPU nothing is served: the kernel is CUDA only)
    assert not gluon_decode_supported(q, paper, paper, None, None, 128, 4, 1)
    if ON_GPU:
        qc = q.cuda()
        assert gluon_decode_supported(qc, paper, paper, None, None, 128, 4, 1)
        assert not gluon_decode_supported(qc, polar4, polar4, None, None, 128, 4, 1)
        assert not gluon_decode_supported(qc.float(), paper, paper, None, None, 128, 4, 1)
        assert not gluon_decode_supported(qc, paper, paper, None, None, 128, 4, 2)


@needs_gpu
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(b=st.integers(1, 3), hk=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 7, 16]),
       n=st.integers(1, 3000), splits=st.integers(1, 9), block_n=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**16))
def test_gluon_decode_matches_reference(b, hk, group, n, splits, block_n, seed):
    d = 128
    cfg = get_preset("paper", head_dim=d)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hk * group, 1, d, generator=g).to(torch.bfloat16).cuda()
    k = quantize(torch.randn(b, hk, n, d, generator=g).cuda(), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).cuda(), cfg)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, q.device, torch.float32).contiguous()
    trig = trig_table(k.centroids, cfg.bits)
    out = launch_attention_gluon(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                 rot, rot, 1 / math.sqrt(d), splits, block_n=block_n)
    ref = polar_sdpa(q.float(), k, v, enable_gqa=group > 1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err <= 2e-2, f"relative error {err:.2e}"
