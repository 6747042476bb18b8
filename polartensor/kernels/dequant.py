"""Dequantize a quantized cache to plain rotated-domain vectors (the "dequantize then SDPA"
baseline of the benchmark, and a fast path for materialising a cache).

Reference: ``PolarQuantTensor.dequantize_rotated`` (see ``kernels/naive.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import decode_tile, interpreting, level_words
from .tree_decode import code16_aligned

__all__ = ["polar_dequant_kernel", "dequantize_rotated_triton"]


@triton.jit(do_not_specialize=["n_rows"])
def polar_dequant_kernel(
    codes_ptr, radii_ptr, trig_ptr, out_ptr, n_rows,
    BN: tl.constexpr, D: tl.constexpr, R: tl.constexpr, KT: tl.constexpr, L: tl.constexpr,
    NB: tl.constexpr, TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr,
    LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr, LV3: tl.constexpr,
    LV4: tl.constexpr, LV5: tl.constexpr, LV6: tl.constexpr, LV7: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    valid = rows < n_rows
    y = decode_tile(codes_ptr, radii_ptr, trig_ptr, rows * R, rows * NB, valid, BN, D, KT, L,
                    NB, TAIL_BYTE, TAIL_NB, LV0, LV1, LV2, LV3, LV4, LV5, LV6, LV7, False)
    dd = tl.arange(0, D)
    tl.store(out_ptr + rows[:, None] * D + dd[None, :], y.to(out_ptr.dtype.element_ty),
             mask=valid[:, None])


def dequantize_rotated_triton(codes: torch.Tensor, radii: torch.Tensor, trig: torch.Tensor,
                              config, head_dim: int, dtype=torch.float32) -> torch.Tensor:
    """y_hat [..., head_dim] in ``dtype`` from contiguous codes [..., R] / radii [..., NB]."""
    codes = codes.contiguous()
    radii = radii.contiguous()
    codes = code16_aligned(codes)
    lead = codes.shape[:-1]
    n_rows = codes.numel() // max(codes.shape[-1], 1)
    out = torch.empty(*lead, head_dim, dtype=dtype, device=codes.device)
    if n_rows == 0:
        return out
    w = level_words(config, head_dim)
    bn = 16 if interpreting() else 64
    polar_dequant_kernel[(triton.cdiv(n_rows, bn),)](
        codes, radii, trig, out, n_rows,
        BN=bn, D=head_dim, R=w["R"], KT=trig.shape[-1], L=w["L"], NB=w["NB"],
        TAIL_BYTE=w["TAIL_BYTE"], TAIL_NB=w["TAIL_NB"],
        LV0=w["LV0"], LV1=w["LV1"], LV2=w["LV2"], LV3=w["LV3"],
        LV4=w["LV4"], LV5=w["LV5"], LV6=w["LV6"], LV7=w["LV7"], num_warps=4,
    )
    return out
