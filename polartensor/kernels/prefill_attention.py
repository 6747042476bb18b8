"""Chunked-prefill attention: q_len up to thousands against the quantized cache plus the new
chunk's own tokens in full precision, bottom-right causal mask, padding masks.

It is the attention kernel of ``decode_attention.py`` launched with query tiles on the grid's
second axis (each program: the whole GQA group x ``BLOCK_T`` query positions of one KV head)
and a single KV split, so the output is finalised (normalised and un-rotated) in the same
kernel. With a causal mask each query tile stops at its last visible key.

Reference: ``polartensor.attention.polar_sdpa`` (see ``kernels/naive.py``).
"""

from __future__ import annotations

import math

import torch

from .decode_attention import launch_attention

__all__ = ["prefill_attention"]


def prefill_attention(
    q: torch.Tensor, k, v, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None, is_causal: bool = True, scale: float | None = None,
    **launch_kw,
) -> torch.Tensor:
    """q [B, Hq, T, D] against PolarQuantTensors ``k``/``v`` [B, Hk, N, D] followed by the
    chunk's own full-precision ``k_new``/``v_new`` [B, Hk, T', D] (original domain; rotated
    here, once). ``attn_mask`` broadcasts to [B, Hq, T, N + T']."""
    from .dispatch import _kernel_mask, _trig
    from .ops import cached_rotation

    d = q.shape[-1]
    kc, vc = k.config, v.config
    rot_k = cached_rotation(kc.rotation, kc.seed, d, q.device)
    rot_v = cached_rotation(vc.rotation, vc.seed, d, q.device)
    kt = vt = None
    if k_new is not None:
        kt = k_new.float() @ rot_k.T if rot_k is not None else k_new.float()
        vt = v_new.float() @ rot_v.T if rot_v is not None else v_new.float()
    total = k.shape[-2] + (0 if kt is None else kt.shape[-2])
    mask = None
    if attn_mask is not None:
        mask, ok = _kernel_mask(attn_mask, q.shape[:-3], q.shape[-3], q.shape[-2], total)
        if not ok:
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(*q.shape[:-1], total)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    return launch_attention(
        q.contiguous(), k.codes, k.radii, _trig(k.centroids), kc,
        v.codes, v.radii, _trig(v.centroids), vc, rot_k, rot_v, kt, vt, mask,
        is_causal, scale, mode=launch_kw.pop("mode", "prefill"), **launch_kw,
    )
