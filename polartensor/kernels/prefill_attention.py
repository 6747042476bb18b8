"""Chunked-prefill attention: q_len up to thousands against the quantized cache plus the new
chunk's own tokens in full precision, bottom-right causal mask, padding masks.

It is the attention kernel of ``decode_attention.py`` launched with query tiles on the grid's
second axis (each program: the whole GQA group x ``BLOCK_T`` query positions of one KV head)
and a single KV split, so the output is finalised (normalised and un-rotated) in the same
kernel. With a causal mask each query tile stops at its last visible key.

Long query chunks can instead (``mode="dequant"``) dequantize the cache once with the dequant
kernel and run PyTorch's SDPA on the rotated vectors: the fused kernel decodes the whole cache
again for every query tile, which made a 2K-token chunk on a 32K cache 10x slower than bf16
SDPA. The price is a transient 16-bit copy of this layer's cache during that call. On the
H200 (2K-token chunk, 32K cache, d 128) it ran 3.6x faster than the fused prefill without a
mask and 2.1x with the causal mask (materialised as a mask), so on the GPU the "auto" mode of
``launch_attention`` takes it from ``DEFAULT_DEQUANT_MIN_Q`` query tokens on;
``POLARTENSOR_DEQUANT_MIN_Q`` moves that threshold
(``off``: never; the fused kernel then serves every chunk).

Reference: ``polartensor.attention.polar_sdpa`` (see ``kernels/naive.py``).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..attention import with_causal
from .common import env_flag
from .decode_attention import launch_attention

__all__ = ["prefill_attention", "dequant_sdpa", "dequant_min_q", "DEFAULT_DEQUANT_MIN_Q"]

DEFAULT_DEQUANT_MIN_Q = 64


def dequant_min_q() -> int | None:
    """Query length from which launch_attention's "auto" mode (on the GPU) takes the
    dequantize-once path (``POLARTENSOR_DEQUANT_MIN_Q``, default ``DEFAULT_DEQUANT_MIN_Q``);
    None: never (``POLARTENSOR_DEQUANT_MIN_Q=off``)."""
    v = os.environ.get("POLARTENSOR_DEQUANT_MIN_Q", "").strip()
    if not v:
        return DEFAULT_DEQUANT_MIN_Q
    if v.lower() == "off":
        return None
    if not v.isdigit() or int(v) < 17:
        raise ValueError(f"POLARTENSOR_DEQUANT_MIN_Q={v!r}: set a query length >= 17 (shorter "
                         "queries take the decode kernel), 'off' (never), or unset it for the "
                         f"default ({DEFAULT_DEQUANT_MIN_Q})")
    return int(v)


def _dequant_rotated(codes, radii, trig, cfg, d, dtype, tail):
    from .dequant import dequantize_rotated_triton

    x = dequantize_rotated_triton(codes, radii, trig, cfg, d, dtype)
    if tail is not None and tail.shape[-2]:
        x = torch.cat([x, tail.to(dtype)], dim=-2)
    return x


def _base_mask(mask: torch.Tensor) -> torch.Tensor:
    """The broadcast mask with its expanded (stride-0) dims shrunk back to size 1."""
    idx = tuple(slice(0, 1) if st == 0 and sz > 1 else slice(None)
                for st, sz in zip(mask.stride(), mask.shape))
    return mask[idx]


def dequant_sdpa(
    q: torch.Tensor, k_codes, k_radii, k_trig, k_cfg, v_codes, v_radii, v_trig, v_cfg,
    rot_k: torch.Tensor | None, rot_v: torch.Tensor | None,
    k_tail: torch.Tensor | None, v_tail: torch.Tensor | None, mask: torch.Tensor | None,
    is_causal: bool, scale: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``launch_attention`` (q [B, Hq, Tq, D], tails already rotated, mask
    broadcast to [B, Hq, Tq, N + NT]); dequantize K/V once, then SDPA in q's dtype."""
    bsz, hq, tq, d = q.shape
    hk = k_codes.shape[1]
    dt = q.dtype
    kd = _dequant_rotated(k_codes, k_radii, k_trig, k_cfg, d, dt, k_tail)
    vd = _dequant_rotated(v_codes, v_radii, v_trig, v_cfg, d, dt, v_tail)
    total = kd.shape[-2]
    if hq != hk:
        kd = kd.repeat_interleave(hq // hk, dim=1)
        vd = vd.repeat_interleave(hq // hk, dim=1)
    qr = (q.float() @ rot_k.T).to(dt) if rot_k is not None else q
    m = None if mask is None else _base_mask(mask)
    if is_causal and m is None and causal_flash_enabled() and _flash_ok(qr):
        # Bottom-right causal without a mask: PyTorch's flash kernel aligns is_causal to the
        # bottom right when there are more keys than queries (what torch's causal_lower_right
        # bias calls; the bias object itself lost its attributes inside our custom op on
        # torch 2.11 CUDA). Every query sees at least its own key, so no row is empty.
        o = torch.ops.aten._scaled_dot_product_flash_attention(
            qr, kd, vd, 0.0, True, False, scale=scale)[0]
        return _finish(o, rot_v, dt, out)
    # Bottom-right causal as a materialised mask.
    if is_causal:  # bottom-right aligned, as the reference
        m = with_causal(m, tq, total, q.device)
    if m is not None and m.dtype != torch.bool:
        m = m.to(dt)
    o = F.scaled_dot_product_attention(qr, kd, vd, attn_mask=m, scale=scale)
    if m is not None:
        # Rows that see no key give zeros (the reference's convention), not NaN.
        alive = m.any(-1, keepdim=True) if m.dtype == torch.bool else (
            m > float("-inf")).any(-1, keepdim=True)
        o = torch.where(alive, o, torch.zeros((), dtype=o.dtype, device=o.device))
    return _finish(o, rot_v, dt, out)


def _finish(o, rot_v, dt, out):
    o = (o.float() @ rot_v).to(dt) if rot_v is not None else o
    if out is not None:
        out.copy_(o)
        return out
    return o


def causal_flash_enabled() -> bool:
    """Causal query chunks on the dequantize-then-SDPA path run PyTorch's flash kernel
    bottom-right aligned unless POLARTENSOR_CAUSAL_FLASH=0 (read per call), which keeps SDPA
    with a materialised mask. On the H200, 2K causal queries on a 32K cache: 4.62 to 4.18 ms
    (d 128) and 1.66 to 1.10 ms (d 64), results/bench/bench_code16.md."""
    return env_flag("POLARTENSOR_CAUSAL_FLASH", True, "flash, bottom-right causal",
                    "a materialised mask")


def _flash_ok(q: torch.Tensor) -> bool:
    """Inputs PyTorch's flash kernel takes: CUDA, 16-bit, head_dim a multiple of 8 up to 256."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0
            and d <= 256)


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
        q.contiguous(), k.codes, k.radii, _trig(k.centroids, kc.bits), kc,
        v.codes, v.radii, _trig(v.centroids, vc.bits), vc, rot_k, rot_v, kt, vt, mask,
        is_causal, scale, mode=launch_kw.pop("mode", "prefill"), **launch_kw,
    )
