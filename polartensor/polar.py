"""Recursive polar transform (pure PyTorch reference for the kernels).

Everything here works in the rotated domain y = S x. Level 1 turns coordinate pairs into an
angle in [0, 2pi) and a radius; each further level turns pairs of radii into an angle in
[0, pi/2] and a radius, until one radius per block of 2**levels coordinates is left.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .codebook import nearest_code
from .config import PolarQuantConfig

__all__ = ["polar_angles", "encode_rotated", "decode_rotated", "decode_factors"]

_TWO_PI = 2.0 * math.pi


def polar_angles(
    y: torch.Tensor, levels: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Angles per level, their node weights (squared node radius) and the block radii."""
    angles, weights = [], []
    r = y
    for lvl in range(1, levels + 1):
        a, b = r[..., 0::2], r[..., 1::2]
        psi = torch.atan2(b, a)
        if lvl == 1:
            psi = torch.remainder(psi, _TWO_PI)
            # remainder can round -tiny up to exactly 2pi; fold it back to 0.
            psi = torch.where(psi >= _TWO_PI, torch.zeros_like(psi), psi)
        r = torch.hypot(a, b)
        angles.append(psi)
        weights.append(r * r)
    return angles, weights, r


def encode_rotated(
    y: torch.Tensor, config: PolarQuantConfig, centroids: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Quantize rotated vectors: (codes per level as int64, float radii per block)."""
    angles, _, radii = polar_angles(y, config.levels)
    codes = []
    for lvl, (psi, b) in enumerate(zip(angles, config.bits), start=1):
        cents = centroids[lvl - 1, : 1 << b].to(device=psi.device, dtype=psi.dtype)
        codes.append(nearest_code(psi, cents, lvl))
    return codes, radii


def decode_factors(
    codes: list[torch.Tensor], config: PolarQuantConfig, centroids: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-coordinate product of cos/sin table entries (the unit direction within each block).

    Coordinate i gets prod_l T_l[code_l(i >> l), bit (l-1) of i] with T_l[c] = (cos c, sin c):
    no trig on the data, only table look-ups, exactly what the kernels compute.
    """
    cents = centroids.to(device=codes[0].device, dtype=dtype)
    table = torch.stack([torch.cos(cents), torch.sin(cents)], dim=-1)  # [levels, K, 2]
    factor = None
    for lvl in range(config.levels, 0, -1):
        # A row gather: embedding / index_select run 3-4x faster than advanced indexing.
        pair = F.embedding(codes[lvl - 1], table[lvl - 1])  # [..., n_l, 2]
        if factor is not None:
            pair = pair * factor.unsqueeze(-1)
        factor = pair.flatten(-2)
    return factor


def decode_rotated(
    codes: list[torch.Tensor], radii: torch.Tensor, config: PolarQuantConfig,
    centroids: torch.Tensor, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Top-down reconstruction of rotated vectors y_hat from codes and block radii."""
    factor = decode_factors(codes, config, centroids, dtype)
    r = radii.to(dtype).repeat_interleave(config.block_size, dim=-1)
    return r * factor
