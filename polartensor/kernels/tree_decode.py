"""Tree decode without in-tree reshapes: the same contract as
``common.decode_tile_reshape``, built so that Triton needs no register-layout conversions
inside the attention loop.

``decode_tile_reshape`` splits every node with ``tl.reshape(tl.join(r cos, r sin))`` and reads each
level's codes as reshaped words; on sm_90 that compiles to 26 layout conversions (shared-memory
round trips with barriers) per K/V tile of the attention loop for the paper preset, and the
H200 benchmark measured the decode, not the bytes, as the bottleneck. Here:

* the radii [BN, NB] are loaded once as a 2-D tile and every level appends its split as a new
  minor dim with ``tl.join``: [BN, NB] -> [BN, NB, 2] -> ... -> one reshape to [BN, D] at the
  end (join appends the minor dim, which is exactly the interleaved coordinate order);
* a level's codes go through the same chain of joins: each block's codes of the level are
  read as 2**k words (<= 32 bits) of [BN, NB] int32 (a few masked byte loads, plus a run-time
  shift when a word is not byte-aligned), joined word-index MSB first, then every word is
  halved by joins until one code per element remains, so codes and radii share one layout;
* levels of <= 2 bits select among <= 4 scalar cos/sin values (``tl.where``); 0-bit levels
  multiply by the constant cos/sin of slot 0; wider levels gather from the table with an
  elementwise ``ld.global.nc`` (a ``tl.load`` there made the compiler convert layouts);
* rows with fewer than 8 radii (full-depth presets) decode their top levels directly in 2-D
  so that the tree's root level spreads over the threads.

Offline sm_90 compilation (TTGIR, Triton 3.9) of the attention kernel, paper preset, d 128,
group 4, bf16: 26 -> 2 layout conversions (none left in the loop), 126 -> 26 barriers in the
PTX; polar-4: 38 -> 2. Triton 3.6 (the H200 machine's) keeps 6, four in the loop: its
coalescer re-lays out the radius load and one level's byte load (see ``PACK`` below).
Bit-identical to ``decode_tile`` under the interpreter for every preset at head_dim 16..256
and odd configurations (tests/kernels/test_tree_decode.py).

The default tile decode of the attention and dequant kernels (``common.decode_tile``); on the
H200 the batch-8, 32K, d-128 paper-preset decode ran 1.8x faster with it than with the reshape
decode. ``POLARTENSOR_DECODE=reshape`` (read at import) selects the reshape decode instead.

``PACK`` (the attention kernel's default for bfloat16 queries, ``POLARTENSOR_DECODE=packed``):
bfloat16 out; level 1 reads one packed bf16x2 (cos, sin) word per angle (``trig_table``'s third
plane) and multiplies both with one ``mul.rn.bf16x2``; the other levels read (cos, sin) with
one 64-bit gather from the interleaved planes instead of selects or two gathers; radii load
through layout-agnostic asm. Offline (Triton 3.6 and 3.9 SASS) that is 18-28% fewer loop
instructions for the paper preset; on the H200 it ran 1.07-1.29x faster than the float32
decode in the same run (results/bench/bench_attention.md).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

# Table gathers of >= 3-bit levels run on tensors in the joined (#linear) layout; a tl.load
# there makes the coalesce pass convert the pointers to a #blocked layout and the values back.
# An elementwise inline-asm ld.global.nc is layout-agnostic, so no conversion is inserted.
# (The interpreter has no inline asm: plain tl.load there.)
_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
# The join tree starts from a 2-D [BN, NBB] tensor with NBB >= _NBB_MIN nodes per row: when a
# row has fewer radii (full-depth presets: NB = 1 or 2), the top levels are decoded directly
# in 2-D (each level-l0 node multiplies its ancestors' cos/sin) so that the tree root spreads
# over the threads instead of piling every coordinate of a row into one thread.
_NBB_MIN = tl.constexpr(8)
# Code words are read with 16-bit loads instead of byte loads where the record size is even
# (records, and so every 16-bit word inside one, are then 2-byte aligned). On the H200 the
# packed decode's L1/TEX pipe was 81% busy, much of it byte loads of codes at the record
# stride; the 16-bit loads took batch 8 / 32K / d 128 from 0.586 to 0.553 ms (paper) and 0.636
# to 0.536 ms (polar-3), results/bench/bench_code16.md. POLARTENSOR_CODE16=0 (read at
# import) keeps the byte loads.
_CODE16 = tl.constexpr(os.environ.get("POLARTENSOR_CODE16", "1") != "0")
# The packed decode's levels above level 1 multiply in packed bfloat16 too (the default;
# POLARTENSOR_DECODE_UPPER, read at import): one (cos, sin) bf16x2 word per code (one shuffle,
# or one 32-bit gather) and one mul.rn.bf16x2 per node, instead of two float32 shuffles (or a
# 64-bit gather) and two FMULs; node values stay bfloat16 down to level 1. Each level adds one
# bf16 rounding per coordinate (bound 2 L + 1 roundings instead of 3). On the H100 the
# batch-8, 32K, d-128 decode ran 1.13x (paper), 1.16x (polar-3) and 1.12x (polar-4) faster
# than with float32 upper levels, same run (results/bench/ab_kernels_2026-12-06_h100.md);
# d 64 1.005-1.03x. POLARTENSOR_DECODE_UPPER=float32 keeps the float32 upper levels.
_UPPER = os.environ.get("POLARTENSOR_DECODE_UPPER", "bf16x2")
if _UPPER not in ("float32", "bf16x2"):
    raise ValueError(f"POLARTENSOR_DECODE_UPPER={_UPPER!r}: use 'bf16x2' (the default) or "
                     "'float32'")
_UPPER_BF16 = tl.constexpr(_UPPER == "bf16x2")

__all__ = ["decode_tile_joined", "code16_aligned"]


def code16_aligned(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` when the 16-bit code loads can read them: records of an odd byte size (byte
    loads), or of an even size at even addresses and strides. Otherwise (a view at an odd
    byte offset, say) an aligned copy, with a warning: a misaligned 16-bit load would fault
    on the GPU."""
    from .common import records_aligned16

    if not _CODE16.value or codes.shape[-1] % 2 or records_aligned16(codes):
        return codes
    warnings.warn(
        f"code records of {codes.shape[-1]} bytes at strides {tuple(codes.stride())} and an "
        f"{'odd' if codes.data_ptr() % 2 else 'even'} address are not 2-byte aligned for the "
        f"16-bit code loads: copied for this call. Pass contiguous codes, or set "
        f"POLARTENSOR_CODE16=0 (byte loads, no copy)", stacklevel=3)
    return codes.clone(memory_format=torch.contiguous_format)


@triton.constexpr_function
def _word_codes(b, P, bitoff):
    """Codes per word CW (power of two dividing P), byte-aligned words where they can be."""
    cw = 1
    while cw * 2 <= P and cw * 2 * b <= 32:
        cw *= 2
    if bitoff % 8 == 0 and (cw * b) % 8 == 0:
        return cw
    cw = 1
    while cw * 2 <= P and cw * 2 * b <= 24:
        cw *= 2
    return cw


@triton.constexpr_function
def _in_two16(bit0, block_bits, wbits):
    """Whether a field of ``wbits`` bits at bit ``bit0 + j * block_bits`` lies inside the two
    16-bit words from its first one, for every block j (the offsets mod 16 repeat within 16
    blocks), and needs both (a field inside one word takes a single load)."""
    return all(0 < (bit0 + j * block_bits) % 16 + wbits - 16 <= 16 for j in range(16))


@triton.constexpr_function
def _aligned(b, cw, bitoff):
    return bitoff % 8 == 0 and (cw * b) % 8 == 0


@triton.constexpr_function
def _window32_inside(bit0, block_bits, wbits, nblocks, rbytes):
    """Whether a field of ``wbits`` (<= 17) bits at bit ``bit0 + j * block_bits`` fits the
    32-bit window of the two aligned 16-bit words from its first one, with both words inside
    a record of ``rbytes`` bytes, for every block j < nblocks."""
    return wbits <= 17 and all(((bit0 + j * block_bits) >> 4) * 2 + 4 <= rbytes
                               for j in range(nblocks))


@triton.constexpr_function
def _word_read_path(code16, b, cw, bitoff, p, nblocks, rbytes, w):
    """How _load_word reads word ``w`` (cw codes of b bits) of a level: 1 whole 16-bit words,
    2 one 16-bit word, 3 the window of two 16-bit words, 4 aligned bytes (masked tl.loads),
    5 unaligned bytes (masked tl.loads)."""
    wbits = cw * b
    w16 = code16 and rbytes % 2 == 0
    aligned = _aligned(b, cw, bitoff)
    bit0 = bitoff + w * cw * b
    if w16 and aligned and wbits % 16 == 0 and bitoff % 16 == 0 and (p * b) % 16 == 0:
        return 1
    if w16 and not aligned and bitoff % wbits == 0 and 16 % wbits == 0:
        return 2
    if w16 and (wbits > 16 or not aligned) and _in_two16(bit0, p * b, wbits):
        return 3
    if aligned:
        return 4
    if w16 and _window32_inside(bit0, p * b, wbits, nblocks, rbytes):
        return 3
    return 5


@triton.constexpr_function
def _word_path(b, cw, bitoff, p, nblocks, rbytes, w):
    return _word_read_path(_CODE16.value, b, cw, bitoff, p, nblocks, rbytes, w)


@triton.constexpr_function
def _level_bitoff(lv, nnodes, tail_byte):
    """Bit offset of a level's codes from its layout word: head levels (>= 8 angles) keep a
    byte offset, tail levels a bit offset inside the tail bytes."""
    pos = lv >> 8
    return pos * 8 if nnodes >= 8 else tail_byte * 8 + pos


@triton.constexpr_function
def _wants_layout_anchor(d, l0, nbb, tail_byte, rbytes, lv0, lv1, lv2, lv3, lv4, lv5, lv6,
                         lv7):
    """Whether the tree below the top levels takes _layout_anchor: at head_dim 128 with 16-bit
    code loads, when no level l <= l0 reads aligned bytes (path 4), the masked loads that
    otherwise lay the tree out across the lanes. Offline (Triton 3.6, sm_90, loop SASS per
    128-key step) it took polar-4 at d 128 from 2289 instructions (262 shared stores) to 2136
    (42) and polar-2 from 2482 to 1857. On an H100 (batch 8, 32K, Llama-3.1-8B heads, against
    e75578f in one run, results/bench/ab_kernels_2026-12-06b_h100.md): polar-3.5 1.31x,
    polar-4 1.10x as fast. Not at d 256: there it ran polar-4.5 and polar-5 1.09x as fast as
    without it but polar-3.5 0.93x and polar-4 0.98x (ab_kernels_2026-12-06c_h100.md); not
    at d 64, where offline it added ~180 instructions to every preset; and not where an
    aligned byte level exists, where it only added instructions (polar-3 at d 128: +72)."""
    if d != 128 or not _CODE16.value:
        return False
    words = (lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7)
    for lvl in range(1, l0 + 1):
        b = words[lvl - 1] & 15
        if b == 0:
            continue
        p = 1 << (l0 - lvl)
        bitoff = _level_bitoff(words[lvl - 1], nbb * p, tail_byte)
        cw = _word_codes(b, p, bitoff)
        if any(_word_read_path(True, b, cw, bitoff, p, nbb, rbytes, w) == 4
               for w in range(p // cw)):
            return False
    return True


@triton.constexpr_function
def _ilog2(x):
    return x.bit_length() - 1


@triton.constexpr_function
def _joint_ok(lv0, lv1):
    """Levels 1 and 2 have a joint table (common.joint12_bits)."""
    from .common import JOINT12_MAX_BITS

    return (lv0 & 15) > 0 and (lv1 & 15) + 2 * (lv0 & 15) <= JOINT12_MAX_BITS


@triton.constexpr_function
def _top_count(NB, L, nbb_min):
    t = 0
    while t < L and (NB << t) < nbb_min:
        t += 1
    return t


@triton.jit
def _ldg(p):
    if _ASM:
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [p],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(p)


@triton.jit
def _ldg_b32(base, i):
    """The 32-bit word base[i] (a float32 table read as its bits), layout-agnostic like _ldg2."""
    if _ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .u64 a; mad.wide.u32 a, $1, 4, $2; ld.global.nc.b32 $0, [a]; }", "=r,r,l",
            [i, tl.broadcast_to(base, i.shape)], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.load(base + i).to(tl.int32, bitcast=True)


@triton.jit
def _ldg2(base, i):
    """(cos, sin) = base[2 i], base[2 i + 1] (8-byte-aligned float32 pairs) with one 64-bit
    gather, layout-agnostic; the address is one wide multiply-add of the 32-bit index onto
    the table's base (instead of 64-bit pointer arithmetic per element)."""
    if _ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .u64 a; mad.wide.u32 a, $2, 8, $3; ld.global.nc.v2.f32 {$0, $1}, [a]; }",
            "=r,=r,r,l", [i, tl.broadcast_to(base, i.shape)],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return tl.load(base + 2 * i), tl.load(base + 2 * i + 1)


@triton.constexpr_function
def _lane_table_asm(n):
    """PTX: lane l reads 32-bit word l mod n of the table at $1 (n a power of two <= 32)."""
    return ("{ .reg .u32 l; .reg .u64 a; mov.u32 l, %laneid; and.b32 l, l, " + str(n - 1)
            + "; mad.wide.u32 a, l, 4, $1; ld.global.nc.b32 $0, [a]; }")


@triton.jit
def _lane_word(base, like, N: tl.constexpr):
    """Word (lane id mod N) of the 32-bit table at ``base``, in the shape of ``like``: one
    load per thread, not per element (the asm is pure and its operand the same for every
    element, so the compiler keeps one; loop-invariant, so it leaves the key loop)."""
    return tl.inline_asm_elementwise(_lane_table_asm(N), "=r,l",
                                     [tl.broadcast_to(base, like.shape)], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _shfl(t, i):
    """The value that lane i of the warp holds in t (shfl.sync.idx over the full warp)."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 31, 0xffffffff;",
                                     "=r,r,r", [t, i], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _shfl_b32(base, i, N: tl.constexpr):
    """The 32-bit word base[i mod N] (N <= 32, a power of two) like _ldg_b32, but from a
    table that the warp holds one word per lane: a register shuffle per look-up instead of a
    global gather (no L1 traffic, no 64-bit address). Only i's low bits count: a shuffle
    reads its index's low 5, and lane l holds word l mod N, so codes need no masking. The
    interpreter reads the table directly."""
    if _ASM:
        return _shfl(_lane_word(base, i, N), i)
    else:
        return _ldg_b32(base, i & (N - 1))


@triton.jit
def _shfl_cs(cos_ptr, sin_ptr, i, N: tl.constexpr):
    """(cos, sin) = cos_ptr[i], sin_ptr[i] (i's low bits, N <= 32 entries each) by two
    shuffles from two tables held one word per lane each. Two tables rather than one of
    interleaved pairs cost a register but need no index arithmetic (2 i, 2 i + 1): offline
    (Triton 3.6, sm_90) that and the unmasked codes took 6-10% off the loop."""
    if _ASM:
        return (_shfl(_lane_word(cos_ptr, i, N), i).to(tl.float32, bitcast=True),
                _shfl(_lane_word(sin_ptr, i, N), i).to(tl.float32, bitcast=True))
    else:
        return tl.load(cos_ptr + (i & (N - 1))), tl.load(sin_ptr + (i & (N - 1)))


@triton.jit
def _ld_nc(base, off):
    """base[off] as float32 (base: float16, bfloat16 or float32), layout-agnostic."""
    if _ASM:
        if base.dtype.element_ty == tl.float32:
            v = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [base + off],
                                          dtype=tl.float32, is_pure=True, pack=1)
        else:
            v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [base + off],
                                          dtype=base.dtype.element_ty, is_pure=True, pack=1)
    else:
        v = tl.load(base + off)
    return v.to(tl.float32)


@triton.constexpr_function
def _ld16_asm(imm):
    return f"ld.global.nc.u16 $0, [$1+{imm}];"


@triton.jit
def _ld16(codes_ptr, off, IMM: tl.constexpr = 0):
    """The little-endian 16-bit word at byte ``off + IMM`` (even) of the codes, as int32.
    Layout-agnostic on the GPU (an elementwise ld.global.nc.u16; IMM goes into the
    instruction's immediate offset, so words of one address share it). Unmasked: invalid rows
    arrive with record offset 0 (``decode_tile_joined`` masks the row offsets once) and their
    radii are 0, so what they read never shows."""
    p = (codes_ptr + off).to(tl.pointer_type(tl.uint16))
    if _ASM:
        # straight into a 32-bit register, zero-extended by the load itself (a 16-bit
        # register and a conversion cost a mask or byte permute per word)
        w = tl.inline_asm_elementwise(_ld16_asm(IMM), "=r,l", [p], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        w = tl.load(p + IMM // 2).to(tl.int32)
    return w


@triton.jit
def _mul_bf16x2(r, w):
    """(r * cos, r * sin) in bfloat16 from r (float32) and w, a packed bf16x2 (cos, sin) word:
    r rounded to bfloat16 once, then one packed multiply (mul.rn.bf16x2) for both products."""
    if _ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $2, $2; mul.rn.bf16x2 t, t, $3; "
            "mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r", [r, w], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        # the same arithmetic: bf16 x bf16 products are exact in float32, then one rounding
        rb = _bf16_rne(r).to(tl.float32)
        cs = (w << 16).to(tl.float32, bitcast=True)
        sn = ((w >> 16) << 16).to(tl.float32, bitcast=True)
        return _bf16_rne(rb * cs), _bf16_rne(rb * sn)


@triton.jit
def _mul_bf16x2_h(r, w):
    """_mul_bf16x2 for r already bfloat16: (r * cos, r * sin), one mul.rn.bf16x2 with r in
    both halves."""
    if _ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; mov.b32 t, {$2, $2}; mul.rn.bf16x2 t, t, $3; mov.b32 {$0, $1}, t; }",
            "=h,=h,h,r", [r, w], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        rb = r.to(tl.float32)
        cs = (w << 16).to(tl.float32, bitcast=True)
        sn = ((w >> 16) << 16).to(tl.float32, bitcast=True)
        return _bf16_rne(rb * cs), _bf16_rne(rb * sn)


@triton.jit
def _mul_pk(r, w):
    """(r * cos, r * sin) in bfloat16 from a packed bf16x2 (cos, sin) word, r float32 or
    bfloat16."""
    if r.dtype == tl.bfloat16:
        lo, hi = _mul_bf16x2_h(r, w)
    else:
        lo, hi = _mul_bf16x2(r, w)
    return lo, hi


@triton.jit
def _pk_children(r, c, pk_ptr, b: tl.constexpr, BY_SHFL: tl.constexpr):
    """Children (r cos, r sin) in bfloat16, joined as a new minor dim, through the packed
    bf16x2 (cos, sin) word of each b-bit code c: by warp shuffle (c unmasked) or gather."""
    if BY_SHFL:
        w = _shfl_b32(pk_ptr, c, 1 << b)
    else:
        w = _ldg_b32(pk_ptr, c & ((1 << b) - 1))
    lo, hi = _mul_pk(r, w)
    return tl.join(lo, hi)


@triton.jit
def _bf16_rne(x):
    """float32 -> bfloat16 rounded to nearest even, as the GPU's cvt.rn does (the interpreter's
    cast truncates; finite inputs)."""
    if _ASM:
        return x.to(tl.bfloat16)
    else:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _top_level(codes_ptr, rec_base, u, valid2, r, cos_ptr, SINOFF: tl.constexpr,
               K: tl.constexpr, NNODES: tl.constexpr, LV: tl.constexpr,
               TAIL_BYTE: tl.constexpr, R: tl.constexpr):
    """A level above the tree root, decoded in 2-D: r [BN, NBB] (one entry per node u of the
    root level l0) times cos/sin of its ancestor's angle at this level (K = l - l0)."""
    b: tl.constexpr = LV & 15
    s = (u >> (K - 1)) & 1
    if b == 0:
        v = tl.where(s != 0, tl.load(cos_ptr + SINOFF), tl.load(cos_ptr))
    else:
        BITOFF: tl.constexpr = _level_bitoff(LV, NNODES, TAIL_BYTE)
        bit0 = BITOFF + (u >> K) * b
        if _CODE16 and R % 2 == 0 and BITOFF % b == 0 and 16 % b == 0:
            # the field never crosses a 16-bit word: one aligned 16-bit load
            w = _ld16(codes_ptr, rec_base + (bit0 >> 4) * 2)
            c = (w >> (bit0 & 15)) & ((1 << b) - 1)
        else:
            byte = bit0 >> 3
            w = tl.load(codes_ptr + rec_base + byte, mask=valid2, other=0).to(tl.int32)
            if BITOFF % 8 != 0 or 8 % b != 0:
                w2 = tl.load(codes_ptr + rec_base + byte + 1, mask=valid2 & (byte + 1 < R),
                             other=0)
                w = w | (w2.to(tl.int32) << 8)
            c = (w >> (bit0 & 7)) & ((1 << b) - 1)
        v = tl.load(cos_ptr + c + s * SINOFF)
    return r * v


@triton.jit
def _load_word(codes_ptr, rec_base, blk, valid2, w: tl.constexpr, P: tl.constexpr,
               b: tl.constexpr, CW: tl.constexpr, BITOFF: tl.constexpr, R: tl.constexpr,
               MASK: tl.constexpr = True):
    """Word ``w`` (CW codes) of every block's level chunk: [BN, NB] int32, code 0 in the low
    bits. ``rec_base`` [BN, 1] record byte offsets, ``blk`` [1, NB] block index. ``MASK``
    False: from 16-bit loads, the bits above the word's CW codes are left as loaded (for
    consumers that read only each code's low bits; offline, dropping the mask after byte
    loads as well made polar-4's loop longer)."""
    WBITS: tl.constexpr = CW * b
    PATH: tl.constexpr = _word_path(b, CW, BITOFF, P, blk.shape[1], R, w)
    if PATH == 1:
        # whole 16-bit words at even byte offsets
        byte0 = rec_base + (BITOFF // 8) + blk * ((P * b) // 8) + (w * CW * b) // 8
        word = _ld16(codes_ptr, byte0)
        for k in tl.static_range(1, WBITS // 16):
            word = word | (_ld16(codes_ptr, byte0, 2 * k) << (16 * k))
        if WBITS < 32 and MASK:
            word = word & ((1 << WBITS) - 1)
    elif PATH == 2:
        # a field that never crosses a 16-bit word: one aligned 16-bit load
        bit0 = BITOFF + (blk * P + w * CW) * b
        word = _ld16(codes_ptr, rec_base + (bit0 >> 4) * 2) >> (bit0 & 15)
        if MASK:
            word = word & ((1 << WBITS) - 1)
    elif PATH == 3:
        # a field inside the two aligned 16-bit words from its first one (e.g. 5-bit or 3-bit
        # codes), both inside the record: two unmasked 16-bit loads and one shift instead of
        # 2-4 masked byte loads (which Triton would also make layout anchors of their own,
        # laid one key per thread)
        bit0 = BITOFF + (blk * P + w * CW) * b
        byte0 = rec_base + (bit0 >> 4) * 2
        word = (_ld16(codes_ptr, byte0) | (_ld16(codes_ptr, byte0, 2) << 16)) >> (bit0 & 15)
        if MASK:
            word = word & ((1 << WBITS) - 1)
    elif PATH == 4:
        NBY: tl.constexpr = WBITS // 8
        # byte address of the word: BITOFF/8 + (blk * P + w * CW) * b / 8
        byte0 = rec_base + (BITOFF // 8) + blk * ((P * b) // 8) + (w * CW * b) // 8
        word = tl.zeros(byte0.shape, dtype=tl.int32)
        for k in tl.static_range(NBY):
            bt = tl.load(codes_ptr + byte0 + k, mask=valid2, other=0)
            word = word | (bt.to(tl.int32) << (8 * k))
        if WBITS < 32:
            word = word & ((1 << WBITS) - 1)
    else:
        NBY: tl.constexpr = (WBITS + 14) // 8
        bit0 = BITOFF + (blk * P + w * CW) * b  # [1, NB] int
        byte_in = bit0 >> 3
        sh = bit0 & 7
        byte0 = rec_base + byte_in
        word = tl.zeros(byte0.shape, dtype=tl.int32)
        for k in tl.static_range(NBY):
            m = valid2 & ((byte_in + k) < R)
            bt = tl.load(codes_ptr + byte0 + k, mask=m, other=0)
            word = word | (bt.to(tl.int32) << (8 * k))
        word = (word >> sh) & ((1 << WBITS) - 1)
    return word


@triton.jit
def _word_tree(codes_ptr, rec_base, blk, valid2, base: tl.constexpr, stride: tl.constexpr,
               K: tl.constexpr, P: tl.constexpr, b: tl.constexpr, CW: tl.constexpr,
               BITOFF: tl.constexpr, R: tl.constexpr, MASK: tl.constexpr = True):
    """Words base + stride * i (i < 2**K) as [BN, NB, 2 (x K)], word-index MSB first."""
    if K == 0:
        return _load_word(codes_ptr, rec_base, blk, valid2, base, P, b, CW, BITOFF, R, MASK)
    else:
        lo = _word_tree(codes_ptr, rec_base, blk, valid2, base, 2 * stride, K - 1, P, b, CW,
                        BITOFF, R, MASK)
        hi = _word_tree(codes_ptr, rec_base, blk, valid2, base + stride, 2 * stride, K - 1, P,
                        b, CW, BITOFF, R, MASK)
        return tl.join(lo, hi)


@triton.jit
def _split_words(x, b: tl.constexpr, CW: tl.constexpr, MASK: tl.constexpr = True):
    """Split every word of CW codes into [..., 2 (x log2 CW)] codes (MSB of index first).
    ``MASK`` False: each code's bits above its b low ones are left as they are (for
    consumers that read only the low bits, such as the shuffles)."""
    if CW == 1:
        return x
    else:
        HALF: tl.constexpr = (CW // 2) * b
        lo = x & ((1 << HALF) - 1) if MASK else x
        y = tl.join(lo, x >> HALF)
        return _split_words(y, b, CW // 2, MASK)


@triton.jit
def _level_v2(codes_ptr, rec_base, blk, valid2, r, cos_ptr, sin_ptr, NB: tl.constexpr,
              P: tl.constexpr, LV: tl.constexpr, TAIL_BYTE: tl.constexpr, R: tl.constexpr,
              PK: tl.constexpr, pk_ptr, PAIRS: tl.constexpr, pair_ptr,
              SHFL: tl.constexpr = False):
    """One level: r [BN, NB, 2 (x m)] (P = 2**m nodes per block) -> [BN, NB, 2 (x m+1)].
    ``PK`` (level 1 only): bfloat16 out, wide levels through the packed bf16x2 table.
    ``PAIRS``: (cos, sin) with one 64-bit gather from ``pair_ptr`` ([K, 2] float32) instead
    of selects (narrow levels) or two gathers (wide levels); the same float32 values.
    ``SHFL`` (PACK 3 or 4): those tables, where they fit in 32 words, held one word per lane
    and read by warp shuffles instead of gathers; the same values."""
    b: tl.constexpr = LV & 15
    if b == 0:
        out = _split(r, tl.load(cos_ptr), tl.load(sin_ptr), PK)
    else:
        PAIR_PATH: tl.constexpr = PAIRS and not (PK and b >= 3)
        # a shuffle reads only its index's low 5 bits, and the lane tables repeat every
        # 2**b words, so the codes need no masking there
        BY_SHFL: tl.constexpr = SHFL and ((PAIR_PATH and b <= 4)
                                          or (not PAIR_PATH and PK and 3 <= b and b <= 5))
        c = _level_codes(codes_ptr, rec_base, blk, valid2, NB, P, LV, TAIL_BYTE, R,
                         not BY_SHFL)
        if PAIR_PATH and _UPPER_BF16:
            out = _pk_children(r, c, pk_ptr, b, BY_SHFL)
        elif PAIR_PATH:
            ci = c & ((1 << b) - 1)
            if BY_SHFL:
                cs, sn = _shfl_cs(cos_ptr, sin_ptr, c, 1 << b)
            else:
                cs, sn = _ldg2(pair_ptr, ci)
            out = _split(r, cs, sn, PK)
        elif b == 1:
            c0 = tl.load(cos_ptr)
            c1 = tl.load(cos_ptr + 1)
            s0 = tl.load(sin_ptr)
            s1 = tl.load(sin_ptr + 1)
            odd = (c & 1) != 0
            cs = tl.where(odd, c1, c0)
            sn = tl.where(odd, s1, s0)
            out = _split(r, cs, sn, PK)
        elif b == 2:
            c0 = tl.load(cos_ptr)
            c1 = tl.load(cos_ptr + 1)
            c2 = tl.load(cos_ptr + 2)
            c3 = tl.load(cos_ptr + 3)
            s0 = tl.load(sin_ptr)
            s1 = tl.load(sin_ptr + 1)
            s2 = tl.load(sin_ptr + 2)
            s3 = tl.load(sin_ptr + 3)
            odd = (c & 1) != 0
            hi = (c & 2) != 0
            cs = tl.where(hi, tl.where(odd, c3, c2), tl.where(odd, c1, c0))
            sn = tl.where(hi, tl.where(odd, s3, s2), tl.where(odd, s1, s0))
            out = _split(r, cs, sn, PK)
        else:
            if PK:
                out = _pk_children(r, c, pk_ptr, b, BY_SHFL)
            else:
                ci = c & ((1 << b) - 1)
                out = tl.join(r * _ldg(cos_ptr + ci), r * _ldg(sin_ptr + ci))
    return out


@triton.jit
def _level_codes(codes_ptr, rec_base, blk, valid2, NB: tl.constexpr, P: tl.constexpr,
                 LV: tl.constexpr, TAIL_BYTE: tl.constexpr, R: tl.constexpr,
                 MASK: tl.constexpr = True):
    """The codes of one level (b > 0 bits), shaped as that level's input r: [BN, NB, 2 (x m)]
    for P = 2**m nodes per block."""
    b: tl.constexpr = LV & 15
    # (a level is a tail level when it has < 8 angles, i.e. NB * P < 8)
    BITOFF: tl.constexpr = _level_bitoff(LV, NB * P, TAIL_BYTE)
    CW: tl.constexpr = _word_codes(b, P, BITOFF)
    K: tl.constexpr = _ilog2(P // CW)
    words = _word_tree(codes_ptr, rec_base, blk, valid2, 0, 1, K, P, b, CW, BITOFF, R, MASK)
    return _split_words(words, b, CW, MASK)


@triton.jit
def _joint12(codes_ptr, rec_base, blk, valid2, r, joint_ptr, NB: tl.constexpr,
             P: tl.constexpr, LV0: tl.constexpr, LV1: tl.constexpr, TAIL_BYTE: tl.constexpr,
             R: tl.constexpr):
    """Levels 2 and 1 in one step (PACK == 2): r [BN, NB, 2 (x m)] level-2 radii (P = 2**m
    nodes per block) -> bfloat16 [BN, NB, 2 (x m+2)], the same layout the two levels give.
    One 64-bit gather of the joint table (common.joint12_words) per level-2 node and two
    packed multiplies, instead of three gathers, two float32 and two packed multiplies."""
    b1: tl.constexpr = LV0 & 15
    b2: tl.constexpr = LV1 & 15
    c1 = _level_codes(codes_ptr, rec_base, blk, valid2, NB, 2 * P, LV0, TAIL_BYTE, R)
    c1a, c1b = tl.split(c1)
    # (split words keep the bits above a code: shifted 32-bit words sign-extend)
    m1: tl.constexpr = (1 << b1) - 1
    idx = ((c1b & m1) << b1) | (c1a & m1)
    if b2 > 0:
        c2 = _level_codes(codes_ptr, rec_base, blk, valid2, NB, P, LV1, TAIL_BYTE, R)
        idx = idx | ((c2 & ((1 << b2) - 1)) << (2 * b1))
    # (two bf16x2 words; their float32 reading is finite, the high halves being products of
    # cosines and sines, and the bitcast is free)
    f0, f1 = _ldg2(joint_ptr, idx)
    w0 = f0.to(tl.int32, bitcast=True)
    w1 = f1.to(tl.int32, bitcast=True)
    lo0, hi0 = _mul_pk(r, w0)
    lo1, hi1 = _mul_pk(r, w1)
    return tl.join(tl.join(lo0, lo1), tl.join(hi0, hi1))


@triton.jit
def _split(r, cs, sn, PK: tl.constexpr):
    """Children (r cos, r sin) of every node, joined as a new minor dim; bfloat16 with PK."""
    if PK:
        out = tl.join(_bf16_rne(r * cs), _bf16_rne(r * sn))
    else:
        out = tl.join(r * cs, r * sn)
    return out


@triton.jit
def _any_level(codes_ptr, rec_base, u, valid2, r, trig_ptr, KT: tl.constexpr,
               SO: tl.constexpr, LVL: tl.constexpr, L0: tl.constexpr, NBB: tl.constexpr,
               D: tl.constexpr, LV: tl.constexpr, TAIL_BYTE: tl.constexpr, R: tl.constexpr,
               PACK: tl.constexpr):
    # level LVL's rows of the table planes (trig_table: cos, sin, packed bf16x2, then the
    # interleaved [levels, K, 2] cos/sin pairs)
    cos_ptr = trig_ptr + (LVL - 1) * KT
    if LVL > L0:
        out = _top_level(codes_ptr, rec_base, u, valid2, r, cos_ptr, SO, LVL - L0, D >> LVL,
                         LV, TAIL_BYTE, R)
        if PACK and LVL == 1:
            out = _bf16_rne(out)
    else:
        out = _level_v2(codes_ptr, rec_base, u, valid2, r, cos_ptr, cos_ptr + SO, NBB,
                        1 << (L0 - LVL), LV, TAIL_BYTE, R, PACK and LVL == 1,
                        cos_ptr + 2 * SO, PACK, trig_ptr + 3 * SO + 2 * (LVL - 1) * KT,
                        PACK >= 3)
    return out


@triton.jit
def _layout_anchor(codes_ptr, rec_base, u, valid2, r, R: tl.constexpr):
    """r unchanged, tied to a masked load of the record's first NBB bytes. Triton 3.6 gives a
    value the layout of the last expensive tl.load above it (its layout propagation starts
    from the last anchor in program order and keeps the first layout that reaches a value).
    This load is contiguous across the blocks, so the tree's nodes, and the decoded tile,
    spread over the lanes ([4, 8] threads per warp) instead of one key per thread, a tile
    that goes to shared memory 16 bits at a time. (Without it, a configuration whose tree
    codes are all read by layout-agnostic 16-bit loads takes the layout of its top levels'
    table gathers, one key per thread.)"""
    if _ASM and R >= u.shape[1]:
        a = tl.load(codes_ptr + rec_base + u, mask=valid2, other=0).to(tl.int32)
        r = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [r, a], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return r


@triton.constexpr_function
def _level_word(lvl, lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7):
    """The layout word LV of level ``lvl`` (1-based) among a kernel's LV0..LV7 constexprs."""
    return (lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7)[lvl - 1]


@triton.constexpr_function
def _joint_at(pack, L, l0, lv0, lv1):
    """Levels 2 and 1 go through the joint table: PACK 2 (or 4, with shuffles for the other
    tables), both decoded below the tree root, and a table for their bits."""
    return (pack == 2 or pack == 4) and L >= 2 and l0 >= 2 and _joint_ok(lv0, lv1)


@triton.constexpr_function
def _last_single_level(joint):
    return 3 if joint else 1


@triton.jit
def _levels_down(codes_ptr, rec_base, u, valid2, r, trig_ptr, KT: tl.constexpr,
                 SO: tl.constexpr, LVL: tl.constexpr, LAST: tl.constexpr, L0: tl.constexpr,
                 NBB: tl.constexpr, D: tl.constexpr, TAIL_BYTE: tl.constexpr, R: tl.constexpr,
                 PACK: tl.constexpr, LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr,
                 LV3: tl.constexpr, LV4: tl.constexpr, LV5: tl.constexpr, LV6: tl.constexpr,
                 LV7: tl.constexpr):
    """Levels LVL down to LAST, one _any_level each (unrolled at compile time: every level
    has its own constexpr layout word)."""
    if LVL == L0 and _wants_layout_anchor(D, L0, NBB, TAIL_BYTE, R, LV0, LV1, LV2, LV3, LV4,
                                          LV5, LV6, LV7):
        r = _layout_anchor(codes_ptr, rec_base, u, valid2, r, R)
    r = _any_level(codes_ptr, rec_base, u, valid2, r, trig_ptr, KT, SO, LVL, L0, NBB, D,
                   _level_word(LVL, LV0, LV1, LV2, LV3, LV4, LV5, LV6, LV7), TAIL_BYTE, R,
                   PACK)
    if LVL > LAST:
        r = _levels_down(codes_ptr, rec_base, u, valid2, r, trig_ptr, KT, SO, LVL - 1, LAST,
                         L0, NBB, D, TAIL_BYTE, R, PACK, LV0, LV1, LV2, LV3, LV4, LV5, LV6,
                         LV7)
    return r


@triton.jit
def decode_tile_joined(codes_ptr, radii_ptr, trig_ptr, rec_off, rad_off, valid,
                   BN: tl.constexpr, D: tl.constexpr, KT: tl.constexpr, L: tl.constexpr,
                   NB: tl.constexpr, TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr,
                   LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr, LV3: tl.constexpr,
                   LV4: tl.constexpr, LV5: tl.constexpr, LV6: tl.constexpr, LV7: tl.constexpr,
                   PACK: tl.constexpr):
    """Same contract as ``decode_tile``: decoded rotated vectors [BN, D] fp32, invalid rows 0.
    ``PACK``: bfloat16 out instead, level 1 decoded with packed bf16x2 table words and
    multiplies (one gather and one multiply per angle instead of two each). ``PACK == 2``:
    also levels 2 and 1 in one step through the joint table that ``trig_table(centroids,
    bits)`` appends (planes 5 on) where the configuration has one; elsewhere as ``PACK``.
    ``PACK == 3`` (4 with the joint table): the per-level tables of at most 32 words read by
    warp shuffles (``_shfl_b32``, ``_shfl_cs``) instead of gathers; the same values."""
    R: tl.constexpr = TAIL_BYTE + TAIL_NB
    T: tl.constexpr = _top_count(NB, L, _NBB_MIN)
    NBB: tl.constexpr = NB << T
    L0: tl.constexpr = L - T
    u = tl.arange(0, NBB)[None, :]
    valid2 = valid[:, None]
    if _CODE16 and R % 2 == 0:
        # The 16-bit code loads are unmasked: invalid rows read record 0 (their radii are 0,
        # so it never shows), masked once here rather than per load. Offline (Triton 3.6,
        # sm_90) that removed 8-10% of the paper preset's loop instructions at d 128
        # (results/bench/kernel_ir_stats.md). Byte loads keep their masks.
        rec_base = tl.where(valid2, rec_off[:, None], 0)
    else:
        rec_base = rec_off[:, None]
    if PACK:
        # layout-agnostic radius loads: Triton 3.6's coalescer gives a masked [BN, NB] load a
        # layout of its own and converts it back through shared memory inside the loop
        # (invalid rows read element 0, then become 0)
        off = tl.where(valid2, rad_off[:, None] + (u >> T), 0)
        r = tl.where(valid2, _ld_nc(radii_ptr, off), 0.0)
    else:
        r = tl.load(radii_ptr + rad_off[:, None] + (u >> T), mask=valid2,
                    other=0.0).to(tl.float32)
    SO: tl.constexpr = L * KT
    JOINT: tl.constexpr = _joint_at(PACK, L, L0, LV0, LV1)
    # top-down, level L to level 1, or to level 3 when levels 2 and 1 take the joint table
    LAST: tl.constexpr = _last_single_level(JOINT)
    if L >= LAST:
        r = _levels_down(codes_ptr, rec_base, u, valid2, r, trig_ptr, KT, SO, L, LAST, L0, NBB,
                         D, TAIL_BYTE, R, PACK, LV0, LV1, LV2, LV3, LV4, LV5, LV6, LV7)
    if JOINT:
        # levels 2 and 1 through the joint table, planes 5.. of the tables
        r = _joint12(codes_ptr, rec_base, u, valid2, r, trig_ptr + 5 * SO, NBB,
                     1 << (L0 - 2), LV0, LV1, TAIL_BYTE, R)
    return tl.reshape(r, (BN, D))
