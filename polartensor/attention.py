"""Attention over quantized K/V with the rotation trick (pure PyTorch reference path).

S is orthogonal, so q.k = (S q).(S k) and sum_i p_i v_i = S^T sum_i p_i (S v_i): rotate the
query once, score it against the rotated keys as stored, weight the rotated values as stored,
and un-rotate the output once per query row. No per-key or per-value rotation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .polar_quant_tensor import PolarQuantTensor, implements_torch_function
from .rotation import rotate, unrotate

__all__ = ["polar_sdpa", "causal_mask", "validate_sdpa_args"]


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask (True = attend): query i sees keys j <= i + kv - q.

    Unlike ``F.scaled_dot_product_attention(is_causal=True)`` (top-left aligned), this is the
    right mask when new queries attend to a cache that already holds earlier tokens.
    """
    i = torch.arange(q_len, device=device).unsqueeze(-1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return j <= i + (kv_len - q_len)


def with_causal(attn_mask: torch.Tensor | None, q_len: int, kv_len: int,
                device=None) -> torch.Tensor:
    """``attn_mask`` (bool: True = attend, or additive) and the bottom-right causal mask,
    combined in the mask's own kind: bool stays bool, additive gets -inf where causality hides
    a key. None gives the causal mask alone."""
    causal = causal_mask(q_len, kv_len, device)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


def validate_sdpa_args(query, key, value, attn_mask, dropout_p, enable_gqa) -> int:
    """Check SDPA arguments; return the GQA group size (query heads per KV head)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must be [..., heads, seq, head_dim], got shape "
                             f"{tuple(t.shape)}")
    if isinstance(query, PolarQuantTensor):
        raise TypeError("query must be a plain tensor; only keys and values can be quantized")
    if not query.is_floating_point():
        raise TypeError(f"query must be floating point, got {query.dtype}")
    if dropout_p:
        raise NotImplementedError(
            "dropout_p > 0 is not supported on quantized K/V (an inference path); pass 0.0"
        )
    devs = {query.device, key.device, value.device}
    if attn_mask is not None:
        devs.add(attn_mask.device)
    if len(devs) > 1:
        raise ValueError(f"query, key, value and attn_mask must be on one device, got {devs}")
    if query.dim() != key.dim() or key.dim() != value.dim():
        raise ValueError("query, key and value must have the same number of dims")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(
            f"batch dims differ: query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query head_dim {query.shape[-1]} != key head_dim {key.shape[-1]}"
        )
    if key.shape[-2] != value.shape[-2] or key.shape[-3] != value.shape[-3]:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in heads or length"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        want = torch.Size((*query.shape[:-1], key.shape[-2]))
        try:
            fits = torch.broadcast_shapes(attn_mask.shape, want) == want
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"[..., query heads, q_len, kv_len] = {tuple(want)}; pass one of that shape "
                "or one that broadcasts to it, such as [q_len, kv_len] or "
                "[batch, 1, q_len, kv_len]"
            )
    hq, hk = query.shape[-3], key.shape[-3]
    if hq == hk:
        return 1
    if not enable_gqa:
        raise ValueError(
            f"query has {hq} heads but key/value have {hk}: pass enable_gqa=True for "
            "grouped-query attention"
        )
    if hq % hk:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hk}")
    return hq // hk


def _as_rotated(t: torch.Tensor, dtype: torch.dtype):
    """(rotated-domain fp tensor, config or None) for a quantized or plain K/V tensor."""
    if isinstance(t, PolarQuantTensor):
        return t.dequantize_rotated(dtype), t.config
    return t.to(dtype), None


def combined_mask(attn_mask, is_causal, q_len, kv_len, device, dtype):
    """Additive float mask (0 / -inf) or None, from a bool/additive mask and causality."""
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=device)
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask.is_floating_point():
            bias = attn_mask.to(dtype)
        else:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if is_causal:
        c = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
        c = c.masked_fill(~causal_mask(q_len, kv_len, device), float("-inf"))
        bias = c if bias is None else bias + c
    return bias


def polar_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention where key and/or value may be PolarQuantTensors.

    Same contract as ``F.scaled_dot_product_attention`` with two deliberate differences:
    ``is_causal`` is bottom-right aligned when q_len < kv_len (new queries after a cache),
    and it may be combined with ``attn_mask``. Query rows with no visible key give zeros.
    The output dtype is the query dtype; math runs in fp32 (fp64 for fp64 queries).
    """
    group = validate_sdpa_args(query, key, value, attn_mask, dropout_p, enable_gqa)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    q_len, kv_len, d = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    if kv_len == 0:  # no key to attend to: zeros, as for a fully masked row
        return query.new_zeros((*query.shape[:-1], value.shape[-1]))
    k_rot, kcfg = _as_rotated(key, work)
    v_rot, vcfg = _as_rotated(value, work)
    q = rotate(query, kcfg.rotation, kcfg.seed) if kcfg is not None else query.to(work)
    if group > 1:
        k_rot = k_rot.repeat_interleave(group, dim=-3)
        v_rot = v_rot.repeat_interleave(group, dim=-3)

    scores = (q @ k_rot.transpose(-1, -2)) * scale
    bias = combined_mask(attn_mask, is_causal, q_len, kv_len, query.device, work)
    if bias is not None:
        scores = scores + bias
    # Rows with no visible key: softmax would give NaN; define the output as zeros.
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    p = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    out = p @ v_rot
    if vcfg is not None:
        out = unrotate(out, vcfg.rotation, vcfg.seed)
    return out.to(query.dtype)


@implements_torch_function(F.scaled_dot_product_attention)
def _sdpa_override(func, types, args, kwargs):
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    from .kernels import dispatch  # late import: kernels are optional on CPU

    return dispatch.scaled_dot_product_attention(**bound)
