"""Seeded random rotations S (y = S x) that make any input look uniform on the sphere."""

from __future__ import annotations

import functools

import torch

__all__ = ["rotation_matrix", "rotate", "unrotate"]


@functools.lru_cache(maxsize=64)
def _rotation_cpu(head_dim: int, kind: str, seed: int) -> torch.Tensor:
    # Generated on the CPU in float64 so a seed gives the same matrix on every device.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "none":
        return torch.eye(head_dim, dtype=torch.float64)
    if kind == "orthogonal":
        g = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        # Fix the signs by diag(R) so the draw is Haar-distributed and reproducible.
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if kind == "hadamard":
        if head_dim & (head_dim - 1):
            raise ValueError(f"rotation='hadamard' needs a power-of-two head_dim, got {head_dim}")
        signs = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.int64) * 2 - 1
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < head_dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / head_dim**0.5 * signs.to(torch.float64).unsqueeze(0)
    raise ValueError(f"unknown rotation {kind!r}; use 'orthogonal', 'hadamard' or 'none'")


@functools.lru_cache(maxsize=256)
def _rotation_cached(
    head_dim: int, kind: str, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return _rotation_cpu(head_dim, kind, seed).to(device=device, dtype=dtype)


def rotation_matrix(
    head_dim: int,
    kind: str = "orthogonal",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The d x d orthogonal matrix S for ``(kind, seed)``; rows act on column vectors x."""
    return _rotation_cached(head_dim, kind, seed, torch.device(device), dtype)


def rotate(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """y = S x for every vector in the last dim, computed in fp32 (or fp64 if x is fp64)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if kind == "none":
        return x.to(dt)
    s = rotation_matrix(x.shape[-1], kind, seed, x.device, dt)
    return x.to(dt) @ s.T


def unrotate(y: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """x = S^T y for every vector in the last dim (S is orthogonal)."""
    if kind == "none":
        return y
    s = rotation_matrix(y.shape[-1], kind, seed, y.device, y.dtype)
    return y @ s
