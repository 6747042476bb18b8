"""Decode / chunked-prefill attention kernels == reference polar_sdpa.

CPU: the Triton interpreter with small shapes; GPU: the same tests with large shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polartensor import PolarQuantConfig, polar_sdpa, quantize
from polartensor.config import PRESETS, get_preset
from polartensor.kernels import common, dispatch
from polartensor.kernels.common import trig_table
from polartensor.kernels.decode_attention import launch_attention
from polartensor.rotation import rotate, rotation_matrix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
HEAD_DIMS = [64, 128, 256] if ON_GPU else [16, 32, 64]
EXAMPLES = 4 if ON_GPU else 3
MAX_N = 3000 if ON_GPU else 90
MAX_B = 4 if ON_GPU else 2
MAX_HK = 4 if ON_GPU else 2

ODD = [PolarQuantConfig(levels=3, bits=(1, 0, 7), radius_dtype="float32"),
       PolarQuantConfig(levels=2, bits=(8, 5), rotation="hadamard", seed=5),
       PolarQuantConfig(levels=4, bits=(4, 2, 2, 2), rotation="none")]


def configs_for(d: int) -> list[PolarQuantConfig]:
    return [get_preset(n, head_dim=d) for n in sorted(PRESETS)] + [
        c for c in ODD if d % c.block_size == 0]


TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (1.5e-2, 1.5e-2),
       torch.bfloat16: (4e-2, 4e-2)}


# Relative Frobenius error allowed: fp32 math, or fp16/bf16 tensor-core operands (on the GPU
# the kernel scores and weights in the query dtype, as a bf16 SDPA does).
REL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _close(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    if dtype == torch.float32 or not ON_GPU:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)
    assert err <= REL[dtype], f"relative error {err:.2e}"


@pytest.fixture(autouse=True)
def triton_decode(monkeypatch):
    """These tests are the Triton kernel's (its launch rules, its bit-exact variants): keep
    the Gluon decode, which large paper-preset decodes take by default, out of them
    (tests/kernels/test_decode_attention_gluon.py tests it)."""
    monkeypatch.setenv("POLARTENSOR_DECODE_GLUON", "0")


@pytest.fixture
def no_reference(monkeypatch):
    """Fail if dispatch falls back to the reference attention."""
    def boom(*a, **k):
        raise AssertionError("dispatch fell back to the reference")

    monkeypatch.setattr(dispatch, "polar_sdpa", boom)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@settings(max_examples=EXAMPLES, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    data=st.data(),
    b=st.integers(1, MAX_B),
    hk=st.integers(1, MAX_HK),
    group=st.sampled_from([1, 2, 3, 4, 8]),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "float", "pad"]),
)
def test_attention_kernel_matches_reference(d, dtype, data, b, hk, group, causal, mask_kind,
                                            no_reference):
    """Sharded by head_dim and dtype (so pytest-xdist spreads the GPU compiles)."""
    kcfg = data.draw(st.sampled_from(configs_for(d)), label="k_config")
    vcfg = data.draw(st.sampled_from([kcfg] + configs_for(d)), label="v_config")
    prefill = data.draw(st.booleans(), label="prefill")
    tq = data.draw(st.integers(17, 300 if ON_GPU else 40) if prefill else st.integers(1, 16),
                   label="q_len")
    n = data.draw(st.integers(1, MAX_N), label="kv_len")
    g = torch.Generator().manual_seed(n * 7 + tq)
    hq = hk * group
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype).to(DEVICE)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), kcfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), vcfg)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(b, 1, tq, n, generator=g) > 0.3).to(DEVICE)
    elif mask_kind == "float":
        mask = (torch.randn(hq, 1, n, generator=g) * 2).to(dtype).to(DEVICE)
    elif mask_kind == "pad":  # left padding per batch row, broadcast over heads and queries
        keep = torch.ones(b, 1, 1, n, dtype=torch.bool)
        for i in range(b):
            keep[i, ..., : int(torch.randint(0, n + 1, (1,), generator=g))] = False
        mask = keep.to(DEVICE)
    scale = data.draw(st.sampled_from([None, 0.3]), label="scale")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=group > 1)
    ref = polar_sdpa(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                     enable_gqa=group > 1)
    _close(out, ref, dtype)


@pytest.mark.parametrize("splits", [1, 3])
def test_full_precision_tail(splits):
    d = HEAD_DIMS[-1]
    cfg = PolarQuantConfig.paper()
    b, hk, group, tq, n, nt = 2, 2, 3, 4, 37 if not ON_GPU else 1500, 9
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hk * group, tq, d, generator=g).to(DEVICE)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    kt = torch.randn(b, hk, nt, d, generator=g).to(DEVICE)
    vt = torch.randn(b, hk, nt, d, generator=g).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    trig = trig_table(k.centroids)
    out = launch_attention(
        q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg, rot, rot,
        rotate(kt, cfg.rotation, cfg.seed), rotate(vt, cfg.rotation, cfg.seed),
        None, True, 1 / math.sqrt(d), mode="decode", num_splits=splits)
    kk = torch.cat([k.dequantize(), kt], dim=-2)
    vv = torch.cat([v.dequantize(), vt], dim=-2)
    ref = polar_sdpa(q, kk, vv, is_causal=True, enable_gqa=True)
    _close(out, ref, torch.float32)


def test_fully_masked_rows_give_zeros(no_reference):
    d = HEAD_DIMS[0]
    q = torch.randn(1, 2, 3, d, device=DEVICE)
    k = quantize(torch.randn(1, 2, 20, d, device=DEVICE), "paper")
    mask = torch.ones(1, 1, 3, 20, dtype=torch.bool, device=DEVICE)
    mask[..., 1, :] = False
    out = F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    _close(out, polar_sdpa(q, k, k, attn_mask=mask), torch.float32)


def test_unsupported_combinations_fall_back():
    d = 48  # not a power of two
    q = torch.randn(1, 2, 2, d, device=DEVICE)
    k = quantize(torch.randn(1, 2, 9, d, device=DEVICE), "paper")
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, k), polar_sdpa(q, k, k))
    d = HEAD_DIMS[0]
    q = torch.randn(1, 2, 2, d, device=DEVICE)
    k = quantize(torch.randn(1, 2, 9, d, device=DEVICE), "paper")
    v = torch.randn(1, 2, 9, d, device=DEVICE)  # plain values
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), polar_sdpa(q, k, v))
    q64 = q.double()
    torch.testing.assert_close(F.scaled_dot_product_attention(q64, k, k), polar_sdpa(q64, k, k))
    # values of another head dim (SDPA allows it; the kernels take one head dim): the output
    # has V's head dim, as the reference's
    for preset in ("paper", "polar-4"):
        kq = quantize(torch.randn(1, 2, 6, d, device=DEVICE), preset)
        vq = quantize(torch.randn(1, 2, 6, 2 * d, device=DEVICE), preset)
        out = F.scaled_dot_product_attention(q, kq, vq)
        assert out.shape == (1, 2, 2, 2 * d)
        torch.testing.assert_close(out, polar_sdpa(q, kq, vq))
    # empty queries: no query tokens, no heads
    for qe, ke in ((q[:, :, :0], k), (q[:, :0], k[:, :0])):
        out = F.scaled_dot_product_attention(qe, ke, ke)
        assert out.shape == qe.shape


def test_validation_errors_match_reference():
    d = HEAD_DIMS[0]
    q = torch.randn(1, 4, 2, d, device=DEVICE)
    k = quantize(torch.randn(1, 2, 9, d, device=DEVICE), "paper")
    with pytest.raises(ValueError, match="enable_gqa"):
        F.scaled_dot_product_attention(q, k, k)
    with pytest.raises(NotImplementedError, match="dropout"):
        F.scaled_dot_product_attention(q, k, k, dropout_p=0.1, enable_gqa=True)
    with pytest.raises(ValueError, match="head_dim"):
        F.scaled_dot_product_attention(q[..., :8], k, k, enable_gqa=True)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: > 2**31-element cache")
def test_int64_offsets():
    # A batch stride so large that b * stride exceeds 2**31 elements.
    d, cfg = 128, PolarQuantConfig.paper()
    cap = (1 << 31) // (2 * cfg.record_bytes(d)) + 1000
    codes = torch.zeros(3, 1, cap, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
    radii = torch.zeros(3, 1, cap, cfg.num_blocks(d), dtype=torch.float16, device=DEVICE)
    assert codes.stride(0) * 2 > 2**31
    x = torch.randn(3, 1, 50, d, device=DEVICE)
    ref = quantize(x, cfg)
    dispatch.encode_into(x, cfg, ref.centroids, codes[:, :, :50], radii[:, :, :50])
    from polartensor.polar_quant_tensor import PolarQuantTensor

    kv = PolarQuantTensor(codes[:, :, :50], radii[:, :, :50], ref.centroids, cfg, x.shape,
                          x.dtype)
    assert (kv.codes == ref.codes).float().mean() > 0.999
    q = torch.randn(3, 4, 1, d, device=DEVICE)
    out = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    _close(out, polar_sdpa(q, ref, ref, enable_gqa=True), torch.float32)


@pytest.mark.parametrize("preset", ["paper", "polar-3"])
def test_chunked_prefill_with_new_tokens_and_padding(preset):
    from polartensor.kernels.prefill_attention import prefill_attention

    d = HEAD_DIMS[-1]
    b, hk, group = 2, 2, 2
    n, t = (2000, 300) if ON_GPU else (29, 21)
    g = torch.Generator().manual_seed(5)
    cfg = get_preset(preset, head_dim=d)
    q = torch.randn(b, hk * group, t, d, generator=g).to(DEVICE)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    kn = torch.randn(b, hk, t, d, generator=g).to(DEVICE)
    vn = torch.randn(b, hk, t, d, generator=g).to(DEVICE)
    pad = torch.ones(b, 1, 1, n + t, dtype=torch.bool)
    pad[1, ..., :7] = False  # left padding of the second sequence
    pad = pad.to(DEVICE)
    out = prefill_attention(q, k, v, kn, vn, attn_mask=pad, is_causal=True)
    kk = torch.cat([k.dequantize(), kn], dim=-2)
    vv = torch.cat([v.dequantize(), vn], dim=-2)
    ref = polar_sdpa(q, kk, vv, attn_mask=pad, is_causal=True, enable_gqa=True)
    _close(out, ref, torch.float32)


@pytest.mark.skipif(not ON_GPU, reason="PyTorch's flash attention kernel is CUDA-only")
@pytest.mark.parametrize("d,group", [(128, 4), (64, 3)])
def test_causal_flash_dequant_matches_reference(d, group, monkeypatch):
    """A causal query chunk on the dequantize-then-SDPA path runs the flash kernel bottom-right
    aligned (the default; POLARTENSOR_CAUSAL_FLASH=0 materialises the mask); it must equal the
    reference's bottom-right causal attention (and the materialised-mask path)."""
    from polartensor.kernels.prefill_attention import prefill_attention

    b, hk, n, t = 2, 2, 1500, 200
    g = torch.Generator().manual_seed(d + group)
    cfg = get_preset("paper", head_dim=d)
    q = torch.randn(b, hk * group, t, d, generator=g).to(DEVICE, torch.bfloat16)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    kn = torch.randn(b, hk, t, d, generator=g).to(DEVICE, torch.bfloat16)
    vn = torch.randn(b, hk, t, d, generator=g).to(DEVICE, torch.bfloat16)
    monkeypatch.setenv("POLARTENSOR_CAUSAL_FLASH", "1")
    got = prefill_attention(q, k, v, kn, vn, is_causal=True, mode="dequant")
    monkeypatch.setenv("POLARTENSOR_CAUSAL_FLASH", "0")
    masked = prefill_attention(q, k, v, kn, vn, is_causal=True, mode="dequant")
    kk = torch.cat([k.dequantize(), kn.float()], dim=-2)
    vv = torch.cat([v.dequantize(), vn.float()], dim=-2)
    ref = polar_sdpa(q.float(), kk, vv, is_causal=True, enable_gqa=True)
    _close(got, ref.to(torch.bfloat16), torch.bfloat16)
    _close(got, masked, torch.bfloat16)


def test_causal_flash_setting_is_checked(monkeypatch):
    from polartensor.kernels.prefill_attention import causal_flash_enabled

    monkeypatch.delenv("POLARTENSOR_CAUSAL_FLASH", raising=False)
    assert causal_flash_enabled()
    monkeypatch.setenv("POLARTENSOR_CAUSAL_FLASH", "0")
    assert not causal_flash_enabled()
    monkeypatch.setenv("POLARTENSOR_CAUSAL_FLASH", "yes")
    with pytest.raises(ValueError, match="POLARTENSOR_CAUSAL_FLASH='yes'"):
        causal_flash_enabled()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dequant_kernel_matches_reference(preset):
    from polartensor.kernels.dequant import dequantize_rotated_triton

    d = HEAD_DIMS[-1]
    cfg = get_preset(preset, head_dim=d)
    x = quantize(torch.randn(3, 2, 37, d).to(DEVICE), cfg)
    got = dequantize_rotated_triton(x.codes, x.radii, trig_table(x.centroids), cfg, d)
    torch.testing.assert_close(got, x.dequantize_rotated(), rtol=1e-5, atol=1e-6)


def test_table_cache_never_serves_a_freed_tensors_table():
    """Tables must follow the codebook tensor, not its address: the caching allocator hands a
    freed table's memory to the next codebook of that size (on CUDA that gave wrong,
    run-to-run different attention outputs). Simulated here: a new tensor object on the same
    storage, with new values and the same version count."""
    a = torch.full((3, 16), 0.25, device=DEVICE)
    a.add_(0.0)  # version 1, as set_() below leaves the new tensor
    dispatch._trig(a)
    storage, ptr, version = a.untyped_storage(), a.data_ptr(), a._version
    del a
    b = torch.empty(0, device=DEVICE).set_(storage, 0, (3, 16), (16, 1))
    b.data.copy_(torch.full((3, 16), 1.5))  # .data: new values without a version bump
    assert b.data_ptr() == ptr and b._version == version
    torch.testing.assert_close(dispatch._trig(b), trig_table(b))


@pytest.mark.parametrize("mode", ["prefill", "dequant"])
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    group=st.sampled_from([1, 3, 4]),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "float", "pad_all"]),
    n=st.integers(1, 900 if ON_GPU else 40),
    t=st.integers(17, 300 if ON_GPU else 24),
    with_tail=st.booleans(),
)
def test_long_query_paths_match_reference(mode, dtype, group, causal, mask_kind, n, t,
                                          with_tail):
    """Both long-query paths: the fused kernel with query tiles ("prefill") and dequantize
    once + PyTorch SDPA ("dequant", what "auto" takes on the GPU from 64 query tokens on),
    including a full-precision tail, masks, rows that see no key, and t > n (causal)."""
    d = HEAD_DIMS[1]
    b, hk = 2, 2
    cfg = get_preset("paper", head_dim=d)
    g = torch.Generator().manual_seed(n * 31 + t)
    q = torch.randn(b, hk * group, t, d, generator=g).to(dtype).to(DEVICE)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    nt = 5 if with_tail else 0
    kt = torch.randn(b, hk, nt, d, generator=g).to(DEVICE)
    vt = torch.randn(b, hk, nt, d, generator=g).to(DEVICE)
    total = n + nt
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(b, 1, t, total, generator=g) > 0.3).to(DEVICE)
    elif mask_kind == "float":
        mask = (torch.randn(hk * group, 1, total, generator=g) * 2).to(dtype).to(DEVICE)
    elif mask_kind == "pad_all":  # the second sequence sees nothing: its rows must be zeros
        mask = torch.ones(b, 1, 1, total, dtype=torch.bool)
        mask[1] = False
        mask = mask.to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    trig = trig_table(k.centroids)
    km = None if mask is None else dispatch._kernel_mask(mask, (b,), hk * group, t, total)[0]
    out = launch_attention(
        q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg, rot, rot,
        rotate(kt, cfg.rotation, cfg.seed) if nt else None,
        rotate(vt, cfg.rotation, cfg.seed) if nt else None,
        km, causal, 1 / math.sqrt(d), mode=mode)
    kk = torch.cat([k.dequantize(), kt], dim=-2)
    vv = torch.cat([v.dequantize(), vt], dim=-2)
    ref = polar_sdpa(q, kk, vv, attn_mask=mask, is_causal=causal, enable_gqa=group > 1)
    if mask_kind == "pad_all":
        assert torch.equal(out[1], torch.zeros_like(out[1]))
    _close(out, ref, dtype)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    tq=st.integers(1, 16),
    group=st.sampled_from([1, 3, 4]),
    n=st.integers(1, 1500 if ON_GPU else 40),
    nt=st.integers(0, 40 if ON_GPU else 7),
    mask_kind=st.sampled_from(["none", "pad", "bool"]),
    presets=st.sampled_from([("polar-4", "polar-3"), ("paper", "paper"), ("polar-2", "polar-5")]),
)
def test_attention_with_tail_matches_reference(dtype, tq, group, n, nt, mask_kind, presets,
                                               monkeypatch):
    """The transformers cache's default layout, [quantized prompt | 16-bit generated tokens]:
    ``attend`` runs it through the kernel (dispatch.scaled_dot_product_attention_with_tail)
    with one joint softmax, equal to the PyTorch reference (causal, bottom-right)."""
    from polartensor.integrations import transformers as ptx

    d = HEAD_DIMS[1]
    b, hk = 2, 2
    kcfg, vcfg = (get_preset(p, head_dim=d) for p in presets)
    g = torch.Generator().manual_seed(n * 13 + nt * 5 + tq)
    q = torch.randn(b, hk * group, tq, d, generator=g).to(dtype).to(DEVICE)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), kcfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), vcfg)
    kt = torch.randn(b, hk, nt, d, generator=g).to(dtype).to(DEVICE)
    vt = torch.randn(b, hk, nt, d, generator=g).to(dtype).to(DEVICE)
    mask = None
    if mask_kind == "pad":  # left padding of the second sequence
        mask = torch.ones(b, 1, 1, n + nt, dtype=torch.bool)
        mask[1, ..., : (n + nt) // 3] = False
        mask = mask.to(DEVICE)
    elif mask_kind == "bool":
        mask = (torch.rand(b, 1, tq, n + nt, generator=g) > 0.3).to(DEVICE)
    ref = ptx._reference_with_tail(q, k, v, kt, vt, mask, True, None, kcfg, vcfg)

    def boom(*a, **kw):
        raise AssertionError("attend fell back to the reference")

    with monkeypatch.context() as m:  # per example: hypothesis reuses the fixture
        m.setattr(ptx, "_reference_with_tail", boom)
        out = ptx.attend(q, ptx.MixedKV(k, kt), ptx.MixedKV(v, vt), attn_mask=mask,
                         is_causal=True, enable_gqa=group > 1)
    _close(out, ref, dtype)


def test_attention_with_tail_declines_what_kernels_do_not_take():
    d = HEAD_DIMS[0]
    k = quantize(torch.randn(1, 2, 9, d, device=DEVICE), "paper")
    kt = torch.randn(1, 2, 3, d, device=DEVICE)
    q64 = torch.randn(1, 2, 1, d, device=DEVICE, dtype=torch.float64)
    assert dispatch.scaled_dot_product_attention_with_tail(q64, k, k, kt, kt) is None
    q = torch.randn(1, 2, 1, d, device=DEVICE)
    assert dispatch.scaled_dot_product_attention_with_tail(q, k, k, kt[:1, :1], kt) is None
    v2 = quantize(torch.randn(1, 2, 9, 2 * d, device=DEVICE), "paper")
    assert dispatch.scaled_dot_product_attention_with_tail(q, k, v2, kt, kt) is None
    assert dispatch.scaled_dot_product_attention_with_tail(q[:, :, :0], k, k, kt, kt) is None


def test_dequant_min_q_setting(monkeypatch):
    from polartensor.kernels.prefill_attention import DEFAULT_DEQUANT_MIN_Q, dequant_min_q

    monkeypatch.delenv("POLARTENSOR_DEQUANT_MIN_Q", raising=False)
    assert dequant_min_q() == DEFAULT_DEQUANT_MIN_Q == 64
    monkeypatch.setenv("POLARTENSOR_DEQUANT_MIN_Q", "100")
    assert dequant_min_q() == 100
    monkeypatch.setenv("POLARTENSOR_DEQUANT_MIN_Q", "off")
    assert dequant_min_q() is None
    for bad in ("abc", "8", "-5"):
        monkeypatch.setenv("POLARTENSOR_DEQUANT_MIN_Q", bad)
        with pytest.raises(ValueError, match="POLARTENSOR_DEQUANT_MIN_Q"):
            dequant_min_q()


# Launch settings the decode accepts (keys per step, warps, register cap, query rows per
# program): each must equal the reference, not only the default the launcher picks. The
# interpreter ignores warps and register caps, so the CPU varies keys per step and rows only.
_LAUNCH = ([(bn, w, r) for bn in (32, 64, 128) for w in (4, 8) for r in (None, 128)]
           + [(64, 4, 168), (128, 4, 168)] if ON_GPU
           else [(bn, 4, None) for bn in (16, 32, 64)])


@pytest.mark.parametrize("tq", [1, 4, 16])
@pytest.mark.parametrize("block_n,warps,maxnreg", _LAUNCH)
def test_decode_launch_settings_match_reference(block_n, warps, maxnreg, tq):
    d = 128 if ON_GPU else 32
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    cfg = PolarQuantConfig.paper()
    b, hk, group, n = 2, 2, 4, 1500 if ON_GPU else 45
    g = torch.Generator().manual_seed(block_n + tq)
    q = torch.randn(b, hk * group, tq, d, generator=g).to(DEVICE, dtype)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    trig = trig_table(k.centroids)

    def launch():
        return launch_attention(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                rot, rot, scale=1 / math.sqrt(d), mode="decode", num_splits=3,
                                block_n=block_n, num_warps=warps, maxnreg=maxnreg)

    if ON_GPU and block_n != 64 and group * tq > 16:
        # refused: wrong outputs / illegal memory accesses on the H200 (see launch_attention)
        with pytest.raises(ValueError, match="block_n"):
            launch()
        return
    ref = polar_sdpa(q.float(), k, v, scale=1 / math.sqrt(d), enable_gqa=True)
    _close(launch(), ref.to(dtype), dtype)


@pytest.mark.parametrize("b,hk,n,preset,want", [
    (16, 4, 8500, "paper", (128, 168)), (16, 4, 8500, "polar-4", (128, 168)),
    (64, 4, 1000, "paper", (64, 128)), (1, 8, 8500, "paper", (128, 168))],
    ids=["many-long", "many-long-polar4", "many-short", "few"])
def test_decode_default_launch_by_program_count(b, hk, n, preset, want, no_reference,
                                                monkeypatch):
    """On the GPU at d 128 the decode's launch (keys per step, register cap) follows the
    (batch, KV head) program count: >= 64 programs over >= 8K tokens take 128 keys under a
    168-register cap where the vp (paper) or kq (polar-4) orientation and the shuffle tables
    serve, else 64 keys under a 128 cap, as do >= 256 programs over fewer tokens; < 64 programs
    128 keys under a 168 cap. Through F.scaled_dot_product_attention each must still equal
    the reference."""
    d = 128 if ON_GPU else 32
    if not ON_GPU:
        b, n = min(b, 2), 30
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, hk * 4, 1, d, generator=g).to(DEVICE, dtype)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), preset)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), preset)
    seen = _spy_kwarg(monkeypatch, ("BN", "maxnreg"))
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    _close(out, polar_sdpa(q.float(), k, v, enable_gqa=True).to(dtype), dtype)
    if ON_GPU:  # the interpreter's launch is its own (16 keys per step, no register cap)
        assert seen[0] == want


_RESHAPE = pytest.mark.skipif(
    common.decode_tile is common.decode_tile_reshape,
    reason="POLARTENSOR_DECODE=reshape: the packed decode is part of the joined tile decode, "
           "which this run does not bind (launch_attention refuses pack=True)")


@_RESHAPE
@pytest.mark.parametrize("preset", ["paper", "polar-3", "polar-4"])
@pytest.mark.parametrize("tq", [1, 5])
def test_packed_decode_attention_matches_reference(preset, tq):
    """pack=True (the default for bfloat16 queries on the GPU): keys and values of level 1
    decoded in bfloat16 (a few bf16 roundings per coordinate): relative error well inside a
    bf16 SDPA's, and not the unpacked kernel's output bit for bit. The default launch on the
    GPU is the packed one unless POLARTENSOR_DECODE=joined."""
    d = 128 if ON_GPU else 32
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    cfg = get_preset(preset, head_dim=d)
    b, hk, group, n = 2, 2, 4, 1300 if ON_GPU else 41
    g = torch.Generator().manual_seed(tq)
    q = torch.randn(b, hk * group, tq, d, generator=g).to(DEVICE, dtype)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    trig = trig_table(k.centroids)

    def launch(pack):
        return launch_attention(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                rot, rot, scale=1 / math.sqrt(d), mode="decode", pack=pack)

    ref = polar_sdpa(q.float(), k, v, scale=1 / math.sqrt(d), enable_gqa=True)
    got, plain = launch(True), launch(False)
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = (got.double() - ref.double()).norm() / ref.double().norm()
    assert err <= 1e-2, f"relative error {err:.2e}"
    assert not torch.equal(got, plain)
    default = launch(None)
    assert torch.equal(default, got if ON_GPU and common.PACKED_DECODE else plain)


@_RESHAPE
@pytest.mark.parametrize("preset", ["paper", "polar-3", "polar-4"])
def test_joint12_decode_attention_matches_reference(preset, monkeypatch):
    """POLARTENSOR_JOINT12=1: the packed decode takes levels 1 and 2 through the
    joint table where the configuration has one (paper, polar-3): within a bf16 SDPA's error
    of the reference, and really another path than the packed decode; polar-4 (no table)
    keeps the packed decode bit for bit. Through F.scaled_dot_product_attention too."""
    from polartensor.kernels.common import joint12_bits

    d = 128 if ON_GPU else 32
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    cfg, q, k, v, rot, trig, _ = _decode_inputs(preset, d, 2, 2, 4, 1300 if ON_GPU else 41, 1,
                                                7, dtype)

    def launch():
        return launch_attention(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                rot, rot, scale=1 / math.sqrt(d), mode="decode", pack=True)

    monkeypatch.setenv("POLARTENSOR_JOINT12", "0")
    packed = launch()
    monkeypatch.setenv("POLARTENSOR_JOINT12", "1")
    got = launch()
    ref = polar_sdpa(q.float(), k, v, scale=1 / math.sqrt(d), enable_gqa=True)
    err = (got.double() - ref.double()).norm() / ref.double().norm()
    assert err <= 1e-2, f"relative error {err:.2e}"
    if joint12_bits(cfg.bits) is None:
        assert torch.equal(got, packed)
    else:
        assert not torch.equal(got, packed)
    if ON_GPU:
        # the op path builds the tables with the configuration's bits, joint planes included
        sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        _close(sdpa, got, dtype)


def _decode_inputs(preset, d, b, hk, group, n, tq, seed, dtype):
    """A decode case: the configuration, queries [b, hk * group, tq, d] in ``dtype``, K and V
    quantized ([b, hk, n, d]), the rotation, the trig table, and the generator (for more)."""
    cfg = get_preset(preset, head_dim=d)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hk * group, tq, d, generator=g).to(DEVICE, dtype)
    k = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).to(DEVICE), cfg)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    return cfg, q, k, v, rot, trig_table(k.centroids, cfg.bits), g


def _spy_kwarg(monkeypatch, key="MMA_T") -> list:
    """The constexpr ``key`` (a tuple of keys: a tuple of their values, None where a launch
    does not pass one) of every attention-kernel launch from now on, in order (launches
    still run)."""
    from polartensor.kernels import decode_attention

    seen, real = [], decode_attention.polar_decode_attn_fwd_kernel

    class _Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(tuple(kwargs.get(k) for k in key) if isinstance(key, tuple)
                            else kwargs[key])
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(decode_attention, "polar_decode_attn_fwd_kernel", _Spy())
    return seen


def _set_env(monkeypatch, name: str, value: str | None) -> None:
    """Set ``name`` to ``value`` for the test, or unset it where ``value`` is None."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("mma", ["vp", "kq"])
@pytest.mark.parametrize("preset,tq,tail,mask_kind", [("paper", 1, 0, 0), ("polar-4", 3, 5, 1),
                                                       ("paper", 4, 0, 2)])
def test_decode_mma_orientations_match_default(mma, preset, tq, tail, mask_kind, monkeypatch):
    """POLARTENSOR_DECODE_MMA=vp (P @ V as V^T P^T) and =kq (the scores as K Q^T too, the
    softmax along the key axis): the same attention as =qk within a bf16 SDPA's error, with
    a query group, several queries, several splits, a full-precision tail and boolean or
    additive masks."""
    d = 128 if ON_GPU else 32
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    b, hk, group, n = 2, 2, 4, 1300 if ON_GPU else 41
    cfg, q, k, v, rot, trig, g = _decode_inputs(preset, d, b, hk, group, n, tq, 11, dtype)
    kt = torch.randn(b, hk, tail, d, generator=g).to(DEVICE, dtype)
    vt = torch.randn(b, hk, tail, d, generator=g).to(DEVICE, dtype)
    mask = None
    if mask_kind == 1:
        mask = torch.rand(b, 1, tq, n + tail, generator=g) > 0.3
        mask[..., -1] = True
    elif mask_kind == 2:
        mask = torch.randn(b, 1, tq, n + tail, generator=g).to(dtype)
    if mask is not None:
        mask = mask.to(DEVICE).expand(b, hk * group, tq, n + tail)
    seen = _spy_kwarg(monkeypatch)

    def launch(setting):
        monkeypatch.setenv("POLARTENSOR_DECODE_MMA", setting)
        return launch_attention(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                rot, rot, k_tail=kt if tail else None,
                                v_tail=vt if tail else None, mask=mask,
                                scale=1 / math.sqrt(d), mode="decode", num_splits=2,
                                # several key tiles per split; the GPU's default tile
                                block_n=None if ON_GPU else 16)

    want = launch("qk")
    got = launch(mma)
    assert seen == [0, {"vp": 1, "kq": 2}[mma]]
    _close(got, want, dtype)


@_RESHAPE
@pytest.mark.parametrize("preset", ["paper", "polar-3", "polar-4"])
@pytest.mark.parametrize("joint", ["0", "1"])
def test_shuffle_tables_equal_gathers(preset, joint, monkeypatch):
    """POLARTENSOR_DECODE_SHFL=1: the packed decode's per-level tables read
    by warp shuffles from one word per lane (PACK 3; 4 with the joint table) give the
    attention of the gathers (PACK 1 / 2) bit for bit: the same table words, the same
    arithmetic. On the GPU this checks the shuffles; the interpreter reads the tables."""
    d = 128 if ON_GPU else 32
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    cfg, q, k, v, rot, trig, _ = _decode_inputs(preset, d, 2, 2, 4, 1300 if ON_GPU else 41,
                                                3, 17, dtype)
    seen = _spy_kwarg(monkeypatch, "PACK")
    monkeypatch.setenv("POLARTENSOR_JOINT12", joint)

    def launch(shfl):
        monkeypatch.setenv("POLARTENSOR_DECODE_SHFL", shfl)
        return launch_attention(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                rot, rot, scale=1 / math.sqrt(d), mode="decode", pack=True,
                                num_splits=2, block_n=None if ON_GPU else 16)

    want, got = launch("0"), launch("1")
    gathers = 2 if joint == "1" and preset != "polar-4" else 1
    assert seen == [gathers, gathers + 2]
    assert torch.equal(got, want)


@pytest.mark.parametrize("getter,name,cases,bad", [
    ("decode_mma_setting", "POLARTENSOR_DECODE_MMA",
     [(None, None), ("auto", None), ("qk", 0), ("kq", 2)], "1"),   # None: auto_decode_mma
    ("joint12_setting", "POLARTENSOR_JOINT12", [(None, None), ("1", True), ("0", False)], "on"),
    ("decode_shfl_setting", "POLARTENSOR_DECODE_SHFL",
     [(None, None), ("1", True), ("0", False)], "yes"),           # None: auto_decode_shfl
])
def test_decode_settings_are_checked(getter, name, cases, bad, monkeypatch):
    """Each per-call decode setting: unset and every accepted value read as documented; any
    other value is refused with an error that names the variable and the value."""
    from polartensor.kernels import decode_attention

    read = getattr(decode_attention, getter)
    for value, want in cases:
        _set_env(monkeypatch, name, value)
        got = read()
        assert got == want and type(got) is type(want), (value, got)
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=f"{name}='{bad}'"):
        read()


@pytest.mark.parametrize("mode,d,rows,dtype,preset,want", [
    ("decode", 64, 16, torch.bfloat16, "paper", 2),      # d 64: kq
    ("decode", 64, 16, torch.bfloat16, "polar-4", 2),
    ("decode", 128, 16, torch.bfloat16, "paper", 1),     # d 128, 4-bit level 1: vp
    ("decode", 128, 16, torch.bfloat16, "polar-3", 1),
    ("decode", 128, 16, torch.bfloat16, "polar-4", 2),   # 5-bit level 1: kq
    ("decode", 128, 16, torch.bfloat16, "polar-5", 2),
    ("decode", 256, 16, torch.bfloat16, "paper", 0),     # not measured: qk
    ("decode", 128, 16, torch.float16, "paper", 0),
    ("decode", 128, 16, torch.float32, "paper", 0),
    ("decode", 128, 32, torch.bfloat16, "paper", 0),     # more than 16 query rows
    ("prefill", 64, 16, torch.bfloat16, "paper", 0),
])
def test_auto_decode_mma_follows_the_measured_rule(mode, d, rows, dtype, preset, want,
                                                   monkeypatch):
    from polartensor.kernels import decode_attention
    from polartensor.kernels.decode_attention import auto_decode_mma

    cfg = get_preset(preset, head_dim=d)
    monkeypatch.setattr(decode_attention, "PACKED_DECODE", True)  # the measured tile decode
    assert auto_decode_mma(mode, d, rows, dtype, cfg, cfg) == want
    # one cache with 5-bit level-1 angles takes kq (the integration's default pair)
    if want == 1:
        assert auto_decode_mma(mode, d, rows, dtype, cfg, get_preset("polar-4", head_dim=d)) == 2
    # the opt-out tile decodes (POLARTENSOR_DECODE=joined or reshape) keep qk
    monkeypatch.setattr(decode_attention, "PACKED_DECODE", False)
    assert auto_decode_mma(mode, d, rows, dtype, cfg, cfg) == 0


@pytest.mark.parametrize("mode,d,rows,dtype,pack,want", [
    ("decode", 128, 16, torch.bfloat16, True, True),    # d 128, per-level gathers: shuffles
    ("decode", 128, 4, torch.bfloat16, 1, True),
    ("decode", 128, 16, torch.bfloat16, 2, False),      # beside the joint table: gathers
    ("decode", 128, 16, torch.bfloat16, False, False),  # float32 tile decode: no tables
    ("decode", 64, 16, torch.bfloat16, True, False),    # d 64: gathers
    ("decode", 256, 16, torch.bfloat16, True, False),   # not measured
    ("decode", 128, 16, torch.float16, True, False),
    ("decode", 128, 32, torch.bfloat16, True, False),   # more than 16 query rows
    ("prefill", 128, 16, torch.bfloat16, True, False),
])
def test_auto_decode_shfl_follows_the_measured_rule(mode, d, rows, dtype, pack, want):
    from polartensor.kernels.decode_attention import auto_decode_shfl

    assert auto_decode_shfl(mode, d, rows, dtype, pack) is want


@_RESHAPE
@pytest.mark.parametrize("joint,want", [("0", 3), ("1", 2)])
def test_auto_decode_shfl_is_what_launches(joint, want, monkeypatch):
    """Unset POLARTENSOR_DECODE_SHFL at d 128 with bfloat16 queries: the packed decode
    without the joint table launches with the shuffles (PACK 3), beside the joint table with
    the gathers (PACK 2); either way the output equals the gathers' bit for bit."""
    d = 128
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    cfg, q, k, v, rot, trig, _ = _decode_inputs("paper", d, 1, 2, 2, 1300 if ON_GPU else 37,
                                                1, 23, dtype)
    if not ON_GPU:
        q = q.to(torch.bfloat16)    # the rule reads the queries' dtype
    seen = _spy_kwarg(monkeypatch, "PACK")
    monkeypatch.setenv("POLARTENSOR_JOINT12", joint)

    def launch(shfl):
        _set_env(monkeypatch, "POLARTENSOR_DECODE_SHFL", shfl)
        return launch_attention(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                rot, rot, scale=1 / math.sqrt(d), mode="decode", pack=True,
                                num_splits=2, block_n=None if ON_GPU else 16)

    got, gathers = launch(None), launch("0")
    assert seen == [want, want if want == 2 else 1]
    assert torch.equal(got, gathers)


@pytest.mark.parametrize("d,kname,vname,group", [(64, "paper", "paper", 3),
                                                  (128, "polar-4", "polar-3", 4)],
                         ids=["d64", "d128-default-pair"])
def test_auto_decode_mma_is_what_launches(d, kname, vname, group, monkeypatch):
    """Unset POLARTENSOR_DECODE_MMA: the launch passes auto_decode_mma's orientation to the
    kernel (bfloat16 queries with the default tile decode: kq at d 64, and at d 128 for the
    transformers integration's default cache, polar-4 keys with polar-3 values), and its
    output equals the qk launch's and the reference within a bf16 SDPA's error."""
    dtype, n = torch.bfloat16, 1300 if ON_GPU else 37
    g = torch.Generator().manual_seed(5)
    kcfg, vcfg = get_preset(kname, head_dim=d), get_preset(vname, head_dim=d)
    q = torch.randn(1, 2 * group, 1, d, generator=g).to(DEVICE, dtype)
    k = quantize(torch.randn(1, 2, n, d, generator=g).to(DEVICE), kcfg)
    v = quantize(torch.randn(1, 2, n, d, generator=g).to(DEVICE), vcfg)
    rk, rv = (rotation_matrix(d, c.rotation, c.seed, DEVICE, torch.float32).contiguous()
              for c in (kcfg, vcfg))
    seen = _spy_kwarg(monkeypatch)

    def launch():
        return launch_attention(q, k.codes, k.radii, trig_table(k.centroids, kcfg.bits), kcfg,
                                v.codes, v.radii, trig_table(v.centroids, vcfg.bits), vcfg,
                                rk, rv, scale=1 / math.sqrt(d), mode="decode", num_splits=2,
                                block_n=None if ON_GPU else 16)

    monkeypatch.delenv("POLARTENSOR_DECODE_MMA", raising=False)
    got = launch()
    monkeypatch.setenv("POLARTENSOR_DECODE_MMA", "qk")
    want = launch()
    assert seen == [2 if common.PACKED_DECODE else 0, 0]
    _close(got, want, dtype)
    ref = polar_sdpa(q.float(), k, v, scale=1 / math.sqrt(d), enable_gqa=True)
    _close(got, ref.to(dtype), dtype)


@_RESHAPE
@pytest.mark.skipif(not ON_GPU, reason="the rule picks among GPU launches (keys per step and "
                    "register caps at d 128); the interpreter takes none of them")
@pytest.mark.parametrize("preset,shfl,want", [("paper", None, 3), ("paper", "0", 2),
                                              ("polar-3", None, 3), ("polar-3", "0", 1)])
def test_joint12_default_where_measured_faster(preset, shfl, want, monkeypatch):
    """POLARTENSOR_JOINT12 unset, in the launch for many programs (batch 8, 8 KV heads, 8K
    keys, d 128): with the shuffles at their default both presets read the per-level tables
    by shuffles (PACK 3); with them off (POLARTENSOR_DECODE_SHFL=0) the paper preset takes the
    joint table (PACK 2), polar-3 the gathers (PACK 1). The output equals the launch that
    forces the same kernel, bit for bit, and matches the reference."""
    d = 128
    cfg, q, k, v, rot, trig, _ = _decode_inputs(preset, d, 8, 8, 4, 8192, 1, 11, torch.bfloat16)
    _set_env(monkeypatch, "POLARTENSOR_DECODE_SHFL", shfl)
    seen = _spy_kwarg(monkeypatch, "PACK")

    def launch(setting):
        _set_env(monkeypatch, "POLARTENSOR_JOINT12", setting)
        return launch_attention(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                rot, rot, scale=1 / math.sqrt(d), mode="decode")

    got, forced = launch(None), launch("1" if want == 2 else "0")
    assert seen == [want, want]
    assert torch.equal(got, forced)
    ref = polar_sdpa(q.float(), k, v, scale=1 / math.sqrt(d), enable_gqa=True)
    err = (got.double() - ref.double()).norm() / ref.double().norm()
    assert err <= 1e-2, f"relative error {err:.2e}"


@_RESHAPE
def test_packed_decode_refuses_more_than_32_rows():
    """64 query rows per program (q_len 16, group 4): Triton 3.6 cannot compile the packed
    decode there, so pack=True is refused with the fix named, and the default launch takes the
    float32 decode (bit for bit pack=False)."""
    d = 128 if ON_GPU else 32
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    cfg = get_preset("paper", head_dim=d)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 16, d, generator=g).to(DEVICE, dtype)
    k = quantize(torch.randn(1, 2, 40, d, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(1, 2, 40, d, generator=g).to(DEVICE), cfg)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    trig = trig_table(k.centroids)

    def launch(pack, **kw):
        return launch_attention(q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg,
                                rot, rot, scale=1 / math.sqrt(d), mode="decode", pack=pack, **kw)

    with pytest.raises(ValueError, match="64 query rows per program.*block_t"):
        launch(True)
    assert torch.equal(launch(None), launch(False))
    # the fix the message names: 8 queries per program (32 rows) packs
    ref = polar_sdpa(q.float(), k, v, scale=1 / math.sqrt(d), enable_gqa=True)
    got = launch(True, block_t=8)
    err = (got.double() - ref.double()).norm() / ref.double().norm()
    assert err <= 1e-2, f"relative error {err:.2e}"


@_RESHAPE
@pytest.mark.skipif(not ON_GPU, reason="the interpreter decodes in float32 whatever the "
                    "query dtype, so pack=True takes any dtype there")
def test_packed_decode_refuses_non_bf16_queries():
    cfg = get_preset("paper", head_dim=64)
    q = torch.randn(1, 4, 1, 64, device=DEVICE, dtype=torch.float16)
    k = quantize(torch.randn(1, 2, 40, 64, device=DEVICE), cfg)
    rot = rotation_matrix(64, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    trig = trig_table(k.centroids)
    with pytest.raises(ValueError, match="bfloat16 queries.*float16"):
        launch_attention(q, k.codes, k.radii, trig, cfg, k.codes, k.radii, trig, cfg, rot, rot,
                         scale=0.125, mode="decode", pack=True)


# (KV heads, batch, context, resident programs per SM, fastest split count): the fastest count
# of an H100 sweep of every count, paper and polar-4 alike (results/bench/
# decode_split_sweep_h100.md); 128 keys per step, 132 SMs
_SWEEP_BEST = [(8, 1, 32768, 3, 32), (8, 1, 131072, 3, 49), (8, 2, 32768, 3, 24),
               (8, 4, 32768, 3, 12), (8, 8, 4096, 2, 4), (8, 8, 32768, 3, 6),
               (3, 1, 32768, 3, 43), (3, 8, 32768, 3, 16), (3, 1, 131072, 3, 128),
               # the faster of the two rules' counts in an A/B run on an H100
               # (results/bench/ab_kernels_2026-12-06i_h100.md): 8 splits against 6 at
               # 1.08-1.13x, 13 against 16 at 1.09-1.15x
               (8, 3, 4096, 3, 8), (3, 8, 4096, 3, 8), (3, 3, 8192, 3, 13)]


@pytest.mark.parametrize("hk,batch,context,per_sm,best", _SWEEP_BEST)
def test_split_count_pick_the_measured_fastest(hk, batch, context, per_sm, best):
    """The split count launch_attention picks from a kernel's resident programs per SM is the
    one the H100 sweep measured fastest (the earlier rule took 43 splits at Llama batch 1 /
    32K, where 32 ran 1.05x faster, and 64 at SmolLM2 batch 1 / 32K, where 43 ran 1.07x)."""
    import triton

    from polartensor.kernels.decode_attention import _split_count

    progs, steps = batch * hk, triton.cdiv(context, 128)
    want = triton.cdiv(8 * 132, progs)
    assert _split_count(want, triton.cdiv(context, 512), progs, per_sm, 132, steps) == best


@settings(max_examples=200, deadline=None)
@given(want=st.integers(1, 300), max_splits=st.integers(1, 300), progs=st.integers(1, 600),
       per_sm=st.integers(1, 8), sms=st.integers(1, 160), steps=st.integers(1, 2000))
def test_split_count_is_a_launchable_count(want, max_splits, progs, per_sm, sms, steps):
    """Any pick is a count the launch keeps as is (every split has keys: the kernel's
    rounding to whole steps does not merge it into fewer) and within the allowed range."""
    import triton

    from polartensor.kernels.decode_attention import _split_count

    s = _split_count(want, max_splits, progs, per_sm, sms, steps)
    assert 1 <= s <= max(1, min(max_splits, steps))
    assert triton.cdiv(steps, triton.cdiv(steps, s)) == s


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 20000), max_splits=st.integers(1, 5000))
def test_split_candidates_are_every_kept_count(steps, max_splits):
    """The rule's candidates, enumerated in O(sqrt(steps)), are exactly the counts
    cdiv(steps, cdiv(steps, x)) for x in 1..max_splits."""
    import triton

    from polartensor.kernels.decode_attention import _split_candidates

    every = {triton.cdiv(steps, triton.cdiv(steps, x)) for x in range(1, max_splits + 1)}
    assert _split_candidates(steps, max_splits) == sorted(every)


def test_blocks_per_sm_from_compiled_kernel(monkeypatch):
    """Resident programs per SM from registers, shared memory and warps (H200 limits): the
    packed decode's 128 registers x 4 warps allow 4 (Nsight Compute said 4), 255 registers 2."""
    from types import SimpleNamespace

    from polartensor.kernels import decode_attention as da

    props = SimpleNamespace(regs_per_multiprocessor=65536,
                            shared_memory_per_multiprocessor=233472,
                            max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)

    def compiled(regs, shared, warps):
        return SimpleNamespace(_init_handles=lambda: None, n_regs=regs,
                               metadata=SimpleNamespace(shared=shared, num_warps=warps))

    assert da._blocks_per_sm(compiled(128, 36864, 4), "cuda") == 4
    assert da._blocks_per_sm(compiled(255, 36864, 4), "cuda") == 2
    assert da._blocks_per_sm(compiled(64, 100000, 4), "cuda") == 2      # shared memory
    assert da._blocks_per_sm(compiled(32, 0, 8), "cuda") == 8            # threads
    broken = SimpleNamespace(_init_handles=lambda: (_ for _ in ()).throw(RuntimeError("x")))
    assert da._blocks_per_sm(broken, "cuda") is None


def test_unknown_split_rule_is_refused():
    cfg = get_preset("paper", head_dim=32)
    q = torch.randn(1, 4, 1, 32, device=DEVICE)
    k = quantize(torch.randn(1, 2, 40, 32, device=DEVICE), cfg)
    rot = rotation_matrix(32, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    trig = trig_table(k.centroids)
    with pytest.raises(ValueError, match="split_rule='fast'.*'waves'"):
        launch_attention(q, k.codes, k.radii, trig, cfg, k.codes, k.radii, trig, cfg, rot, rot,
                         scale=0.2, mode="decode", split_rule="fast")
