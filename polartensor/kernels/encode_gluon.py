"""Fused encode whose rotation runs asynchronously beside the polar transform (Gluon, sm_90).

The Triton encode (``encode.polar_encode_fwd_kernel``) runs each tile's phases one after
another: load x, stage it in shared memory, the two bfloat16 MMAs against S's high and low
parts, wait, then the polar transform and the stores. ``tl.dot`` waits for its MMA at once,
so a program's tensor-core time and its transform never overlap, and the encode took the
same 0.42 ms on the H100 and the H200 (paper, batch 8 x 32K x 8 heads, d 128): latency, not
bandwidth (docs/kernel_history.md).

Here each program keeps S's parts in shared memory, loads x tiles by TMA into a ring of
``NBUF`` buffers (the copy of tile i + NBUF issued as soon as tile i's MMAs retire) and takes
two tiles an iteration: both tiles' ``warpgroup_mma`` pairs issued, then the first tile
quantized while the tensor cores work on the second. (With the next tile's MMAs still in
flight across the loop's back edge ptxas serialized every wgmma, C7514; nothing is in flight
there now.) Offline, ptxas hoists the wait for the second tile's MMAs ~200 instructions
into the first tile's transform, before its stores. On the H100 (b202bba,
results/bench/encode_launch_sweep_2026-12-07c_h100.md) a CTA barrier that kept the wait
after them took the same time (1.00x), and with it 4 tiles an iteration (one MMA pair in 4
with no transform beside it, not one in 2) 0.96x, so neither was kept (docs/kernel_history.md).
Offline (Triton 3.6, sm_90, ``scripts/gluon_offline_stats.py --kernel encode``):
255 registers, no spills, 1915 loop SASS instructions per two tiles (2252 with the staged
stores, the default), against the Triton kernel's 1221 per tile at the same 128 rows and 8
warps. The transform is the Triton
kernel's, in the MMA accumulator's registers: S's rows come in ``encode.mma_order`` so that
a thread holds whole 16-coordinate blocks. The same products in the same order and the same
arithmetic give the Triton kernel's codes and radii bit for bit: on the H100 at 7bd0692
(results/bench/encode_launch_sweep_2026-12-07a_h100.md, paper, batch 8 x 32K x 8 heads) every
tile and ring depth wrote the Triton default's bytes, and the 64-row tile took 0.358 ms
against its 0.422 (1.18x; 128 rows 1.06x). The hypothesis test of the same run
(tests/kernels/test_encode_gluon.py) found one token a lead failing to compile (T made a
constant by the launch), fixed since and caught on the CPU now. After the fix, on the H100 at
c8d1662 and 4dec221 (results/bench/gpu_tests_2026-12-07_h100_gluon_encode.log), its tests
passed and the 64-row tile took 0.361 ms against the Triton default's 0.425 (1.18x; with a
third buffer at two programs per SM 1.17x; encode_launch_sweep_2026-12-07b_h100.md), so it
is the default where it applies. Since 2b246fd each tile's code words and radii go out
through shared memory by row (``gluon_encode_stage_setting``).

Scope: bfloat16 x, S as two bfloat16 parts (``rotation_mma="bf16x2"``), head_dim 128, four
levels over 16-coordinate blocks with 2-bit upper levels and a uniform 2- or 4-bit level 1
(the paper preset), 16-bit radii, records 2-byte aligned, rows and offsets below 2^31, x's
rows evenly strided and 16-byte aligned; sm_90 only (wgmma). ``encode_into_triton`` takes it
by default where all of that holds (POLARTENSOR_ENCODE_GLUON=0: the Triton kernel).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .common import _sm_count, env_choice, env_flag, level_words, records_aligned16
from .dispatch import _cached
from .encode import mma_order, rows_tma_ready
from .gluon_compat import cta_barrier as _cta_barrier
from .gluon_compat import tma_load as _tma_load

__all__ = ["polar_encode_gluon_fwd_kernel", "encode_into_gluon", "gluon_encode_setting",
           "gluon_encode_applies", "gluon_encode_launch", "gluon_encode_stage_setting",
           "gluon_encode_halves_setting", "half_order"]


@gluon.jit
def _passes(num, den, t):
    """num > den * t as 0 or 1 (int32): the sign bit of fma(den, t, -num), as
    ``common._passes``."""
    return (gl.fma(den, t, num * -1.0).to(gl.uint32, bitcast=True) >> 31).to(gl.int32)


@gluon.jit
def _count_above(num, den, t):
    """How many of the three ascending thresholds t = (t0, t1, t2) have num > den * t_k
    (den >= 0)."""
    return _passes(num, den, t[0]) + _passes(num, den, t[1]) + _passes(num, den, t[2])


@gluon.jit
def _thresholds(t_ptr):
    return gl.load(t_ptr), gl.load(t_ptr + 1), gl.load(t_ptr + 2)


@gluon.jit
def _level_thresholds(tab_ptr, KT1: gl.constexpr):
    """Each level's three thresholds (``cross_table``'s rows 4..7), held in registers."""
    return (_thresholds(tab_ptr + 4 * KT1), _thresholds(tab_ptr + 5 * KT1),
            _thresholds(tab_ptr + 6 * KT1), _thresholds(tab_ptr + 7 * KT1))


@gluon.jit
def _coord_order(y, BN: gl.constexpr):
    """[BN, 128] whose column c holds coordinate mma_order(128)[c] -> coordinate order (a
    relabelling of the index bits, as ``encode._coord_order``: no data moves)."""
    y = gl.permute(gl.reshape(y, [BN, 2, 2, 2, 2, 2, 2, 2]), (0, 5, 6, 1, 2, 3, 4, 7))
    return gl.reshape(y, [BN, 128])


@gluon.jit
def _pack(code, b: gl.constexpr, n: gl.constexpr, BN: gl.constexpr):
    """n codes of b bits a row -> [BN, n b / 16] 16-bit words, the first code in the low bits."""
    G2: gl.constexpr = 16 // b
    c3 = gl.reshape(code, [BN, n // G2, G2])
    L3: gl.constexpr = c3.type.layout
    sh = b * gl.arange(0, G2, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    return gl.sum(c3 << sh[None, None, :], axis=2)


@gluon.jit
def _store_words(code, b: gl.constexpr, n: gl.constexpr, codes_ptr, rec_off, valid,
                 POS: gl.constexpr, BN: gl.constexpr, w_smem, STAGE: gl.constexpr):
    """A level's n codes of b bits (b 2 or 4: whole codes per byte) as aligned 16-bit words
    at byte POS of each row's record, the first code in the low bits: the bytes that
    ``common._encode_level``'s record stores write. With STAGE, into the tile's staging
    words w_smem [BN, 32] at word POS / 2 instead (``_store_staged`` writes them out)."""
    G2: gl.constexpr = 16 // b          # codes per 16-bit word
    word = _pack(code, b, n, BN)
    if STAGE:
        w_smem.slice(POS // 2, n // G2, dim=1).store(word.to(gl.uint16))
        return
    W: gl.constexpr = word.type.layout
    ww = gl.arange(0, n // G2, layout=gl.SliceLayout(0, W))
    ro = gl.convert_layout(rec_off, gl.SliceLayout(1, W))
    ok = gl.convert_layout(valid, gl.SliceLayout(1, W))
    p16 = (codes_ptr + ro + POS).to(gl.pointer_type(gl.uint16), bitcast=True)
    gl.store(p16[:, None] + ww[None, :], word.to(gl.uint16), mask=ok[:, None])


@gluon.jit
def _row_offsets(tile, n_rows, T, sc_l, sc_t, sr_l, sr_t, BN: gl.constexpr,
                 WRAP1: gl.constexpr, row_l: gl.constexpr):
    """Each of the tile's rows' record and radii offsets and whether it exists, in row_l."""
    rows = tile * BN + gl.arange(0, BN, layout=row_l)
    valid = rows < n_rows
    # (T a tensor also where the launch made it the constant 1, one token a lead: a decode
    # step's append, which failed to compile on the H100 when T.to met a Python int)
    tu = gl.to_tensor(T).to(gl.uint32)
    if WRAP1:
        # (T >= BN, or one lead: a tile's rows cross at most one lead boundary)
        r0 = tile * BN
        lead0 = (r0.to(gl.uint32) // tu).to(gl.int32)
        tt = (r0 - lead0 * T) + gl.arange(0, BN, layout=row_l)
        w = (tt >= T).to(gl.int32)
        lead = lead0 + w
        t = tt - w * T
    else:
        lead = (rows.to(gl.uint32) // tu).to(gl.int32)
        t = rows - lead * T
    return lead * sc_l + t * sc_t, lead * sr_l + t * sr_t, valid


@gluon.jit
def _store_staged(w_smem, r_smem, tile, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t,
                  n_rows, T, BN: gl.constexpr, NW: gl.constexpr, WRAP1: gl.constexpr):
    """Write a staged tile out: each warp store covers one row's NW code words (its whole
    record, contiguous) or four rows' radii, where the accumulator layout's stores cover
    eight rows' few words each (on the H100 6.2 bytes of each 32-byte sector they wrote)."""
    _cta_barrier()      # every warp's staged words written
    wl: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [gl.num_warps(), 1], [1, 0])
    rl: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [gl.num_warps(), 1], [1, 0])
    words = w_smem.load(wl)
    rec_off, _, ok = _row_offsets(tile, n_rows, T, sc_l, sc_t, sr_l, sr_t, BN, WRAP1,
                                  gl.SliceLayout(1, wl))
    ww = gl.arange(0, 32, layout=gl.SliceLayout(0, wl))
    p16 = (codes_ptr + rec_off).to(gl.pointer_type(gl.uint16), bitcast=True)
    gl.store(p16[:, None] + ww[None, :], words, mask=ok[:, None] & (ww[None, :] < NW))
    radii = r_smem.load(rl)
    _, rad_off, ok = _row_offsets(tile, n_rows, T, sc_l, sc_t, sr_l, sr_t, BN, WRAP1,
                                  gl.SliceLayout(1, rl))
    nb = gl.arange(0, 8, layout=gl.SliceLayout(0, rl))
    gl.store(radii_ptr + rad_off[:, None] + nb[None, :], radii, mask=ok[:, None])


@gluon.jit
def _level1(ab, t1, B1: gl.constexpr):
    """Level 1 of coordinate pairs ab = (a, b): their squared radii and codes, the quadrant
    from the sign bits, then the cell inside it (B1 4; B1 2 is the quadrant)."""
    a, b = ab
    r = gl.fma(a, a, b * b)                                   # squared radii
    yb = b.to(gl.int32, bitcast=True)
    sym = yb >> 31
    swm = (a.to(gl.int32, bitcast=True) ^ yb) >> 31
    if B1 == 4:
        cnt = _count_above(gl.abs(b), gl.abs(a), t1)
        code = (cnt ^ (swm & 7)) | (sym & 8)
    else:
        gl.static_assert(B1 == 2, "the Gluon encode serves 2- and 4-bit level-1 codes")
        code = (swm & 1) | (sym & 2)
    return r, code


@gluon.jit
def _encode_tile(y, tile, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t, n_rows, T,
                 t1, t2, t3, t4, BN: gl.constexpr, B1: gl.constexpr, WRAP1: gl.constexpr,
                 acc_l: gl.constexpr, w_smem, r_smem, STAGE: gl.constexpr):
    """The polar transform, codes and radii of one tile: y [BN, 128] float32 rotated rows in
    the accumulator layout (columns in mma_order). Level 1 by the sign bits and tangent
    comparisons, the upper levels on squared radii, the block radius's one square root, as
    ``common._encode_level`` with CROSS and a uniform level 1; t1..t4 each level's three
    thresholds (``cross_table``). With STAGE the codes and radii go through w_smem / r_smem
    (``_store_staged``)."""
    rec_off, rad_off, valid = _row_offsets(tile, n_rows, T, sc_l, sc_t, sr_l, sr_t, BN,
                                           WRAP1, gl.SliceLayout(1, acc_l))

    y = _coord_order(y, BN)
    r, code = _level1(gl.split(gl.reshape(y, [BN, 64, 2])), t1, B1)
    _store_words(code, B1, 64, codes_ptr, rec_off, valid, 0, BN, w_smem, STAGE)
    # levels 2-4: 2-bit angles of squared radii pairs (y > a tan^2 m, the table signed)
    POS2: gl.constexpr = 8 * B1
    a, b = gl.split(gl.reshape(r, [BN, 32, 2]))
    r = a + b
    code = _count_above(b, a, t2)
    _store_words(code, 2, 32, codes_ptr, rec_off, valid, POS2, BN, w_smem, STAGE)
    a, b = gl.split(gl.reshape(r, [BN, 16, 2]))
    r = a + b
    code = _count_above(b, a, t3)
    _store_words(code, 2, 16, codes_ptr, rec_off, valid, POS2 + 8, BN, w_smem, STAGE)
    a, b = gl.split(gl.reshape(r, [BN, 8, 2]))
    r = gl.sqrt(a + b)                                        # the block radii [BN, 8]
    code = _count_above(b, a, t4)
    _store_words(code, 2, 8, codes_ptr, rec_off, valid, POS2 + 12, BN, w_smem, STAGE)
    if STAGE:
        r_smem.store(r.to(radii_ptr.dtype.element_ty))
        _store_staged(w_smem, r_smem, tile, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t,
                      n_rows, T, BN, 4 * B1 + 7, WRAP1)
        return
    R: gl.constexpr = r.type.layout
    nb = gl.arange(0, 8, layout=gl.SliceLayout(0, R))
    ro = gl.convert_layout(rad_off, gl.SliceLayout(1, R))
    ok = gl.convert_layout(valid, gl.SliceLayout(1, R))
    gl.store(radii_ptr + ro[:, None] + nb[None, :], r.to(radii_ptr.dtype.element_ty),
             mask=ok[:, None])


@gluon.jit
def _issue(j, x_smem, bars, s_hi, s_lo, zero, mine, NBUF: gl.constexpr):
    """Tile j's two MMAs, asynchronous, once its x copy has landed (past the last tile they
    rerun a loaded buffer, and their result is dropped)."""
    mbarrier.wait(bars.index(j % NBUF), (j // NBUF) & 1, pred=j < mine)
    src = x_smem.index(gl.minimum(j, mine - 1) % NBUF)
    acc = warpgroup_mma(src, s_hi, zero, use_acc=False, is_async=True)
    return warpgroup_mma(src, s_lo, acc, is_async=True)


@gluon.jit
def _refill(j, x_desc, x_smem, bars, mine, pid, step, BN: gl.constexpr, NBUF: gl.constexpr,
            BASE: gl.constexpr = 0):
    """Tile j's MMAs have retired: copy tile j + NBUF into its buffer (of the NBUF from
    BASE)."""
    ahead = j + NBUF
    buf = BASE + j % NBUF
    mbarrier.expect(bars.index(buf), BN * 128 * 2, pred=ahead < mine)
    _tma_load(x_desc, [(pid + ahead * step) * BN, 0], bars.index(buf), x_smem.index(buf),
              pred=ahead < mine)


@gluon.jit
def _coord_order_half(y, BN: gl.constexpr):
    """[BN, 64] half tile whose column c holds coordinate mma_order(64)[c] of its four blocks
    (``half_order``) -> coordinate order (a relabelling, as ``_coord_order``)."""
    y = gl.permute(gl.reshape(y, [BN, 2, 2, 2, 2, 2, 2]), (0, 4, 5, 1, 2, 3, 6))
    return gl.reshape(y, [BN, 64])


@gluon.jit
def _encode_half(y, H: gl.constexpr, t1, t2, t3, t4, w4, BN: gl.constexpr,
                 B1: gl.constexpr, w_smem, r_smem, radii_ptr):
    """Blocks 4 H to 4 H + 3 of each row (y [BN, 64] float32, one column half of the
    rotation's output in ``half_order``): their codes and radii into the staging words
    w_smem [BN, 32] and radii r_smem [BN, 8], as ``_encode_tile`` computes them. Level 4
    gives a half only a byte of its 16-bit word: half 0 returns its byte, which half 1 (w4)
    completes and stages."""
    y = _coord_order_half(y, BN)
    r, code = _level1(gl.split(gl.reshape(y, [BN, 32, 2])), t1, B1)
    # the record's 16-bit words: level 1 from 0 (2 B1 a half), level 2 from 4 B1 (2 a half),
    # level 3 from 4 B1 + 4 (1 a half), level 4 at 4 B1 + 6 (one for both halves)
    w_smem.slice(2 * B1 * H, 2 * B1, dim=1).store(_pack(code, B1, 32, BN).to(gl.uint16))
    a, b = gl.split(gl.reshape(r, [BN, 16, 2]))
    r = a + b
    code = _count_above(b, a, t2)
    w_smem.slice(4 * B1 + 2 * H, 2, dim=1).store(_pack(code, 2, 16, BN).to(gl.uint16))
    a, b = gl.split(gl.reshape(r, [BN, 8, 2]))
    r = a + b
    code = _count_above(b, a, t3)
    w_smem.slice(4 * B1 + 4 + H, 1, dim=1).store(_pack(code, 2, 8, BN).to(gl.uint16))
    a, b = gl.split(gl.reshape(r, [BN, 4, 2]))
    r = gl.sqrt(a + b)                                        # the block radii [BN, 4]
    code = _count_above(b, a, t4)
    L4: gl.constexpr = code.type.layout
    byte = gl.sum(code << (2 * gl.arange(0, 4, layout=gl.SliceLayout(0, L4)))[None, :], axis=1)
    r_smem.slice(4 * H, 4, dim=1).store(r.to(radii_ptr.dtype.element_ty))
    if H == 1:
        word = gl.expand_dims(w4 | (byte << 8), 1)
        w_smem.slice(4 * B1 + 6, 1, dim=1).store(word.to(gl.uint16))
    return byte


@gluon.jit
def _halves_run(G: gl.constexpr, NG: gl.constexpr, x_desc, s_smem, x_smem, bars, w_smem,
                r_smem, tab_ptr, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t, n_rows, T,
                BN: gl.constexpr, NBUF: gl.constexpr, B1: gl.constexpr, KT1: gl.constexpr,
                WRAP1: gl.constexpr):
    """Warpgroup G of NG in a program, with HALVES: tiles v, v + V, v + 2V, ... (v = NG
    program id + G, V = NG programs) one an iteration, in two column halves, each [BN, 64]
    accumulator (32 registers a thread, not 64) quantized while the other half's MMAs run,
    the codes and radii staged and stored by row. Its own x ring (x_smem [NG NBUF, BN, D],
    barriers G NBUF on, S's barrier last) and staging buffers (w_smem / r_smem [2 NG, ...]);
    S (s_smem [4, 64, D]: high part's column halves, then the low part's) shared."""
    D: gl.constexpr = 128
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                    warps_per_cta=[gl.num_warps(), 1],
                                                    instr_shape=[16, 64, 16])
    vid = gl.program_id(0) * NG + G
    step = gl.num_programs(0) * NG
    mine = (gl.cdiv(n_rows, BN) - vid + step - 1) // step     # this group's tiles (>= 0)
    for k in gl.static_range(NBUF):
        mbarrier.expect(bars.index(G * NBUF + k), BN * D * 2, pred=k < mine)
        _tma_load(x_desc, [(vid + k * step) * BN, 0], bars.index(G * NBUF + k),
                  x_smem.index(G * NBUF + k), pred=k < mine)
    t1, t2, t3, t4 = _level_thresholds(tab_ptr, KT1)
    mbarrier.wait(bars.index(NG * NBUF), 0)
    zero = gl.zeros([BN, 64], gl.float32, acc_l)
    NW: gl.constexpr = 4 * B1 + 7
    for i in range(mine):
        # (two staging buffers, tile parity: the barrier before one tile's write-out also
        # orders the other buffer's last write-out before its next writes)
        w_buf = w_smem.index(2 * G + i % 2)
        r_buf = r_smem.index(2 * G + i % 2)
        slot = G * NBUF + i % NBUF
        mbarrier.wait(bars.index(slot), (i // NBUF) & 1)
        src = x_smem.index(slot)
        acc0 = warpgroup_mma(src, s_smem.index(0).permute((1, 0)), zero, use_acc=False,
                             is_async=True)
        acc0 = warpgroup_mma(src, s_smem.index(2).permute((1, 0)), acc0, is_async=True)
        acc1 = warpgroup_mma(src, s_smem.index(1).permute((1, 0)), zero, use_acc=False,
                             is_async=True)
        acc1 = warpgroup_mma(src, s_smem.index(3).permute((1, 0)), acc1, is_async=True)
        y = warpgroup_mma_wait(num_outstanding=2, deps=[acc0])
        w4 = _encode_half(y, 0, t1, t2, t3, t4, 0, BN, B1, w_buf, r_buf, radii_ptr)
        y = warpgroup_mma_wait(num_outstanding=0, deps=[acc1])
        _refill(i, x_desc, x_smem, bars, mine, vid, step, BN, NBUF, G * NBUF)
        _encode_half(y, 1, t1, t2, t3, t4, w4, BN, B1, w_buf, r_buf, radii_ptr)
        _store_staged(w_buf, r_buf, vid + i * step, codes_ptr, sc_l, sc_t, radii_ptr, sr_l,
                      sr_t, n_rows, T, BN, NW, WRAP1)


@gluon.jit
def _halves_loop(x_desc, s_desc, tab_ptr, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t,
                 n_rows, T, BN: gl.constexpr, NBUF: gl.constexpr, B1: gl.constexpr,
                 KT1: gl.constexpr, WRAP1: gl.constexpr, NG: gl.constexpr):
    """The kernel with HALVES: the shared memory of NG warpgroups (``_halves_run``), S's
    copy, then the groups: one (the program's warps), or three, each a partition of a
    warp-specialized region (12 warps an SM sharing one copy of S: two accumulators of 32
    registers fit 12 warps under 168 registers, where the two-tile loop's 255 hold 8)."""
    D: gl.constexpr = 128
    s_smem = gl.allocate_shared_memory(gl.bfloat16, [4, 64, D], s_desc.layout)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [NG * NBUF, BN, D], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NG * NBUF + 1, 1], mbarrier.MBarrierLayout())
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    w_smem = gl.allocate_shared_memory(gl.uint16, [2 * NG, BN, 32], plain)
    r_smem = gl.allocate_shared_memory(radii_ptr.dtype.element_ty, [2 * NG, BN, 8], plain)
    for k in gl.static_range(NG * NBUF + 1):
        mbarrier.init(bars.index(k), count=1)
    fence_async_shared()
    mbarrier.expect(bars.index(NG * NBUF), 4 * 64 * D * 2)
    for k in gl.static_range(4):
        _tma_load(s_desc, [64 * k, 0], bars.index(NG * NBUF), s_smem.index(k))
    if NG == 1:
        _halves_run(0, 1, x_desc, s_smem, x_smem, bars, w_smem, r_smem, tab_ptr, codes_ptr,
                    sc_l, sc_t, radii_ptr, sr_l, sr_t, n_rows, T, BN, NBUF, B1, KT1, WRAP1)
    else:
        gl.static_assert(NG == 3, "the Gluon encode's halves run one or three warpgroups")
        gl.warp_specialize(
            [(_halves_run, (0, NG, x_desc, s_smem, x_smem, bars, w_smem, r_smem, tab_ptr,
                            codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t, n_rows, T, BN,
                            NBUF, B1, KT1, WRAP1)),
             (_halves_run, (1, NG, x_desc, s_smem, x_smem, bars, w_smem, r_smem, tab_ptr,
                            codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t, n_rows, T, BN,
                            NBUF, B1, KT1, WRAP1)),
             (_halves_run, (2, NG, x_desc, s_smem, x_smem, bars, w_smem, r_smem, tab_ptr,
                            codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t, n_rows, T, BN,
                            NBUF, B1, KT1, WRAP1))],
            [4, 4], [168, 168])


@gluon.jit
def polar_encode_gluon_fwd_kernel(
    x_desc, s_desc, tab_ptr,
    codes_ptr, sc_l, sc_t,
    radii_ptr, sr_l, sr_t,
    n_rows, T,
    BN: gl.constexpr, NBUF: gl.constexpr, B1: gl.constexpr, KT1: gl.constexpr,
    WRAP1: gl.constexpr, STAGE: gl.constexpr, HALVES: gl.constexpr = False,
    GROUPS: gl.constexpr = 1,
):
    """Persistent: program p encodes tiles p, p + P, p + 2P, ... (P programs) of BN rows:
    two tiles an iteration (``_tiles_loop``), or with HALVES one tile in two column halves
    (``_halves_loop``)."""
    if HALVES:
        _halves_loop(x_desc, s_desc, tab_ptr, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t,
                     n_rows, T, BN, NBUF, B1, KT1, WRAP1, GROUPS)
    else:
        _tiles_loop(x_desc, s_desc, tab_ptr, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t,
                    n_rows, T, BN, NBUF, B1, KT1, WRAP1, STAGE)


@gluon.jit
def _tiles_loop(x_desc, s_desc, tab_ptr, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t,
                n_rows, T, BN: gl.constexpr, NBUF: gl.constexpr, B1: gl.constexpr,
                KT1: gl.constexpr, WRAP1: gl.constexpr, STAGE: gl.constexpr):
    """The kernel without HALVES: two tiles an iteration."""
    D: gl.constexpr = 128
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                    warps_per_cta=[gl.num_warps(), 1],
                                                    instr_shape=[16, 128, 16])
    s_smem = gl.allocate_shared_memory(gl.bfloat16, [2, D, D], s_desc.layout)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BN, D], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NBUF + 1, 1], mbarrier.MBarrierLayout())
    # (with STAGE, each of an iteration's two tiles stages its code words and radii here:
    # one buffer a tile, so the barrier before one tile's write-out also orders the other
    # buffer's write-out before its next writes)
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    SR: gl.constexpr = BN if STAGE else 1
    w_smem = gl.allocate_shared_memory(gl.uint16, [2, SR, 32], plain)
    r_smem = gl.allocate_shared_memory(radii_ptr.dtype.element_ty, [2, SR, 8], plain)
    for k in gl.static_range(NBUF + 1):
        mbarrier.init(bars.index(k), count=1)
    fence_async_shared()

    pid = gl.program_id(0)
    step = gl.num_programs(0)
    mine = (gl.cdiv(n_rows, BN) - pid + step - 1) // step     # this program's tiles (>= 1)
    # S's two parts (rows in mma_order, [N, K]: the B operand is their transpose), once
    mbarrier.expect(bars.index(NBUF), 2 * D * D * 2)
    _tma_load(s_desc, [0, 0], bars.index(NBUF), s_smem.index(0))
    _tma_load(s_desc, [D, 0], bars.index(NBUF), s_smem.index(1))
    # the first NBUF tiles' copies (rows past n_rows read as zero)
    for k in gl.static_range(NBUF):
        mbarrier.expect(bars.index(k), BN * D * 2, pred=k < mine)
        _tma_load(x_desc, [(pid + k * step) * BN, 0], bars.index(k),
                                        x_smem.index(k), pred=k < mine)
    t1, t2, t3, t4 = _level_thresholds(tab_ptr, KT1)
    mbarrier.wait(bars.index(NBUF), 0)
    s_hi = s_smem.index(0).permute((1, 0))
    s_lo = s_smem.index(1).permute((1, 0))
    zero = gl.zeros([BN, D], gl.float32, acc_l)
    # Two tiles an iteration: both tiles' MMAs issued, the first tile quantized while the
    # second's run, then the second. Nothing is in flight across the back edge: with the
    # next tile's MMAs in flight there, ptxas serialized every wgmma (C7514, "non wgmma
    # instructions reading accumulator registers"; a straight-line copy of the same steps
    # kept them asynchronous). Past an odd count the second tile lies past the end: its
    # stores are all masked.
    for i in range(0, mine, 2):
        acc_a = _issue(i, x_smem, bars, s_hi, s_lo, zero, mine, NBUF)
        acc_b = _issue(i + 1, x_smem, bars, s_hi, s_lo, zero, mine, NBUF)
        y = warpgroup_mma_wait(num_outstanding=2, deps=[acc_a])
        _refill(i, x_desc, x_smem, bars, mine, pid, step, BN, NBUF)
        _encode_tile(y, pid + i * step, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t,
                     n_rows, T, t1, t2, t3, t4, BN, B1, WRAP1, acc_l, w_smem.index(0),
                     r_smem.index(0), STAGE)
        y = warpgroup_mma_wait(num_outstanding=0, deps=[acc_b])
        _refill(i + 1, x_desc, x_smem, bars, mine, pid, step, BN, NBUF)
        _encode_tile(y, pid + (i + 1) * step, codes_ptr, sc_l, sc_t, radii_ptr, sr_l, sr_t,
                     n_rows, T, t1, t2, t3, t4, BN, B1, WRAP1, acc_l, w_smem.index(1),
                     r_smem.index(1), STAGE)
    for k in gl.static_range(NBUF + 1):
        mbarrier.invalidate(bars.index(k))


def gluon_encode_setting() -> bool:
    """POLARTENSOR_ENCODE_GLUON (read per call): 1 (the default) takes the Gluon encode where
    it applies (``gluon_encode_applies``) and the caller asked for no particular launch; 0 the
    Triton kernel everywhere."""
    return env_choice("POLARTENSOR_ENCODE_GLUON", ("1", "0")) == "1"


# POLARTENSOR_ENCODE_GLUON_TILE (read per call): rows per tile, with one warp per 16 rows:
# 64 (the default: 4 warps, S and two x buffers in 96 KB of shared memory, two programs per
# SM) or 128 (8 warps, 128 KB, one per SM). POLARTENSOR_ENCODE_GLUON_BUFS: x buffers, 2 (the
# default: each copy issued a tile before its MMA) or 3 (two tiles before; 128-row tiles
# 160 KB, 64-row ones 112 KB, one program per SM either way unless _PER_SM below says 2).
# Timed on the H100 at 7bd0692 (paper, batch 8 x 32K x 8 heads;
# results/bench/encode_launch_sweep_2026-12-07a_h100.md,
# against the Triton default in the same run, codes and radii equal byte for byte): 64 rows
# 1.18x, 128 rows 1.06x, 128 rows with 3 buffers 1.03x.
_TILES = ("64", "128")
_BUFS = ("2", "3")
# POLARTENSOR_ENCODE_GLUON_PER_SM: programs per SM, "auto" (the rule above) or 1 or 2. Two
# 64-row programs with 3 buffers fit an sm_90 SM, just, with the unstaged stores
# (POLARTENSOR_ENCODE_GLUON_STAGE=0; the staging's 10 KB do not fit beside them): offline
# (Triton 3.6, scripts/gluon_offline_stats.py) each asks 114,720 bytes of shared memory
# (2 x 114,720 plus 1 KB reserved a program <= 228 KB) and 128 threads x 255 registers
# (2 x 4 warps x 8192 = the 65,536-register file); on the H100 1.17x the Triton kernel, as
# two buffers' 1.18x
# (results/bench/encode_launch_sweep_2026-12-07b_h100.md). 128-row tiles take one (8 warps).
_PER_SM = ("auto", "1", "2")


def gluon_encode_stage_setting() -> bool:
    """POLARTENSOR_ENCODE_GLUON_STAGE (read per call; 1, the default): each tile's code words
    and radii go through shared memory and out by row, one warp store a record (46
    contiguous bytes for paper); 0 stores them from the accumulator layout, each warp store
    covering eight rows' few words. Nsight Compute on the H100 (1939a24,
    results/bench/ncu_gluon_encode_2026-12-07_h100.md) found those stores writing 6.2 bytes
    of each 32-byte sector, and the warps' longest stall waiting for them to release their
    registers. Staging costs 10 KB of shared memory a program (20 KB at 128-row tiles), a CTA
    barrier a tile and, offline (Triton 3.6), 2252 loop instructions per two tiles against
    1915. On the H100, at 64-row tiles, 1.02x the unstaged stores in two sweeps (4806af3,
    0.3492 ms against 0.3574, encode_launch_sweep_2026-12-07d_h100.md; 2b246fd, 0.3439
    against 0.3499, 63.7% of the copy bandwidth, encode_launch_sweep_2026-12-07e_h100.md),
    byte-equal, and its hypothesis GPU test passed (gpu_tests_2026-12-07f_h100_encode_gluon.log);
    0.99x at 128-row tiles (one sweep)."""
    return env_flag("POLARTENSOR_ENCODE_GLUON_STAGE", True, "codes and radii staged in "
                    "shared memory, stored by row", "stored from the accumulator layout")


def gluon_encode_halves_setting() -> bool:
    """POLARTENSOR_ENCODE_GLUON_HALVES=1 (read per call; opt-in, measured slower): one tile an
    iteration, its rotation in two column halves (S's rows in ``half_order``, four blocks a
    half), each half's [rows, 64] accumulator quantized while the other half's MMAs run,
    the codes and radii staged (it needs POLARTENSOR_ENCODE_GLUON_STAGE=1, the default).
    Two 32-register accumulators in flight instead of two 64-register ones: 168 registers
    offline (Triton 3.6) against 255, and 1301 loop instructions a tile against 1126. S's
    64 KB still hold 64-row programs at two an SM, so the registers were meant to pay off with
    POLARTENSOR_ENCODE_GLUON_GROUPS=3 (three warpgroups sharing S: 12 warps an SM where the
    two-tile loop holds 8; Nsight Compute found that loop latency-bound at 1.74 warps a
    scheduler, results/bench/ncu_gluon_encode_2026-12-07b_h100.md). On an H100, byte-equal
    to the default: 0.98x it at 64 rows, 0.94x at 128, 0.86x with three groups, which stall
    on "no instruction" (each partition is its own copy of the loop;
    results/bench/ncu_gluon_encode_2026-12-07c_h100.md)."""
    return env_flag("POLARTENSOR_ENCODE_GLUON_HALVES", False, "one tile an iteration in two "
                    "column halves", "two tiles an iteration")


def gluon_encode_groups_setting() -> int:
    """POLARTENSOR_ENCODE_GLUON_GROUPS (read per call; with HALVES only): warpgroups a
    program, 1 (the default) or 3 (a warp-specialized program of 12 warps, one an SM, each
    warpgroup its own tiles and x ring, S's copy shared; 64-row tiles, 2 buffers)."""
    return int(env_choice("POLARTENSOR_ENCODE_GLUON_GROUPS", ("1", "3")))


def half_order(d: int = 128) -> torch.Tensor:
    """[d] int64: the coordinate that output column c computes with HALVES (S's rows in this
    order): each column half of 64 is ``encode.mma_order(64)`` over four whole blocks, so a
    [rows, 64] accumulator's thread holds whole 16-coordinate blocks."""
    half = mma_order(d // 2)
    return torch.cat([half, half + d // 2])


def gluon_encode_applies(x3: torch.Tensor, config, d: int, radii: torch.Tensor,
                         codes: torch.Tensor) -> bool:
    """Whether the Gluon encode serves this call (its module docstring's scope), with the
    record layout it writes: level 1 at byte 0, levels 2-4 after it, no tail."""
    bits = tuple(config.bits)
    if not (x3.is_cuda and torch.cuda.get_device_capability(x3.device) == (9, 0)
            and x3.dtype == torch.bfloat16 and d == 128 and config.levels == 4
            and bits[0] in (2, 4) and all(b == 2 for b in bits[1:])
            and radii.dtype in (torch.float16, torch.bfloat16) and rows_tma_ready(x3)
            and codes.stride(-1) == 1 and radii.stride(-1) == 1 and records_aligned16(codes)
            and max(codes.stride(0) * codes.shape[0], radii.stride(0) * radii.shape[0])
            < 2**31):
        return False
    w = level_words(config, d)
    pos = [w[f"LV{i}"] >> 8 for i in range(4)]
    return pos == [0, 8 * bits[0], 8 * bits[0] + 8, 8 * bits[0] + 12] and w["TAIL_NB"] == 0


def gluon_encode_launch() -> tuple[int, int, int]:
    """(rows per tile, x buffers, programs per SM) from POLARTENSOR_ENCODE_GLUON_TILE, _BUFS
    and _PER_SM (read per call, each checked)."""
    bn = int(env_choice("POLARTENSOR_ENCODE_GLUON_TILE", _TILES))
    bufs = int(env_choice("POLARTENSOR_ENCODE_GLUON_BUFS", _BUFS))
    per_sm = env_choice("POLARTENSOR_ENCODE_GLUON_PER_SM", _PER_SM)
    groups = gluon_encode_groups_setting()
    per_sm = ((2 if bn == 64 and bufs == 2 and groups == 1 else 1) if per_sm == "auto"
              else int(per_sm))
    halves = gluon_encode_halves_setting()
    if halves and not gluon_encode_stage_setting():
        raise ValueError("POLARTENSOR_ENCODE_GLUON_HALVES=1 with POLARTENSOR_ENCODE_GLUON_STAGE"
                         "=0: the column halves stage their codes (a record's level-4 word "
                         "takes a byte from each half); use the staged stores (STAGE=1, the "
                         "default) or HALVES=0")
    if groups == 3 and not (halves and bn == 64 and bufs == 2 and per_sm == 1):
        raise ValueError("POLARTENSOR_ENCODE_GLUON_GROUPS=3 runs three 64-row warpgroups with "
                         "two x buffers each, one program an SM, with the column halves: set "
                         "POLARTENSOR_ENCODE_GLUON_HALVES=1, _TILE=64, _BUFS=2 and _PER_SM=1")
    if per_sm == 2 and bn == 128:
        raise ValueError("POLARTENSOR_ENCODE_GLUON_PER_SM=2 with 128-row tiles: two 8-warp "
                         "programs at 255 registers do not fit an SM; use 64-row tiles "
                         "(POLARTENSOR_ENCODE_GLUON_TILE=64) or one per SM")
    if per_sm == 2 and bufs == 3 and gluon_encode_stage_setting():
        raise ValueError("POLARTENSOR_ENCODE_GLUON_STAGE=1 (the default) with 3 buffers at "
                         "two programs per SM: the staging's 10 KB take a program past half "
                         "an SM's shared memory; use 2 buffers (POLARTENSOR_ENCODE_GLUON_BUFS=2"
                         "), one program per SM (POLARTENSOR_ENCODE_GLUON_PER_SM=1) or the "
                         "unstaged stores (POLARTENSOR_ENCODE_GLUON_STAGE=0)")
    return bn, bufs, per_sm


def encode_into_gluon(x3: torch.Tensor, rot_bf16x2: torch.Tensor, tables: torch.Tensor,
                      c3: torch.Tensor, r3: torch.Tensor, config, n_rows: int) -> None:
    """Launch the Gluon encode: x3 [lead, T, 128] bfloat16, rot_bf16x2 [2, 128, 128] (S's
    bfloat16 parts, rows in mma_order), tables ``encode.cross_table``'s [8, K + 1] (uniform
    level 1), c3 / r3 the [lead, T, bytes] codes and [lead, T, 8] radii views. The caller
    checked ``gluon_encode_applies``."""
    d, t = 128, x3.shape[1]
    bn, bufs, per_sm = gluon_encode_launch()
    halves = gluon_encode_halves_setting()
    x_layout = gl.NVMMASharedLayout.get_default_for([bn, d], gl.bfloat16)
    x_desc = TensorDescriptor(x3, [n_rows, d], [x3.stride(1), 1], [bn, d], x_layout)
    if halves:
        # S's rows from mma_order to half_order (cached with the split rotation)
        s2 = _cached("rot_bf16x2_halves", rot_bf16x2, None, lambda: rot_bf16x2[
            :, torch.argsort(mma_order(d))[half_order(d)].to(rot_bf16x2.device)]
            .reshape(2 * d, d).contiguous())
        s_rows = d // 2
    else:
        s2, s_rows = rot_bf16x2.reshape(2 * d, d), d
    s_layout = gl.NVMMASharedLayout.get_default_for([s_rows, d], gl.bfloat16)
    s_desc = TensorDescriptor(s2, [2 * d, d], [d, 1], [s_rows, d], s_layout)
    groups = gluon_encode_groups_setting()
    # (with 3 groups a program runs three tile streams)
    grid = (min(triton.cdiv(triton.cdiv(n_rows, bn), groups), per_sm * _sm_count(x3.device)),)
    polar_encode_gluon_fwd_kernel[grid](
        x_desc, s_desc, tables,
        c3, c3.stride(0), c3.stride(1),
        r3, r3.stride(0), r3.stride(1),
        n_rows, t,
        BN=bn, NBUF=bufs, B1=config.bits[0], KT1=tables.shape[1],
        WRAP1=t >= bn or t == n_rows, STAGE=gluon_encode_stage_setting(), HALVES=halves,
        GROUPS=groups, num_warps=bn // 16,
    )
