"""kernels/tree_decode.py (the default decode, without in-tree reshapes) ==
common.decode_tile_reshape (the reshape decode), bit for bit: a dequant kernel built on each,
every preset at every head_dim the kernels serve, odd configurations (0-bit levels, 8-bit
levels, codes straddling bytes, 8 levels), row counts not multiples of the block. Runs
compiled on the GPU and under the interpreter on the CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from polartensor import PolarQuantConfig, polar_sdpa, quantize
from polartensor.config import PRESETS, get_preset
from polartensor.kernels import decode_attention
from polartensor.kernels.common import decode_tile_reshape, interpreting, level_words, trig_table
from polartensor.kernels.tree_decode import decode_tile_joined

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ODD = [PolarQuantConfig(levels=3, bits=(1, 0, 7), radius_dtype="float32"),
       PolarQuantConfig(levels=2, bits=(8, 5), rotation="hadamard", seed=5),
       PolarQuantConfig(levels=4, bits=(4, 2, 2, 2), rotation="none"),
       PolarQuantConfig(levels=8, bits=(8, 7, 6, 5, 4, 3, 2, 1), radius_dtype="float32"),
       PolarQuantConfig(levels=5, bits=(3, 5, 7, 0, 6))]


@triton.jit(do_not_specialize=["n_rows"])
def _dequant_with_kernel(
    codes_ptr, radii_ptr, trig_ptr, out_ptr, n_rows,
    BN: tl.constexpr, D: tl.constexpr, R: tl.constexpr, KT: tl.constexpr, L: tl.constexpr,
    NB: tl.constexpr, TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr,
    LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr, LV3: tl.constexpr,
    LV4: tl.constexpr, LV5: tl.constexpr, LV6: tl.constexpr, LV7: tl.constexpr,
    DECODE: tl.constexpr, PACK: tl.constexpr,
):
    """The dequant kernel with the tile decode as a parameter (the library's binds
    ``common.decode_tile`` at import)."""
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    valid = rows < n_rows
    y = DECODE(codes_ptr, radii_ptr, trig_ptr, rows * R, rows * NB, valid, BN, D, KT, L, NB,
               TAIL_BYTE, TAIL_NB, LV0, LV1, LV2, LV3, LV4, LV5, LV6, LV7, PACK)
    y = y.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], y, mask=valid[:, None])


def _dequant_with(decode, codes, radii, trig, config, d, bn, pack=False):
    n_rows = codes.numel() // codes.shape[-1]
    out = torch.empty(*codes.shape[:-1], d, dtype=torch.float32, device=codes.device)
    w = level_words(config, d)
    _dequant_with_kernel[(triton.cdiv(n_rows, bn),)](
        codes, radii, trig, out, n_rows, BN=bn, D=d, R=w["R"], KT=trig.shape[-1], L=w["L"],
        NB=w["NB"], TAIL_BYTE=w["TAIL_BYTE"], TAIL_NB=w["TAIL_NB"],
        **{f"LV{i}": w[f"LV{i}"] for i in range(8)}, DECODE=decode, PACK=pack, num_warps=4)
    return out


def _configs(d):
    return ([(n, get_preset(n, head_dim=d)) for n in sorted(PRESETS)]
            + [(repr(c), c) for c in ODD if d % c.block_size == 0])


@pytest.mark.parametrize("d", [16, 32, 64, 128, 256])
def test_joined_decode_equals_decode_tile(d):
    rows = 37 if interpreting() else 1000
    for name, cfg in _configs(d):
        g = torch.Generator().manual_seed(d)
        q = quantize((torch.randn(rows, d, generator=g) * 3).to(DEVICE), cfg)
        trig = trig_table(q.centroids)
        ref = _dequant_with(decode_tile_reshape, q.codes, q.radii, trig, cfg, d, 16)
        # a real decode, not zeros: the comparison below can fail
        assert ref.abs().sum() > 0, name
        for bn in (16, 32):
            got = _dequant_with(decode_tile_joined, q.codes, q.radii, trig, cfg, d, bn)
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{name} d={d} bn={bn}")


def _rounding_units(cfg) -> float:
    """Bound of the packed decode's error in bf16 roundings (unit 2**-8) of a pair's radius:
    2 L + 1 with every level in bf16 (the default: r, and per level the table word and the
    product), or three with POLARTENSOR_DECODE_UPPER=float32 (r, level 1's table word and
    product)."""
    from polartensor.kernels import tree_decode

    return (2 * len(cfg.bits) + 1.01) if tree_decode._UPPER_BF16.value else 3.01


@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_packed_decode_within_bf16_rounding(d):
    """PACK: every level as bf16(bf16(r) x bf16(cos)) etc., rounded to nearest: each
    coordinate is within 2 L + 1 bf16 roundings (unit 2**-8) of its pair's radius of the exact
    decode (three with float32 upper levels, POLARTENSOR_DECODE_UPPER=float32)."""
    rows = 37 if interpreting() else 1000
    for name, cfg in _configs(d):
        g = torch.Generator().manual_seed(d + 1)
        q = quantize((torch.randn(rows, d, generator=g) * 3).to(DEVICE), cfg)
        trig = trig_table(q.centroids)
        ref = _dequant_with(decode_tile_joined, q.codes, q.radii, trig, cfg, d, 16)
        got = _dequant_with(decode_tile_joined, q.codes, q.radii, trig, cfg, d, 16, pack=True)
        pair_r = ref.reshape(*ref.shape[:-1], d // 2, 2).norm(dim=-1)
        bound = (_rounding_units(cfg) * 2.0 ** -8 * pair_r).repeat_interleave(2, dim=-1) + 1e-30
        err = (got - ref).abs()
        assert (err <= bound).all(), f"{name} d={d}: max excess {(err - bound).max():.3g}"
        # not the exact decode: the packed path really rounds (the test above can fail)
        assert not torch.equal(got, ref), name


@pytest.mark.parametrize("d", [16, 64, 128])
def test_joint12_decode_within_bf16_rounding(d):
    """PACK == 2: levels 2 and 1 through the joint table (one gather of four bf16 products
    per level-2 node, times the level-2 radius in bf16): within three bf16 roundings of the
    exact decode like PACK, not equal to PACK's output where the joint table applies, and
    PACK's output bit for bit where it does not (no table: > 10 index bits; level 2 decoded
    above the tree root at small head_dim)."""
    from polartensor.kernels.common import joint12_bits

    rows = 37 if interpreting() else 1000
    applied = 0
    for name, cfg in _configs(d):
        g = torch.Generator().manual_seed(d + 2)
        q = quantize((torch.randn(rows, d, generator=g) * 3).to(DEVICE), cfg)
        trig = trig_table(q.centroids, cfg.bits)
        assert trig.shape[0] > 5 or joint12_bits(cfg.bits) is None, name
        ref = _dequant_with(decode_tile_joined, q.codes, q.radii, trig, cfg, d, 16)
        packed = _dequant_with(decode_tile_joined, q.codes, q.radii, trig, cfg, d, 16, pack=1)
        got = _dequant_with(decode_tile_joined, q.codes, q.radii, trig, cfg, d, 16, pack=2)
        pair_r = ref.reshape(*ref.shape[:-1], d // 2, 2).norm(dim=-1)
        bound = (_rounding_units(cfg) * 2.0 ** -8 * pair_r).repeat_interleave(2, dim=-1) + 1e-30
        err = (got - ref).abs()
        assert (err <= bound).all(), f"{name} d={d}: max excess {(err - bound).max():.3g}"
        w = level_words(cfg, d)
        top = 0
        while top < w["L"] and (w["NB"] << top) < 8:
            top += 1
        if joint12_bits(cfg.bits) is not None and w["L"] - top >= 2:
            applied += 1
            assert not torch.equal(got, packed), name
        else:
            assert torch.equal(got, packed), name
    # the presets it is for really take it (paper and polar-3 from d 64 on)
    assert applied >= (2 if d >= 64 else 0)


@pytest.mark.skipif(not interpreting(),
                    reason="on the GPU the kernels bind decode_tile at import: run the suite "
                           "with POLARTENSOR_DECODE=reshape to test the attention with it")
@pytest.mark.parametrize("preset,d,tq", [("paper", 64, 1), ("polar-4", 32, 3),
                                         ("polar-2", 16, 20)])
def test_attention_with_either_decode_matches_reference(preset, d, tq, monkeypatch):
    cfg = get_preset(preset, head_dim=d)
    g = torch.Generator().manual_seed(d + tq)
    q = torch.randn(1, 4, tq, d, generator=g)
    k = quantize(torch.randn(1, 2, 29, d, generator=g), cfg)
    v = quantize(torch.randn(1, 2, 29, d, generator=g), cfg)

    def attn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                              scale=1 / math.sqrt(d))

    ref = polar_sdpa(q, k, v, is_causal=True, enable_gqa=True)
    # The interpreter looks decode_tile up at every call: a decode that returns zeros must
    # change the output (so the swap below is real), the joined decode must not.
    monkeypatch.setattr(decode_attention, "decode_tile", _zeros_decode)
    assert not torch.allclose(attn(), ref, rtol=1e-2, atol=1e-2)
    for decode in (decode_tile_joined, decode_tile_reshape):
        monkeypatch.setattr(decode_attention, "decode_tile", decode)
        torch.testing.assert_close(attn(), ref, rtol=2e-4, atol=2e-4)


@triton.jit
def _zeros_decode(codes_ptr, radii_ptr, trig_ptr, rec_off, rad_off, valid,
                  BN: tl.constexpr, D: tl.constexpr, KT: tl.constexpr, L: tl.constexpr,
                  NB: tl.constexpr, TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr,
                  LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr, LV3: tl.constexpr,
                  LV4: tl.constexpr, LV5: tl.constexpr, LV6: tl.constexpr, LV7: tl.constexpr,
                  PACK: tl.constexpr):
    return tl.zeros((BN, D), dtype=tl.float32)


def test_code16_flag_follows_the_environment():
    """POLARTENSOR_CODE16 is read at import (16-bit code loads unless it is 0): the run below
    (and any run with it set) really uses what it asks for."""
    from polartensor.kernels import tree_decode

    assert tree_decode._CODE16.value == (os.environ.get("POLARTENSOR_CODE16", "1") != "0")


@pytest.mark.skipif(os.environ.get("POLARTENSOR_CODE16") == "0",
                    reason="this run already has POLARTENSOR_CODE16=0: the bit-exact test "
                           "above covers the byte loads directly")
@pytest.mark.skipif(not interpreting(),
                    reason="on the GPU one process would compile every configuration in a "
                           "row (minutes): scripts/gpu_validate.sh optin runs this file "
                           "with POLARTENSOR_CODE16=0 instead, spread over the cores")
def test_byte_load_decode_is_bit_exact():
    """POLARTENSOR_CODE16=0 (the opt-out): the joined decode with byte code loads equals the
    reshape decode bit for bit too, for every preset at even and odd record sizes. Run in a
    fresh interpreter, as the flag is read at import."""
    env = dict(os.environ, POLARTENSOR_CODE16="0")
    sel = "test_code16_flag or test_joined_decode_equals_decode_tile"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", "-k", sel, __file__], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout, res.stdout[-2000:]


@pytest.mark.skipif(os.environ.get("POLARTENSOR_DECODE_UPPER") == "float32",
                    reason="this run already has POLARTENSOR_DECODE_UPPER=float32")
@pytest.mark.skipif(not interpreting(),
                    reason="on the GPU one process would compile every configuration in a "
                           "row (minutes): run the kernel tests with "
                           "POLARTENSOR_DECODE_UPPER=float32 instead, spread over the cores")
def test_upper_levels_in_float32():
    """POLARTENSOR_DECODE_UPPER=float32 (the opt-out, read at import): the packed decodes stay
    within their tighter rounding bound (three roundings) of the exact decode, shuffled and
    gathered tables give the attention bit for bit, and the attention kernel agrees with the
    reference. Run in a fresh interpreter, as the flag is read at import."""
    env = dict(os.environ, POLARTENSOR_DECODE_UPPER="float32")
    attn = os.path.join(os.path.dirname(__file__), "test_kernel_attention.py")
    sel = ("within_bf16_rounding or upper_flag or shuffle_tables_equal_gathers "
           "or packed_decode_attention_matches_reference "
           "or joint12_decode_attention_matches_reference")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", "-k", sel, __file__, attn], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout, res.stdout[-2000:]


def test_upper_flag_follows_the_environment():
    from polartensor.kernels import tree_decode

    assert tree_decode._UPPER_BF16.value == (
        os.environ.get("POLARTENSOR_DECODE_UPPER", "bf16x2") == "bf16x2")


def test_code16_copies_misaligned_codes(monkeypatch):
    """Records of an even size at an odd address or stride would make the 16-bit loads
    misaligned: they are copied (with a warning naming the fix), aligned ones and odd-size
    ones are passed through untouched."""
    from polartensor.kernels import tree_decode

    monkeypatch.setattr(tree_decode, "_CODE16", tl.constexpr(True))
    flat = torch.arange(200, dtype=torch.int64).to(torch.uint8)
    for bad in (flat.as_strided((2, 46), (47, 1)), flat[1:93].view(2, 46)):
        with pytest.warns(UserWarning, match="not 2-byte aligned.*POLARTENSOR_CODE16=0"):
            got = tree_decode.code16_aligned(bad)
        assert got.data_ptr() % 2 == 0 and got.is_contiguous() and torch.equal(got, bad)
    for ok in (flat[:92].view(2, 46), flat[1:47].view(2, 23)):
        assert tree_decode.code16_aligned(ok) is ok
    monkeypatch.setattr(tree_decode, "_CODE16", tl.constexpr(False))
    assert tree_decode.code16_aligned(flat[1:93].view(2, 46)).data_ptr() % 2 == 1


def test_attention_on_misaligned_codes_matches_aligned():
    """End to end: decode attention over a cache whose code records sit at an odd address
    gives what the same cache at an aligned address gives (no misaligned load, no wrong
    answer): with the 16-bit code loads through a copy, with a warning saying so; with byte
    loads (POLARTENSOR_CODE16=0) directly, without one."""
    import warnings

    from polartensor.kernels import tree_decode

    cfg = get_preset("paper", head_dim=32)
    assert cfg.record_bytes(32) % 2 == 0
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1, 32, generator=g).to(DEVICE)
    k = quantize(torch.randn(1, 2, 19, 32, generator=g).to(DEVICE), cfg)
    v = quantize(torch.randn(1, 2, 19, 32, generator=g).to(DEVICE), cfg)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    r = k.codes.shape[-1]
    store = torch.zeros(k.codes.numel() + 1, dtype=torch.uint8, device=DEVICE)
    store[1:].copy_(k.codes.reshape(-1))
    odd = store[1:].view(k.codes.shape)
    assert odd.data_ptr() % 2 == 1 and r % 2 == 0
    k_odd = type(k)(odd, k.radii, k.centroids, k.config, k.shape, k.dtype)
    if tree_decode._CODE16.value:
        with pytest.warns(UserWarning, match="not 2-byte aligned"):
            got = F.scaled_dot_product_attention(q, k_odd, v, enable_gqa=True)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*not 2-byte aligned")
            got = F.scaled_dot_product_attention(q, k_odd, v, enable_gqa=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# -- how code words are read: the 16-bit windows and the layout anchor (pure host logic) ----

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from polartensor.kernels import tree_decode as td  # noqa: E402


def _tree_words(config, d):
    """(b, P, NBB, BITOFF, CW, w, path) of every code word the tree below the top levels
    reads, as decode_tile_joined lays the levels out (16-bit code loads on); the kernel
    constants; and the tree's root level l0 and block count NBB."""
    lw = level_words(config, d)
    L, NB, R = lw["L"], lw["NB"], lw["R"]
    T = td._top_count(NB, L, td._NBB_MIN.value)
    nbb, l0 = NB << T, L - T
    out = []
    for lvl in range(1, l0 + 1):
        lv = lw[f"LV{lvl - 1}"]
        b = lv & 15
        if b == 0:
            continue
        p = 1 << (l0 - lvl)
        bitoff = td._level_bitoff(lv, nbb * p, lw["TAIL_BYTE"])
        cw = td._word_codes(b, p, bitoff)
        for w in range(p // cw):
            out.append((b, p, nbb, bitoff, cw, w,
                        td._word_read_path(True, b, cw, bitoff, p, nbb, R, w)))
    return out, lw, l0, nbb


@st.composite
def _random_configs(draw):
    levels = draw(st.integers(1, 7))
    bits = (draw(st.integers(1, 8)),) + tuple(draw(st.integers(0, 8))
                                              for _ in range(levels - 1))
    d = draw(st.sampled_from([64, 128, 256]).filter(lambda d: d % (1 << levels) == 0))
    return PolarQuantConfig(levels=levels, bits=bits), d


@settings(max_examples=300, deadline=None)
@given(_random_configs())
def test_window_reads_hold_the_field_inside_the_record(cfg_d):
    """Every word read through two 16-bit loads (path 3) lies inside those two words, and
    both words lie inside the record, for every block: the unmasked loads never read
    another record's bytes into a code, nor past the end of the cache."""
    config, d = cfg_d
    words, lw, _, _ = _tree_words(config, d)
    for b, p, nbb, bitoff, cw, w, path in words:
        if path != 3:
            continue
        for j in range(nbb):
            bit0 = bitoff + j * p * b + w * cw * b
            assert bit0 % 16 + cw * b <= 32, (config, d, bit0, cw * b)
            assert (bit0 // 16) * 2 + 4 <= lw["R"], (config, d, bit0, lw["R"])


def test_three_bit_levels_take_16_bit_windows_not_byte_loads():
    """polar-4's 3-bit levels 2 and 3 at d 128 (12- and 6-bit words that are not byte
    aligned) are read through 16-bit windows: no unaligned byte loads remain in its tree."""
    words, *_ = _tree_words(get_preset("polar-4", 128), 128)
    paths = {(b, p): path for b, p, *_, path in words}
    assert paths[(3, 4)] == 3 and paths[(3, 2)] == 3
    assert 5 not in paths.values()


@pytest.mark.parametrize("preset,d,expected", [
    ("polar-4", 128, True), ("polar-3.5", 128, True), ("polar-2", 128, True),
    ("polar-4", 256, False), ("polar-5", 256, False),
    ("paper", 128, False), ("polar-3", 128, False), ("polar-2.5", 128, False),
    ("paper", 64, False), ("polar-4", 64, False),
])
def test_layout_anchor_rule(preset, d, expected):
    """The layout anchor goes where no level of the tree reads aligned bytes (the loads that
    otherwise spread the tree over the lanes), at head_dim 128 only (measured there; offline
    SASS counts and H100 times in _wants_layout_anchor's docstring)."""
    words, lw, l0, nbb = _tree_words(get_preset(preset, d), d)
    got = td._wants_layout_anchor(d, l0, nbb, lw["TAIL_BYTE"], lw["R"],
                                  *(lw[f"LV{i}"] for i in range(8)))
    assert got is expected
    # the rule's reason, from the word paths this file enumerates itself (with the package's
    # path function): at d 128 an aligned-byte word exists iff no anchor
    if d == 128:
        assert (not any(path == 4 for *_, path in words)) is expected
