"""Angle codebooks: offline Lloyd-Max on the analytic densities, online k-means++ on data.

The reconstruction error of a block is ``r^2 * 2 * (1 - prod_l cos(psi_l - c_l))`` when every
level's angle psi_l is replaced by its centroid c_l, so each level's quantizer should maximise
E[cos(psi - c)]. Lloyd's two steps for that distortion: cells are nearest-angle intervals and a
cell's centroid is its circular mean, atan2(E sin psi, E cos psi). For the small cells we use
this is within a hair of squared-angle Lloyd-Max, and it is the optimum for vector MSE.
"""

from __future__ import annotations

import functools
import math

import torch

from .config import PolarQuantConfig

__all__ = [
    "angle_density",
    "offline_centroids",
    "offline_codebook",
    "fit_online_codebook",
    "nearest_code",
    "level_cosine_gain",
    "theoretical_mse",
    "codebook_size",
]

_TWO_PI = 2.0 * math.pi
_GRID = 1 << 15


def codebook_size(config: PolarQuantConfig) -> int:
    """Columns of the [levels, K] centroid table: K = 2**max(bits)."""
    return 1 << max(config.bits)


def angle_density(level: int, grid: torch.Tensor) -> torch.Tensor:
    """Normalised density of a level-``level`` angle for a vector uniform on the sphere.

    Level 1 is uniform on [0, 2pi). Level l >= 2 is proportional to sin(2 psi)^(2^(l-1) - 1)
    on [0, pi/2]: atan of the ratio of two norms of independent 2^(l-1)-dim Gaussians.
    """
    if level == 1:
        return torch.full_like(grid, 1.0 / _TWO_PI)
    m = (1 << (level - 1)) - 1
    logd = m * torch.log(torch.sin(2.0 * grid).clamp_min(1e-300))
    d = torch.exp(logd - logd.max())
    step = (grid[1] - grid[0]).item()
    return d / (d.sum() * step)


def _grid(level: int) -> torch.Tensor:
    hi = _TWO_PI if level == 1 else math.pi / 2
    step = hi / _GRID
    return (torch.arange(_GRID, dtype=torch.float64) + 0.5) * step


def _lloyd_on_grid(
    grid: torch.Tensor, w: torch.Tensor, k: int, iters: int = 500
) -> torch.Tensor:
    """Cosine-distortion Lloyd on a sorted 1-D grid with weights (no wrap-around)."""
    cdf = torch.cumsum(w, 0)
    cdf = cdf / cdf[-1]
    # Start at the quantile midpoints: already close for unimodal densities.
    qs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    c = grid[torch.searchsorted(cdf, qs).clamp_max(len(grid) - 1)]
    ws, wc = w * torch.sin(grid), w * torch.cos(grid)
    cs, cc, cw = (torch.cumsum(torch.cat([w.new_zeros(1), t]), 0) for t in (ws, wc, w))
    for _ in range(iters):
        mids = (c[:-1] + c[1:]) / 2
        edges = torch.cat([c.new_zeros(1), torch.searchsorted(grid, mids).to(c.dtype),
                           c.new_full((1,), len(grid))]).long()
        s = cs[edges[1:]] - cs[edges[:-1]]
        co = cc[edges[1:]] - cc[edges[:-1]]
        mass = cw[edges[1:]] - cw[edges[:-1]]
        new = torch.where(mass > 0, torch.atan2(s, co), c)
        new, _ = torch.sort(new)
        if torch.allclose(new, c, rtol=0, atol=1e-13):
            c = new
            break
        c = new
    return c


@functools.cache
def _offline_centroids_cached(level: int, bits: int) -> torch.Tensor:
    k = 1 << bits
    if level == 1:
        # Uniform density on the circle: the uniform grid is optimal.
        return (torch.arange(k, dtype=torch.float64) + 0.5) * (_TWO_PI / k)
    if bits == 0:
        return torch.tensor([math.pi / 4], dtype=torch.float64)
    grid = _grid(level)
    w = angle_density(level, grid)
    return _lloyd_on_grid(grid, w, k)


def offline_centroids(level: int, bits: int) -> torch.Tensor:
    """Sorted float64 centroids for one level (computed once per (level, bits), cached)."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    return _offline_centroids_cached(level, bits).clone()


def _table(config: PolarQuantConfig, per_level: list[torch.Tensor]) -> torch.Tensor:
    k = codebook_size(config)
    table = torch.zeros(config.levels, k, dtype=torch.float32)
    for i, c in enumerate(per_level):
        table[i, : len(c)] = c.to(torch.float32)
        table[i, len(c):] = float(c[-1])  # unused slots repeat the last centroid
    return table


def offline_codebook(config: PolarQuantConfig) -> torch.Tensor:
    """The [levels, 2**max(bits)] float32 centroid table for analytic (offline) codebooks."""
    return _table(
        config, [offline_centroids(lvl, b) for lvl, b in enumerate(config.bits, start=1)]
    )


def nearest_code(psi: torch.Tensor, centroids: torch.Tensor, level: int) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` (circular distance at level 1)."""
    c = centroids.to(psi.dtype)
    k = c.numel()
    if k == 1:
        return torch.zeros_like(psi, dtype=torch.int64)
    mids = (c[:-1] + c[1:]) / 2
    idx = torch.searchsorted(mids, psi.contiguous())
    if level == 1:
        wrap = (c[-1] + c[0] + _TWO_PI) / 2  # boundary between the last and first (+2pi)
        idx = torch.where(psi >= wrap, torch.zeros_like(idx), idx)
        idx = torch.where(psi < wrap - _TWO_PI, torch.full_like(idx, k - 1), idx)
    return idx


def _kmeanspp_init(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator,
                   circular: bool) -> torch.Tensor:
    def dist2(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d = (a[:, None] - c[None, :]).abs()
        if circular:
            d = torch.minimum(d, _TWO_PI - d)
        return (d * d).min(dim=1).values

    first = torch.multinomial(w, 1, generator=gen)
    cents = x[first]
    for _ in range(1, k):
        p = w * dist2(x, cents)
        if p.sum() <= 0:
            break
        cents = torch.cat([cents, x[torch.multinomial(p, 1, generator=gen)]])
    return cents


def _fit_level(x: torch.Tensor, w: torch.Tensor, bits: int, level: int,
               gen: torch.Generator, iters: int = 60) -> torch.Tensor:
    k = 1 << bits
    circular = level == 1
    uniq = torch.unique(x)
    if uniq.numel() <= k:  # fewer distinct angles than centroids: each gets its own
        c = torch.sort(uniq).values
        return torch.cat([c, c.new_full((k - c.numel(),), float(c[-1]))]) if c.numel() < k else c
    c = torch.sort(_kmeanspp_init(x, w, k, gen, circular)).values
    sx, cx = w * torch.sin(x), w * torch.cos(x)
    for _ in range(iters):
        code = nearest_code(x, c, level)
        s = torch.zeros(k, dtype=x.dtype).index_add_(0, code, sx)
        co = torch.zeros(k, dtype=x.dtype).index_add_(0, code, cx)
        mass = torch.zeros(k, dtype=x.dtype).index_add_(0, code, w)
        new = torch.atan2(s, co)
        if circular:
            new = torch.remainder(new, _TWO_PI)
        new = torch.where(mass > 0, new, c)
        new = torch.sort(new).values
        if torch.allclose(new, c, rtol=0, atol=1e-9):
            c = new
            break
        c = new
    return c


def fit_online_codebook(
    angles: list[torch.Tensor],
    weights: list[torch.Tensor],
    config: PolarQuantConfig,
    max_samples: int = 1 << 16,
) -> torch.Tensor:
    """k-means++ then Lloyd per level on observed angles, weighted by the squared node radius
    (the error an angle causes scales with it). Deterministic for ``config.seed``.

    Returns the [levels, 2**max(bits)] float32 centroid table.
    """
    if len(angles) != config.levels or len(weights) != config.levels:
        raise ValueError(f"expected {config.levels} levels of angles and weights")
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    per_level = []
    for lvl, (a, w, b) in enumerate(zip(angles, weights, config.bits), start=1):
        a = a.detach().reshape(-1).to("cpu", torch.float64)
        w = w.detach().reshape(-1).to("cpu", torch.float64)
        if a.numel() == 0:
            raise ValueError("online codebooks need at least one observed vector to fit")
        if a.numel() > max_samples:
            sel = torch.randperm(a.numel(), generator=gen)[:max_samples]
            a, w = a[sel], w[sel]
        w = torch.where(torch.isfinite(w) & (w > 0), w, torch.zeros_like(w))
        if w.sum() <= 0:
            w = torch.ones_like(w)
        if b == 0:
            per_level.append(torch.tensor([math.pi / 4], dtype=torch.float64))
            continue
        per_level.append(_fit_level(a, w, b, lvl, gen))
    return _table(config, per_level)


@functools.cache
def level_cosine_gain(level: int, bits: int) -> float:
    """E[cos(psi - Q(psi))] for the offline codebook under the analytic density."""
    grid = _grid(level)
    dens = angle_density(level, grid)
    step = (grid[1] - grid[0]).item()
    c = _offline_centroids_cached(level, bits)
    q = c[nearest_code(grid, c, level)]
    return float((torch.cos(grid - q) * dens).sum() * step)


def theoretical_mse(config: PolarQuantConfig) -> float:
    """Expected ||y - y_hat||^2 for a unit vector (radius rounding ignored):
    2 * (1 - prod_l E[cos(psi_l - Q(psi_l))]), levels being independent."""
    prod = 1.0
    for lvl, b in enumerate(config.bits, start=1):
        prod *= level_cosine_gain(lvl, b)
    return 2.0 * (1.0 - prod)
