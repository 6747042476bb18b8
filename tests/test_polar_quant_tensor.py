import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import polartensor as pt
from polartensor.config import PolarQuantConfig
from polartensor.polar_quant_tensor import PolarQuantTensor, quantize
from polartensor.rotation import rotate

SMALL_BITS = st.integers(1, 5)


@st.composite
def configs(draw, max_levels=5, radius=None):
    levels = draw(st.integers(1, max_levels))
    bits = tuple([draw(SMALL_BITS)] + [draw(st.integers(0, 4)) for _ in range(levels - 1)])
    return PolarQuantConfig(
        levels=levels,
        bits=bits,
        radius_dtype=radius or draw(st.sampled_from(["float16", "bfloat16", "float32"])),
        rotation=draw(st.sampled_from(["orthogonal", "hadamard", "permuted_hadamard",
                                       "none"])),
        seed=draw(st.integers(0, 3)),
    )


def _worst_cell_error(centroids: torch.Tensor, level: int) -> float:
    """Largest |psi - Q(psi)| over the angle range, from the sorted centroids alone."""
    c = centroids.double()
    if level == 1:
        gaps = torch.diff(torch.cat([c, c[:1] + 2 * math.pi]))
        return float(gaps.max() / 2)
    if c.numel() == 1:
        return float(max(c[0], math.pi / 2 - c[0]))
    gaps = torch.diff(c) / 2
    return float(max(gaps.max(), c[0], math.pi / 2 - c[-1]))


def _min_block_cosine(q: PolarQuantTensor) -> float:
    # At every node the direction cosine is >= cos(angle error) times the children's worst
    # (all level >= 2 angles lie in [0, pi/2]); level 1 is exactly cos(angle error).
    rho = 1.0
    for lvl, b in enumerate(q.config.bits, start=1):
        rho *= math.cos(min(_worst_cell_error(q.centroids[lvl - 1, : 1 << b], lvl), math.pi / 2))
    return rho


@given(configs(), st.integers(1, 3), st.integers(1, 9), st.integers(1, 3), st.integers(0, 10**6))
def test_roundtrip_error_within_config_bound(cfg, batch, seq, mult, seed):
    d = max(cfg.block_size, 2) * mult
    if cfg.rotation.endswith("hadamard") and d & (d - 1):
        d = cfg.block_size * 2
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d, generator=g) * 3
    q = quantize(x, cfg)
    xh = q.dequantize(torch.float64)
    assert xh.shape == x.shape and q.dequantize().dtype == x.dtype
    # Exact per-block identity ||y - y_hat||^2 = r^2 + r_hat^2 - 2 r r_hat rho, rho >= rho_min.
    y = rotate(x.double(), cfg.rotation, cfg.seed).reshape(batch, seq, -1, cfg.block_size)
    r = y.norm(dim=-1)
    r_hat = q.radii.double()
    rho = _min_block_cosine(q)
    bound = (r * r + r_hat * r_hat - 2 * r * r_hat * rho).clamp_min(0).sum(-1)
    err = (x.double() - xh).pow(2).sum(-1)
    assert torch.all(err <= bound * (1 + 1e-6) + 1e-9 * (r * r).sum(-1) + 1e-12)


def test_paper_preset_relative_mse_on_gaussians():
    x = torch.randn(4000, 128, generator=torch.Generator().manual_seed(0))
    q = quantize(x, PolarQuantConfig.paper())
    rel = ((x - q.dequantize()).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
    assert 0.028 < float(rel) < 0.036  # design.md: near 0.032 at 3.875 bits


@given(configs(max_levels=3, radius="float32"), st.integers(1, 6), st.integers(1, 6),
       st.integers(0, 10**6))
def test_quantize_cat_equals_cat_quantize(cfg, n1, n2, seed):
    d = 16 if cfg.block_size <= 16 else cfg.block_size
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, n1, d, generator=g), torch.randn(2, n2, d, generator=g)
    whole = quantize(torch.cat([a, b], dim=1), cfg)
    parts = torch.cat([quantize(a, cfg), quantize(b, cfg)], dim=1)
    assert isinstance(parts, PolarQuantTensor)
    assert torch.equal(whole.codes, parts.codes) and torch.equal(whole.radii, parts.radii)


@given(st.integers(0, 10**6), st.integers(0, 3), st.integers(0, 7), st.integers(1, 8))
def test_layout_ops_match_ops_on_codes(seed, dim, start, length):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 8, 32, generator=g)
    q = quantize(x, "paper")
    if dim == 3:
        with pytest.raises(NotImplementedError, match="head dim"):
            q[..., :16]
        return
    n = q.shape[dim]
    s, e = min(start, n), min(start + length, n)
    sl = q.narrow(dim, s, e - s) if e > s else q.narrow(dim, 0, 0)
    assert torch.equal(sl.codes, q.codes.narrow(dim, s, e - s if e > s else 0))
    assert torch.equal(sl.radii, q.radii.narrow(dim, s, e - s if e > s else 0))
    assert sl.shape == (*sl.codes.shape[:-1], 32)
    idx = torch.randint(0, n, (5,), generator=g)
    sel = q.index_select(dim, idx)
    assert torch.equal(sel.codes, q.codes.index_select(dim, idx))
    assert torch.equal(sel.dequantize(), q.dequantize().index_select(dim, idx))
    one = q.select(dim, min(start, n - 1))
    assert torch.equal(one.codes, q.codes.select(dim, min(start, n - 1)))
    cat = torch.cat([q, sel], dim=dim)
    assert torch.equal(cat.codes, torch.cat([q.codes, sel.codes], dim=dim))


def test_copy_clone_detach_contiguous_and_device():
    x = torch.randn(2, 3, 5, 64)
    q = quantize(x, "paper")
    for t in (q.clone(), q.detach(), q.contiguous(), q.to("cpu"), q.to(torch.bfloat16)):
        assert isinstance(t, PolarQuantTensor)
        assert torch.equal(t.codes, q.codes)
    assert q.to(torch.bfloat16).dequantize().dtype == torch.bfloat16
    buf = quantize(torch.zeros(2, 3, 5, 64), "paper")
    buf.copy_(q)
    assert torch.equal(buf.codes, q.codes) and torch.equal(buf.radii, q.radii)
    # copy_ into a slice writes through to the storage of the larger tensor
    big = quantize(torch.zeros(2, 3, 9, 64), "paper")
    big[:, :, 2:7].copy_(q)
    assert torch.equal(big.codes[:, :, 2:7], q.codes)


def test_unsupported_ops_name_dequantize():
    q = quantize(torch.randn(2, 4, 32), "paper")
    for op in (lambda t: t + 1, lambda t: t @ t.transpose(-1, -2), lambda t: t.sum(),
               lambda t: t.view(8, 32)):
        with pytest.raises(NotImplementedError, match="dequantize"):
            op(q)


def test_torch_save_load_weights_only():
    q = quantize(torch.randn(2, 3, 7, 64), PolarQuantConfig(levels=6, bits=3, seed=5))
    buf = io.BytesIO()
    torch.save({"k": q}, buf)
    buf.seek(0)
    q2 = torch.load(buf, weights_only=True)["k"]
    assert isinstance(q2, PolarQuantTensor) and q2.config == q.config
    assert torch.equal(q2.codes, q.codes) and torch.equal(q2.radii, q.radii)
    assert torch.equal(q2.dequantize(), q.dequantize())


def test_safetensors_roundtrip(tmp_path):
    q = quantize(torch.randn(1, 2, 5, 128), "polar-3.25")
    plain = torch.arange(6.0)
    path = tmp_path / "kv.safetensors"
    pt.save_safetensors({"layer0.k": q, "step": plain}, path)
    out = pt.load_safetensors(path)
    assert torch.equal(out["step"], plain)
    q2 = out["layer0.k"]
    assert isinstance(q2, PolarQuantTensor) and q2.config == q.config and q2.shape == q.shape
    assert torch.equal(q2.dequantize(), q.dequantize())
    with pytest.raises(TypeError, match="'step' is of type int"):
        pt.save_safetensors({"layer0.k": q, "step": 3}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_online_codebook_beats_offline_on_anisotropic_data():
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.2, 3.0, 64)
    x = torch.randn(2000, 64, generator=g) * scale + 1.5  # strong per-channel structure
    cfg = PolarQuantConfig(levels=6, bits=(3, 2, 2, 2, 2, 2), rotation="none")
    off = quantize(x, cfg)
    on = quantize(x, cfg.replace(codebook="online"))
    err = lambda q: float((x - q.dequantize()).pow(2).sum() / x.pow(2).sum())  # noqa: E731
    assert err(on) < err(off)
    # the fitted table travels with the tensor and is reused when appending
    more = quantize(x[:10], cfg.replace(codebook="online"), centroids=on.centroids)
    assert torch.equal(torch.cat([on, more], 0).centroids, on.centroids)


def test_fit_codebook_takes_what_quantize_takes():
    """A preset name (its levels resolved for the head dim, as ``quantize`` does) or None
    (the paper preset) gives the table that the config itself gives."""
    x = torch.randn(2, 3, 40, 128, generator=torch.Generator().manual_seed(1))
    cfg = pt.get_preset("polar-3.25", head_dim=128)
    assert torch.equal(pt.fit_codebook(x, "polar-3.25"), pt.fit_codebook(x, cfg))
    assert torch.equal(pt.fit_codebook(x), pt.fit_codebook(x, PolarQuantConfig.paper()))
    with pytest.raises(TypeError, match="preset name"):
        pt.fit_codebook(x, 3)


def test_memory_bytes():
    q = quantize(torch.randn(2, 3, 10, 128), "paper")
    expect = 2 * 3 * 10 * (46 + 8 * 2)
    assert q.memory_bytes(include_codebook=False) == expect
    assert q.memory_bytes() == expect + q.centroids.numel() * 4
    assert q[:, :, :5].storage_bytes() == q.storage_bytes()


# -- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_raise_clearly():
    with pytest.raises(ValueError, match="not divisible"):
        quantize(torch.randn(2, 40), "paper")
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(2, 64, dtype=torch.int32), "paper")
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, "paper")
    x[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, "paper")
    with pytest.raises(ValueError, match="overflows radius_dtype=float16"):
        quantize(torch.full((1, 64), 3e4), "paper")
    ok = quantize(torch.full((1, 64), 3e4), PolarQuantConfig.paper(radius_dtype="float32"))
    ref = torch.full((1, 64), 3e4)
    assert float((ok.dequantize() - ref).norm() / ref.norm()) < 0.25
    with pytest.raises(ValueError, match="at least one dim"):
        quantize(torch.tensor(1.0), "paper")
    with pytest.raises(TypeError, match="already a PolarQuantTensor"):
        quantize(quantize(torch.randn(1, 64), "paper"), "paper")
    with pytest.raises(ValueError, match="online"):
        pt.fit_codebook(torch.randn(0, 64), PolarQuantConfig.paper())


def test_nonfinite_documented_behaviour_when_unchecked():
    x = torch.randn(3, 64)
    x[1, 0] = float("nan")
    q = quantize(x, "paper", check_finite=False)
    out = q.dequantize()
    assert torch.isnan(out[1]).all()  # the bad vector decodes to NaN, not to a plausible value
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_empty_tensors():
    q = quantize(torch.randn(2, 3, 0, 64), "paper")
    assert q.shape == (2, 3, 0, 64) and q.dequantize().shape == (2, 3, 0, 64)
    with pytest.raises(ValueError, match="head_dim must be positive"):
        quantize(torch.randn(2, 0), "paper")
