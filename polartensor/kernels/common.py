"""Shared pieces of the Triton kernels: per-level layout constants, atan2, tile encode/decode.

A token record is one little-endian bit stream (see ``polartensor.packing``): level 1's codes
first, code ``j`` of level ``l`` at bit ``offset_l + j * bits_l``. With a power-of-two head_dim,
every level with at least 8 angles (``n_l = D >> l``) fills a whole number of bytes, so its
section starts and ends on a byte boundary. Such a "head" level is read and written as words of
``G = 8 / gcd(8, b)`` codes (``G * b`` bits, a whole number of bytes). The levels with fewer
than 8 angles form the "tail": at most 56 bits, handled as one int64 per record.

Per-level constants travel as one small int each (``LV0`` .. ``LV7``, see :func:`level_words`):
bits (4 bits), log2 G (2 bits), log2 of the padded word bytes (2 bits), and the level's byte
offset (head levels) or bit offset inside the tail (tail levels), 10 bits.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .tree_decode import _ilog2

MAX_LEVELS = 8
_TWO_PI = 2.0 * math.pi


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INTERPRETER_CHECKED: list = []


def check_interpreter() -> None:
    """Under TRITON_INTERPRET=1, once per process: run a loop with a run-time bound in the
    interpreter. Triton 3.6's interpreter turns loop bounds into Python ints with ``int()`` on
    one-element arrays, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"); every kernel here has such loops. Raise one clear error instead of
    a failure inside a kernel."""
    if _INTERPRETER_CHECKED:
        return

    @triton.jit
    def _probe(out_ptr, n):
        for i in range(n):
            tl.store(out_ptr + i, i)

    out = torch.zeros(2, dtype=torch.int32)
    try:
        _probe[(1,)](out, 2)
    except Exception as exc:  # noqa: BLE001  (the interpreter wraps what it hits)
        import numpy

        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run a loop "
            f"with numpy {numpy.__version__}: {exc}. Install numpy<2.4 or a newer triton "
            "(3.9 works), or unset TRITON_INTERPRET to run the PyTorch reference on the CPU"
        ) from exc
    if out.tolist() != [0, 1]:
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter ran a two-step loop "
                           f"wrongly ({out.tolist()}): unset TRITON_INTERPRET")
    _INTERPRETER_CHECKED.append(True)


def supported_head_dim(d: int) -> bool:
    return 16 <= d <= 256 and d & (d - 1) == 0


def level_words(config, d: int) -> dict:
    """Kernel constants for ``config`` at head_dim ``d`` (a power of two)."""
    offs = config.level_bit_offsets(d)
    nlev = config.levels
    words = [0] * MAX_LEVELS
    tail_bit = config.code_bits(d)
    for lvl in range(nlev):
        n = d >> (lvl + 1)
        if n < 8:
            tail_bit = min(tail_bit, offs[lvl])
    assert tail_bit % 8 == 0
    for lvl in range(nlev):
        b = config.bits[lvl]
        n = d >> (lvl + 1)
        g = 8 // math.gcd(8, b) if b else 1
        wb = max(1, g * b // 8)
        wbp = 1 << (wb - 1).bit_length()
        if n >= 8:
            assert offs[lvl] % 8 == 0
            pos = offs[lvl] // 8
        else:
            pos = offs[lvl] - tail_bit
        assert pos < 1024 and b < 16
        words[lvl] = b | (int(math.log2(g)) << 4) | (int(math.log2(wbp)) << 6) | (pos << 8)
    rec = config.record_bytes(d)
    return dict(
        L=nlev, NB=d >> nlev, R=rec, TAIL_BYTE=tail_bit // 8, TAIL_NB=rec - tail_bit // 8,
        **{f"LV{i}": w for i, w in enumerate(words)},
    )


def trig_table(centroids: torch.Tensor, bits=None) -> torch.Tensor:
    """[5 (+ J), levels, K] float32, the decode tables. Planes 0 and 1: cos and sin of every
    centroid. For the packed decode: plane 2, the pair rounded to bfloat16 and packed into one
    32-bit word per centroid (cos in the low half, sin in the high half; float32 bit
    patterns); planes 3-4 read as one [levels, K, 2] array, cos and sin side by side (one
    64-bit gather per angle). With the configuration's ``bits`` and a joint index of at most
    ``JOINT12_MAX_BITS`` (see :func:`joint12_bits`): J more planes holding the joint table of
    levels 1 and 2 (:func:`joint12_words`), zero-padded."""
    c = centroids.to(torch.float32)
    cos, sin = torch.cos(c), torch.sin(c)
    lo = cos.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    hi = sin.to(torch.bfloat16).view(torch.int16).to(torch.int32) << 16
    packed = (lo | hi).view(torch.float32)
    pairs = torch.stack([cos, sin], dim=-1).reshape(2, *cos.shape)
    planes = [torch.stack([cos, sin, packed]), pairs]
    if bits is not None and joint12_bits(bits) is not None:
        words = joint12_words(centroids, bits).view(torch.float32).reshape(-1)
        plane = cos.numel()
        pad = (-words.numel()) % plane
        words = torch.cat([words, words.new_zeros(pad)])
        planes.append(words.reshape(-1, *cos.shape))
    return torch.cat(planes).contiguous()


# The joint table of levels 1 and 2 has 2^(b2 + 2 b1) entries of 8 bytes: 8 KB at 10 bits (b1
# 4, b2 2: paper, polar-3, polar-3.25), which stays in L1; wider levels keep two steps.
JOINT12_MAX_BITS = 10


def joint12_bits(bits) -> int | None:
    """The joint index width b2 + 2 b1 of levels 1 and 2, or None where there is no joint
    table (one level, or wider than ``JOINT12_MAX_BITS``)."""
    if len(bits) < 2:
        return None
    width = bits[1] + 2 * bits[0]
    return width if width <= JOINT12_MAX_BITS else None


def joint12_words(centroids: torch.Tensor, bits) -> torch.Tensor:
    """[2^(b2 + 2 b1), 2] int32: for index (c2 << 2 b1) | (c1b << b1) | c1a, with phi the
    level-2 angle of code c2 and theta_a, theta_b the level-1 angles of codes c1a, c1b, two
    bf16x2 words: (cos phi cos theta_a, cos phi sin theta_a) and (sin phi cos theta_b,
    sin phi sin theta_b), low half first. One gather and two packed multiplies by the
    level-2 radius then give the four coordinates under a level-2 node."""
    b1, b2 = bits[0], bits[1]
    idx = torch.arange(1 << (b2 + 2 * b1), device=centroids.device)
    c1a = idx & ((1 << b1) - 1)
    c1b = (idx >> b1) & ((1 << b1) - 1)
    c2 = idx >> (2 * b1)
    c = centroids.to(torch.float32)
    phi, ta, tb = c[1, c2], c[0, c1a], c[0, c1b]
    prods = torch.stack([phi.cos() * ta.cos(), phi.cos() * ta.sin(),
                         phi.sin() * tb.cos(), phi.sin() * tb.sin()], dim=-1)
    h = prods.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return (h[:, 0::2] | (h[:, 1::2] << 16)).contiguous()


def boundary_table(centroids: torch.Tensor, config,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[levels, K + 1] cell boundaries per level in ``dtype`` (the angle dtype), computed
    exactly as ``codebook.nearest_code`` does: the midpoints, then (level 1) the wrap-around
    boundary and that boundary minus 2 pi in the last two slots."""
    c32 = centroids.to(dtype)
    k = c32.shape[1]
    rows = []
    for lvl, b in enumerate(config.bits, start=1):
        row = c32.new_zeros(k + 1)
        kk = 1 << b
        c = c32[lvl - 1, :kk]
        if kk > 1:
            row[: kk - 1] = (c[:-1] + c[1:]) / 2
            if lvl == 1:
                wrap = (c[-1] + c[0] + _TWO_PI) / 2
                row[k - 1] = wrap
                row[k] = wrap - _TWO_PI
        rows.append(row)
    return torch.stack(rows).contiguous()


def env_flag(name: str, default: bool, on: str, off: str) -> bool:
    """A 0/1 setting read from the environment (per call where the caller reads it per
    call); anything else is refused with both meanings named."""
    v = os.environ.get(name, "1" if default else "0")
    if v not in ("0", "1"):
        raise ValueError(f"{name}={v!r}: use 1 ({on}{', the default' if default else ''}) "
                         f"or 0 ({off}{'' if default else ', the default'})")
    return v == "1"


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first is the default) read from the environment; anything
    else is refused, naming the choices."""
    v = os.environ.get(name, choices[0])
    if v not in choices:
        rest = " or ".join(repr(c) for c in choices[1:])
        raise ValueError(f"{name}={v!r}: use {choices[0]!r} (the default) or {rest}")
    return v


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached; 4 elsewhere)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def records_aligned16(codes: torch.Tensor) -> bool:
    """Code records [..., R] of an even size at even addresses: every 16-bit word inside a
    record is aligned (the 16-bit code loads and stores need it)."""
    return (codes.shape[-1] % 2 == 0 and codes.data_ptr() % 2 == 0
            and all(st % 2 == 0 for st in codes.stride()[:-1]))


# -- device helpers -------------------------------------------------------------------------------

@triton.jit
def _atan2(y, x):
    """atan2 in (-pi, pi] from tl ops only (the interpreter has no libdevice): octant
    reduction then the Cephes atanf polynomial (~1e-7 rad)."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    mx = tl.maximum(ax, ay)
    mn = tl.minimum(ax, ay)
    t = mn / tl.where(mx == 0.0, 1.0, mx)
    big = t > 0.41421356237309503
    z = tl.where(big, (t - 1.0) / (t + 1.0), t)
    z2 = z * z
    p = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2
         - 3.33329491539e-1) * z2 * z + z
    a = tl.where(big, p + 0.7853981633974483, p)
    a = tl.where(ay > ax, 1.5707963267948966 - a, a)
    a = tl.where(x < 0.0, 3.141592653589793 - a, a)
    return tl.where(y < 0.0, -a, a)


@triton.jit
def _atan2_f64(y, x):
    """Double-precision atan2 from tl ops: octant reduction, then the Cephes atan rational
    approximation (|t| <= 0.66 direct, else via (t - 1) / (t + 1) around pi/4), ~1e-16."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    mx = tl.maximum(ax, ay)
    mn = tl.minimum(ax, ay)
    t = mn / tl.where(mx == 0.0, 1.0, mx)
    big = t > 0.66
    z = tl.where(big, (t - 1.0) / (t + 1.0), t)
    z2 = z * z
    p = ((((-8.750608600031904122785e-1 * z2 - 1.615753718733365076637e1) * z2
           - 7.500855792314704667340e1) * z2 - 1.228866684490136173410e2) * z2
         - 6.485021904942025371773e1)
    q = (((((z2 + 2.485846490142306297962e1) * z2 + 1.650270098316988542046e2) * z2
           + 4.328810604912902668951e2) * z2 + 4.853903996359136964868e2) * z2
         + 1.945506571482613964425e2)
    w = z * (z2 * p / q) + z
    a = tl.where(big, 0.7853981633974483096 + (w + 3.061616997868382943065e-17), w)
    a = tl.where(ay > ax, (1.5707963267948966192 - a) + 6.123233995736765886130e-17, a)
    a = tl.where(x < 0.0, (3.1415926535897932385 - a) + 1.2246467991473531772e-16, a)
    return tl.where(y < 0.0, -a, a)


@triton.jit
def _load_tail(codes_ptr, rec_off, valid, TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr):
    tail = tl.zeros(rec_off.shape, dtype=tl.int64)
    for k in tl.static_range(TAIL_NB):
        byte = tl.load(codes_ptr + rec_off + TAIL_BYTE + k, mask=valid, other=0)
        tail = tail | (byte.to(tl.int64) << (8 * k))
    return tail


@triton.jit
def _level_codes(codes_ptr, rec_off, valid, tail, BN: tl.constexpr, n: tl.constexpr,
                 LV: tl.constexpr):
    """Integer codes [BN, n] of one level, read from records at ``rec_off`` (uint8 offsets)."""
    b: tl.constexpr = LV & 15
    logg: tl.constexpr = (LV >> 4) & 3
    logwbp: tl.constexpr = (LV >> 6) & 3
    pos: tl.constexpr = LV >> 8
    if b == 0:
        c = tl.zeros((BN, n), dtype=tl.int32)
    elif n >= 8:
        G: tl.constexpr = 1 << logg
        WB: tl.constexpr = (b << logg) >> 3
        WBP: tl.constexpr = 1 << logwbp
        NW: tl.constexpr = n // G
        kk = tl.arange(0, WBP)
        ww = tl.arange(0, NW)
        ptrs = (codes_ptr + rec_off[:, None, None] + pos + ww[None, :, None] * WB
                + kk[None, None, :])
        m = valid[:, None, None] & (kk < WB)[None, None, :]
        byts = tl.load(ptrs, mask=m, other=0)
        if WB > 3:
            word = tl.sum(byts.to(tl.int64) << (8 * kk.to(tl.int64))[None, None, :], axis=2)
            sh = (b * tl.arange(0, G)).to(tl.int64)
        else:
            word = tl.sum(byts.to(tl.int32) << (8 * kk)[None, None, :], axis=2)
            sh = b * tl.arange(0, G)
        c3 = (word[:, :, None] >> sh[None, None, :]) & ((1 << b) - 1)
        c = tl.reshape(c3, (BN, n)).to(tl.int32)
    else:
        sh = (pos + b * tl.arange(0, n)).to(tl.int64)
        c = ((tail[:, None] >> sh[None, :]) & ((1 << b) - 1)).to(tl.int32)
    return c


@triton.jit
def _decode_level(codes_ptr, rec_off, valid, tail, r, cos_ptr, sin_ptr, BN: tl.constexpr,
                  n: tl.constexpr, LV: tl.constexpr):
    c = _level_codes(codes_ptr, rec_off, valid, tail, BN, n, LV)
    cs = tl.load(cos_ptr + c)
    sn = tl.load(sin_ptr + c)
    return tl.reshape(tl.join(r * cs, r * sn), (BN, 2 * n))


@triton.jit
def decode_tile_reshape(codes_ptr, radii_ptr, trig_ptr, rec_off, rad_off, valid,
                        BN: tl.constexpr, D: tl.constexpr, KT: tl.constexpr, L: tl.constexpr,
                        NB: tl.constexpr, TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr,
                        LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr,
                        LV3: tl.constexpr, LV4: tl.constexpr, LV5: tl.constexpr,
                        LV6: tl.constexpr, LV7: tl.constexpr, PACK: tl.constexpr):
    """Decoded rotated vectors [BN, D] (fp32) of the records at ``rec_off``; rows that are not
    ``valid`` come out as zeros. ``trig_ptr``: [5, L, KT] tables (``trig_table``; planes 0-1).
    Top-down: radius, then each level splits every node into (r cos, r sin) -- table
    look-ups, no trig. ``PACK`` (the joined decode's packed bfloat16 output) is not
    implemented here and must be False."""
    tl.static_assert(not PACK, "the reshape decode has no packed bfloat16 output")
    r = tl.load(radii_ptr + rad_off[:, None] + tl.arange(0, NB)[None, :], mask=valid[:, None],
                other=0.0).to(tl.float32)
    tail = _load_tail(codes_ptr, rec_off, valid, TAIL_BYTE, TAIL_NB)
    sin_ptr = trig_ptr + L * KT
    if L >= 8:
        r = _decode_level(codes_ptr, rec_off, valid, tail, r, trig_ptr + 7 * KT,
                          sin_ptr + 7 * KT, BN, D >> 8, LV7)
    if L >= 7:
        r = _decode_level(codes_ptr, rec_off, valid, tail, r, trig_ptr + 6 * KT,
                          sin_ptr + 6 * KT, BN, D >> 7, LV6)
    if L >= 6:
        r = _decode_level(codes_ptr, rec_off, valid, tail, r, trig_ptr + 5 * KT,
                          sin_ptr + 5 * KT, BN, D >> 6, LV5)
    if L >= 5:
        r = _decode_level(codes_ptr, rec_off, valid, tail, r, trig_ptr + 4 * KT,
                          sin_ptr + 4 * KT, BN, D >> 5, LV4)
    if L >= 4:
        r = _decode_level(codes_ptr, rec_off, valid, tail, r, trig_ptr + 3 * KT,
                          sin_ptr + 3 * KT, BN, D >> 4, LV3)
    if L >= 3:
        r = _decode_level(codes_ptr, rec_off, valid, tail, r, trig_ptr + 2 * KT,
                          sin_ptr + 2 * KT, BN, D >> 3, LV2)
    if L >= 2:
        r = _decode_level(codes_ptr, rec_off, valid, tail, r, trig_ptr + 1 * KT,
                          sin_ptr + 1 * KT, BN, D >> 2, LV1)
    r = _decode_level(codes_ptr, rec_off, valid, tail, r, trig_ptr, sin_ptr, BN, D >> 1, LV0)
    return r


@triton.jit
def _passes(num, den, t):
    """num > den * t, read off the sign bit of fma(den, t, -num) as an int32 (1: passes),
    where the fused multiply-add rounds once: the test of the exact product (the float
    product den * t can round either way only on a tie). On sm_90 an FFMA and a shift or
    LEA.HI per test instead of FMUL, FSETP and selects on the predicate: offline (Triton 3.6,
    sm_90) paper d 128 1784 -> 1464 SASS instructions, polar-4 3016 -> 2256. ``num * -1.0``
    is an exact negation that ptxas folds into the FFMA (``-num`` lowers to 0 - num, which
    differs on +0 and stays a separate FADD per pair: 1464 -> 1408)."""
    return (tl.fma(den, t, num * -1.0).to(tl.uint32, bitcast=True) >> 31).to(tl.int32)


@triton.jit
def _count_above(code, num, den, t_ptr, NT: tl.constexpr, BINARY: tl.constexpr):
    """code + how many of the NT = 2^m - 1 ascending tangents t_ptr[k] have num > den * t[k]
    (den >= 0; ``_passes``), int32. ``BINARY`` (used from NT = 7 on): a binary search, m
    dependent comparisons instead of NT independent ones. It gives the linear count bit for
    bit: with den >= 0 and t ascending, the exact products den * t[k] are non-decreasing in
    k, so the tests passed form a prefix. Its first step compares against one scalar, the
    second selects between two, later steps gather. (At NT = 3 the two compile to about as
    many instructions offline, paper d 128 1304 binary vs 1312, and the independent
    comparisons have no dependent chain, so they stay.)"""
    if BINARY and NT >= 7:
        M: tl.constexpr = _ilog2(NT + 1)
        lo = tl.zeros(num.shape, dtype=tl.int32)
        for step in tl.static_range(M):
            half = 1 << (M - 1 - step)  # (a compile-time value of each unrolled step)
            if step == 0:
                t = tl.load(t_ptr + half - 1)
            elif step == 1:
                t = tl.where(lo != 0, tl.load(t_ptr + 2 * half + half - 1),
                             tl.load(t_ptr + half - 1))
            else:
                t = tl.load(t_ptr + lo + (half - 1))
            lo = tl.where(_passes(num, den, t) != 0, lo + half, lo)
        code = code + lo
    else:
        for k in tl.static_range(NT):
            code += _passes(num, den, tl.load(t_ptr + k))
    return code


@triton.jit
def _encode_level(r, tail, codes_ptr, rec_off, valid, mids_ptr, BN: tl.constexpr,
                  n: tl.constexpr, LV: tl.constexpr, LEVEL1: tl.constexpr, KT: tl.constexpr,
                  F64: tl.constexpr, VEC_SEARCH: tl.constexpr, CROSS: tl.constexpr = False,
                  TOFF: tl.constexpr = 0, STORE16: tl.constexpr = False,
                  SQ_IN: tl.constexpr = False, SQ_OUT: tl.constexpr = False,
                  STORE_MODE: tl.constexpr = 0, rec=None, RBP: tl.constexpr = 1):
    """One bottom-up level: pairs of r [BN, 2n] -> angles -> codes (stored, or or-ed into the
    tail word) and the new radii [BN, n]. Arithmetic runs in r's dtype: float64 when ``F64``
    (the reference's precision, bit-exact up to atan2 ties), float32 otherwise.

    ``CROSS`` (float32): no atan2 (2: the boundaries by binary search, 1: one by one; the
    same codes). Above level 1 both coordinates are radii (>= 0), so the angle passes
    boundary m exactly when y > a tan(m) (the table at ``mids_ptr + TOFF``; see SQ_IN).
    Level 1 (only with a uniform codebook, boundaries k 2 pi / 2^b): the quadrant from the
    sign bits, then the same test of |y| against |a| tan(k pi / 2^(b-1)) within it, the count
    reversed in quadrants 1 and 3 (there the angle runs from the y axis, and
    tan(k pi / 2^(b-1)) tan((2^(b-2) - k) pi / 2^(b-1)) = 1, so counting from the other axis
    and reversing is the same up to ties). Integer bit operations, not selects on
    comparisons: offline
    (Triton 3.6, sm_90, paper, d 128) 2088 -> 1784 SASS instructions, the predicate copies
    (P2R) gone. A signed zero counts by its sign bit, so an axis pair (a boundary) may land in
    the cell on the other side of it. Codes differ from the atan2 path only on float ties at
    a boundary. With ``STORE16`` (records 2-byte aligned) the fast path also stores byte
    words in aligned pairs.

    ``SQ_IN`` / ``SQ_OUT`` (the CROSS encode, above level 1 / below the top level): r holds /
    the level returns squared radii. Squares keep the tests' order (y > a tan(m) exactly when
    y^2 > a^2 tan(m)^2 for y, a >= 0; the table then holds tan(m)^2 with tan's sign, and the
    codes differ only on float ties), a squared radius is a_s + y_s, and the only square root
    is the stored block radius's: offline (Triton 3.6, sm_90, paper, d 128) 2216 -> 2088
    SASS instructions."""
    b: tl.constexpr = LV & 15
    logg: tl.constexpr = (LV >> 4) & 3
    pos: tl.constexpr = LV >> 8
    a, y = tl.split(tl.reshape(r, (BN, n, 2)))
    if SQ_IN:
        rr = a + y
    else:
        # one explicit fma: left to the compiler, the contraction differed between tile
        # layouts (H100: float32 radii one ulp apart between the two column orders)
        rr = a * a + y * y if F64 else tl.fma(a, a, y * y)
    if not SQ_OUT:
        rr = tl.sqrt(rr)
    if b > 0 and CROSS and LEVEL1:
        # quadrant Q = 2 sy + sw from the sign bits (sy: y's; sw: a's xor y's, set in
        # quadrants 1 and 3), then the cell within it: count the tangents below |y| / |a|,
        # reversed (xor S - 1 = S - 1 - count) in quadrants 1 and 3. With all-ones masks
        # (arithmetic shifts), code = Q S + cell = (count ^ (sw-mask & (2 S - 1))) |
        # (sy-mask & 2 S): the sw bit lands above the count for free.
        yb = y.to(tl.int32, bitcast=True)
        sym = yb >> 31                                      # -1 where y < 0 (sign bit)
        swm = (a.to(tl.int32, bitcast=True) ^ yb) >> 31     # -1 in quadrants 1 and 3
        if b >= 2:
            S: tl.constexpr = 1 << (b - 2)
            if S > 1:
                cnt = _count_above(tl.zeros((BN, n), dtype=tl.int32), tl.abs(y), tl.abs(a),
                                   mids_ptr + TOFF, S - 1, CROSS == 2)
                code = (cnt ^ (swm & (2 * S - 1))) | (sym & (2 * S))
            else:
                code = (swm & 1) | (sym & 2)
        else:
            code = sym & 1
    elif b > 0 and CROSS:
        code = _count_above(tl.zeros((BN, n), dtype=tl.int32), y, a, mids_ptr + TOFF,
                            (1 << b) - 1, CROSS == 2)
    elif b > 0:
        if F64:
            psi = _atan2_f64(y, a)
        else:
            psi = _atan2(y, a)
        if LEVEL1:
            psi = tl.where(psi < 0.0, psi + 6.283185307179586, psi)
            psi = tl.where(psi >= 6.283185307179586, 0.0, psi)
        if VEC_SEARCH:
            # One [BN, n, K] comparison: few ops, which is what the interpreter pays for.
            kk = tl.arange(0, 1 << b)
            mids = tl.load(mids_ptr + kk, mask=kk < (1 << b) - 1, other=float("inf"))
            code = tl.sum((mids[None, None, :] < psi[:, :, None]).to(tl.int32), axis=2)
        else:
            # Count the boundaries below psi (searchsorted, left side).
            code = tl.zeros((BN, n), dtype=tl.int32)
            for k in tl.static_range((1 << b) - 1):
                code += (tl.load(mids_ptr + k) < psi).to(tl.int32)
        if LEVEL1:
            wrap = tl.load(mids_ptr + KT - 1)
            wrap_lo = tl.load(mids_ptr + KT)
            code = tl.where(psi >= wrap, 0, code)
            code = tl.where(psi < wrap_lo, (1 << b) - 1, code)
    if b > 0:
        G: tl.constexpr = 1 << logg
        WB: tl.constexpr = (b << logg) >> 3
        NW: tl.constexpr = n // G if n >= 8 else 1
        if n >= 8 and STORE_MODE == 2:
            # (the whole-record store) the level's words or-ed into the row's record bytes
            # [BN, RBP]; the kernel stores each record at once
            word = _pack_words(code, BN, NW, G, b, WB)
            rec = rec | _record_bytes(word, BN, NW, WB, pos, RBP)
        elif n >= 8 and CROSS and WB == 1 and STORE16 and pos % 2 == 0 and NW % 2 == 0:
            # (the fast encode) byte words built in int32 and stored two at a time as
            # aligned 16-bit words: half the stores, no int64 shifts
            c3 = tl.reshape(code, (BN, NW // 2, 2 * G))
            sh = b * tl.arange(0, 2 * G)
            word = tl.sum(c3 << sh[None, None, :], axis=2)
            ww = tl.arange(0, NW // 2)
            # STORE_MODE 1: each row's 16-bit pointer first, then + ww: Triton then sees a row's
            # words as contiguous and lays the store out along them, so a warp's store covers
            # runs of a record. Offsets added in bytes before the cast hide that, and the store
            # goes down the rows, one 2-byte write per row per instruction (sm_90 TTGIR:
            # threadsPerWarp [32, 1]); the H100 profile counted ~21 L2 write sectors per
            # 62-byte row of codes and radii.
            if STORE_MODE:
                p16 = (codes_ptr + rec_off + pos).to(tl.pointer_type(tl.uint16))[:, None] \
                    + ww[None, :]
            else:
                p16 = (codes_ptr + rec_off[:, None] + pos + 2 * ww[None, :]).to(
                    tl.pointer_type(tl.uint16))
            tl.store(p16, word.to(tl.uint16), mask=valid[:, None])
        elif n >= 8:
            word = _pack_words(code, BN, NW, G, b, WB)
            ww = tl.arange(0, NW)
            if (STORE_MODE == 3 and STORE16 and pos % 2 == 0 and NW % 2 == 0 and WB % 2 == 1
                    and WB > 1):
                # (record16) odd-sized words (polar-4's 5- and 3-byte ones) in pairs: a pair's
                # 2 WB bytes are WB aligned 16-bit units, unit k = bits [16 k, 16 k + 16) of
                # w0 | w1 << 8 WB, stored along the record instead of byte by byte
                UP: tl.constexpr = 4 if WB < 4 else 8  # (WB 3, or 5 and 7)
                w0, w1 = tl.split(tl.reshape(word, (BN, NW // 2, 2)))
                k = tl.arange(0, UP)
                top: tl.constexpr = 63 if WB > 4 else 31  # (the words' width, less one)
                s0 = tl.minimum(16 * k, top)
                s1 = 16 * k - 8 * WB
                up = tl.minimum(tl.maximum(s1, 0), top)
                down = tl.minimum(tl.maximum(-s1, 0), top)
                w0e, w1e = w0[:, :, None], w1[:, :, None]
                unit = ((w0e >> s0[None, None, :].to(w0e.dtype))
                        | ((w1e >> up[None, None, :].to(w1e.dtype))
                           << down[None, None, :].to(w1e.dtype))) & 65535
                mm = tl.arange(0, NW // 2)
                p16 = (codes_ptr + rec_off + pos).to(tl.pointer_type(tl.uint16))[:, None, None] \
                    + (mm * WB)[None, :, None] + k[None, None, :]
                tl.store(p16, unit.to(tl.uint16),
                         mask=valid[:, None, None] & (k < WB)[None, None, :])
            elif STORE_MODE:
                # the words' bytes as one [BN, NW, WBP] store (WBP: WB rounded up to a power
                # of two, level_words' field; the extra bytes masked), contiguous along the
                # bytes of a word, so the store runs along a record instead of down the rows
                WBP: tl.constexpr = 1 << ((LV >> 6) & 3)
                kb = tl.arange(0, WBP)
                wb = word[:, :, None]
                byt = ((wb >> (8 * kb[None, None, :]).to(wb.dtype)) & 255).to(tl.uint8)
                ptr = (codes_ptr + rec_off + pos)[:, None, None] + ww[None, :, None] * WB \
                    + kb[None, None, :]
                tl.store(ptr, byt, mask=valid[:, None, None] & (kb < WB)[None, None, :])
            else:
                base = codes_ptr + rec_off[:, None] + pos + ww[None, :] * WB
                for k in tl.static_range(WB):
                    tl.store(base + k, ((word >> (8 * k)) & 255).to(tl.uint8),
                             mask=valid[:, None])
        else:
            sh = (pos + b * tl.arange(0, n)).to(tl.int64)
            tail = tail | tl.sum(code.to(tl.int64) << sh[None, :], axis=1)
    return rr, tail, rec


@triton.jit
def _pack_words(code, BN: tl.constexpr, NW: tl.constexpr, G: tl.constexpr, b: tl.constexpr,
                WB: tl.constexpr):
    """[BN, NW] words of G b-bit codes each, the first code in the low bits: int32 up to 4
    bytes (disjoint bit fields, so the sum is exact), int64 above."""
    c3 = tl.reshape(code, (BN, NW, G))
    sh = b * tl.arange(0, G)
    if WB > 4:
        c3 = c3.to(tl.int64)
        sh = sh.to(tl.int64)
    return tl.sum(c3 << sh[None, None, :], axis=2)


@triton.jit
def _record_bytes(word, BN: tl.constexpr, NW: tl.constexpr, WB: tl.constexpr,
                  POS: tl.constexpr, RBP: tl.constexpr):
    """[BN, RBP] int32: byte j of each row's record where it falls in this level's NW words of
    WB bytes at byte POS (little-endian, as the strided stores write them), 0 elsewhere. A
    gather along the row picks each byte's word, so any word size packs into one record."""
    j = tl.arange(0, RBP)
    rel = j - POS
    inside = (rel >= 0) & (rel < NW * WB)
    rel = tl.where(inside, rel, 0)
    if NW == 1:
        # (no gather: Triton 3.6's thread-locality pass asserts on a gather from one column)
        got = tl.broadcast_to(tl.reshape(word, (BN,))[:, None], (BN, RBP))
    else:
        got = tl.gather(word, tl.broadcast_to((rel // WB)[None, :], (BN, RBP)), axis=1)
    byt = (got >> (8 * (rel % WB))[None, :].to(got.dtype)) & 255
    return tl.where(inside[None, :], byt.to(tl.int32), 0)


# The attention and dequant kernels take ``decode_tile`` from this module when they are
# imported. The default is the tree decode without in-tree reshapes (kernels/tree_decode.py):
# on the H200 it ran the batch-8, 32K, d-128 decode 1.8x faster than the reshape decode (0.85
# vs 1.56 ms, same run). With it, for bfloat16 queries, the attention kernel decodes level 1
# with packed bf16x2 table words and multiplies (``PACK``): 0.58 vs 0.71 ms at that shape, same
# run (results/bench/bench_attention.md). POLARTENSOR_DECODE=joined keeps the float32
# decode for every dtype; POLARTENSOR_DECODE=reshape selects the reshape decode above, the
# simpler one to read and the reference the joined decode is tested against bit for bit.
_DECODE = os.environ.get("POLARTENSOR_DECODE", "packed")
PACKED_DECODE = _DECODE == "packed"
if _DECODE in ("joined", "packed"):
    from .tree_decode import decode_tile_joined as decode_tile  # noqa: E402, F401
elif _DECODE == "reshape":
    decode_tile = decode_tile_reshape
else:
    raise ValueError(f"POLARTENSOR_DECODE={_DECODE!r}: use 'packed' (default), 'joined' or "
                     "'reshape'")
