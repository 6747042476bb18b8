"""kernels/tree_encode.py (the opt-in encode without in-tree reshapes) against the reshape
encode kernel and the reference quantize.

The float64 (exact) path must equal ``polar_encode_fwd_kernel`` bit for bit (codes and radii)
for every preset at every head_dim the kernels serve and for odd configurations (0-bit levels,
8-bit levels, codes straddling bytes, record sizes that are not multiples of 2 or 4). The
float32 path (fused rotation, no atan2 above level 1) is held to the tolerances of
test_kernel_encode.py. Both kernels launch through ``encode_into_triton`` into an offset view
of poisoned storage, so bytes outside the written rows are checked too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polartensor import PolarQuantConfig, quantize
from polartensor.config import PRESETS, get_preset
from polartensor.kernels import encode
from polartensor.kernels.common import boundary_table
from polartensor.kernels.tree_encode import polar_encode_split_fwd_kernel
from polartensor.packing import unpack_codes
from polartensor.polar import decode_rotated
from polartensor.rotation import rotate, rotation_matrix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def _encode(kernel, x, cfg, exact, offset=2):
    """Encode x [..., t, d] with ``kernel`` into rows [offset, offset + t) of poisoned storage;
    returns (codes, radii) of those rows after checking the other rows are untouched."""
    d, t = x.shape[-1], x.shape[-2]
    g = torch.Generator().manual_seed(t * 7 + d)
    cap = offset + t + 2
    codes = torch.randint(0, 256, (*x.shape[:-2], cap, cfg.record_bytes(d)), generator=g,
                          dtype=torch.uint8).to(DEVICE)
    radii = torch.randn(*x.shape[:-2], cap, cfg.num_blocks(d), generator=g).to(
        cfg.torch_radius_dtype).to(DEVICE)
    codes0, radii0 = codes.clone(), radii.clone()
    rot = None if cfg.rotation == "none" else rotation_matrix(
        d, cfg.rotation, cfg.seed, DEVICE, torch.float32)
    mids = boundary_table(quantize(x[..., :1, :], cfg).centroids, cfg, torch.float64)
    saved = encode._encode_kernel
    encode._encode_kernel = kernel
    try:
        assert encode.encode_into_triton(x, rot, mids, codes[..., offset:offset + t, :],
                                         radii[..., offset:offset + t, :], cfg, exact=exact)
    finally:
        encode._encode_kernel = saved
    keep = torch.ones(cap, dtype=torch.bool, device=DEVICE)
    keep[offset:offset + t] = False
    assert torch.equal(codes[..., keep, :], codes0[..., keep, :])
    assert torch.equal(radii[..., keep, :].float(), radii0[..., keep, :].float())
    return codes[..., offset:offset + t, :], radii[..., offset:offset + t, :]


def _assert_same_as_reshape_kernel(x, cfg, msg=""):
    c0, r0 = _encode(encode.polar_encode_fwd_kernel, x, cfg, exact=True)
    c1, r1 = _encode(polar_encode_split_fwd_kernel, x, cfg, exact=True)
    assert torch.equal(c1, c0), f"codes differ {msg}"
    assert torch.equal(r1.float(), r0.float()), f"radii differ {msg}"


def _assert_fp32_path_close(x, cfg):
    """The float32 path vs the reference, with test_kernel_encode.py's tolerances: >= 99.9%
    of the codes agree (one tie flip allowed), radii within the radius dtype's rounding,
    reconstruction error no worse than the reference's."""
    d = x.shape[-1]
    codes, radii = _encode(polar_encode_split_fwd_kernel, x, cfg, exact=False)
    ref = quantize(x, cfg)
    got, want = unpack_codes(codes, cfg, d), ref.unpack()
    total = sum(a.numel() for a in want)
    differ = sum(int((a != b).sum()) for a, b in zip(got, want))
    assert differ <= max(1, total // 1000), f"{differ} of {total} codes differ"
    rtol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[cfg.radius_dtype]
    torch.testing.assert_close(radii.double(), ref.radii.double(), rtol=rtol, atol=1e-6)
    y = rotate(x.float(), cfg.rotation, cfg.seed)
    e_got = (decode_rotated(got, radii, cfg, ref.centroids) - y).pow(2).sum().item()
    e_ref = (ref.dequantize_rotated() - y).pow(2).sum().item()
    assert e_got <= e_ref * 1.001 + 1e-6 * y.pow(2).sum().item()


# On the GPU every configuration is a fresh compile of both kernels (seconds each); the
# interpreter covers the small head_dims and the CI's breadth of random configurations.
PRESET_DIMS = [64, 128, 256] if ON_GPU else [16, 32, 64, 128, 256]
CONFIG_EXAMPLES = 8 if ON_GPU else 20


@pytest.mark.parametrize("d", PRESET_DIMS)
def test_split_encode_equals_reshape_encode_presets(d):
    """Exact path, every preset: codes and radii bit-identical to the reshape kernel."""
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(2, 5, d, generator=g) * 3).to(DEVICE)
    for name in sorted(PRESETS):
        _assert_same_as_reshape_kernel(x, get_preset(name, head_dim=d), f"{name} d={d}")


@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_split_encode_fp32_path_presets(d):
    """Float32 path (fused, permuted rotation; no atan2 above level 1) vs the reference."""
    g = torch.Generator().manual_seed(d + 1)
    x = (torch.randn(3, 7, d, generator=g) * 3).to(DEVICE)
    for name in ("paper", "polar-2", "polar-4", "polar-5"):
        _assert_fp32_path_close(x, get_preset(name, head_dim=d))


@st.composite
def _configs(draw):
    d = draw(st.sampled_from([16, 32, 64, 128]))
    levels = draw(st.integers(1, min(8, d.bit_length() - 1)))
    bits = [draw(st.integers(1, 8))] + [draw(st.integers(0, 8)) for _ in range(levels - 1)]
    cfg = PolarQuantConfig(
        levels=levels, bits=tuple(bits),
        radius_dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
        rotation=draw(st.sampled_from(["orthogonal", "hadamard", "none"])), seed=3)
    return d, cfg


@settings(max_examples=CONFIG_EXAMPLES)
@given(dc=_configs(), t=st.integers(1, 9))
def test_split_encode_hypothesis_configs(dc, t):
    """Random depths and bit widths (0-bit levels, 5/7-bit codes straddling bytes, odd
    record sizes): exact path bit-identical, float32 path within the reference tolerances."""
    d, cfg = dc
    g = torch.Generator().manual_seed(d * 31 + t)
    x = (torch.randn(2, t, d, generator=g) * 3).to(DEVICE)
    _assert_same_as_reshape_kernel(x, cfg, repr(cfg))
    _assert_fp32_path_close(x, cfg)


@pytest.mark.parametrize("cfg", [
    PolarQuantConfig(levels=3, bits=(1, 1, 5)),  # a wide level the permuted tree cannot align
    PolarQuantConfig(levels=2, bits=(8, 7), radius_dtype="float32"),
    PolarQuantConfig(levels=7, bits=(3, 0, 5, 0, 7, 0, 1)),
], ids=repr)
def test_split_encode_odd_layouts(cfg):
    d = 128
    x = (torch.randn(1, 6, d, generator=torch.Generator().manual_seed(5)) * 3).to(DEVICE)
    _assert_same_as_reshape_kernel(x, cfg, repr(cfg))
    _assert_fp32_path_close(x, cfg)


def test_split_encode_zero_and_axis_vectors():
    """Zero pairs (atan2(0, 0)) and exact axes: the float32 comparisons of levels >= 2 must
    agree with the reference where no angle lies near a boundary."""
    d = 32
    cfg = get_preset("polar-3", head_dim=d).replace(rotation="none")
    x = torch.zeros(1, 4, d)
    x[0, 1, 0] = 1.0  # one nonzero coordinate: all deeper angles 0
    x[0, 2, 1] = -2.0  # level-1 angle 3pi/2, deeper angles 0
    x[0, 3, 16:] = 1.0  # first half zero: angles pi/2 at the top level
    x = x.to(DEVICE)
    _assert_same_as_reshape_kernel(x, cfg)
    codes, radii = _encode(polar_encode_split_fwd_kernel, x, cfg, exact=False)
    ref = quantize(x, cfg)
    assert torch.equal(codes, ref.codes)
    assert torch.equal(radii, ref.radii)


@pytest.mark.parametrize("value,ok", [("split", True), ("reshape", True), ("bogus", False)])
def test_encode_kernel_selected_by_environment(value, ok):
    code = ("from polartensor.kernels import encode, tree_encode;"
            "print(encode._encode_kernel is tree_encode.polar_encode_split_fwd_kernel)")
    env = {**os.environ, "POLARTENSOR_ENCODE": value, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if ok:
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == str(value == "split")
    else:
        assert res.returncode != 0
        assert "ValueError" in res.stderr and "POLARTENSOR_ENCODE" in res.stderr
