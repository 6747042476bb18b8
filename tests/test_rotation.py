"""Seeded rotations: orthogonality, reproducibility, errors, and torch.compile safety."""

from __future__ import annotations

import pytest
import torch

from polartensor import PolarQuantConfig, quantize
from polartensor import rotation as rot
from polartensor.kernels import dispatch
from polartensor.rotation import rotate, rotation_matrix, unrotate

KINDS = ["orthogonal", "hadamard", "permuted_hadamard", "none"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [16, 64])
def test_rotation_is_orthogonal_and_seeded(kind, d, device):
    s = rotation_matrix(d, kind, seed=3, device=device, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64, device=device)
    torch.testing.assert_close(s @ s.T, eye, rtol=0, atol=1e-12)
    assert s.is_contiguous()
    # The same seed gives the same matrix on every device and dtype (drawn on the CPU).
    torch.testing.assert_close(s.cpu(), rotation_matrix(d, kind, 3, "cpu", torch.float64))
    torch.testing.assert_close(rotation_matrix(d, kind, 3, device, torch.float32),
                               s.float(), rtol=0, atol=0)
    if kind != "none":
        assert not torch.equal(s, rotation_matrix(d, kind, 4, device, torch.float64))


def test_rotation_errors():
    with pytest.raises(ValueError, match="unknown rotation"):
        rotation_matrix(16, "random")
    for kind in ("hadamard", "permuted_hadamard"):
        with pytest.raises(ValueError, match=f"rotation='{kind}' needs a power-of-two"):
            rotation_matrix(24, kind)


@pytest.mark.parametrize("d", [16, 64, 128])
def test_permuted_hadamard_is_the_hadamard_rows_shuffled(d):
    """permuted_hadamard: the seed's 'hadamard' matrix (same signs) with its rows in a seeded
    random order; every entry +-1/sqrt(d), as the kernels' one-MMA path needs, and consecutive
    rows no longer the Sylvester pairs (A + B, A - B)."""
    h = rotation_matrix(d, "hadamard", 7, "cpu", torch.float64)
    p = rotation_matrix(d, "permuted_hadamard", 7, "cpu", torch.float64)
    c = p.abs().max()
    assert (p.abs() == c).all() and abs(float(c) - d ** -0.5) < 1e-15
    # each row of p is a row of h, each row of h appears once
    match = (p @ h.T).round().long()  # d * (1/d) on the matching row, 0 elsewhere
    assert torch.equal(match.abs().sum(1), torch.ones(d, dtype=torch.long))
    assert torch.equal(match.sum(0), torch.ones(d, dtype=torch.long))
    order = match.argmax(1)
    assert not torch.equal(order, torch.arange(d))
    # Sylvester rows 2k and 2k + 1 differ only in the odd columns' signs; shuffled, most don't
    sylvester = (p[0::2] * p[1::2] * d).round()
    odd = torch.tensor([(-1) ** j for j in range(d)], dtype=torch.float64)
    assert sum(torch.equal(r, odd) for r in sylvester) < d // 4


def test_rotate_unrotate_round_trip(device):
    x = torch.randn(3, 5, 32, device=device)
    y = rotate(x, "orthogonal", 0)
    assert y.dtype == torch.float32
    torch.testing.assert_close(unrotate(y, "orthogonal", 0), x, rtol=1e-5, atol=1e-5)


def test_rotation_op_matches_cache_and_passes_opcheck(device):
    args = (32, "orthogonal", 1, torch.device(device), torch.float32)
    out = torch.ops.polartensor.rotation_matrix(*args)
    cached = rotation_matrix(*args)
    assert torch.equal(out, cached)
    assert out.data_ptr() != cached.data_ptr()  # a copy: the graph may reuse its buffer
    torch.library.opcheck(torch.ops.polartensor.rotation_matrix.default, args)


@pytest.mark.parametrize("cold", [False, True], ids=["warm-cache", "cold-cache"])
def test_rotate_compiles_fullgraph(cold, device):
    """rotate/unrotate under torch.compile(fullgraph=True): the matrix comes from the op
    (a cached real tensor or a seeded Generator cannot be traced), values identical to eager,
    also when the cache is empty at compile time."""
    torch._dynamo.reset()
    x = torch.randn(2, 3, 7, 64, device=device)

    def f(x):
        return unrotate(rotate(x, "orthogonal", 5) * 2.0, "hadamard", 6)

    eager = f(x)
    if cold:
        rot._MATRICES.clear()
        rot._CPU.clear()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    # The cached matrix was not modified through the graph.
    s = rotation_matrix(64, "orthogonal", 5, device, torch.float32)
    torch.testing.assert_close(s @ s.T, torch.eye(64, device=device), rtol=0, atol=1e-5)


def test_quantize_dequantize_compiles_fullgraph(device):
    """The reference quantize -> dequantize (rotation, bit unpacking tables) traces fullgraph."""
    torch._dynamo.reset()
    cfg = PolarQuantConfig(levels=3, bits=(4, 2, 2), rotation="orthogonal", seed=2)
    x = torch.randn(2, 2, 5, 32, device=device)

    def f(x):
        return quantize(x, cfg, check_finite=False).dequantize()

    with dispatch.force_reference():
        eager = f(x)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_dequantize_on_fake_tensors_uses_no_cached_tables(device):
    """With warm caches, dequantize on fake tensors (what Dynamo and AOTAutograd trace with;
    torch 2.11 reports is_compiling() False there) must not mix in cached real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = PolarQuantConfig(levels=3, bits=(4, 2, 2), rotation="orthogonal", seed=2)
    with dispatch.force_reference():
        q = quantize(torch.randn(2, 3, 32, device=device), cfg)
        real = q.dequantize()  # warms the rotation and unpacking caches
        mode = FakeTensorMode()
        fake = mode.from_tensor(q)
        with mode:
            out = fake.dequantize()
    assert out.shape == real.shape and out.dtype == real.dtype
