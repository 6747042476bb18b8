"""Encode without in-tree reshapes: the same launch contract and results as
``encode.polar_encode_fwd_kernel``, built so that Triton needs (almost) no register-layout
conversions on sm_90.

``polar_encode_fwd_kernel`` pairs every level with ``tl.split(tl.reshape(r, (BN, n, 2)))`` and
packs codes through ``tl.reshape(code, (BN, NW, G))`` + ``tl.sum``: each reshape moves data
between threads, i.e. a shared-memory round trip with barriers. Here (the inverse of
``tree_decode``'s join chain):

* y [BN, D] is reshaped ONCE to [BN, NSB, 2, ..., 2]: superblocks of whole blocks, every
  coordinate index bit a dim of size 2 (minor-most = bit 0); every level then takes
  ``tl.split`` of the minor-most dim, so all levels stay in one layout. With the fused
  rotation the rotation's output columns are permuted (rows of S gathered in another order)
  so that one superblock is exactly what the MMA accumulator keeps in one thread's registers:
  no data moves at all (levels above a superblock, full-depth presets, pair superblocks
  through a small [BN, NSB] reshape each);
* a level's codes become words by or-ing split halves (``lo | hi << w``) inside the thread,
  stored bytewise per superblock chunk (superblocks are sized so that every wide level's chunk
  is whole bytes); levels of <= 64 bits per record become one int64 per row through a sum over
  the superblocks (a reduction, not a conversion), whose bytes the row's threads share;
* stores are elementwise inline-asm ``st.global`` on the GPU: a ``tl.store`` of a tensor in
  the tree's layout makes the coalesce pass convert it to a blocked layout first;
* float32 path: the levels >= 2 (angles in [0, pi/2] of two radii >= 0) need no atan2:
  beta < psi  <=>  a sin(beta) < y cos(beta) (cos(beta) > 0), counted per cell boundary.
  Level 1 keeps the polynomial atan2. The float64 (``F64``, exact) path is the reference's
  arithmetic unchanged (``_atan2_f64``, boundary counts), bit-identical to the reshape kernel.

Offline sm_90 compile (scripts/kernel_ir_stats.py --kernel encode, bf16 input, fused rotation),
d 128: paper 7 -> 0 layout conversions, 28 -> 7 PTX barriers; polar-4 23 -> 7, 59 -> 10; no
register spills (the reshape kernel spills ~490 bytes). Bit-identical to the reshape kernel
under the interpreter (exact path), tests/kernels/test_tree_encode.py. Not yet run on a GPU:
the inline-asm stores are checked by ptxas only.

Opt-in: ``POLARTENSOR_ENCODE=split`` (read when ``kernels.encode`` is imported).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .common import _atan2, _atan2_f64

__all__ = ["polar_encode_split_fwd_kernel"]

# Stores of tensors in the tree's (#linear) layout: a tl.store there makes the coalesce pass
# convert value and pointer to a #blocked layout (one shared-memory round trip per store). An
# elementwise inline-asm st.global is layout-agnostic. (The interpreter has no inline asm.)
_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


# -- compile-time planning --------------------------------------------------------------------

@triton.constexpr_function
def _geometry(D, L, ROTATE, LV0, LV1, LV2, LV3, LV4, LV5, LV6, LV7):
    """(PERM, G0, NSB0): the tree starts as [BN, NSB0, 2 (x G0)], 2**G0 coordinates per
    thread group ("superblock").

    PERM (fused rotation): the rotation's output columns are permuted so that the
    superblock bits are exactly the columns an MMA accumulator keeps in one thread's registers
    (column bit 0 and bits >= 3; bits 1 and 2 are lane bits): G0 = log2(D) - 2, NSB0 = 4 and
    the tree needs no conversion at all. Levels above the superblock (full-depth presets)
    pair superblocks through a small [BN, NSB] reshape each. Otherwise the fewest whole blocks
    per superblock that make every wide level's chunk whole bytes (G0 >= L)."""
    lvs = (LV0, LV1, LV2, LV3, LV4, LV5, LV6, LV7)
    m = D.bit_length() - 1
    nb = D >> L
    # (level, bits, codes per block) of the "wide" levels: > 64 code bits per record
    wide = [(lvl, lvs[lvl] & 15, 1 << (L - 1 - lvl)) for lvl in range(L)
            if (lvs[lvl] & 15) and (nb << (L - 1 - lvl)) * (lvs[lvl] & 15) > 64]
    if ROTATE and m >= 4:
        g0 = m - 2
        # codes per superblock at a wide level: 2**(g0 - 1 - lvl) (wide levels are all below
        # the superblock top: 4 superblocks hold <= 4 codes of a level above it)
        if all(lvl < g0 and ((1 << (g0 - 1 - lvl)) * b) % 8 == 0 for lvl, b, _ in wide):
            return (True, g0, 4)
    e = 0
    for _, b, p in wide:
        while ((p << e) * b) % 8 != 0:
            e += 1
    e = min(e, nb.bit_length() - 1)
    return (False, L + e, nb >> e)


@triton.constexpr_function
def _level_geom(G0, NSB0, lvl):
    """(NSB, K, RESHAPE) before level ``lvl`` (0-based): r [BN, NSB, 2 (x K + 1)];
    RESHAPE: r [BN, 2 * NSB] must first be paired as [BN, NSB, 2] (levels above G0)."""
    if lvl < G0:
        return (NSB0, G0 - 1 - lvl, False)
    return (NSB0 >> (lvl - G0 + 1), 0, True)


@triton.constexpr_function
def _geo_item(g, i):
    return g[i]


@triton.constexpr_function
def _tree_shape(BN, NSB, K):
    return [BN, NSB] + [2] * K


@triton.constexpr_function
def _word_plan(b, Q):
    """Codes per stored word (a power of two dividing Q, whole bytes, <= 64 bits), preferring
    int32 words: returns CW."""
    cw = 1
    while cw * 2 <= Q and cw * 2 * b <= 32:
        cw *= 2
    if (cw * b) % 8 == 0:
        return cw
    cw = 1
    while cw * 2 <= Q and cw * 2 * b <= 64:
        cw *= 2
    return cw


@triton.constexpr_function
def _ilog2(x):
    return x.bit_length() - 1


# -- device helpers ---------------------------------------------------------------------------

@triton.jit
def _st_u8(p, v, m):
    """*p = v (low byte) where m."""
    if _ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred q; setp.ne.b32 q, $3, 0; @q st.global.b8 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r,r", [p, v.to(tl.int32), m.to(tl.int32)], dtype=tl.int32, is_pure=False,
            pack=1)
    else:
        tl.store(p, v.to(tl.uint8), mask=m)


@triton.jit
def _st_radius(p, v, m):
    """*p = v (in p's element type) where m."""
    if _ASM and p.dtype.element_ty.primitive_bitwidth == 16:
        tl.inline_asm_elementwise(
            "{ .reg .pred q; setp.ne.b32 q, $3, 0; @q st.global.b16 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,h,r", [p, v.to(p.dtype.element_ty).to(tl.int16, bitcast=True),
                         m.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    elif _ASM and p.dtype.element_ty == tl.float32:
        tl.inline_asm_elementwise(
            "{ .reg .pred q; setp.ne.b32 q, $3, 0; @q st.global.b32 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r,r", [p, v.to(tl.float32).to(tl.int32, bitcast=True), m.to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(p, v.to(p.dtype.element_ty), mask=m)


@triton.jit
def _pack(c, b: tl.constexpr, K: tl.constexpr):
    """Or the 2**K codes along the K minor-most dims (bit 0 minor) into one word each, code
    index 0 in the low bits: [..., 2 (x K)] -> [...]. All in-thread splits."""
    if K == 0:
        return c
    else:
        lo, hi = tl.split(c)
        return _pack(lo | (hi << b), 2 * b, K - 1)


@triton.jit
def _store_words(w, codes_ptr, off, valid2, WB: tl.constexpr, STRIDE: tl.constexpr,
                 K: tl.constexpr):
    """Store words w [BN, NSB, 2 (x K)] (word index bit 0 minor-most) of WB bytes each at byte
    offsets off + index * STRIDE (off [BN, NSB])."""
    if K == 0:
        for k in tl.static_range(WB):
            _st_u8(codes_ptr + off + k, (w >> (8 * k)) & 255, valid2)
    else:
        lo, hi = tl.split(w)
        _store_words(lo, codes_ptr, off, valid2, WB, 2 * STRIDE, K - 1)
        _store_words(hi, codes_ptr, off + STRIDE, valid2, WB, 2 * STRIDE, K - 1)


@triton.jit
def _store_row_bytes(row, codes_ptr, off, off_sb, valid2, NBYTES: tl.constexpr,
                     NSB: tl.constexpr):
    """Bytes 0..NBYTES-1 of the per-row words row [BN, 1] at off [BN, 1] + byte: the row's
    NSB superblock threads store every NSB-th byte each."""
    for j in tl.static_range(0, NBYTES, NSB):
        idx = j + off_sb
        _st_u8(codes_ptr + off + idx, (row >> (8 * idx).to(tl.int64)) & 255,
               valid2 & (idx < NBYTES))


@triton.jit
def _store_radii(r, radii_ptr, off, valid2, STRIDE: tl.constexpr, K: tl.constexpr):
    if K == 0:
        _st_radius(radii_ptr + off, r, valid2)
    else:
        lo, hi = tl.split(r)
        _store_radii(lo, radii_ptr, off, valid2, 2 * STRIDE, K - 1)
        _store_radii(hi, radii_ptr, off + STRIDE, valid2, 2 * STRIDE, K - 1)


@triton.jit
def _codes(a, y, mids_ptr, b: tl.constexpr, LEVEL1: tl.constexpr, KT: tl.constexpr,
           F64: tl.constexpr, VEC_SEARCH: tl.constexpr, RANK: tl.constexpr):
    """Cell index of the angle of every (a, y) pair: the number of cell boundaries below it
    (searchsorted, left side) with the level-1 wrap-around fix-up."""
    if F64 or LEVEL1:
        if F64:
            psi = _atan2_f64(y, a)
        else:
            psi = _atan2(y, a)
        if LEVEL1:
            psi = tl.where(psi < 0.0, psi + 6.283185307179586, psi)
            psi = tl.where(psi >= 6.283185307179586, 0.0, psi)
        if VEC_SEARCH:
            # One [..., K] comparison: few ops, which is what the interpreter pays for.
            kk = tl.arange(0, 1 << b)
            mids = tl.load(mids_ptr + kk, mask=kk < (1 << b) - 1, other=float("inf"))
            code = tl.sum((mids < tl.expand_dims(psi, RANK)).to(tl.int32), axis=RANK)
        else:
            code = tl.zeros(psi.shape, dtype=tl.int32)
            for k in tl.static_range((1 << b) - 1):
                code += (tl.load(mids_ptr + k) < psi).to(tl.int32)
        if LEVEL1:
            wrap = tl.load(mids_ptr + KT - 1)
            wrap_lo = tl.load(mids_ptr + KT)
            code = tl.where(psi >= wrap, 0, code)
            code = tl.where(psi < wrap_lo, (1 << b) - 1, code)
    else:
        # a, y >= 0 and every boundary beta in [0, pi/2]: beta < atan2(y, a) exactly when
        # a sin(beta) < y cos(beta). The scalars' cos/sin in float64 keep ties to rounding.
        code = tl.zeros(a.shape, dtype=tl.int32)
        for k in tl.static_range((1 << b) - 1):
            beta = tl.load(mids_ptr + k).to(tl.float64)
            sb = tl.sin(beta).to(tl.float32)
            cb = tl.cos(beta).to(tl.float32)
            code += (a * sb < y * cb).to(tl.int32)
    return code


@triton.jit
def _split_level(r, tail, codes_ptr, rec2, off_sb, valid2, mids_ptr, LV: tl.constexpr,
                 LEVEL1: tl.constexpr, KT: tl.constexpr, F64: tl.constexpr, VEC: tl.constexpr,
                 NSB: tl.constexpr, K: tl.constexpr):
    """One bottom-up level. r [BN, NSB, 2 (x K + 1)]: the level's pairs in the minor-most dim
    -> new radii [BN, NSB, 2 (x K)]; codes stored (or or-ed into the tail word)."""
    b: tl.constexpr = LV & 15
    pos: tl.constexpr = LV >> 8
    a, y = tl.split(r)
    rr = tl.sqrt(a * a + y * y)
    if b > 0:
        code = _codes(a, y, mids_ptr, b, LEVEL1, KT, F64, VEC, K + 2)
        Q: tl.constexpr = 1 << K  # codes per superblock
        N: tl.constexpr = NSB * Q  # codes per record
        if N * b <= 64:
            # Narrow level: one int64 per row; the superblocks' words are disjoint bit
            # ranges, so their sum is their or.
            w = _pack(code.to(tl.int64), b, K)
            w = w << (off_sb.to(tl.int64) * (Q * b))
            # [BN, 1] in the parent layout: every superblock's thread holds its row's word
            # (a store of the [BN] slice would be converted to a blocked layout first).
            row = tl.expand_dims(tl.sum(w, axis=1), 1)
            if N >= 8:
                _store_row_bytes(row, codes_ptr, rec2 + pos, off_sb, valid2, (N * b) // 8, NSB)
            else:
                tail = tail | (row << pos)
        else:
            CW: tl.constexpr = _word_plan(b, Q)
            KW: tl.constexpr = _ilog2(CW)
            WB: tl.constexpr = (CW * b) // 8
            if CW * b <= 32:
                w = _pack(code, b, KW)
            else:
                w = _pack(code.to(tl.int64), b, KW)
            _store_words(w, codes_ptr, rec2 + pos + off_sb * ((Q * b) // 8), valid2, WB, WB,
                         K - KW)
    return rr, tail


@triton.jit
def _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, LVL: tl.constexpr,
               LV: tl.constexpr, BN: tl.constexpr, G0: tl.constexpr, NSB0: tl.constexpr,
               KT: tl.constexpr, F64: tl.constexpr, VEC: tl.constexpr):
    GEO: tl.constexpr = _level_geom(G0, NSB0, LVL)
    NSB: tl.constexpr = _geo_item(GEO, 0)
    K: tl.constexpr = _geo_item(GEO, 1)
    if _geo_item(GEO, 2):
        # Above the superblocks (few nodes per row): pair neighbouring superblocks.
        r = tl.reshape(r, (BN, NSB, 2))
    off_sb = tl.arange(0, NSB)[None, :]
    return _split_level(r, tail, codes_ptr, rec2, off_sb, valid2, mids_ptr + LVL * (KT + 1),
                        LV, LVL == 0, KT, F64, VEC, NSB, K)


@triton.jit(do_not_specialize=["sx_l", "sx_t", "sc_l", "sc_t", "sr_l", "sr_t", "n_rows", "T"])
def polar_encode_split_fwd_kernel(
    x_ptr, sx_l, sx_t,
    rot_ptr, mids_ptr,
    codes_ptr, sc_l, sc_t,
    radii_ptr, sr_l, sr_t,
    n_rows, T,
    BN: tl.constexpr, D: tl.constexpr, KCH: tl.constexpr, KT: tl.constexpr,
    L: tl.constexpr, NB: tl.constexpr, TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr,
    LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr, LV3: tl.constexpr,
    LV4: tl.constexpr, LV5: tl.constexpr, LV6: tl.constexpr, LV7: tl.constexpr,
    ROTATE: tl.constexpr, PREC: tl.constexpr, F64: tl.constexpr, VEC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BN + tl.arange(0, BN)
    valid = rows < n_rows
    lead = rows // T
    t = rows % T
    x_off = lead * sx_l + t * sx_t
    dd = tl.arange(0, D)
    GEO: tl.constexpr = _geometry(D, L, ROTATE, LV0, LV1, LV2, LV3, LV4, LV5, LV6, LV7)
    PERM: tl.constexpr = _geo_item(GEO, 0)
    G0: tl.constexpr = _geo_item(GEO, 1)
    NSB0: tl.constexpr = _geo_item(GEO, 2)
    if ROTATE:
        if PERM:
            # Output column c holds coordinate ((c >> 1) & 3) * 2**G0 + (c >> 3) * 2 + (c & 1):
            # the superblock index lives in the accumulator's lane bits (1, 2), the
            # coordinates of one superblock in one thread's registers.
            src = (((dd >> 1) & 3) << G0) | ((dd >> 3) << 1) | (dd & 1)
        else:
            src = dd
        # y = x @ S^T, chunked over the contraction dim (S^T[k, j] = S[j, k]).
        y = tl.zeros((BN, D), dtype=tl.float32)
        for k0 in tl.static_range(0, D, KCH):
            kk = k0 + tl.arange(0, KCH)
            xc = tl.load(x_ptr + x_off[:, None] + kk[None, :], mask=valid[:, None],
                         other=0.0).to(tl.float32)
            st = tl.load(rot_ptr + src[None, :] * D + kk[:, None])
            y += tl.dot(xc, st, input_precision=PREC)
    else:
        y = tl.load(x_ptr + x_off[:, None] + dd[None, :], mask=valid[:, None], other=0.0)
        y = y.to(tl.float64) if F64 else y.to(tl.float32)
    # The one reshape (no data movement): [BN, D] -> [BN, NSB0, 2 (x G0)], bit 0 minor-most.
    if PERM:
        r = tl.reshape(y, (BN, D >> 3, 4, 2))
        r = tl.permute(r, (0, 2, 1, 3))
        r = tl.reshape(r, _tree_shape(BN, NSB0, G0))
    else:
        r = tl.reshape(y, _tree_shape(BN, NSB0, G0))
    rec2 = (lead * sc_l + t * sc_t)[:, None]
    valid2 = valid[:, None]
    tail = tl.zeros((BN, 1), dtype=tl.int64)
    r, tail = _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, 0, LV0, BN, G0, NSB0, KT,
                         F64, VEC)
    if L >= 2:
        r, tail = _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, 1, LV1, BN, G0, NSB0,
                             KT, F64, VEC)
    if L >= 3:
        r, tail = _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, 2, LV2, BN, G0, NSB0,
                             KT, F64, VEC)
    if L >= 4:
        r, tail = _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, 3, LV3, BN, G0, NSB0,
                             KT, F64, VEC)
    if L >= 5:
        r, tail = _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, 4, LV4, BN, G0, NSB0,
                             KT, F64, VEC)
    if L >= 6:
        r, tail = _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, 5, LV5, BN, G0, NSB0,
                             KT, F64, VEC)
    if L >= 7:
        r, tail = _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, 6, LV6, BN, G0, NSB0,
                             KT, F64, VEC)
    if L >= 8:
        r, tail = _any_level(r, tail, codes_ptr, rec2, valid2, mids_ptr, 7, LV7, BN, G0, NSB0,
                             KT, F64, VEC)
    # r [BN, NSB, 2 (x EF)]: block radii, block index bit 0 minor-most.
    GF: tl.constexpr = _level_geom(G0, NSB0, L - 1)
    NSBF: tl.constexpr = _geo_item(GF, 0)
    EF: tl.constexpr = _geo_item(GF, 1)
    off_sb = tl.arange(0, NSBF)[None, :]
    _store_row_bytes(tail, codes_ptr, rec2 + TAIL_BYTE, off_sb, valid2, TAIL_NB, NSBF)
    # F64: radii go to a float64 scratch; torch casts them exactly as the reference does.
    rad = (lead * sr_l + t * sr_t)[:, None] + off_sb * (1 << EF)
    _store_radii(r, radii_ptr, rad, valid2, 1, EF)
