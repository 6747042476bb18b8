"""Seeded random rotations S (y = S x) that make any input look uniform on the sphere.

Kinds: ``orthogonal`` (Haar-random, from the QR of a Gaussian matrix), ``hadamard`` (a
Sylvester-order Hadamard matrix times random signs, / sqrt(d)), ``permuted_hadamard`` (the same
with its rows in a seeded random order) and ``none``. Both Hadamard kinds are +-1 / sqrt(d)
everywhere, which lets the GPU encode rotate bfloat16 inputs with one exact MMA. Their quality
differs: in Sylvester order consecutive rows pair up as (A + B, A - B) of partial sums, and the
polar tree pairs consecutive coordinates, so the deep levels see that structure (measured on
SmolLM2: see README, "Presets and measured quality"); the row shuffle removes it.

The matrices are drawn once per ``(head_dim, kind, seed)`` on the CPU in float64 and cached per
device and dtype in plain dicts. Under ``torch.compile`` (or any fake-tensor tracing) the cache
is not read: a seeded ``torch.Generator`` cannot be traced and a cached real tensor is not a
fake tensor, so a traced graph gets the matrix from the opaque op ``polartensor::rotation_matrix``
(it reads the same cache at run time and returns a copy). No graph break, no recompile when the
cache fills, and the same matrix bit for bit.
"""

from __future__ import annotations

import torch

from ._tracing import tracing

__all__ = ["rotation_matrix", "rotate", "unrotate"]

_KINDS = ("orthogonal", "hadamard", "permuted_hadamard", "none")
_MAX_ENTRIES = 256
_CPU: dict[tuple, torch.Tensor] = {}  # (head_dim, kind, seed) -> float64 CPU matrix
_MATRICES: dict[tuple, torch.Tensor] = {}  # (head_dim, kind, seed, device, dtype) -> matrix


def _check(head_dim: int, kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown rotation {kind!r}; use 'orthogonal', 'hadamard', "
                         "'permuted_hadamard' or 'none'")
    if kind.endswith("hadamard") and head_dim & (head_dim - 1):
        raise ValueError(f"rotation={kind!r} needs a power-of-two head_dim, got {head_dim}")


def _draw(head_dim: int, kind: str, seed: int) -> torch.Tensor:
    # Generated on the CPU in float64 so a seed gives the same matrix on every device.
    _check(head_dim, kind)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "none":
        return torch.eye(head_dim, dtype=torch.float64)
    if kind == "orthogonal":
        g = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        # Fix the signs by diag(R) so the draw is Haar-distributed and reproducible.
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    signs = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.int64) * 2 - 1
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    s = h / head_dim**0.5 * signs.to(torch.float64).unsqueeze(0)
    if kind == "permuted_hadamard":
        # (drawn after the signs: the same seed gives the same signs as 'hadamard')
        s = s[torch.randperm(head_dim, generator=gen)]
    return s


def _remember(table: dict, key: tuple, value: torch.Tensor) -> torch.Tensor:
    if len(table) >= _MAX_ENTRIES:
        table.clear()
    table[key] = value
    return value


def _cached(head_dim: int, kind: str, seed: int, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    key = (head_dim, kind, seed, device, dtype)
    s = _MATRICES.get(key)
    if s is None:
        base = _CPU.get(key[:3])
        if base is None:
            base = _remember(_CPU, key[:3], _draw(head_dim, kind, seed))
        s = _remember(_MATRICES, key, base.to(device=device, dtype=dtype).contiguous())
    return s


@torch.library.custom_op("polartensor::rotation_matrix", mutates_args=())
def _rotation_op(head_dim: int, kind: str, seed: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    # A copy: a custom op's output must not alias the cache (Inductor may reuse the buffer).
    return _cached(head_dim, kind, seed, device, dtype).clone(memory_format=torch.contiguous_format)


@_rotation_op.register_fake
def _(head_dim, kind, seed, device, dtype):
    _check(head_dim, kind)
    return torch.empty(head_dim, head_dim, device=device, dtype=dtype)


def rotation_matrix(
    head_dim: int,
    kind: str = "orthogonal",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The d x d orthogonal matrix S for ``(kind, seed)``; rows act on column vectors x.

    Eager calls return the cached tensor (do not modify it in place); under torch.compile
    (or fake tensors) it comes from ``torch.ops.polartensor.rotation_matrix`` (same values).
    """
    device = torch.device(device)
    if tracing():
        return _rotation_op(head_dim, kind, seed, device, dtype)
    return _cached(head_dim, kind, seed, device, dtype)


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
