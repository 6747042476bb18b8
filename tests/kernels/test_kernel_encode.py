"""Fused encode kernel == reference quantize (CPU: Triton interpreter, small shapes; GPU: large).

Codes may differ from the reference only on exact ties at cell boundaries (the kernel's atan2
is a polynomial, its rotation a different summation order): we require >= 99.9% agreement per
level and a reconstruction error no worse than the reference's.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polartensor import PolarQuantConfig, quantize
from polartensor.config import PRESETS, get_preset
from polartensor.kernels import dispatch, ops  # noqa: F401  (ops registers the op)
from polartensor.kernels import encode as _enc
from polartensor.kernels.common import _atan2, boundary_table
from polartensor.kernels.encode import encode_into_triton
from polartensor.kv_buffer import PolarKVBuffer
from polartensor.packing import unpack_codes
from polartensor.polar import decode_rotated
from polartensor.rotation import rotate, rotation_matrix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
HEAD_DIMS = [64, 128, 256] if ON_GPU else [16, 32, 64]
EXAMPLES = 4 if ON_GPU else 8

ODD_CONFIGS = [
    PolarQuantConfig(levels=2, bits=(8, 6), radius_dtype="float32"),
    PolarQuantConfig(levels=3, bits=(1, 0, 7)),
    PolarQuantConfig(levels=4, bits=(5, 3, 3, 2), radius_dtype="bfloat16", rotation="hadamard"),
    PolarQuantConfig(levels=4, bits=(4, 2, 2, 2), rotation="none", seed=3),
]


def configs_for(d: int) -> list[PolarQuantConfig]:
    out = [get_preset(name, head_dim=d) for name in sorted(PRESETS)]
    out += [c for c in ODD_CONFIGS if d % c.block_size == 0]
    return out


@triton.jit
def _atan2_kernel(y_ptr, x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    y = tl.load(y_ptr + i, mask=m, other=1.0)
    x = tl.load(x_ptr + i, mask=m, other=1.0)
    tl.store(o_ptr + i, _atan2(y, x), mask=m)


def test_polynomial_atan2_accuracy():
    g = torch.Generator().manual_seed(0)
    n = 1 << 14
    ang = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi - math.pi
    rad = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 3)
    y = (rad * torch.sin(ang)).float()
    x = (rad * torch.cos(ang)).float()
    # exact axes and diagonals
    y[:8] = torch.tensor([0.0, 1.0, 0.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    x[:8] = torch.tensor([1.0, 0.0, -1.0, 0.0, 1.0, 1.0, -1.0, -1.0])
    y, x = y.to(DEVICE), x.to(DEVICE)
    out = torch.empty_like(x)
    _atan2_kernel[(triton.cdiv(n, 4096),)](y, x, out, n, BLOCK=4096)
    ref = torch.atan2(y.double(), x.double())
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-6, err


def _check_encode(x, cfg, codes, radii, lo, hi, exact=False):
    d = x.shape[-1]
    ref = quantize(x, cfg)
    if exact:
        # The interpreter's float64 path reproduces the reference bit for bit.
        assert torch.equal(codes[..., lo:hi, :], ref.codes)
        assert torch.equal(radii[..., lo:hi, :], ref.radii)
    got = unpack_codes(codes[..., lo:hi, :], cfg, d)
    want = ref.unpack()
    # >= 99.9% of all codes agree (one exact-tie flip is allowed in small examples).
    total = sum(a.numel() for a in want)
    differ = sum(int((a != b).sum()) for a, b in zip(got, want))
    assert differ <= max(1, total // 1000), f"{differ} of {total} codes differ"
    r_got = radii[..., lo:hi, :].double()
    rtol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[cfg.radius_dtype]
    # The float32 rotation's rounding is absolute, about 2^-21 |x| per coordinate (tf32x3):
    # a block radius far below its vector's norm sees it as more than rtol (on the H200, 1.7e-5
    # on a radius of 0.78 in a d 256 vector of norm ~48), so atol scales with the norm.
    atol = max(1e-6, 1e-6 * x.double().norm(dim=-1).max().item())
    torch.testing.assert_close(r_got, ref.radii.double(), rtol=rtol, atol=atol)
    # Reconstruction error no worse than the reference's.
    y = rotate(x.double().float(), cfg.rotation, cfg.seed)
    y_got = decode_rotated(got, radii[..., lo:hi, :], cfg, ref.centroids)
    y_ref = ref.dequantize_rotated()
    e_got = (y_got - y).pow(2).sum().item()
    e_ref = (y_ref - y).pow(2).sum().item()
    assert e_got <= e_ref * 1.001 + 1e-6 * y.pow(2).sum().item()


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@settings(max_examples=EXAMPLES)
@given(
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    t=st.integers(1, 70 if ON_GPU else 19),
    offset=st.integers(0, 9),
    fused=st.booleans(),
)
def test_encode_kernel_matches_reference(d, dtype, data, lead, t, offset, fused):
    """fused: the GPU form (float32, rotation as a tl.dot in the kernel), also checked under
    the interpreter; else the op as dispatch calls it (float64 and bit-exact on CPU).
    Sharded by head_dim and dtype (so pytest-xdist spreads the GPU compiles)."""
    cfg = data.draw(st.sampled_from(configs_for(d)))
    g = torch.Generator().manual_seed(d * 1000 + t)
    x = (torch.randn(*lead, t, d, generator=g) * 3).to(dtype).to(DEVICE)
    cap = offset + t + 3
    # Poisoned storage: bytes outside [offset, offset + t) must stay untouched.
    codes = torch.randint(0, 256, (*lead, cap, cfg.record_bytes(d)), generator=g,
                          dtype=torch.uint8).to(DEVICE)
    radii = torch.randn(*lead, cap, cfg.num_blocks(d), generator=g).to(
        cfg.torch_radius_dtype).to(DEVICE)
    codes0, radii0 = codes.clone(), radii.clone()
    rot = None if cfg.rotation == "none" else rotation_matrix(
        d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    ref_cent = quantize(x[..., :1, :], cfg).centroids
    mids = boundary_table(ref_cent, cfg, torch.float64)
    if fused:
        assert encode_into_triton(x, rot, mids, codes[..., offset:offset + t, :],
                                  radii[..., offset:offset + t, :], cfg, exact=False)
    else:
        torch.ops.polartensor.encode_into(
            x, None, mids, codes[..., offset:offset + t, :], radii[..., offset:offset + t, :],
            list(cfg.bits), cfg.rotation, cfg.seed)
    untouched = torch.ones(cap, dtype=torch.bool)
    untouched[offset:offset + t] = False
    assert torch.equal(codes[..., untouched.to(DEVICE), :], codes0[..., untouched.to(DEVICE), :])
    assert torch.equal(radii[..., untouched.to(DEVICE), :].float(),
                       radii0[..., untouched.to(DEVICE), :].float())
    _check_encode(x, cfg, codes, radii, offset, offset + t, exact=not fused and not ON_GPU)


@pytest.mark.parametrize("static", [False, True])
def test_buffer_append_uses_kernel_and_matches(static, monkeypatch):
    import polartensor.polar_quant_tensor as pqt

    d = HEAD_DIMS[-1]
    cfg = PolarQuantConfig.paper()
    buf = PolarKVBuffer(cfg, capacity=40 if static else 4, static=static)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, t, d, generator=g).to(DEVICE) for t in (5, 1, 7)]
    calls = []
    orig = pqt.PolarQuantTensor.from_hp.__func__

    def spy(cls, *a, **k):
        calls.append(1)
        return orig(cls, *a, **k)

    monkeypatch.setattr(pqt.PolarQuantTensor, "from_hp", classmethod(spy))
    for x in xs:
        view = buf.append(x)
    assert not calls, "append went through the reference quantize, not the kernel"
    monkeypatch.undo()
    full = torch.cat(xs, dim=-2)
    assert view.shape == full.shape
    _check_encode(full, cfg, buf.codes, buf.radii, 0, full.shape[-2], exact=not ON_GPU)


def test_encode_non_finite_raises_on_kernel_path():
    d = HEAD_DIMS[0]
    buf = PolarKVBuffer("paper")
    x = torch.randn(1, 1, 3, d, device=DEVICE)
    x[0, 0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        buf.append(x)
    big = torch.full((1, 1, 2, d), 1e5, device=DEVICE)
    with pytest.raises(ValueError, match="overflows"):
        PolarKVBuffer("paper").append(big)
    # check_finite=False: the big vector is stored (radius saturates to inf), no error
    PolarKVBuffer("paper").append(big, check_finite=False)


def test_encode_unsupported_falls_back():
    # head_dim 48 is not a power of two: the reference encodes it.
    cfg = PolarQuantConfig(levels=4, bits=(4, 2, 2, 2))
    x = torch.randn(2, 5, 48, device=DEVICE)
    codes = torch.zeros(2, 5, cfg.record_bytes(48), dtype=torch.uint8, device=DEVICE)
    radii = torch.zeros(2, 5, 3, dtype=torch.float16, device=DEVICE)
    cent = quantize(x, cfg).centroids
    dispatch.encode_into(x, cfg, cent, codes, radii)
    ref = quantize(x, cfg)
    assert torch.equal(codes, ref.codes)
    assert torch.equal(radii, ref.radii)
    # no tokens (a first append of none): nothing to write, on any path
    buf = PolarKVBuffer("paper")
    assert buf.append(torch.randn(2, 2, 0, 64, device=DEVICE)).shape == (2, 2, 0, 64)


def _spy_launches(monkeypatch, *names):
    """Record the named launch arguments of every launch of the Triton encode (the kernel
    still runs), which these tests pin: where the Gluon encode applies (sm_90, paper, d 128)
    it is the default, and tests/kernels/test_encode_gluon.py checks it against this one."""
    from polartensor.kernels import encode

    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON", "0")
    seen, real = [], encode._encode_kernel

    class _Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                vals = tuple(kwargs[n] for n in names)
                seen.append(vals[0] if len(vals) == 1 else vals)
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(encode, "_encode_kernel", _Spy())
    return seen


# (head_dim, configuration) pairs, one test item each: on the GPU every pair compiles its own
# kernel, and pytest-xdist spreads the items over the cores
def _cfg_id(d, i):
    names = sorted(PRESETS)
    return f"{d}-{names[i]}" if i < len(names) else f"{d}-odd{i - len(names)}"


_D_CFGS = [pytest.param(d, cfg, id=_cfg_id(d, i)) for d in HEAD_DIMS
           for i, cfg in enumerate(configs_for(d))]


@pytest.mark.parametrize("d,cfg", _D_CFGS)
def test_cross_quantizer_matches_reference(d, cfg, monkeypatch):
    """quantizer='cross' (the default; POLARTENSOR_ENCODE_QUANT=atan2 opts out): codes from sign and
    tangent comparisons instead of atan2 agree with the reference as the atan2 path does (>=
    99.9%, ties only), for every preset and the odd configurations (non-uniform level-1
    codebooks keep atan2 at level 1)."""
    from polartensor.kernels.encode import cross_table

    seen = _spy_launches(monkeypatch, "STORE16")
    g = torch.Generator().manual_seed(d + 7)
    x = (torch.randn(2, 23, d, generator=g) * 3).to(DEVICE)
    # written at an offset into poisoned storage: other tokens' bytes must stay
    store = torch.randint(0, 256, (2, 29, cfg.record_bytes(d)), generator=g,
                          dtype=torch.uint8).to(DEVICE)
    before = store.clone()
    codes = store[:, 3:26]
    radii = torch.zeros(2, 23, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype, device=DEVICE)
    rot = None if cfg.rotation == "none" else rotation_matrix(
        d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :], cfg).centroids, cfg, torch.float64)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False, quantizer="cross")
    assert torch.equal(store[:, :3], before[:, :3])
    assert torch.equal(store[:, 26:], before[:, 26:])
    # even records (aligned here) take the paired 16-bit stores
    assert seen[-1] == (cfg.record_bytes(d) % 2 == 0), cfg
    _check_encode(x, cfg, codes, radii, 0, 23)
    # the offline codebooks' level 1 is uniform: the closed form really runs there
    if cfg.bits[0] >= 3 and cfg in [get_preset(n, head_dim=d) for n in PRESETS]:
        assert cross_table(mids, cfg)[1], cfg


def test_cross_quantizer_axis_cases_are_ties():
    """Exact axis and zero pairs (no rotation) lie on level-1 cell boundaries, where the atan2
    path's answer depends on how the boundaries round (psi = 0 lands in the last cell, as the
    reference's wrap boundary rounds above 2 pi): there the closed form may pick the
    neighbouring cell, never another one; off the boundaries the codes are the same."""
    cfg = PolarQuantConfig(levels=4, bits=(4, 2, 2, 2), rotation="none", seed=3)
    d = 16
    pairs = [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (0.0, 0.0), (-2.0, -0.0),
             (3.0, -3.0), (-3.0, 3.0), (0.3, 0.2), (-0.7, -0.1)]
    x = torch.stack([torch.tensor([a, y] * (d // 2)) for a, y in pairs]).to(DEVICE)
    mids = boundary_table(quantize(x[:1], cfg).centroids, cfg, torch.float64)
    out = []
    for q in ("atan2", "cross"):
        codes = torch.zeros(len(pairs), cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
        radii = torch.zeros(len(pairs), cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                            device=DEVICE)
        assert encode_into_triton(x, None, mids, codes, radii, cfg, exact=False, quantizer=q)
        out.append(unpack_codes(codes, cfg, d))
    lvl1 = (out[0][0] - out[1][0]) % 16
    assert ((lvl1 == 0) | (lvl1 == 1) | (lvl1 == 15)).all(), (out[0][0], out[1][0])
    assert torch.equal(out[0][0][-2:], out[1][0][-2:])      # off the boundaries: the same
    # equal radii put every level-2 angle at pi / 4, the middle boundary of the symmetric
    # codebook: a tie again, so neighbouring cells at most
    for a, b in zip(out[0][1:], out[1][1:]):
        assert (a - b).abs().max() <= 1


def test_quantizer_choice_is_checked():
    cfg = get_preset("paper", head_dim=16)
    x = torch.randn(1, 3, 16, device=DEVICE)
    mids = boundary_table(quantize(x, cfg).centroids, cfg, torch.float64)
    codes = torch.zeros(1, 3, cfg.record_bytes(16), dtype=torch.uint8, device=DEVICE)
    radii = torch.zeros(1, 3, cfg.num_blocks(16), dtype=cfg.torch_radius_dtype, device=DEVICE)
    with pytest.raises(ValueError, match="quantizer 'fast'.*'atan2', 'cross'"):
        encode_into_triton(x, None, mids, codes, radii, cfg, exact=False, quantizer="fast")
    with pytest.raises(ValueError, match="exact=False"):
        encode_into_triton(x, None, mids, codes, radii, cfg, exact=True, quantizer="cross")


@pytest.mark.parametrize("d,cfg", [p for p in _D_CFGS if p.values[1].rotation != "none"])
@pytest.mark.parametrize("quantizer", ["atan2", "cross"])
def test_bf16x2_rotation_matches_reference(d, cfg, quantizer, monkeypatch):
    """rotation_mma='bf16x2' (the default for bfloat16 inputs; POLARTENSOR_ENCODE_ROT=tf32x3 opts
    out): the fused rotation as two bfloat16 MMAs against S's high and low bfloat16 parts agrees
    with the reference as the tf32x3 rotation does (float32-radius configurations keep tf32x3:
    the split's ~2^-16 relative error would show in their radii)."""
    from polartensor.kernels.encode import rotation_bf16x2

    seen = _spy_launches(monkeypatch, "ROT_BF16X2", "CROSS")
    g = torch.Generator().manual_seed(d + 11)
    x = (torch.randn(2, 21, d, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    codes = torch.zeros(2, 21, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
    radii = torch.zeros(2, 21, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype, device=DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    split = rotation_bf16x2(rot)
    assert split.dtype == torch.bfloat16 and split.shape == (2, d, d)
    assert (split.float().sum(0) - rot).abs().max() <= 2.0 ** -16 * rot.abs().max()
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False,
                              quantizer=quantizer, rotation_mma="bf16x2")
    # the split really ran (float32 radii keep tf32x3), with the quantizer asked for
    assert (seen[-1][0], bool(seen[-1][1])) == (cfg.radius_dtype != "float32",
                                                quantizer == "cross"), cfg
    _check_encode(x, cfg, codes, radii, 0, 21)


@pytest.mark.parametrize("d", sorted(set(HEAD_DIMS) | {128}))
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("kind", ["hadamard", "permuted_hadamard"])
def test_sign_matrix_rotation_takes_one_exact_mma(d, persistent, kind, monkeypatch):
    """rotation='hadamard' or 'permuted_hadamard' makes S = c x (a sign matrix), c = 1 /
    sqrt(d): the bfloat16
    rotation then runs as one MMA against S / c, exact in bfloat16 (no low part to multiply),
    and the block radii are multiplied by c (the angles do not depend on the scale). Codes and
    radii agree with the reference as the two MMAs' do, and with the two MMAs' own output up
    to float ties and one radius rounding. A rotation that is not a sign matrix keeps two."""
    from polartensor.kernels import encode

    seen = _spy_launches(monkeypatch, "ROT_BF16X2", "ROT_LO", "R_SCALE")
    cfg = PolarQuantConfig(levels=4, bits=(4, 2, 2, 2), radius_dtype="float16",
                           rotation=kind)
    g = torch.Generator().manual_seed(d + 3)
    t = 70 if ON_GPU else 33
    x = (torch.randn(2, t, d, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    c = encode.sign_matrix_scale(cfg, d)
    assert c == pytest.approx(d ** -0.5, rel=1e-7) and bool((rot.abs() == c).all())
    assert encode.sign_matrix_scale(get_preset("paper", head_dim=d), d) == 0.0
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)

    def run():
        codes = torch.zeros(2, t, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
        radii = torch.zeros(2, t, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                            device=DEVICE)
        assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False,
                                  persistent=persistent)
        return codes, radii

    codes, radii = run()
    assert seen[-1][:2] == (True, False)
    assert seen[-1][2] == pytest.approx(d ** -0.5, rel=1e-7)
    _check_encode(x, cfg, codes, radii, 0, t)
    # the same S through the two MMAs (as any other rotation)
    monkeypatch.setattr(encode, "sign_matrix_scale", lambda config, d: 0.0)
    codes2, radii2 = run()
    assert seen[-1] == (True, True, 1.0)
    got, want = unpack_codes(codes, cfg, d), unpack_codes(codes2, cfg, d)
    total = sum(a.numel() for a in want)
    assert sum(int((a != b).sum()) for a, b in zip(got, want)) <= max(1, total // 1000)
    torch.testing.assert_close(radii.double(), radii2.double(), rtol=2.0 ** -10, atol=1e-6)


@pytest.mark.parametrize("preset", ["paper", "polar-3", "polar-4"])
@pytest.mark.parametrize("d", [d for d in HEAD_DIMS if d >= 32])
@pytest.mark.parametrize("persistent", [False, True])
@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # (spy re-made per example)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.01, 1.0, 300.0]))
def test_bf16_rotation_bounded_against_reference(preset, d, persistent, seed, scale,
                                                 monkeypatch):
    """rotation_mma='bf16' (POLARTENSOR_ENCODE_ROT=bf16, opt-in): one MMA against S rounded to
    bfloat16. The rotated coordinates carry ~2^-9 relative error, so a few codes land in the
    neighbouring cell, or further only at nodes of tiny radius (under 1.5% here; ~0.3-0.6%
    measured on the CPU, 0.8-1.4% of code bytes on the H100); radii move within the same
    bound, and the reconstruction error stays the reference's within 0.2%. Every launch form
    that takes it (per tile, persistent) gives the same codes."""
    seen = _spy_launches(monkeypatch, "ROT_BF16X2", "ROT_LO")
    cfg = get_preset(preset, head_dim=d)
    g = torch.Generator().manual_seed(seed)
    t = 150 if ON_GPU else 60
    x = (torch.randn(2, t, d, generator=g) * scale).to(torch.bfloat16).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    ref = quantize(x, cfg)
    mids = boundary_table(ref.centroids, cfg, torch.float64)
    codes = torch.zeros(2, t, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
    radii = torch.zeros(2, t, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype, device=DEVICE)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False, block_rows=16,
                              rotation_mma="bf16", persistent=persistent)
    assert seen[-1] == (True, False)
    got, want = unpack_codes(codes, cfg, d), ref.unpack()
    total = sum(a.numel() for a in want)
    differ = 0
    # S rounded to bfloat16 moves each rotated coordinate by at most 2^-9 |x| (S's rows are
    # unit vectors), a level-l node's 2^l coordinates by 2^-9 |x| 2^(l/2), and so its angle by
    # about that over the node's radius: a code may skip past its neighbour cell only at a
    # node whose radius is within a few times that of the angle's smallest cell width (the
    # GPU found such a small-radius pair at polar-4, d 256). Everywhere else: neighbours only.
    y_ref = rotate(x.double(), cfg.rotation, cfg.seed)
    x_norm = x.double().norm(dim=-1, keepdim=True)
    for lvl, (a, b) in enumerate(zip(got, want)):
        n = 1 << cfg.bits[lvl]
        if n == 1:
            continue
        step = (a.long() - b.long()) % n if lvl == 0 else (a.long() - b.long()).abs()
        if lvl == 0:  # cyclic: a step of n - 1 is the other neighbour
            step = torch.minimum(step, n - step)
        cent = ref.centroids[lvl, :n].double()
        cell = 2 * math.pi / n if lvl == 0 else float(cent.diff().min())
        node_r = y_ref.reshape(*y_ref.shape[:-1], -1, 2 << lvl).norm(dim=-1)
        limit = 4 * 2.0 ** -9 * x_norm * 2.0 ** ((lvl + 1) / 2) / cell
        far = step > 1
        assert (node_r[far] <= limit.expand_as(node_r)[far]).all(), (
            f"level {lvl + 1}: a code moved more than one cell at a node whose radius is "
            f"above the bound")
        differ += int((a != b).sum())
    assert differ <= 0.015 * total, f"{differ} of {total} codes differ"
    # a block's radius moves by at most its 2^L coordinates' shift (above), plus the 16-bit
    # radius's own rounding
    r_err = (radii.double() - ref.radii.double()).abs()
    r_bound = (2.0 ** -9 * x_norm * 2.0 ** (len(cfg.bits) / 2)
               + 2.0 ** -10 * ref.radii.double().abs() + 1e-6 * scale)
    assert (r_err <= r_bound).all(), f"radii: max excess {(r_err - r_bound).max():.3g}"
    y = rotate(x.float(), cfg.rotation, cfg.seed)
    e_got = (decode_rotated(got, radii, cfg, ref.centroids) - y).pow(2).sum().item()
    e_ref = (ref.dequantize_rotated() - y).pow(2).sum().item()
    assert e_got <= e_ref * 1.002
    if not persistent:  # the bf16x2 default's two MMAs really ran before (ROT_LO)
        encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False, block_rows=16)
        assert seen[-1] == (True, True)


@pytest.mark.parametrize("preset", ["paper", "polar-3", "polar-4"])
@pytest.mark.parametrize("d", sorted(set(HEAD_DIMS) | {128, 256}))
@pytest.mark.parametrize("persistent", [False, True])
def test_record_stores_equal_strided(preset, d, persistent, monkeypatch):
    """POLARTENSOR_ENCODE_STORE=record (code words stored along each record), =whole (each
    record packed in registers and stored at once) and =record16 (record, odd-sized words in
    pairs as 16-bit units) write the same bytes as the strided stores: every level's words,
    byte and 16-bit paths, odd and even record sizes, the tail word of full-depth presets, at
    an offset into a larger cache whose other records must stay untouched."""
    seen = _spy_launches(monkeypatch, "STORE_MODE")
    cfg = get_preset(preset, head_dim=d)
    g = torch.Generator().manual_seed(d + len(preset))
    t, cap, off = 37, 50, 5
    x = (torch.randn(2, t, d, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    out = {}
    for mode, store in enumerate(("strided", "record", "whole", "record16")):
        monkeypatch.setenv("POLARTENSOR_ENCODE_STORE", store)
        codes = torch.full((2, cap, cfg.record_bytes(d)), 0xA5, dtype=torch.uint8,
                           device=DEVICE)
        radii = torch.full((2, cap, cfg.num_blocks(d)), -1.0, dtype=cfg.torch_radius_dtype,
                           device=DEVICE)
        assert encode_into_triton(x, rot, mids, codes[:, off:off + t], radii[:, off:off + t],
                                  cfg, exact=False, persistent=persistent)
        assert seen[-1] == mode
        out[store] = codes, radii
    untouched = torch.ones(cap, dtype=torch.bool)
    untouched[off:off + t] = False
    for store in ("record", "whole", "record16"):
        assert torch.equal(out["strided"][0], out[store][0]), store
        assert torch.equal(out["strided"][1], out[store][1]), store
        # the records around the written rows are untouched, the written ones are not
        assert (out[store][0][:, untouched] == 0xA5).all(), store
        assert not (out[store][0][:, off:off + t] == 0xA5).all(), store


@pytest.mark.parametrize("block_rows", [16, 32])
def test_whole_records_need_whole_rows_per_warp(block_rows, monkeypatch):
    """POLARTENSOR_ENCODE_STORE=whole gathers along each row: Triton 3.6 compiles that only
    where each warp holds >= 16 whole rows (its thread-locality pass aborts below), so tiles
    of 16 or 32 rows with 4 warps take the record stores instead, the same bytes."""
    seen = _spy_launches(monkeypatch, "STORE_MODE")
    d = 64
    cfg = get_preset("polar-4", head_dim=d)
    g = torch.Generator().manual_seed(block_rows)
    x = (torch.randn(2, 45, d, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    out = []
    for store, mode in (("strided", 0), ("whole", 1)):
        monkeypatch.setenv("POLARTENSOR_ENCODE_STORE", store)
        codes = torch.zeros(2, 45, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
        radii = torch.zeros(2, 45, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                            device=DEVICE)
        assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False,
                                  block_rows=block_rows)
        assert seen[-1] == mode
        out.append(codes)
    assert torch.equal(out[0], out[1])


def test_encode_store_choice_is_checked(monkeypatch):
    monkeypatch.setenv("POLARTENSOR_ENCODE_STORE", "rows")
    cfg = get_preset("paper", head_dim=16)
    x = torch.randn(1, 3, 16, device=DEVICE)
    q = quantize(x.cpu(), cfg)
    with pytest.raises(ValueError,
                       match="POLARTENSOR_ENCODE_STORE='rows'.*'record'.*'whole'.*'record16'"):
        encode_into_triton(x, rotation_matrix(16, cfg.rotation, cfg.seed, DEVICE,
                                              torch.float32),
                           boundary_table(q.centroids, cfg, torch.float64),
                           torch.empty(1, 3, cfg.record_bytes(16), dtype=torch.uint8,
                                       device=DEVICE),
                           torch.empty(1, 3, cfg.num_blocks(16),
                                       dtype=cfg.torch_radius_dtype, device=DEVICE),
                           cfg, exact=False)


@pytest.mark.parametrize("preset,d,dtype,store,want", [
    ("paper", 128, torch.bfloat16, None, (128, 8, 128, 3, True)),
    ("polar-3", 128, torch.bfloat16, None, (128, 8, 128, 3, True)),
    ("polar-4", 128, torch.bfloat16, None, (64, 4, 128, 3, False)),
    ("polar-5", 128, torch.bfloat16, None, (64, 4, None, 3, False)),
    ("paper", 64, torch.bfloat16, None, (64, 4, None, 3, False)),
    ("polar-4", 64, torch.bfloat16, None, (64, 4, None, 3, False)),
    ("paper", 256, torch.bfloat16, None, (128, 8, None, 3, False)),
    ("polar-4", 256, torch.bfloat16, None, (128, 8, None, 3, False)),
    ("paper", 128, torch.float32, None, (64, 4, None, 3, False)),
    ("paper", 128, torch.bfloat16, "record", (128, 8, 128, 1, True)),
    ("paper", 128, torch.bfloat16, "strided", (64, 4, None, 0, False)),
    ("paper", 128, torch.bfloat16, "whole", (64, 4, None, 2, False)),
])
def test_encode_gpu_launch_defaults(preset, d, dtype, store, want, monkeypatch):
    """The GPU's default launch (rows, warps, register cap, stores, persistent), captured
    without running it: record16 stores at every head_dim; with them (or record) at d 128 and
    the bfloat16 rotation, 128 rows and 8 warps where every level has <= 4 bits, persistent
    under a 128-register cap (two programs per SM); a 128-register cap per tile where the
    widest has 5, neither at 6 (spills offline); other paths keep 64 rows and 4 warps."""
    assert _default_launch(monkeypatch, preset, d, dtype,
                           {"POLARTENSOR_ENCODE_STORE": store}) == want


def _default_launch(monkeypatch, preset, d, dtype, env, rotation=None, **kw):
    """The GPU launch encode_into_triton makes (rows, warps, register cap, stores,
    persistent) under the environment settings ``env`` (None: unset), captured without
    running it."""
    from polartensor.kernels import encode

    captured = []

    class _Capture:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                captured.append((kw["BN"], kw["num_warps"], kw.get("maxnreg"),
                                 kw["STORE_MODE"], kw["PERSIST"]))
            return launch

    monkeypatch.setattr(encode, "_encode_kernel", _Capture())
    monkeypatch.setattr(encode, "interpreting", lambda: False)
    for name in ("POLARTENSOR_ENCODE_STORE", "POLARTENSOR_ENCODE_PERSIST",
                 "POLARTENSOR_ENCODE_ROT"):
        if env.get(name) is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, env[name])
    cfg = get_preset(preset, head_dim=d)
    if rotation:
        cfg = dataclasses.replace(cfg, rotation=rotation)
    x = torch.randn(2, 300, d).to(dtype)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, "cpu", torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    codes = torch.zeros(2, 300, cfg.record_bytes(d), dtype=torch.uint8)
    radii = torch.zeros(2, 300, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False, **kw)
    assert len(captured) == 1
    return captured[0]


@pytest.mark.parametrize("preset,d,env,rotation,kw,want", [
    # off everywhere, or on where it applies
    ("paper", 128, {"POLARTENSOR_ENCODE_PERSIST": "0"}, None, {}, (128, 8, None, 3, False)),
    ("paper", 64, {"POLARTENSOR_ENCODE_PERSIST": "1"}, None, {}, (64, 4, None, 3, True)),
    ("polar-4", 128, {"POLARTENSOR_ENCODE_PERSIST": "1"}, None, {}, (64, 4, 128, 3, True)),
    # auto: not where it was not timed faster (a launch named by the caller, the one-MMA
    # rotations, the strided stores)
    ("paper", 128, {}, None, {"block_rows": 64}, (64, 4, None, 3, False)),
    ("paper", 128, {}, None, {"num_warps": 8}, (128, 8, None, 3, False)),
    ("paper", 128, {}, "permuted_hadamard", {}, (128, 8, None, 3, False)),
    ("paper", 128, {"POLARTENSOR_ENCODE_ROT": "bf16"}, None, {}, (128, 8, None, 3, False)),
    ("paper", 128, {"POLARTENSOR_ENCODE_STORE": "strided"}, None, {}, (64, 4, None, 0, False)),
    # persistent= beats the environment
    ("paper", 128, {"POLARTENSOR_ENCODE_PERSIST": "1"}, None, {"persistent": False},
     (128, 8, None, 3, False)),
    ("paper", 64, {"POLARTENSOR_ENCODE_PERSIST": "0"}, None, {"persistent": True},
     (64, 4, None, 3, True)),
])
def test_encode_persistent_setting(preset, d, env, rotation, kw, want, monkeypatch):
    """POLARTENSOR_ENCODE_PERSIST: auto (the default) is persistent only at the default launch
    of d 128 with the two-MMA rotation, the record(16) stores and levels of <= 4 bits (timed
    faster there); 1 and 0 force it on (where it applies) and off; ``persistent=`` overrides
    the setting."""
    assert _default_launch(monkeypatch, preset, d, torch.bfloat16, env, rotation, **kw) == want


def test_encode_persistent_setting_is_checked(monkeypatch):
    """auto takes the launch's own answer, 1 and 0 replace it; anything else is refused,
    naming the choices."""
    from polartensor.kernels import encode

    for value, want in ((None, (False, True)), ("auto", (False, True)), ("1", (True, True)),
                        ("0", (False, False))):
        if value is None:
            monkeypatch.delenv("POLARTENSOR_ENCODE_PERSIST", raising=False)
        else:
            monkeypatch.setenv("POLARTENSOR_ENCODE_PERSIST", value)
        assert (encode._persistent(None, False), encode._persistent(None, True)) == want
        # (the argument wins over the setting)
        assert encode._persistent(True, False) and not encode._persistent(False, True)
    monkeypatch.setenv("POLARTENSOR_ENCODE_PERSIST", "yes")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_PERSIST='yes'.*'auto'.*'1'.*'0'"):
        _default_launch(monkeypatch, "paper", 128, torch.bfloat16,
                        {"POLARTENSOR_ENCODE_PERSIST": "yes"})


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("block_rows,num_warps,maxnreg", [(16, 4, None), (64, 8, None),
                                                           (64, 4, 168), (64, 4, 0),
                                                           (32, 4, 128), (256, 16, None),
                                                           (128, 8, 128)])
def test_encode_launch_settings_equal_default(block_rows, num_warps, maxnreg, persistent):
    """Rows per program, warps and a register cap (the encode launch sweep's settings) change
    the tiling, not the arithmetic: codes and radii equal the default launch's bit for bit
    (the cap applies on the GPU only; 0 lifts any default cap), per tile and persistent.
    (The persistent launch contracts the rotation in one dot, per tile in two chunks of 64:
    the two may differ in the last bit, so each is compared with its own kind.)"""
    d = 128 if ON_GPU else 32
    cfg = get_preset("paper", head_dim=d)
    g = torch.Generator().manual_seed(29)
    x = (torch.randn(2, 75, d, generator=g) * 2).to(torch.bfloat16).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)

    def run(**kw):
        codes = torch.zeros(2, 75, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
        radii = torch.zeros(2, 75, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                            device=DEVICE)
        assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False, **kw)
        return codes, radii

    want = run(persistent=persistent)
    got = run(block_rows=block_rows, num_warps=num_warps, maxnreg=maxnreg,
              persistent=persistent)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("kw,match", [({"rotation_mma": "fp8"}, "rotation_mma 'fp8'"),
                                      ({"block_rows": 24}, "block_rows=24: use a power of two"),
                                      ({"block_rows": 8}, "block_rows=8"),
                                      ({"num_warps": 3}, "num_warps=3"),
                                      ({"maxnreg": 300}, "maxnreg=300")])
def test_encode_launch_settings_are_checked(kw, match):
    """An unknown rotation MMA or a launch the kernel cannot take is refused, naming it."""
    cfg = get_preset("paper", head_dim=16)
    x = torch.randn(1, 3, 16, device=DEVICE, dtype=torch.bfloat16)
    mids = boundary_table(quantize(x.float(), cfg).centroids, cfg, torch.float64)
    codes = torch.zeros(1, 3, cfg.record_bytes(16), dtype=torch.uint8, device=DEVICE)
    radii = torch.zeros(1, 3, cfg.num_blocks(16), dtype=cfg.torch_radius_dtype, device=DEVICE)
    rot = rotation_matrix(16, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    with pytest.raises(ValueError, match=match):
        encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False, **kw)


@pytest.mark.parametrize("pad,want", [(0, 8), (4, 4), (2, 2), (1, 1)])
def test_encode_row_alignment_hint(pad, want):
    """Rows of x start at multiples of 8, 4, 2 or 1 elements (views into a wider buffer): the
    kernel is told only what holds (vector loads where it may, no misaligned ones), and the
    codes equal the reference whatever the alignment."""
    from polartensor.kernels.encode import _row_align

    d = 32
    cfg = get_preset("paper", head_dim=d)
    g = torch.Generator().manual_seed(pad)
    wide = (torch.randn(2, 7, d + pad, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    x = wide[..., pad:] if pad else wide
    assert _row_align(x) == want
    codes = torch.zeros(2, 7, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
    radii = torch.zeros(2, 7, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype, device=DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False)
    _check_encode(x, cfg, codes, radii, 0, 7)


@pytest.mark.parametrize("pad,want", [(0, 8), (4, 4), (2, 2), (1, 1)])
def test_encode_radii_alignment_hint(pad, want, monkeypatch):
    """Radii rows (views into a wider buffer) start at multiples of 8, 4, 2 or 1 elements:
    the kernel is told only what holds, and the radii equal the reference."""
    seen = _spy_launches(monkeypatch, "R_ALIGN")
    d = 128
    cfg = get_preset("paper", head_dim=d)
    nb = cfg.num_blocks(d)
    g = torch.Generator().manual_seed(pad + 5)
    x = (torch.randn(2, 7, d, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    wide = torch.zeros(2, 7, nb + pad, dtype=cfg.torch_radius_dtype, device=DEVICE)
    radii = wide[..., pad:]
    codes = torch.zeros(2, 7, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False)
    assert seen[-1] == want
    _check_encode(x, cfg, codes, radii, 0, 7)


@pytest.mark.parametrize("preset", ["paper", "polar-3", "polar-4"])
@pytest.mark.parametrize("d", [d for d in HEAD_DIMS if d <= 128])
def test_persistent_encode_matches_reference(preset, d, monkeypatch):
    """persistent=True (POLARTENSOR_ENCODE_PERSIST=1, opt-in; bfloat16 x, the bf16x2 rotation,
    head_dim <= 128): fewer programs than tiles, each loading S once and encoding tile after
    tile (rows not a multiple of the tile, written at an offset); codes and radii agree with
    the reference as the one-program-per-tile launch does."""
    seen = _spy_launches(monkeypatch, "PERSIST")
    cfg = get_preset(preset, head_dim=d)
    g = torch.Generator().manual_seed(d + 13)
    t = 70 if ON_GPU else 23
    x = (torch.randn(3, t, d, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    store = torch.randint(0, 256, (3, t + 5, cfg.record_bytes(d)), generator=g,
                          dtype=torch.uint8).to(DEVICE)
    before = store.clone()
    codes = store[:, 2:2 + t]
    radii = torch.zeros(3, t, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype, device=DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False, block_rows=16,
                              persistent=True)
    assert seen[-1] is True
    assert torch.equal(store[:, :2], before[:, :2]) and torch.equal(store[:, 2 + t:],
                                                                     before[:, 2 + t:])
    _check_encode(x, cfg, codes, radii, 0, t)
    # where it does not apply (float32 x: no bf16x2 rotation) the flag is ignored
    assert encode_into_triton(x.float(), rot, mids, codes, radii, cfg, exact=False,
                              block_rows=16, persistent=True)
    assert seen[-1] is False


def _paper64_rows(seed, t):
    """The paper preset at head_dim 64, bfloat16 rows x [2, t, 64], S and the boundaries."""
    cfg = get_preset("paper", head_dim=64)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, t, 64, generator=g) * 2).to(torch.bfloat16).to(DEVICE)
    rot = rotation_matrix(64, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    return cfg, x, rot, mids


@pytest.mark.parametrize("stages", ["2", "3"])
def test_persistent_encode_stages(stages, monkeypatch):
    """POLARTENSOR_ENCODE_STAGES: the persistent launch gets that many software-pipeline stages
    (x copied ahead into shared memory) and the same codes and radii as with one; the
    one-program-per-tile launch keeps one stage (with S's loads in its loop, more would buffer
    S); any other value is refused, naming the choices."""
    seen = _spy_launches(monkeypatch, "PERSIST", "num_stages")
    cfg, x, rot, mids = _paper64_rows(5, 40)
    one = _encode_under(monkeypatch, {}, x, rot, mids, cfg, block_rows=16, persistent=True)
    assert seen[-1] == (True, 1)
    more = _encode_under(monkeypatch, {"POLARTENSOR_ENCODE_STAGES": stages}, x, rot, mids, cfg,
                         block_rows=16, persistent=True)
    assert seen[-1] == (True, int(stages))
    assert torch.equal(one[0], more[0]) and torch.equal(one[1], more[1])
    _encode_under(monkeypatch, {}, x, rot, mids, cfg, block_rows=16, persistent=False)
    assert seen[-1] == (False, 1)
    # programs per SM (POLARTENSOR_ENCODE_PER_SM; the interpreter always runs two programs):
    # same codes and radii
    per_sm = _encode_under(monkeypatch, {"POLARTENSOR_ENCODE_PER_SM": "4"}, x, rot, mids, cfg,
                           block_rows=16, persistent=True)
    assert torch.equal(one[0], per_sm[0]) and torch.equal(one[1], per_sm[1])
    for name, bad in (("POLARTENSOR_ENCODE_PER_SM", "5"), ("POLARTENSOR_ENCODE_STAGES", "4")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name}='{bad}'"):
            _encode_under(monkeypatch, {}, x, rot, mids, cfg, persistent=True)
        monkeypatch.delenv(name)


@pytest.mark.parametrize("ahead", ["1", "2"])
def test_persistent_encode_l2_prefetch(ahead, monkeypatch):
    """POLARTENSOR_ENCODE_L2PF: on the GPU the persistent launch asks L2 for x that many tiles
    ahead, which changes no code or radius (a prefetch moves no data into registers); the
    interpreter, which runs no inline assembly, launches without it; any other value is
    refused, naming the choices."""
    seen = _spy_launches(monkeypatch, "PERSIST", "L2PF")
    # (on the GPU many more tiles than programs, so that every program prefetches in its loop
    # and the last tiles' prefetches fall past the end)
    cfg, x, rot, mids = _paper64_rows(7, 20011 if ON_GPU else 40)
    without = _encode_under(monkeypatch, {}, x, rot, mids, cfg, block_rows=16, persistent=True)
    assert seen[-1] == (True, 0)
    with_pf = _encode_under(monkeypatch, {"POLARTENSOR_ENCODE_L2PF": ahead}, x, rot, mids, cfg,
                            block_rows=16, persistent=True)
    assert seen[-1] == (True, int(ahead) if ON_GPU else 0)
    assert torch.equal(without[0], with_pf[0]) and torch.equal(without[1], with_pf[1])
    monkeypatch.setenv("POLARTENSOR_ENCODE_L2PF", "3")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_L2PF='3'"):
        _encode_under(monkeypatch, {}, x, rot, mids, cfg, persistent=True)


@pytest.mark.parametrize("stages", [None, "2", "3"])
def test_persistent_encode_tma(stages, monkeypatch):
    """POLARTENSOR_ENCODE_TMA=1: the persistent launch loads x's tiles through a tensor
    descriptor (pipelined with POLARTENSOR_ENCODE_STAGES 2 or 3), with the codes and radii
    of the pointer loads, the last tile's rows past the end read as zero;
    where x's rows are not evenly strided (a lead's rows followed by a gap) it keeps the
    pointer loads, with the same result; any other value is refused."""
    seen = _spy_launches(monkeypatch, "X_TMA", "num_stages")
    t = 5003 if ON_GPU else 37
    cfg, wide, rot, mids = _paper64_rows(11, t + 3)
    x = wide[:, :t].contiguous()
    want = _encode_under(monkeypatch, {}, x, rot, mids, cfg, block_rows=16, persistent=True)
    assert seen[-1] == (False, 1)
    tma_ok = not ON_GPU or torch.cuda.get_device_capability() >= (9, 0)
    env = {"POLARTENSOR_ENCODE_TMA": "1"}
    if stages:
        env["POLARTENSOR_ENCODE_STAGES"] = stages
    got = _encode_under(monkeypatch, env, x, rot, mids, cfg, block_rows=16, persistent=True)
    assert seen[-1] == (tma_ok, int(stages or 1))
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    # a strided view (rows of a lead contiguous, a gap between leads): pointer loads
    got = _encode_under(monkeypatch, env, wide[:, :t], rot, mids, cfg, block_rows=16,
                        persistent=True)
    assert seen[-1][0] is False
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    monkeypatch.setenv("POLARTENSOR_ENCODE_TMA", "2")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_TMA='2'"):
        _encode_under(monkeypatch, {}, x, rot, mids, cfg, persistent=True)


@pytest.mark.parametrize("name,read,default", [
    ("POLARTENSOR_ENCODE_PERM", lambda: _enc._column_order(), True)])
def test_encode_flag_settings_are_checked(name, read, default, monkeypatch):
    """The encode's 0/1 settings: their default, both values, and a clear error otherwise."""
    monkeypatch.delenv(name, raising=False)
    assert read() is default
    for value in ("0", "1"):
        monkeypatch.setenv(name, value)
        assert read() is (value == "1")
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name}='yes'"):
        read()


def _encode_under(monkeypatch, env, x, rot, mids, cfg, **kw):
    """Codes and radii of one fused encode (exact=False) of x [lead, t, d] under the
    environment settings ``env``."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    lead, t, d = x.shape
    codes = torch.zeros(lead, t, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
    radii = torch.zeros(lead, t, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                        device=DEVICE)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False, **kw)
    return codes, radii


def _assert_same_encode(got, want, cfg):
    assert torch.equal(got[0], want[0]), cfg
    assert torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8)), cfg


@pytest.mark.parametrize("d", [d for d in HEAD_DIMS if d <= 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,t", [(3, 5), (2, 40), (1, 37)])
def test_encode_index_width_is_invisible(d, dtype, lead, t, monkeypatch):
    """int32 row indices and offsets (IDX32, where every offset fits; head_dim <= 128) give
    the codes and radii of the int64 ones bit for bit: lead dims, T below and above the
    16-row tile and not a multiple of it (at or above it, or one lead, WRAP1: one division
    per tile), and the persistent launch."""
    from polartensor.kernels import encode

    seen = _spy_launches(monkeypatch, "IDX32", "WRAP1")
    wrap1 = t >= 16 or lead == 1
    cfg = get_preset("polar-4", head_dim=d)
    g = torch.Generator().manual_seed(lead * t + d)
    x = (torch.randn(lead, t, d, generator=g) * 2).to(dtype).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    for persistent in (False, True):
        kw = dict(block_rows=16, persistent=persistent)
        got = _encode_under(monkeypatch, {}, x, rot, mids, cfg, **kw)
        assert seen[-1] == (True, wrap1)
        monkeypatch.setattr(encode, "_IDX32_LIMIT", 0)
        want = _encode_under(monkeypatch, {}, x, rot, mids, cfg, **kw)
        assert seen[-1] == (False, False)
        monkeypatch.undo()
        seen = _spy_launches(monkeypatch, "IDX32", "WRAP1")
        _assert_same_encode(got, want, cfg)


def test_encode_index_width_needs_offsets_below_2_31():
    """int32 indices only where every row (past the last tile's end too) and every element
    offset of the views fits in int32."""
    from polartensor.kernels.encode import _index32

    def view(shape, stride):
        return torch.empty_strided(shape, stride, device="meta")

    small = view((4, 8, 16), (128, 16, 1))
    assert _index32(64, small, small)
    assert not _index32(2**31, small)
    assert not _index32(64, small, view((2, 8, 16), (2**31 - 64, 16, 1)))
    assert _index32(64, view((1, 8, 16), (2**40, 16, 1)))  # (one lead: its stride unused)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@settings(max_examples=2 if ON_GPU else 3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), t=st.integers(1, 40))
def test_encode_column_order_is_invisible(d, dtype, data, t, monkeypatch):
    """The rotation's output columns in register order (POLARTENSOR_ENCODE_PERM=1, the
    default: S's rows permuted, the result relabelled back) give the codes and radii of the
    coordinate order (=0) bit for bit, for every configuration, with the bf16x2 (bfloat16
    x) and the tf32x3 (float32 x) rotation, and the persistent launch (64-row tiles: the
    order applies where each warp has 16 whole rows).

    Under the interpreter ``tl.dot`` is numpy's matmul, whose float32 sums depend on an
    output column's position (its BLAS blocking: permuting S's columns moves y by an ulp,
    which float32 radii show), so there the rotation is a signed permutation and x small
    integers: every product and sum is exact, and what is compared is the kernel's
    relabelling alone. On the GPU, the configuration's own rotation and Gaussian x."""
    seen = _spy_launches(monkeypatch, "PERM")
    cfg = data.draw(st.sampled_from([c for c in configs_for(d) if c.rotation != "none"]))
    persistent = data.draw(st.booleans()) and dtype == torch.bfloat16 and d <= 128
    g = torch.Generator().manual_seed(t + d)
    if ON_GPU:
        x = (torch.randn(2, t, d, generator=g) * 2).to(dtype).to(DEVICE)
        rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    else:
        x = torch.randint(-15, 16, (2, t, d), generator=g).to(dtype)
        rot = torch.zeros(d, d)
        rot[torch.arange(d), torch.randperm(d, generator=g)] = (
            torch.randint(0, 2, (d,), generator=g) * 2 - 1).float()
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)

    kw = dict(block_rows=64, persistent=persistent)
    want = _encode_under(monkeypatch, {"POLARTENSOR_ENCODE_PERM": "0"}, x, rot, mids, cfg, **kw)
    assert seen[-1] is False
    got = _encode_under(monkeypatch, {"POLARTENSOR_ENCODE_PERM": "1"}, x, rot, mids, cfg, **kw)
    assert seen[-1] is True
    _assert_same_encode(got, want, cfg)


def test_column_order_needs_whole_rows_per_warp(monkeypatch):
    """Tiles of fewer than 16 rows per warp keep coordinate order (measured slower offline
    in register order), whatever POLARTENSOR_ENCODE_PERM says; the codes agree either way."""
    seen = _spy_launches(monkeypatch, "PERM")
    monkeypatch.delenv("POLARTENSOR_ENCODE_PERM", raising=False)
    d = 64 if ON_GPU else 32
    cfg = get_preset("paper", head_dim=d)
    x = torch.randn(1, 40, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    out = []
    for rows in (32, 64):
        codes = torch.zeros(1, 40, cfg.record_bytes(d), dtype=torch.uint8, device=DEVICE)
        radii = torch.zeros(1, 40, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                            device=DEVICE)
        assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False,
                                  block_rows=rows, num_warps=4)
        out.append((codes, radii))
    assert seen == [False, True]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("d", HEAD_DIMS)
@settings(max_examples=2 if ON_GPU else 3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), t=st.integers(1, 40), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_boundary_search_is_invisible(d, data, t, scale, monkeypatch):
    """The atan2-free encode's binary search over a level's boundaries
    (POLARTENSOR_ENCODE_SEARCH=binary) gives the codes of the one-by-one count (=linear, the
    default) bit for bit, for configurations with wide levels (3 to 8 bits), float32 and
    bfloat16 x, three input scales."""
    seen = _spy_launches(monkeypatch, "CROSS")
    # configurations with a level of >= 7 boundaries, where the search is binary (level 1
    # from 5 bits: 2^(b-2) - 1 per quadrant; above, from 3 bits)
    wide = [c for c in configs_for(d)
            if c.bits[0] >= 5 or any(b >= 3 for b in c.bits[1:])]
    cfg = data.draw(st.sampled_from(wide))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    g = torch.Generator().manual_seed(t + 7 * d)
    x = (torch.randn(2, t, d, generator=g) * scale).to(dtype).to(DEVICE)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x.float(), cfg).centroids, cfg, torch.float64)

    key = "POLARTENSOR_ENCODE_SEARCH"
    want = _encode_under(monkeypatch, {key: "linear"}, x, rot, mids, cfg, quantizer="cross")
    assert seen[-1] == 1
    got = _encode_under(monkeypatch, {key: "binary"}, x, rot, mids, cfg, quantizer="cross")
    assert seen[-1] == 2
    _assert_same_encode(got, want, cfg)


def test_boundary_search_setting_is_checked(monkeypatch):
    from polartensor.kernels.encode import _boundary_search

    monkeypatch.delenv("POLARTENSOR_ENCODE_SEARCH", raising=False)
    assert _boundary_search() == "linear"
    monkeypatch.setenv("POLARTENSOR_ENCODE_SEARCH", "binary")
    assert _boundary_search() == "binary"
    monkeypatch.setenv("POLARTENSOR_ENCODE_SEARCH", "bisect")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_SEARCH='bisect'"):
        _boundary_search()
