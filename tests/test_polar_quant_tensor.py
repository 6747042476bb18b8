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


def test_safetensors_shared_storage_and_checked_loads(tmp_path):
    """Tensors that share storage (two of one offline table, views of one buffer) save; a file
    whose parts disagree with its recorded config, shape or dtype is refused at load, naming
    the entry."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    k, v = quantize(torch.randn(1, 2, 4, 64), "paper"), quantize(torch.randn(1, 2, 4, 64), "paper")
    assert k.centroids is v.centroids
    plain = torch.randn(3, 4)
    path = tmp_path / "kv.safetensors"
    pt.save_safetensors({"k": k, "v": v, "a": plain, "b": plain[1:]}, path)
    out = pt.load_safetensors(path)
    assert torch.equal(out["v"].dequantize(), v.dequantize())
    assert torch.equal(out["b"], plain[1:])

    def load_edited(edit):
        flat = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        info = json.loads(meta["polartensor"])
        edit(flat, info)
        bad = tmp_path / "edited.safetensors"
        save_file(flat, str(bad), metadata=dict(meta, polartensor=json.dumps(info)))
        return pt.load_safetensors(bad)

    edits = [
        (lambda f, i: i["k"].update(shape=[1, 2, 9, 64]), "codes are"),
        (lambda f, i: i["k"]["config"].update(bits=[3, 3, 3, 3]), "centroids must be"),
        (lambda f, i: i["k"].update(dtype="int32"), "dtype 'int32'"),
        (lambda f, i: f.update({"k.codes": f["k.codes"][..., :-1].contiguous()}), "codes are"),
        (lambda f, i: f.pop("k.radii"), "no k.radii tensor"),
        (lambda f, i: i["k"]["config"].update(levels=99), "unreadable metadata"),
    ]
    for edit, match in edits:
        with pytest.raises(ValueError, match=match):
            load_edited(edit)


def test_copy_keeps_the_destination_codebook():
    """copy_ writes codes and radii only: a source of another table is refused (its codes
    would decode wrongly, and writing its table would change every tensor sharing the
    destination's), as is a plain tensor either way."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 2, 4, 64, generator=g), torch.randn(1, 2, 4, 64, generator=g)
    on = pt.get_preset("paper").replace(codebook="online")
    qa, qb = quantize(x, on), quantize(5 * y + 3, on)
    before = qa.dequantize()
    with pytest.raises(ValueError, match="different configs or codebooks"):
        qa[:, :, :2].copy_(qb[:, :, :2])
    assert torch.equal(qa.dequantize(), before)
    # an offline config with a table of its own: the shared offline table stays untouched
    q1 = quantize(x, "paper")
    q2 = quantize(y, "paper", centroids=pt.fit_codebook(y, "paper"))
    before = q1.dequantize()
    with pytest.raises(ValueError, match="different configs or codebooks"):
        quantize(torch.zeros(1, 2, 4, 64), "paper").copy_(q2)
    with pytest.raises(ValueError, match="different configs or codebooks"):
        torch.cat([q1, q2], 2)
    assert torch.equal(q1.dequantize(), before)
    assert torch.equal(quantize(x, "paper").dequantize(), before)
    # the same values in another tensor are the same codebook
    q3 = quantize(y, "paper", centroids=q1.centroids.clone())
    assert torch.equal(torch.cat([q1, q3], 2)[:, :, 4:].dequantize(), q3.dequantize())
    with pytest.raises(ValueError, match="shapes differ"):
        quantize(torch.zeros(1, 2, 5, 64), "paper").copy_(q1)
    with pytest.raises(TypeError, match="quantize it"):
        q1.copy_(x)
    with pytest.raises(TypeError, match="quantize it"):
        q1[0] = x[0]
    with pytest.raises(TypeError, match="dequantize"):
        torch.zeros(1, 2, 4, 64).copy_(q1)


def test_logical_dtypes():
    """Inputs and results are float16/bfloat16/float32/float64; cat promotes as torch's does;
    an input that requires grad leaves no graph in the parts."""
    q = quantize(torch.randn(2, 64, requires_grad=True), "paper")
    assert not q.radii.requires_grad and q.radii.grad_fn is None
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        quantize(torch.randn(2, 64).to(torch.float8_e4m3fn), "paper")
    with pytest.raises(TypeError, match="int32"):
        q.dequantize(torch.int32)
    with pytest.raises(TypeError, match="logical dtype"):
        q.to(torch.float8_e5m2)
    h = q.to(torch.float16)
    assert torch.cat([h, q]).dtype == torch.float32 and torch.cat([h, h]).dtype == torch.float16


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
