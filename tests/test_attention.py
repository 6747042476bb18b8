import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from polartensor.attention import causal_mask, polar_sdpa
from polartensor.config import PolarQuantConfig
from polartensor.polar_quant_tensor import quantize

CFGS = [PolarQuantConfig.paper(), PolarQuantConfig(levels=6, bits=(3, 2, 2, 1, 1, 1), seed=3),
        PolarQuantConfig(levels=2, bits=(4, 3), rotation="hadamard", radius_dtype="float32")]


def _reference(q, k, v, mask, is_causal, scale, group):
    """SDPA on plain (dequantized) tensors with an explicit bottom-right causal mask."""
    if group > 1:
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    lq, lk = q.shape[-2], k.shape[-2]
    bias = torch.zeros(lq, lk, dtype=torch.float64)
    if is_causal:
        bias = bias.masked_fill(~causal_mask(lq, lk), float("-inf"))
    if mask is not None:
        bias = bias + (mask.double() if mask.is_floating_point()
                       else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(
                           ~mask, float("-inf")))
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + bias
    dead = torch.isneginf(s.amax(-1, keepdim=True))
    p = torch.softmax(s.masked_fill(dead, 0), -1).masked_fill(dead, 0)
    return p @ v.double()


@given(
    cfg_i=st.sampled_from(range(len(CFGS))),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3, 4, 16]),
    kv_len=st.integers(1, 19),
    q_frac=st.floats(0, 1),
    mask_kind=st.sampled_from(["none", "bool", "float", "causal", "causal+bool"]),
    quant=st.sampled_from(["kv", "k", "v"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 10**6),
)
def test_sdpa_on_quantized_equals_sdpa_on_dequantized(
    cfg_i, batch, kv_heads, group, kv_len, q_frac, mask_kind, quant, dtype, seed
):
    cfg = CFGS[cfg_i]
    d = 64
    g = torch.Generator().manual_seed(seed)
    q_len = max(1, int(round(q_frac * kv_len)))
    q = torch.randn(batch, kv_heads * group, q_len, d, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, d, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, d, generator=g)
    kq, vq = quantize(k, cfg), quantize(v, cfg)
    key = kq if "k" in quant else k
    val = vq if "v" in quant else v
    mask = None
    if "bool" in mask_kind:
        mask = torch.rand(batch, 1, q_len, kv_len, generator=g) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(1, kv_heads * group, q_len, kv_len, generator=g)
    is_causal = "causal" in mask_kind
    scale = 0.3 if seed % 2 else None
    out = F.scaled_dot_product_attention(q, key, val, attn_mask=mask, is_causal=is_causal,
                                         scale=scale, enable_gqa=group > 1)
    assert out.dtype == dtype and out.shape == q.shape
    kd = kq.dequantize() if "k" in quant else k
    vd = vq.dequantize() if "v" in quant else v
    ref = _reference(q, kd, vd, mask, is_causal, scale or d**-0.5, group)
    tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert torch.allclose(out.double(), ref, atol=tol, rtol=tol)


def test_matches_torch_sdpa_without_causal_offset():
    # With q_len == kv_len bottom-right and top-left causal coincide: compare with torch itself.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 64, generator=g) for _ in range(3))
    kq, vq = quantize(k, "paper"), quantize(v, "paper")
    out = F.scaled_dot_product_attention(q, kq, vq, is_causal=True)
    ref = F.scaled_dot_product_attention(q, kq.dequantize(), vq.dequantize(), is_causal=True)
    assert torch.allclose(out, ref, atol=1e-5)


def test_bottom_right_causal_mask():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_fully_masked_rows_are_zero():
    q = torch.randn(1, 1, 2, 64)
    k = quantize(torch.randn(1, 1, 3, 64), "paper")
    mask = torch.tensor([[False, False, False], [True, False, True]])
    out = polar_sdpa(q, k, k, attn_mask=mask)
    assert torch.equal(out[0, 0, 0], torch.zeros(64)) and out[0, 0, 1].abs().sum() > 0


def test_sdpa_bad_arguments():
    q = torch.randn(1, 4, 2, 64)
    k = quantize(torch.randn(1, 2, 3, 64), "paper")
    with pytest.raises(ValueError, match="enable_gqa=True"):
        F.scaled_dot_product_attention(q, k, k)
    with pytest.raises(NotImplementedError, match="dropout"):
        F.scaled_dot_product_attention(q, k, k, dropout_p=0.1, enable_gqa=True)
    with pytest.raises(ValueError, match="head_dim"):
        F.scaled_dot_product_attention(torch.randn(1, 4, 2, 32), k, k, enable_gqa=True)
    with pytest.raises(ValueError, match="multiple"):
        F.scaled_dot_product_attention(torch.randn(1, 3, 2, 64), k, k, enable_gqa=True)
    with pytest.raises(TypeError, match="query must be a plain tensor"):
        F.scaled_dot_product_attention(k, k, k)
    with pytest.raises(TypeError, match="floating"):
        F.scaled_dot_product_attention(torch.ones(1, 4, 2, 64, dtype=torch.int64), k, k,
                                       enable_gqa=True)
    with pytest.raises(ValueError, match="same number of dims"):
        F.scaled_dot_product_attention(torch.randn(4, 2, 64), k, k, enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be bool or floating"):
        F.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(2, 3, dtype=torch.int64),
                                       enable_gqa=True)
    with pytest.raises(ValueError, match=r"does not broadcast to .* \(1, 4, 2, 3\)"):
        F.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(2, 4, dtype=torch.bool),
                                       enable_gqa=True)
    with pytest.raises(ValueError, match="does not broadcast"):  # would widen the output
        F.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(5, 1, 4, 2, 3),
                                       enable_gqa=True)


def test_sdpa_with_no_keys_gives_zeros():
    # F.scaled_dot_product_attention on plain tensors gives zeros for an empty key set too
    q = torch.randn(2, 4, 3, 64, dtype=torch.bfloat16)
    k = quantize(torch.randn(2, 2, 5, 64), "paper")[:, :, :0]
    out = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    assert out.shape == (2, 4, 3, 64) and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.zeros_like(out))


def test_sdpa_mismatched_devices_raise():
    k = quantize(torch.randn(1, 2, 3, 64), "paper")
    q = torch.empty(1, 2, 1, 64, device="meta")
    with pytest.raises(ValueError, match="one device"):
        F.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="one device"):
        F.scaled_dot_product_attention(torch.randn(1, 2, 1, 64), k, k,
                                       attn_mask=torch.ones(1, 3, dtype=torch.bool,
                                                            device="meta"))
