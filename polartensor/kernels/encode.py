"""Fused encode / append: rotation, polar transform, angle quantization and bit packing in one
kernel, writing new tokens straight into the cache storage at an offset (no copy of old tokens).

Reference: ``polartensor.polar_quant_tensor.quantize`` (see ``kernels/naive.py``).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .common import (
    _encode_level,
    _sm_count,
    env_choice,
    env_flag,
    interpreting,
    level_words,
    records_aligned16,
)
from .tree_decode import _level_word

__all__ = ["polar_encode_fwd_kernel", "encode_into_triton", "encode_supported"]

_INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def _encode_levels(r, tail, codes_ptr, rec_off, valid, mids_ptr, BN: tl.constexpr,
                   D: tl.constexpr, KT: tl.constexpr, F64: tl.constexpr, VEC: tl.constexpr,
                   CROSS: tl.constexpr, CROSS1: tl.constexpr, TOFF: tl.constexpr,
                   STORE16: tl.constexpr, LVL: tl.constexpr, L: tl.constexpr,
                   LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr, LV3: tl.constexpr,
                   LV4: tl.constexpr, LV5: tl.constexpr, LV6: tl.constexpr,
                   LV7: tl.constexpr, STORE_MODE: tl.constexpr, rec, RBP: tl.constexpr):
    """Levels LVL..L bottom-up (common._encode_level each; unrolled at compile time, as every
    level has its own constexpr bit layout): radii [BN, D >> L], the tail word and (whole-
    record stores, STORE_MODE 2) the record bytes."""
    LV: tl.constexpr = _level_word(LVL, LV0, LV1, LV2, LV3, LV4, LV5, LV6, LV7)
    if LVL == 1:
        # level 1: the closed-form quantizer where the codebook allows (CROSS1)
        r, tail, rec = _encode_level(r, tail, codes_ptr, rec_off, valid, mids_ptr, BN, D >> 1,
                                     LV, True, KT, F64, VEC, CROSS1, TOFF, STORE16 and CROSS,
                                     False, CROSS and L > 1, STORE_MODE, rec, RBP)
    else:
        r, tail, rec = _encode_level(r, tail, codes_ptr, rec_off, valid,
                                     mids_ptr + (LVL - 1) * (KT + 1), BN, D >> LVL, LV, False,
                                     KT, F64, VEC, CROSS, TOFF, STORE16, CROSS,
                                     CROSS and LVL < L, STORE_MODE, rec, RBP)
    if LVL < L:
        r, tail, rec = _encode_levels(r, tail, codes_ptr, rec_off, valid, mids_ptr, BN, D, KT,
                                      F64, VEC, CROSS, CROSS1, TOFF, STORE16, LVL + 1, L, LV0,
                                      LV1, LV2, LV3, LV4, LV5, LV6, LV7, STORE_MODE, rec, RBP)
    return r, tail, rec


@triton.jit
def _store_records(rec, tail, codes_ptr, rec_off, valid, BN: tl.constexpr, RBP: tl.constexpr,
                   TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr, STORE16: tl.constexpr):
    """Whole-record stores: the tail word's bytes join the levels' record bytes [BN, RBP],
    then each row's record goes out in one store along it (16-bit words where records are
    2-byte aligned), not one store per word down the tile's rows."""
    RB: tl.constexpr = TAIL_BYTE + TAIL_NB
    j = tl.arange(0, RBP)
    if TAIL_NB > 0:
        rel = j - TAIL_BYTE
        inside = (rel >= 0) & (rel < TAIL_NB)
        sh = (8 * tl.where(inside, rel, 0)).to(tl.int64)
        tb = ((tail[:, None] >> sh[None, :]) & 255).to(tl.int32)
        rec = rec | tl.where(inside[None, :], tb, 0)
    if STORE16:
        lo, hi = tl.split(tl.reshape(rec, (BN, RBP // 2, 2)))
        hw = tl.arange(0, RBP // 2)
        p16 = (codes_ptr + rec_off).to(tl.pointer_type(tl.uint16))[:, None] + hw[None, :]
        tl.store(p16, (lo | (hi << 8)).to(tl.uint16),
                 mask=valid[:, None] & (hw < RB // 2)[None, :])
    else:
        tl.store((codes_ptr + rec_off)[:, None] + j[None, :], rec.to(tl.uint8),
                 mask=valid[:, None] & (j < RB)[None, :])


@triton.jit
def _dot_bf16x2(x, s_hi, s_lo, acc, LO: tl.constexpr = True):
    """acc + x @ (S_hi + S_lo) for bfloat16 x and S's bfloat16 parts: two bf16 MMAs into the
    accumulator, no operand splitting, ~2^-16 relative error; without LO one MMA against S
    rounded to bfloat16 (~2^-9). The interpreter's bfloat16 dot is wrong (Triton 3.9), so
    there the same products run in float32, where bfloat16 x bfloat16 is exact."""
    if _INTERP:
        xf = x.to(tl.float32)
        acc += tl.dot(xf, s_hi.to(tl.float32), input_precision="ieee")
        if LO:
            acc += tl.dot(xf, s_lo.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(x, s_hi, acc)
        if LO:
            acc = tl.dot(x, s_lo, acc)
    return acc


def mma_order(d: int) -> torch.Tensor:
    """[d] int64: the coordinate of y = S x that MMA output column c computes with ``PERM``
    (S's rows are passed in this order): column bits (c0, c3, c4, ..., c1, c2) become
    coordinate bits 0, 1, 2, ... An MMA accumulator (wgmma and mma.sync alike) keeps column
    bit 0 and bits 3 and up in a thread's registers and spreads bits 1-2 over lanes; this
    order puts the low coordinate bits, the ones the polar transform pairs level by level, in
    registers. (Permuted on the host rather than by the kernel's S addresses: offline,
    Triton 3.6, sm_90, paper d 128 1216 -> 1200 SASS instructions, d 64 880 -> 864.)"""
    c = torch.arange(d)
    return (c & 1) | ((c >> 3) << 1) | (((c >> 1) & 3) << (d.bit_length() - 3))


@triton.jit
def _coord_order(y, BN: tl.constexpr, D: tl.constexpr):
    """y [BN, D] whose column c holds coordinate mma_order(D)[c] -> [BN, D] in coordinate
    order: a relabelling of the index bits (reshape, permute, reshape), which moves no data."""
    if D == 16:
        y = tl.permute(tl.reshape(y, (BN, 2, 2, 2, 2)), (0, 2, 3, 1, 4))
    elif D == 32:
        y = tl.permute(tl.reshape(y, (BN, 2, 2, 2, 2, 2)), (0, 3, 4, 1, 2, 5))
    elif D == 64:
        y = tl.permute(tl.reshape(y, (BN, 2, 2, 2, 2, 2, 2)), (0, 4, 5, 1, 2, 3, 6))
    elif D == 128:
        y = tl.permute(tl.reshape(y, (BN, 2, 2, 2, 2, 2, 2, 2)), (0, 5, 6, 1, 2, 3, 4, 7))
    else:
        tl.static_assert(D == 256, "the encode's column order covers head_dim 16..256")
        y = tl.permute(tl.reshape(y, (BN, 2, 2, 2, 2, 2, 2, 2, 2)),
                       (0, 6, 7, 1, 2, 3, 4, 5, 8))
    return tl.reshape(y, (BN, D))


@triton.jit
def _prefetch_rows_l2(x_ptr, sx_l, sx_t, row0, n_rows, T, BN: tl.constexpr, D: tl.constexpr,
                      IDX32: tl.constexpr):
    """Ask L2 for the 128-byte lines of bfloat16 rows row0 .. row0 + BN - 1 of x (one
    ``prefetch.global.L2`` per line, no registers held, nothing waited on), so that the tile's
    own load later finds them there. Rows past n_rows repeat the last row's lines."""
    LPR: tl.constexpr = D // 64 if D >= 64 else 1  # (128-byte lines per bfloat16 row)
    j = tl.arange(0, BN * LPR)
    if IDX32:
        rows = tl.minimum(row0 + j // LPR, n_rows - 1)
        lead = (rows.to(tl.uint32) // T.to(tl.uint32)).to(tl.int32)
    else:
        rows = tl.minimum(row0.to(tl.int64) + j // LPR, n_rows - 1)
        lead = rows // T
    off = lead * sx_l + (rows - lead * T) * sx_t + (j % LPR) * 64
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                              [x_ptr + off], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["sx_l", "sx_t", "sc_l", "sc_t", "sr_l", "sr_t", "n_rows", "T"])
def polar_encode_fwd_kernel(
    x_ptr, sx_l, sx_t,
    rot_ptr, mids_ptr,
    codes_ptr, sc_l, sc_t,
    radii_ptr, sr_l, sr_t,
    n_rows, T, x_desc,
    BN: tl.constexpr, D: tl.constexpr, KCH: tl.constexpr, KT: tl.constexpr,
    L: tl.constexpr, NB: tl.constexpr, TAIL_BYTE: tl.constexpr, TAIL_NB: tl.constexpr,
    LV0: tl.constexpr, LV1: tl.constexpr, LV2: tl.constexpr, LV3: tl.constexpr,
    LV4: tl.constexpr, LV5: tl.constexpr, LV6: tl.constexpr, LV7: tl.constexpr,
    ROTATE: tl.constexpr, PREC: tl.constexpr, F64: tl.constexpr, VEC: tl.constexpr,
    CROSS: tl.constexpr = False, CROSS1: tl.constexpr = False, TOFF: tl.constexpr = 0,
    ROT_BF16X2: tl.constexpr = False, STORE16: tl.constexpr = False,
    X_ALIGN: tl.constexpr = 1, PERSIST: tl.constexpr = False, PERM: tl.constexpr = False,
    R_ALIGN: tl.constexpr = 1, IDX32: tl.constexpr = False, WRAP1: tl.constexpr = False,
    ROT_LO: tl.constexpr = True, STORE_MODE: tl.constexpr = 0, RBP: tl.constexpr = 1,
    R_SCALE: tl.constexpr = 1.0, L2PF: tl.constexpr = 0, X_TMA: tl.constexpr = False,
):
    """Encode rows into the cache storage, a tile of BN rows per program; ``PERSIST``
    (bfloat16 x and the bf16x2 rotation, d <= 128): a grid of a few programs per SM, each
    loading S's parts once and encoding tile after tile, instead of every tile reading all of
    S from L2."""
    pid = tl.program_id(0)
    dd = tl.arange(0, D)
    # (PERM: S's rows come in mma_order, the coordinate each MMA output column computes)
    if PERSIST:
        s_hi = tl.load(rot_ptr + dd[None, :] * D + dd[:, None])
        if ROT_LO:
            s_lo = tl.load(rot_ptr + D * D + dd[None, :] * D + dd[:, None])
        else:
            s_lo = s_hi  # (unused)
        step = tl.num_programs(0)
        for k in tl.static_range(1, L2PF + 1):
            if pid + k * step < tl.cdiv(n_rows, BN):
                _prefetch_rows_l2(x_ptr, sx_l, sx_t, (pid + k * step) * BN, n_rows, T, BN, D,
                                  IDX32)
    else:
        step = tl.cdiv(n_rows, BN)
    for tile in range(pid, tl.cdiv(n_rows, BN), step):
        # the row's [lead, T] index: int32 where the host found every row and offset below
        # 2^31 (IDX32), int64 otherwise (huge caches)
        if IDX32:
            rows = tile * BN + tl.arange(0, BN)
        else:
            rows = tl.full((), BN, tl.int64) * tile + tl.arange(0, BN)
        valid = rows < n_rows
        if WRAP1:
            # (with IDX32) T >= BN, or one lead: a tile's rows cross at most one lead
            # boundary, so one scalar division per tile and a compare per row replace the
            # per-row division (offline, Triton 3.6, sm_90: paper d 128 1232 -> 1216 SASS
            # instructions, d 64 944 -> 880)
            r0 = tile * BN
            lead0 = (r0.to(tl.uint32) // T.to(tl.uint32)).to(tl.int32)
            tt = (r0 - lead0 * T) + tl.arange(0, BN)
            w = (tt >= T).to(tl.int32)
            lead = lead0 + w
            t = tt - w * T
        elif IDX32:
            # (unsigned: no sign fix-ups)
            lead = (rows.to(tl.uint32) // T.to(tl.uint32)).to(tl.int32)
            t = rows - lead * T
        else:
            lead = rows // T
            t = rows % T
        x_off = lead * sx_l + t * sx_t
        if X_ALIGN > 1:
            # The row strides are not specialised on (one compiled kernel for every cache shape),
            # so Triton cannot see that rows start at multiples of 8 elements and loads x one
            # element per instruction. The host checks the strides and says so here: offline
            # (Triton 3.6, sm_90, paper, d 128) 2880 -> 1856 SASS instructions, 16-byte loads.
            x_off = tl.multiple_of(x_off, X_ALIGN)
        if PERSIST:
            # S^T's bfloat16 parts, loaded once per program (persistent launch)
            if X_TMA:
                # x's rows as a [n_rows, D] tensor descriptor (rows past n_rows read as zero):
                # a TMA copy into shared memory that the MMA reads, which the software
                # pipeliner issues num_stages - 1 tiles ahead (see _x_tma)
                xb = x_desc.load([tile * BN, 0])
            else:
                xb = tl.load(x_ptr + x_off[:, None] + dd[None, :], mask=valid[:, None],
                             other=0.0)
            y = _dot_bf16x2(xb, s_hi, s_lo, tl.zeros((BN, D), dtype=tl.float32), ROT_LO)
        elif ROTATE:
            # y = x @ S^T, chunked over the contraction dim (S^T[k, j] = S[j, k]).
            y = tl.zeros((BN, D), dtype=tl.float32)
            for k0 in tl.static_range(0, D, KCH):
                kk = k0 + tl.arange(0, KCH)
                xc = tl.load(x_ptr + x_off[:, None] + kk[None, :], mask=valid[:, None],
                             other=0.0)
                if ROT_BF16X2:
                    # bfloat16 x against S's bfloat16 parts ([2, D, D] at rot_ptr)
                    st_hi = tl.load(rot_ptr + dd[None, :] * D + kk[:, None])
                    if ROT_LO:
                        st_lo = tl.load(rot_ptr + D * D + dd[None, :] * D + kk[:, None])
                    else:
                        st_lo = st_hi  # (unused)
                    y = _dot_bf16x2(xc, st_hi, st_lo, y, ROT_LO)
                else:
                    st = tl.load(rot_ptr + dd[None, :] * D + kk[:, None])
                    y += tl.dot(xc.to(tl.float32), st, input_precision=PREC)
        else:
            y = tl.load(x_ptr + x_off[:, None] + dd[None, :], mask=valid[:, None], other=0.0)
            y = y.to(tl.float64) if F64 else y.to(tl.float32)
        if PERM and (PERSIST or ROTATE):
            y = _coord_order(y, BN, D)
        rec_off = lead * sc_l + t * sc_t
        r = y
        rec = tl.zeros((BN, RBP) if STORE_MODE == 2 else (1,), dtype=tl.int32)
        r, tail, rec = _encode_levels(r, tl.zeros((BN,), dtype=tl.int64), codes_ptr, rec_off,
                                      valid, mids_ptr, BN, D, KT, F64, VEC, CROSS, CROSS1,
                                      TOFF, STORE16, 1, L, LV0, LV1, LV2, LV3, LV4, LV5, LV6,
                                      LV7, STORE_MODE, rec, RBP)
        if STORE_MODE == 2:
            _store_records(rec, tail, codes_ptr, rec_off, valid, BN, RBP, TAIL_BYTE, TAIL_NB,
                           STORE16)
        elif STORE_MODE and TAIL_NB > 1:
            # (one [BN, bytes] store along the record, as the levels' words: common)
            TNP: tl.constexpr = 2 if TAIL_NB == 2 else 4 if TAIL_NB <= 4 else 8
            kb = tl.arange(0, TNP)
            byt = ((tail[:, None] >> (8 * kb[None, :]).to(tl.int64)) & 255).to(tl.uint8)
            tl.store((codes_ptr + rec_off + TAIL_BYTE)[:, None] + kb[None, :], byt,
                     mask=valid[:, None] & (kb < TAIL_NB)[None, :])
        else:
            for k in tl.static_range(TAIL_NB):
                tl.store(codes_ptr + rec_off + TAIL_BYTE + k,
                         ((tail >> (8 * k)) & 255).to(tl.uint8), mask=valid)
        nb = tl.arange(0, NB)
        rad_off = lead * sr_l + t * sr_t
        if R_ALIGN > 1:
            # as X_ALIGN: radii rows start at multiples of R_ALIGN elements (vector stores);
            # offline (Triton 3.6, sm_90, paper) d 128 1312 -> 1272 SASS instructions, d 256
            # 2408 -> 2152
            rad_off = tl.multiple_of(rad_off, R_ALIGN)
        if R_SCALE != 1.0:
            # (the rotation ran against S / R_SCALE, a sign matrix: see sign_matrix_scale)
            r = r * R_SCALE
        # F64: radii go to a float64 scratch; torch casts them exactly as the reference does.
        tl.store(radii_ptr + rad_off[:, None] + nb[None, :],
                 r.to(radii_ptr.dtype.element_ty), mask=valid[:, None])
        if PERSIST and L2PF > 0:
            # (L2PF tiles between this prefetch and the load: see _l2_prefetch; here, where
            # the tile's values are dead, it holds no registers across the MMA)
            ahead = tile + (L2PF + 1) * step
            if ahead < tl.cdiv(n_rows, BN):
                _prefetch_rows_l2(x_ptr, sx_l, sx_t, ahead * BN, n_rows, T, BN, D, IDX32)


# The float32 encode finds codes without atan2 by default (see common._encode_level, CROSS);
# POLARTENSOR_ENCODE_QUANT=atan2 (read per call) or quantizer='atan2' keeps atan2.
_QUANTIZERS = ("atan2", "cross")
# For bfloat16 inputs with 16-bit radii the fused rotation runs by default as two bfloat16
# MMAs against S split into bfloat16 high and low parts; POLARTENSOR_ENCODE_ROT=tf32x3 (read
# per call) or rotation_mma='tf32x3' keeps three tf32 MMAs plus splitting both operands in
# the kernel. On the H200, the two defaults together took the paper encode of batch 8 x 32K
# tokens x 8 heads (d 128) from 3.91 to 1.58 ms (6.2% to 15.2% of copy bandwidth);
# results/bench/bench_code16.md.
# POLARTENSOR_ENCODE_ROT=bf16 (opt-in) keeps one of the two bfloat16 MMAs: S rounded to
# bfloat16, ~2^-9 relative error in the rotated coordinates, the same order as x's own
# bfloat16 rounding. It halves the rotation's MMAs and S's reads at d 128, where they are a
# large share of the encode's time. Codes then differ from the reference's at cell boundaries
# (tests bound how often and that the reconstruction error stays the reference's).
_ROT_MMAS = ("tf32x3", "bf16x2", "bf16")


def rotation_bf16x2(rot: torch.Tensor, mma_rows: bool = False,
                    scale: float = 1.0) -> torch.Tensor:
    """[2, D, D] bfloat16: S / ``scale`` rounded to bfloat16, then the rounded remainder
    (cached with the rotation tensor, as the other kernel tables are); ``mma_rows``: S's rows
    in :func:`mma_order`."""
    from .dispatch import _cached

    def split():
        s32 = rot.detach().to(torch.float32)
        if scale != 1.0:
            s32 = s32 / scale
        if mma_rows:
            s32 = s32[mma_order(s32.shape[0]).to(s32.device)]
        hi = s32.to(torch.bfloat16)
        return torch.stack([hi, (s32 - hi.to(torch.float32)).to(torch.bfloat16)]).contiguous()

    return _cached("rot_bf16x2", rot, (bool(mma_rows), scale), split)


_SIGN_SCALES: dict[tuple, float] = {}


def sign_matrix_scale(config, d: int) -> float:
    """c where every entry of the configuration's S is +c or -c (the Hadamard rotations: c =
    1 / sqrt(d)), else 0.0. S / c is then exact in bfloat16, so one bfloat16 MMA rotates as
    exactly as the two of bf16x2; the angles do not depend on the scale, and the kernel
    multiplies the block radii by c. Read from S's CPU copy (the device copy is the same
    float32 values), so it never waits on the device, also while a CUDA graph captures."""
    if not config.rotation.endswith("hadamard"):
        return 0.0
    key = (config.rotation, config.seed, d)
    c = _SIGN_SCALES.get(key)
    if c is None:
        from ..rotation import rotation_matrix

        a = rotation_matrix(d, config.rotation, config.seed, "cpu", torch.float32).abs()
        top = a.max()
        c = _SIGN_SCALES[key] = float(top) if bool((a == top).all()) else 0.0
    return c


def _rows_in_mma_order(rot: torch.Tensor) -> torch.Tensor:
    """S with its rows in :func:`mma_order` (cached with the rotation tensor)."""
    from .dispatch import _cached

    return _cached("rot_mma_rows", rot, None,
                   lambda: rot.detach()[mma_order(rot.shape[0]).to(rot.device)].contiguous())


def cross_table(mids: torch.Tensor, config) -> tuple[torch.Tensor, bool]:
    """[2 L, K + 1] float32: the boundaries, then the tangents the atan2-free encode compares
    against (tan^2 with tan's sign of each boundary above level 1, where the encode carries
    squared radii; tan(k pi / 2^(b-1)) within a quadrant at level 1), and whether level 1's
    boundaries are the uniform k 2 pi / 2^b that its closed form needs. Cached with the
    boundary tensor."""
    from .dispatch import _cached

    def build():
        m64 = mids.detach().to("cpu", torch.float64)
        tans = torch.zeros_like(m64)
        uniform = False
        for lvl, b in enumerate(config.bits):
            nb = (1 << b) - 1
            if b == 0:
                continue
            if lvl == 0:
                want = torch.arange(1, nb + 1, dtype=torch.float64) * (2 * math.pi / (1 << b))
                uniform = bool(torch.allclose(m64[0, :nb], want, rtol=0, atol=1e-5))
                if uniform and b >= 3:
                    k = torch.arange(1, 1 << (b - 2), dtype=torch.float64)
                    tans[0, : k.numel()] = torch.tan(k * math.pi / (1 << (b - 1)))
            else:
                # squared (the encode carries squared radii above level 1), sign kept
                t = torch.tan(m64[lvl, :nb])
                tans[lvl, :nb] = t * t.abs()
        return torch.cat([m64, tans]).to(mids.device, torch.float32).contiguous(), uniform

    return _cached("cross", mids, tuple(config.bits), build)


# POLARTENSOR_ENCODE_PERSIST (read per call): ``auto`` (the default) runs the persistent
# launch where it was timed faster, ``1`` wherever it applies (bfloat16 x with the bf16x2
# rotation at head_dim <= 128), ``0`` one program per tile everywhere. Persistent programs
# load S's two bfloat16 parts into shared memory once, instead of every tile reading all of
# S (64 KB at d 128) from L2. On an H100 (bfloat16 x, same run;
# results/bench/encode_launch_sweep_persist_2026-12-06_h100.md), at d 128 on the 128-row,
# 8-warp tiles under a 128-register cap (two programs per SM; uncapped, 153 registers, one
# fits and it ran 0.74x), it ran 1.08x (paper, 53.3% of copy bandwidth) and 1.04x (polar-3)
# faster than one program per tile; polar-4 0.86x (64-row tiles) to 0.98x (128-row capped
# ones); at d 64 0.70-0.94x. On the H200 it had measured slower with the strided stores
# (0.91 vs 0.72 ms, results/bench/bench_encode.md), when those stores bounded the encode.
# ``auto``: persistent at 64 < d <= 128 with the two-MMA rotation, the record(16) stores and
# levels of <= 4 bits, at the default launch.
_PERSIST_MODES = ("auto", "1", "0")


def _persistent(persistent: bool | None, auto: bool) -> bool:
    """``persistent``, else POLARTENSOR_ENCODE_PERSIST (``auto``: ``auto``)."""
    if persistent is not None:
        return bool(persistent)
    mode = env_choice("POLARTENSOR_ENCODE_PERSIST", _PERSIST_MODES)
    return auto if mode == "auto" else mode == "1"


# POLARTENSOR_ENCODE_STAGES for the persistent launch: 1 (the default) loads each tile's x
# when the tile starts; 2 or 3 let Triton's software pipeliner copy the next tiles' x into
# shared memory (cp.async) while this one is encoded. Offline (Triton 3.6, sm_90, paper d 128)
# shared memory 80 KB -> 100 KB (2) and 117 KB (3), the loop 1018 -> 1059 SASS instructions.
_PERSIST_STAGES = ("1", "2", "3")


def _persist_stages() -> int:
    return int(env_choice("POLARTENSOR_ENCODE_STAGES", _PERSIST_STAGES))


# POLARTENSOR_ENCODE_PER_SM: persistent programs per SM (default 2). With the one-MMA bf16
# rotation the persistent paper encode at d 128 needs 48 KB of shared memory and 126
# registers (offline, Triton 3.6), so four fit on an SM.
_PER_SM = ("2", "1", "3", "4")


def _persist_per_sm() -> int:
    return int(env_choice("POLARTENSOR_ENCODE_PER_SM", _PER_SM))


# POLARTENSOR_ENCODE_L2PF (read per call): the persistent launch asks L2 for the x rows of
# a tile this many of its tiles before it loads them (0, the default: none; 1 or 2), one prefetch
# instruction per 128-byte line and no registers held, so that the tile's load waits on L2
# rather than DRAM. The Nsight Compute profile of the encode at d 128 (H100,
# results/bench/ncu_encode_2026-12-06b_h100.md) had it bound by latency, a quarter of each
# warp's stalls on global loads, with x hitting L2 16% of the time. GPU only: the
# interpreter runs no inline assembly, and there is no latency to hide. H100 at 7bd0692
# (paper, results/bench/encode_launch_sweep_2026-12-07a_h100.md): 1 tile ahead 1.02x the
# default, the same bytes; beside the TMA loads below, 1.11x against their 1.12x alone.
_L2PF = ("0", "1", "2")


def _l2_prefetch() -> int:
    return int(env_choice("POLARTENSOR_ENCODE_L2PF", _L2PF))


# POLARTENSOR_ENCODE_TMA (read per call): 1 loads the persistent launch's x tiles by TMA
# through a [rows, D] tensor descriptor instead of through registers (0, the default). The
# MMA then reads the tile where the copy lands, with no register round trip, shared store or
# barrier of its own. With one stage (POLARTENSOR_ENCODE_STAGES) each tile copies and waits;
# with n the pipeliner issues the copy n - 1 tiles ahead, at the end of the tile before (so
# 2 overlap it only with other programs' work, 3 with a whole tile), each stage another
# tile of shared memory (offline, Triton 3.6, sm_90: see scripts/sweep_encode_launch.py).
# With POLARTENSOR_ENCODE_L2PF the copy waits on L2 rather than DRAM. Where it applies:
# sm_90 and up or the interpreter, x's rows evenly strided (lead stride = T x row stride),
# 16-byte aligned and fewer than 2^31; elsewhere the pointer loads. H100 at 7bd0692 (paper,
# one stage, results/bench/encode_launch_sweep_2026-12-07a_h100.md): 1.12x the default, the
# same bytes; its GPU hypothesis tests have not run, so it stays opt-in.
_TMA = ("0", "1")


def _x_tma(x3: torch.Tensor, interp: bool) -> bool:
    if env_choice("POLARTENSOR_ENCODE_TMA", _TMA) != "1":
        return False
    if not interp and x3.is_cuda and torch.cuda.get_device_capability(x3.device) < (9, 0):
        return False
    return rows_tma_ready(x3)


def rows_tma_ready(x3: torch.Tensor) -> bool:
    """x3 [lead, T, D]'s rows as one [lead T, D] TMA tensor: evenly strided (lead stride = T x
    row stride), unit last stride, 16-byte aligned rows and base, and fewer rows than 2^31
    less headroom (TMA coordinates and the kernels' row indices are 32-bit; tiles past the
    end stay in range)."""
    return (x3.shape[0] * x3.shape[1] < 2**31 - 2**22
            and x3.stride(0) == x3.shape[1] * x3.stride(1) and x3.stride(-1) == 1
            and (x3.stride(1) * x3.element_size()) % 16 == 0 and x3.data_ptr() % 16 == 0)


# POLARTENSOR_ENCODE_STORE (read per call): how the code words are written. ``strided`` lets
# Triton lay each store out down the tile's rows: one 1- or 2-byte write per row per store
# instruction, 32 records apart in a warp. The H100 profile of the paper encode at d 128
# (results/bench/ncu_encode_2026-12-06_h100.md) had the L2 at 69-81% of its throughput with
# DRAM at 27-33%, and ~21 L2 write sectors per row where the row's 46 code and 16 radius bytes
# fill two. ``record`` writes along each record (a row's words are contiguous to Triton, so a
# warp's store covers runs of one record); ``whole`` packs each row's levels and tail word
# into its record bytes in registers (a gather along the row per level) and stores each
# record at once. Same bytes (tested). Offline (scripts/store_sectors.py, Triton 3.6, sm_90)
# paper d 128 writes 23.5 sectors per row strided, 5.4 record, 2.9 whole.
# Timed on an H100 (results/bench/encode_launch_sweep_store_2026-12-06_h100.md, bfloat16 x,
# same run): at d 128 record ran 1.42x (paper), 1.36x (polar-3) and 2.45x (polar-4) faster
# than strided; at d 64 0.98x, 1.06x, 2.21x. whole was slower than record in every row (its
# gathers cost more than the sectors it saves: paper d 128 1208 -> 1696 SASS instructions
# offline), and stays opt-in. ``record16``: record, and odd-sized multi-byte words (polar-4's 5-
# and 3-byte ones, which record stores byte by byte: 17 sectors per row at d 128 in the model)
# in pairs as aligned 16-bit units, where records are 2-byte aligned. Timed on an H100
# (results/bench/encode_launch_sweep_store_2026-12-06b_h100.md, same run, each at the default
# launch): polar-4 record16 ran 1.12x faster than record at d 128 and 1.12x at d 256 (2.31x
# strided there), 1.00x at d 64; paper and polar-3 (no odd-sized words) 0.995-1.001x; at d 256
# record ran 1.36x (paper) and 1.30x (polar-3) faster than strided. ``auto`` (the default):
# record16 at every head_dim.
_STORES = ("auto", "strided", "record", "whole", "record16")


def _store_mode() -> int:
    """POLARTENSOR_ENCODE_STORE as the kernel's STORE_MODE: 0 strided, 1 record, 2 whole (each
    row's levels and tail word packed into its record bytes in registers, a gather along the
    row per level, then one store per record; tiles of >= 16 rows per warp, record stores
    below that), 3 record16. ``auto``: record16 at every head_dim."""
    choice = env_choice("POLARTENSOR_ENCODE_STORE", _STORES)
    if choice == "auto":
        return 3
    return _STORES.index(choice) - 1


_SEARCHES = ("linear", "binary")


def _boundary_search() -> str:
    """POLARTENSOR_ENCODE_SEARCH (read per call): how the atan2-free encode finds a level's
    cell among its 2^b - 1 ascending boundaries: ``linear`` (the default; each boundary in
    turn, independent comparisons) or ``binary`` (b dependent comparisons). Same codes bit
    for bit (tested). The search is binary only for levels of >= 7 boundaries (paper and
    polar-3 have none). Offline (Triton 3.6, sm_90, results/bench/kernel_ir_stats.md) binary
    took 6-9% fewer SASS instructions for polar-4 and 15-22% for polar-5, but on an H100
    polar-4 at d 128 ran 1.02x faster linear (1.917 vs 1.955 ms, same run;
    results/bench/encode_search_h100.md), probably because the dependent steps cost more
    latency than the saved instructions (not profiled). polar-4.5 and polar-5 are not
    timed. Since the tests are fma sign bits (common._passes) the linear count is cheaper
    and binary saves less offline: polar-4 0.4% more (d 128) and 1.3% fewer (d 64),
    polar-4.5 11-14% fewer, polar-5 10-11% fewer."""
    return env_choice("POLARTENSOR_ENCODE_SEARCH", _SEARCHES)


def _column_order() -> bool:
    """POLARTENSOR_ENCODE_PERM (read per call): 1 (the default) computes the rotation's
    output columns in the order that keeps the polar transform's pairs inside each thread
    (``mma_order``), where a launch gives each warp at least 16 whole rows (the defaults
    do); 0 in coordinate order. The codes and radii are the same either way. Offline
    (Triton 3.6, sm_90, paper) 16- and 32-row tiles with 4 warps compiled to 8-17% more
    SASS instructions in register order, 64- and 128-row tiles to 8-29% fewer."""
    return env_flag("POLARTENSOR_ENCODE_PERM", True, "MMA columns in register order",
                    "MMA columns in coordinate order")


def _row_align(x3: torch.Tensor) -> int:
    """The largest of 8, 4, 2, 1 that every row offset of ``x3`` [lead, T, D] (unit last
    stride) is a multiple of, in elements: what the kernel may promise Triton (which knows
    the base pointer's alignment itself) so that rows load as vectors."""
    for a in (8, 4, 2):
        if x3.stride(0) % a == 0 and x3.stride(1) % a == 0:
            return a
    return 1


# int32 row indices and offsets below this (a module constant so that a test can force int64)
_IDX32_LIMIT = 2**31


def _index32(rows: int, *views: torch.Tensor) -> bool:
    """Whether ``rows`` (the tile rows, past the end included) and every element offset
    inside the [lead, T, C] ``views`` fit in int32."""
    span = max(sum((n - 1) * st for n, st in zip(v.shape, v.stride())) + 1 for v in views)
    return max(rows, span) < _IDX32_LIMIT


def encode_supported(x: torch.Tensor, config) -> bool:
    from .common import supported_head_dim

    d = x.shape[-1]
    return (supported_head_dim(d) and config.levels <= 8 and x.dim() >= 2
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _flat3(t: torch.Tensor, rows_t: int) -> torch.Tensor | None:
    """View [..., T, C] as [lead, T, C] without a copy, or None if impossible."""
    try:
        return t.view(-1, rows_t, t.shape[-1])
    except RuntimeError:
        return None


def encode_into_triton(
    x: torch.Tensor, rot: torch.Tensor | None, mids: torch.Tensor, codes_out: torch.Tensor,
    radii_out: torch.Tensor, config, block_rows: int | None = None,
    pre_rotate: bool | None = None, exact: bool | None = None, quantizer: str | None = None,
    rotation_mma: str | None = None, persistent: bool | None = None,
    num_warps: int | None = None, maxnreg: int | None = None,
) -> bool:
    """Launch the fused encode. ``rot``: S (fp32 [D, D]) or None (``x`` already rotated, or
    rotation 'none'). ``mids``: :func:`common.boundary_table` (cast to the
    working precision here).

    ``exact`` (default: under the interpreter): the reference's float64 pipeline (x rotated
    by a float64 torch matmul before the kernel, angles and norms in float64), so codes and
    radii equal the reference bit for bit up to exact atan2 ties. Otherwise (the GPU fast
    path) float32, the rotation fused in the kernel as a tl.dot unless ``pre_rotate``.
    ``quantizer``: ``"atan2"`` or ``"cross"`` (float32 only: codes from sign and tangent
    comparisons, no atan2; see ``common._encode_level``); default POLARTENSOR_ENCODE_QUANT,
    else cross. ``rotation_mma``: ``"bf16x2"``, ``"bf16"`` (one MMA against S rounded to
    bfloat16; opt-in, see _ROT_MMAS) or ``"tf32x3"`` (how the fused rotation multiplies;
    bf16x2 and bf16 only for bfloat16 inputs with 16-bit radii, others take tf32x3);
    default POLARTENSOR_ENCODE_ROT, else bf16x2. ``persistent`` (default:
    POLARTENSOR_ENCODE_PERSIST, else ``auto``, see _PERSIST_MODES; where the bf16x2 rotation
    runs at head_dim <= 128, elsewhere ignored): two programs per SM, each loading S's
    bfloat16 parts once and encoding tile after tile. ``block_rows``, ``num_warps``,
    ``maxnreg`` (a register cap, GPU only; 0: no cap; None: the default): the launch
    (defaults below). (A 168-register cap ran 1.22x faster at d 128 before the register-order
    columns; with them paper ran 1.04x faster uncapped and polar-4 0.99x. With the record
    stores a 128-register cap runs polar-4 at d 128 1.07x faster, and is its default.)
    Returns False (nothing written) when the output views cannot be addressed as
    [lead, T, C] with unit last stride; the caller then falls back to the reference."""
    if block_rows is not None and (block_rows < 16 or block_rows & (block_rows - 1)):
        raise ValueError(f"block_rows={block_rows}: use a power of two >= 16 (the rotation is a "
                         "tensor-core dot over the tile's rows)")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps={num_warps}: use 1, 2, 4, 8 or 16")
    if maxnreg is not None and maxnreg != 0 and not (24 <= maxnreg <= 255):
        raise ValueError(f"maxnreg={maxnreg}: a register cap between 24 and 255, or 0 for none")
    interp = interpreting()
    exact = interp if exact is None else exact
    chosen = quantizer or os.environ.get("POLARTENSOR_ENCODE_QUANT", "cross")
    if chosen not in _QUANTIZERS:
        raise ValueError(f"quantizer {chosen!r} (POLARTENSOR_ENCODE_QUANT or quantizer=): use "
                         f"one of {_QUANTIZERS}")
    if chosen == "cross" and exact and quantizer is not None:
        raise ValueError("quantizer='cross' is float32 arithmetic: it cannot give the "
                         "reference's float64 codes (exact=True); pass exact=False")
    cross = chosen == "cross" and not exact
    rot_mma = rotation_mma or os.environ.get("POLARTENSOR_ENCODE_ROT", "bf16x2")
    if rot_mma not in _ROT_MMAS:
        raise ValueError(f"rotation_mma {rot_mma!r} (POLARTENSOR_ENCODE_ROT or rotation_mma=): "
                         f"use one of {_ROT_MMAS}")
    if exact:
        x = x.to(torch.float64)
        if rot is not None:
            x = x @ rot.to(torch.float64).T
            rot = None
    elif pre_rotate and rot is not None:
        x = x.to(torch.float32) @ rot.T
        rot = None
    mids_in = mids
    mids = mids.to(torch.float64 if exact else torch.float32)
    d = x.shape[-1]
    t = x.shape[-2]
    x3 = x.reshape(-1, t, d)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    c3 = _flat3(codes_out, t)
    r3 = _flat3(radii_out, t)
    if c3 is None or r3 is None or c3.stride(-1) != 1 or r3.stride(-1) != 1:
        return False
    n_rows = x3.shape[0] * t
    if n_rows == 0:
        return True
    r_dst = r3
    if exact:
        r3 = torch.empty(r3.shape, dtype=torch.float64, device=r3.device)
    w = level_words(config, d)
    kch = min(d, 64)
    rot_bf16x2 = False
    if rot is None:
        rot_arg, rotate = x3, False
    elif (rot_mma in ("bf16x2", "bf16") and x3.dtype == torch.bfloat16
            and config.radius_dtype != "float32"):
        # (float32 radii would show its ~2^-16 relative error; 16-bit radii round coarser)
        rotate, rot_bf16x2 = True, True
    else:
        rotate = True
    store_mode = _store_mode()
    # (a scaled sign matrix takes one exact MMA: see sign_matrix_scale)
    sign_c = sign_matrix_scale(config, d) if rot_bf16x2 else 0.0
    # the timed d-128 launches below: the bfloat16 rotation with the record(16) stores
    record_d128 = not interp and rot_bf16x2 and 64 < d <= 128 and store_mode in (1, 3)
    widest = max(config.bits)
    # (no launch asked for by argument; persistent= only overrides the persistent choice
    # below, where the auto rule's value is then unused)
    default_launch = (block_rows is None and num_warps is None and maxnreg is None
                      and persistent is None)
    persist = _persistent(persistent, record_d128 and rot_mma != "bf16" and not sign_c
                          and widest <= 4 and default_launch) and rot_bf16x2 and d <= 128
    if block_rows is None:
        # The interpreter pays per op, not per element: one wide program is fastest there.
        # On the H200 (results/bench/encode_launch_sweep.md, bfloat16 x): at d <= 128, 64 rows
        # and 4 warps per program (1.08x faster than 32 rows at d 128, 1.12-1.37x at d 64; 128
        # rows or 8 warps slower); at d 256 with the bf16x2 rotation, 128 rows and 8 warps
        # (2.43x paper, 1.57x polar-4 against 16 rows and 4 warps: each program reads all of
        # S, 256 KB, from L2). The tf32x3 rotation at d 256 keeps 16 rows and 4 warps: at 128
        # rows it spills ~4 KB per thread offline (Triton 3.6), and it is not measured there.
        wide = d > 128 and rot_bf16x2
        block_rows = (min(256, triton.next_power_of_2(n_rows)) if interp
                      else (64 if d <= 128 else 128 if wide else 16))
        if num_warps is None and not interp and wide:
            num_warps = 8
        if record_d128:
            # With the record stores, on an H100 at d 128 (bfloat16 x, same run,
            # results/bench/encode_launch_sweep_store_2026-12-06_h100.md): 128 rows and 8
            # warps (S read once per 128 rows) ran 1.13x (paper) and 1.15x (polar-3) faster
            # than 64 rows and 4 warps, 49.4% of copy bandwidth for paper; for polar-4, whose
            # 5-bit level 1 needs more registers, 0.82x, while a 128-register cap on 64-row
            # tiles ran 1.07x (0.92-0.95x at d 64, so no cap there). Levels of <= 4 bits take
            # the former, 5-bit ones the latter (polar-3.25/3.5/4.5 are not timed); 6-bit
            # levels (polar-5) keep the uncapped default: under the cap they spill 24 bytes
            # offline (Triton 3.6).
            # Persistent there (see _PERSIST_MODES), the same tiles under a 128-register cap,
            # so that two programs fit per SM (the default 1 stage: S's parts and x take 96 KB
            # of shared memory).
            if widest <= 4:
                block_rows, num_warps = 128, num_warps or 8
                if persist and maxnreg is None:
                    maxnreg = 128
            elif widest == 5 and maxnreg is None:
                maxnreg = 128
    # (register-order columns need whole rows per warp: with fewer than 16 rows per warp
    # Triton splits the MMA's columns over warps, and offline the order cost instructions)
    perm = _column_order() and rotate and block_rows >= 16 * (num_warps or 4)
    rot_lo, r_scale = rot_mma != "bf16", 1.0
    if rot_bf16x2:
        if sign_c:
            # (a scaled sign matrix, rotation="hadamard" or "permuted_hadamard": one exact MMA
            # against S / c, the block radii times c; the codes the two MMAs would give, up to
            # float ties)
            rot_lo, r_scale = False, sign_c
        rot_arg = rotation_bf16x2(rot, perm, r_scale)
    elif rotate:
        rot_arg = _rows_in_mma_order(rot) if perm else rot.contiguous()
    prec = "ieee" if interp else "tf32x3"
    cross1, toff = False, 0
    if cross:
        mids, cross1 = cross_table(mids_in, config)
        toff = w["L"] * mids.shape[1]
    from .encode_gluon import encode_into_gluon, gluon_encode_applies, gluon_encode_setting

    # (the Gluon encode takes the default launch only: a launch asked for by argument, block
    # rows, warps, a register cap or persistent=, stays the Triton kernel's)
    if (gluon_encode_setting() and default_launch and cross and cross1 and store_mode == 3
            and rot_bf16x2 and rot_lo and perm and not sign_c and not interp
            and gluon_encode_applies(x3, config, d, r3, c3)):
        encode_into_gluon(x3, rot_arg, mids, c3, r3, config, n_rows)
        return True
    n_tiles = triton.cdiv(n_rows, block_rows)
    # (read, and checked, per call)
    stages, per_sm, l2pf = _persist_stages(), _persist_per_sm(), _l2_prefetch()
    # (whole records gather along each row's words: Triton 3.6 compiles that only where every
    # warp holds whole rows, >= 16 per warp, as for the register-order columns; with fewer
    # its thread-locality pass aborts, offline at 16 and 32 rows with 4 warps, so such
    # launches take the record stores, the same bytes)
    if store_mode == 2 and block_rows < 16 * (num_warps or 4):
        store_mode = 1
    # int32 row indices and offsets where they fit: the row division becomes a 32-bit one
    # (offline, Triton 3.6, sm_90: paper d 128 1272 -> 1232 SASS instructions, d 64 1088 ->
    # 944; polar-4 d 64 1264 -> 1224). Not at d 256 (128-row tiles, 8 warps), where polar-4
    # sits at the register limit: 3520 -> 3632 instructions with 12 bytes of spills, and
    # paper gained 1%.
    idx32 = d <= 128 and _index32(n_rows + block_rows, x3, c3, r3)
    # (under the interpreter two programs, so that each really loops over tiles)
    grid = (min(n_tiles, 2 if interp else per_sm * _sm_count(x3.device)) if persist
            else n_tiles,)
    caps = {} if not maxnreg or interp else {"maxnreg": maxnreg}
    x_tma = persist and _x_tma(x3, interp)
    x_desc = x3
    if x_tma:
        # (rows as one [n_rows, D] tensor: evenly strided, checked by _x_tma)
        x_desc = TensorDescriptor(x3, [n_rows, d], [x3.stride(1), 1], [block_rows, d])
    _encode_kernel[grid](
        x3, x3.stride(0), x3.stride(1),
        rot_arg, mids,
        c3, c3.stride(0), c3.stride(1),
        r3, r3.stride(0), r3.stride(1),
        n_rows, t, x_desc,
        BN=block_rows, D=d, KCH=kch, KT=mids.shape[1] - 1,
        L=w["L"], NB=w["NB"], TAIL_BYTE=w["TAIL_BYTE"], TAIL_NB=w["TAIL_NB"],
        LV0=w["LV0"], LV1=w["LV1"], LV2=w["LV2"], LV3=w["LV3"],
        LV4=w["LV4"], LV5=w["LV5"], LV6=w["LV6"], LV7=w["LV7"],
        ROTATE=rotate, PREC=prec, F64=bool(exact), VEC=bool(exact),
        CROSS=(2 if _boundary_search() == "binary" else 1) if cross else 0, CROSS1=cross1,
        TOFF=toff, ROT_BF16X2=rot_bf16x2, ROT_LO=rot_lo, R_SCALE=r_scale,
        STORE16=cross and records_aligned16(c3), X_ALIGN=_row_align(x3), PERSIST=persist,
        R_ALIGN=_row_align(r3), L2PF=l2pf if persist and not interp else 0, X_TMA=x_tma,
        IDX32=idx32, WRAP1=idx32 and (t >= block_rows or t == n_rows),
        PERM=perm, STORE_MODE=store_mode, RBP=triton.next_power_of_2(max(w["R"], 2)),
        # One stage: with Triton's default three, the software pipeliner double-buffers all of
        # S in shared memory across iterations of the tile loop (H200, d 256: 536 KB asked for,
        # 227 KB there; d 128: 152 KB, one program per SM). The persistent launch loads S
        # before its loop, so there only x is buffered (_persist_stages).
        num_warps=num_warps or 4, num_stages=stages if persist else 1, **caps,
    )
    if exact:
        r_dst.copy_(r3)
    return True


# encode_into_triton launches the kernel through this name, so that a script can capture the
# launch arguments (scripts/kernel_ir_stats.py) without running it.
_encode_kernel = polar_encode_fwd_kernel
