"""Decode attention whose tree decode writes the tensor-core operands in registers (Gluon).

The Triton kernel (``decode_attention``) decodes a [keys, D] tile in a layout of Triton's
choosing and moves it through shared memory into the MMA's operand layout: on the H200 that
traffic and its bank conflicts were ~half of the L1 pipe's wavefronts (results/bench/
ncu_decode.md). Here every layout is explicit, and the coordinates of the rotated domain are
relabelled (a permutation, undone for the query on the host and for the output at the
partial store) so that each thread's MMA operand registers hold whole 16-coordinate blocks
of the polar tree:

* ``S = Q K^T`` (``mma.sync`` m16n8k16, K^T as the B operand): a thread holds, for key
  ``lane // 4`` of each 8-key tile, the 32 operand coordinates ``16 t + 8 h + 2 (lane % 4) +
  e``. Those are blocks ``2 (lane % 4)`` and ``2 (lane % 4) + 1`` of the key, e being the
  level-1 (cos, sin) half, h level 2 and t levels 3-4 and the block's low bit.
* ``O = P V`` (V as the B operand): a thread holds keys ``2 (lane % 4) + {0, 1, 8, 9}`` of
  each 16-key tile at operand columns ``lane // 4 + 8 u``: block ``lane // 4`` whole, u
  being the coordinate inside the block.

So a thread decodes whole trees (radius, then one packed bf16x2 multiply per node, the
tables read by warp shuffles) straight into its operand registers: no shared memory in the
loop. One warp per program (the softmax state stays in the warp); the split partials go to
the Triton combine kernel, which un-rotates.

The arithmetic is the Triton kernel's packed decode (``tree_decode``: radius rounded to
bfloat16, one ``mul.rn.bf16x2`` per level), so the decoded keys and values are the same
bfloat16 numbers, except where levels 3 and 2 are folded into one table
(``gluon_fold_setting``; by default with the staged ring), which rounds them otherwise.
Scope: decode (one query row per head, group <= 16), bfloat16 queries, head_dim 128, four
levels over 16-coordinate blocks with 2-bit upper levels and a 2- to 4-bit level 1 (the
paper preset: 8 radii per vector), no mask, no full-precision tail. ``launch_attention``
takes it by default from 2^20 batch x KV heads x keys, or 2^19 with the transposed step
over at least 16 batch x KV heads (``gluon_decode_auto``, measured). CUDA only: Gluon has
no interpreter.

For groups of at most 8, by default (``gluon_transposed_setting``), both products are
transposed (S^T = K Q^T, O^T = V^T P^T), so that the MMAs' 16 rows carry keys and
coordinates rather than a group padded to 16 (``_attn_step`` with TRANS): K and V as A
operands hold the coordinates they hold as B operands, so the tree decode is the same.

The loop's other settings, each read per call and each measured (the settings' docstrings):
where transposed (over at least ``STAGED_MIN_HEADS`` (batch, KV head) pairs), each step's
codes and radii staged in shared memory by ``cp.async``
three steps ahead (``gluon_staged_setting``: no registers hold them, so 12 programs fit an
SM; the only shared memory the kernel has), elsewhere the next step's codes prefetched in
registers (``gluon_prefetch_setting``); K's code words per block pair
(``gluon_kpairs_setting``), shifted tables for 2-bit code pairs (``gluon_lshift_setting``),
levels 3 and 2 in one shuffle per level-2 node with the ring (``gluon_fold_setting``),
two steps an iteration where not transposed (``gluon_pairs_setting``); opt-in, measured
slower, the prefetch half a step ahead (``gluon_stagger_setting``). Nsight Compute at the
target shape with the register prefetch (results/bench/ncu_gluon_2026-12-06_h100.md):
latency-bound at the two warps per scheduler that its registers allow, no pipe near its
limit. The staged ring, 1.06-1.17x faster on an H100, profiled there
(results/bench/ncu_gluon_2026-12-07b_h100.md): load stalls gone, the LSU pipe (the table
shuffles and the ring's reads) at 64-68% of its peak is the limit.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from .common import env_flag
from .gluon_compat import cp_async as _cp_async
from .gluon_compat import cta_barrier as _cta_barrier
from .tree_decode import _lane_table_asm

__all__ = ["polar_decode_attn_gluon_fwd_kernel", "launch_attention_gluon",
           "gluon_decode_supported", "gluon_decode_auto", "gluon_decode_setting",
           "takes_gluon_decode", "gluon_prefetch_setting", "gluon_transposed_setting",
           "gluon_pairs_setting", "gluon_kpairs_setting", "gluon_lshift_setting",
           "gluon_stagger_setting", "gluon_staged_setting", "gluon_fold_setting",
           "fold_table", "staged_fits",
           "gluon_split_count",
           "programs_per_sm", "tile_layouts", "k_permutation", "v_permutation"]

_LOG2E = 1.4426950408889634


# The decoded tile [key, blk2, blk1, blk0, i3, i2, i1, i0] (block bits, then the coordinate's
# bits inside the block: level 4's split first) is permuted to these dim orders, then read as
# [key, operand column]. K: column kappa = i0 | blk1 << 1 | blk2 << 2 | i1 << 3 | i2 << 4 |
# i3 << 5 | blk0 << 6, the B operand's k index of S = Q K^T. V: column nu = blk + 8 i, the B
# operand's n index of O = P V.
_K_ORDER = gl.constexpr((0, 3, 4, 5, 6, 1, 2, 7))
_V_ORDER = gl.constexpr((0, 4, 5, 6, 7, 1, 2, 3))


def _operand_coords(order) -> torch.Tensor:
    """coordinate[column] for a tile permuted to ``order`` (the key dim left out)."""
    c = torch.arange(128).reshape(2, 2, 2, 2, 2, 2, 2)
    return c.permute(*[o - 1 for o in order[1:]]).reshape(128)


def k_permutation() -> torch.Tensor:
    """coordinate[kappa] for the K operand's column kappa (head_dim 128)."""
    return _operand_coords(_K_ORDER.value)


def v_permutation() -> torch.Tensor:
    """coordinate[nu] for the V operand's column nu (head_dim 128)."""
    return _operand_coords(_V_ORDER.value)


@gluon.jit
def _lane_word(base, like, N: gl.constexpr):
    """Word (lane id mod N) of the 32-bit table at ``base`` in every element of ``like``'s
    shape (one load per thread: the asm is pure with one operand for every element)."""
    zero = gl.zeros_like(like)
    return gl.inline_asm_elementwise(_lane_table_asm(N), "=r,l", [base + zero],
                                     dtype=gl.int32, is_pure=True, pack=1)


@triton.constexpr_function
def _shifted_lane_table_asm(n, s):
    """PTX: lane l reads 32-bit word (l >> s) mod n of the table at $1."""
    return ("{ .reg .u32 l; .reg .u64 a; mov.u32 l, %laneid; shr.u32 l, l, " + str(s)
            + "; and.b32 l, l, " + str(n - 1)
            + "; mad.wide.u32 a, l, 4, $1; ld.global.nc.b32 $0, [a]; }")


@gluon.jit
def _lane_word_shifted(base, like, N: gl.constexpr, S: gl.constexpr):
    """``_lane_word`` read at lane bits S and up: word ((lane id >> S) mod N), so that a
    shuffle indexed by a code word reads the code at bit S of it (bits S to S + log2 N
    must lie in the 5 that a shuffle's index keeps)."""
    zero = gl.zeros_like(like)
    return gl.inline_asm_elementwise(_shifted_lane_table_asm(N, S), "=r,l", [base + zero],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _tables(base, like, B: gl.constexpr):
    """For ``like`` = join(w, w): the table at lane bits 0 for the first and at lane bits B
    for the second (LSHIFT, where a code pair fits the shuffle's 5 index bits), so that one
    word serves both codes unshifted."""
    a, b = gl.split(like)
    return gl.join(_lane_word(base, a, 1 << B), _lane_word_shifted(base, b, 1 << B, B))


@gluon.jit
def _shfl(t, i):
    return gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 31, 0xffffffff;",
                                     "=r,r,r", [t, i], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _bits_0_1_of(a, b):
    """Bits 0-1 of a, the rest of b: one lop3 (written out: ptxas had split (a & 3) | (b &
    ~3) into a bit-field extract and the select)."""
    return gl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 3, 0xE4;", "=r,r,r", [a, b],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _children_f32(r, w):
    """(r cos, r sin) in bfloat16 from float32 r and the packed bf16x2 (cos, sin) word w."""
    lo, hi = gl.inline_asm_elementwise(
        "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $2, $2; mul.rn.bf16x2 t, t, $3; "
        "mov.b32 {$0, $1}, t; }",
        "=h,=h,r,r", [r, w], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
    return gl.join(lo, hi)


@gluon.jit
def _children(r, w):
    """(r cos, r sin) in bfloat16 from bfloat16 r: one mul.rn.bf16x2."""
    lo, hi = gl.inline_asm_elementwise(
        "{ .reg .b32 t; mov.b32 t, {$2, $2}; mul.rn.bf16x2 t, t, $3; mov.b32 {$0, $1}, t; }",
        "=h,=h,h,r", [r, w], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
    return gl.join(lo, hi)


@gluon.jit
def _ld16(ptr, ZEXT: gl.constexpr, SMEM: gl.constexpr = False):
    if SMEM:
        # ``ptr`` a shared-window byte address (the staged ring): zero-extended by the load.
        # Not pure, so that the compiler keeps it after the ring's wait and barrier
        return gl.inline_asm_elementwise("ld.shared.u16 $0, [$1];", "=r,r", [ptr],
                                         dtype=gl.int32, is_pure=False, pack=1)
    elif ZEXT:
        # zero-extended into a 32-bit register by the load itself (a gl.load of uint16 and
        # its conversion compile to a load and a LOP3 & 0xffff where the value crosses the
        # prefetch loop's back edge)
        return gl.inline_asm_elementwise("ld.global.nc.u16 $0, [$1];", "=r,l", [ptr],
                                         dtype=gl.int32, is_pure=True, pack=1)
    else:
        return gl.load(ptr.to(gl.pointer_type(gl.uint16), bitcast=True)).to(gl.int32)


@gluon.jit
def _ld_radius(radp, SMEM: gl.constexpr):
    """A float16 radius from global memory, or (SMEM) from a shared-window byte address."""
    if SMEM:
        return gl.inline_asm_elementwise("ld.shared.b16 $0, [$1];", "=h,r", [radp],
                                         dtype=gl.float16, is_pure=False, pack=1)
    else:
        return gl.load(radp)


@gluon.jit
def _load_codes(rowp, radp, valid, MASKED: gl.constexpr, B1: gl.constexpr,
                B2: gl.constexpr, B3: gl.constexpr, B4: gl.constexpr, blk,
                RAW: gl.constexpr = False, SMEM: gl.constexpr = False):
    """The radii and the code words of every (key, block) of a [BN, 8] tile, for
    ``_code_words``: ``rowp`` [BN, 1] points at each key's record, ``radp`` [BN, 8] at its
    radii (0 where not ``valid`` with ``MASKED``). Record (head_dim 128, four levels): level
    1 at bit 0 (8 codes of B1 bits per block), level 2 after it (4 per block), then 3 (2) and
    4 (1). Issued apart from the tree so that a step's K and V loads all go out before its
    first use of them.

    Default: float32 radii and the words shifted into place here. RAW (the PAIRS loop): the
    float16 radii and 16-bit words as loaded (zero-extended by the load) with each word's
    bit offset, shifted and converted where they are used, so that what crosses the loop's
    back edge is the loads' own registers. SMEM (the staged ring): ``rowp`` and ``radp`` are
    shared-window byte addresses of the same records and radii."""
    OFF2: gl.constexpr = 64 * B1
    OFF3: gl.constexpr = OFF2 + 32 * B2
    OFF4: gl.constexpr = OFF3 + 16 * B3
    bit4 = OFF4 + blk * B4
    bit3 = OFF3 + blk * (2 * B3)
    bit2 = OFF2 + blk * (4 * B2)
    if RAW:
        r = _ld_radius(radp, SMEM)
        if MASKED:
            r = gl.where(valid, r, 0.0)
        w4 = _ld16(rowp + (bit4 >> 4) * 2, True, SMEM)
        w3 = _ld16(rowp + (bit3 >> 4) * 2, True, SMEM)
        w2 = _ld16(rowp + (bit2 >> 4) * 2, True, SMEM)
        # level 1: one 16-bit word per half block (B1 4), else B1 * 8 <= 24 bits inside the
        # two 16-bit words from the first
        bit1 = blk * (8 * B1)
        p1 = rowp + (bit1 >> 4) * 2
        return (r, w4, bit4 & 15, w3, bit3 & 15, w2, bit2 & 15, _ld16(p1, True, SMEM),
                _ld16(p1 + 2, True, SMEM), bit1 & 15)
    else:
        r = _ld_radius(radp, SMEM).to(gl.float32)
        if MASKED:
            r = gl.where(valid, r, 0.0)
        w4 = _ld16(rowp + (bit4 >> 4) * 2, False, SMEM) >> (bit4 & 15)
        w3 = _ld16(rowp + (bit3 >> 4) * 2, False, SMEM) >> (bit3 & 15)
        w2 = _ld16(rowp + (bit2 >> 4) * 2, False, SMEM) >> (bit2 & 15)
        if B1 == 4:
            # one 16-bit word per half block
            p1 = rowp + blk * 4
            w1a = _ld16(p1, False, SMEM)
            w1b = _ld16(p1 + 2, False, SMEM)
        else:
            # B1 * 8 <= 24 bits inside the two 16-bit words from the first
            bit1 = blk * (8 * B1)
            p1 = rowp + (bit1 >> 4) * 2
            w1a = ((_ld16(p1, False, SMEM) | (_ld16(p1 + 2, False, SMEM) << 16))
                   >> (bit1 & 15))
            w1b = w1a >> (4 * B1)
        return r, w4, w3, w2, w1a, w1b


@gluon.jit
def _pair_join(a, b, like):
    """[BN, 4] block-pair words a (even block) and b (odd block) -> [BN, 8] in ``like``'s
    layout (the K tile's: a block pair's two blocks in one thread's registers, so this moves
    nothing)."""
    BN: gl.constexpr = a.shape[0]
    t = gl.reshape(gl.join(a, b), [BN, 8])
    return gl.convert_layout(t, like.type.layout, assert_trivial=True)


@gluon.jit
def _load_codes_kpairs(rowp, radp, valid, MASKED: gl.constexpr, B1: gl.constexpr,
                       B2: gl.constexpr, B3: gl.constexpr, B4: gl.constexpr, blk, pair,
                       RAW: gl.constexpr = False, SMEM: gl.constexpr = False):
    """``_load_codes`` for the K tile, whose threads hold blocks 2j and 2j + 1 of a key: the
    upper levels' codes of a block pair share one 16-bit word (level 2: 16 bits a pair,
    level 3: 8, level 4: 4) and level 1 fills B1 (3 or 4) consecutive words, so each word
    is addressed and shifted once per pair (``rowp`` [BN, 1] and ``pair`` [1, 4] in the
    [BN, 4] pair layout), the odd block's codes then one shift on. (The loads themselves
    were already one per word: the compiler merges those of equal addresses.) Returns
    ``_load_codes``' tuple with the upper levels' words as [BN, 4] (``_pair_words`` expands
    them at use) and level 1 as [BN, 8]. SMEM as ``_load_codes``'."""
    OFF2: gl.constexpr = 64 * B1
    OFF3: gl.constexpr = OFF2 + 32 * B2
    OFF4: gl.constexpr = OFF3 + 16 * B3
    bit4 = OFF4 + pair * (2 * B4)
    bit3 = OFF3 + pair * (4 * B3)
    bit2 = OFF2 + pair * (8 * B2)
    r = _ld_radius(radp, SMEM)
    if MASKED:
        r = gl.where(valid, r, 0.0)
    w4 = _ld16(rowp + (bit4 >> 4) * 2, RAW, SMEM)
    w3 = _ld16(rowp + (bit3 >> 4) * 2, RAW, SMEM)
    w2 = _ld16(rowp + (bit2 >> 4) * 2, RAW, SMEM)
    # level 1: the pair's 16 B1 bits from word 0; the odd block's from bit 8 B1
    p1 = rowp + pair * (2 * B1)
    x0 = _ld16(p1, RAW, SMEM)
    x1 = _ld16(p1 + 2, RAW, SMEM)
    x2 = _ld16(p1 + 4, RAW, SMEM)
    if B1 == 4:
        x3 = _ld16(p1 + 6, RAW, SMEM)
        w1a = _pair_join(x0, x2, r)
        w1b = _pair_join(x1, x3, r)
    else:
        # the odd block from word 1, at bit 8 B1 - 16 (s1); B1 2 reads x2 only as filler
        w1a = _pair_join(x0, x1, r)
        w1b = _pair_join(x1, x2, r)
    s1 = (blk & 1) * ((8 * B1) % 16)
    if RAW:
        return (r, w4, bit4 & 15, w3, bit3 & 15, w2, bit2 & 15, w1a, w1b, s1)
    else:
        r = r.to(gl.float32)
        if B1 != 4:
            w1a = (w1a | (w1b << 16)) >> s1
            w1b = w1a >> (4 * B1)
        return r, w4 >> (bit4 & 15), w3 >> (bit3 & 15), w2 >> (bit2 & 15), w1a, w1b


@gluon.jit
def _pair_words(w4, w3, w2, like, B2: gl.constexpr, B3: gl.constexpr, B4: gl.constexpr):
    """The K tile's [BN, 4] upper-level pair words (shifted into place) -> [BN, 8] per block:
    the odd block's codes follow the even block's."""
    return (_pair_join(w4, w4 >> B4, like), _pair_join(w3, w3 >> (2 * B3), like),
            _pair_join(w2, w2 >> (4 * B2), like))


@gluon.jit
def _code_words(raw, B1: gl.constexpr):
    """``_load_codes``' RAW loads -> float32 radii and the code words shifted into place."""
    r, w4, s4, w3, s3, w2, s2, w1a, w1b, s1 = raw
    if B1 != 4:
        w1a = (w1a | (w1b << 16)) >> s1
        w1b = w1a >> (4 * B1)
    return r.to(gl.float32), w4 >> s4, w3 >> s3, w2 >> s2, w1a, w1b


@gluon.jit
def _smem_base(like):
    """The shared-window address of the kernel's shared memory (``global_smem``, which Triton's
    PTX declares) in every element of ``like``'s shape. The staged ring is the kernel's only
    allocation, so it starts there: ``launch_attention_gluon`` checks the build's shared
    bytes against the ring's before it trusts that."""
    return gl.inline_asm_elementwise("mov.u32 $0, global_smem;", "=r,r", [gl.zeros_like(like)],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _stage_step(ring, slot, n0, ok, kc_h, kr_h, vc_h, vr_h, K_REC: gl.constexpr,
                V_REC: gl.constexpr, BN: gl.constexpr, K_PW: gl.constexpr,
                V_PW: gl.constexpr, RW: gl.constexpr):
    """The staged ring (STAGED): ``cp.async`` of the full step at key ``n0`` (nothing where
    not ``ok``: the copies write zeros) into ring slot ``slot``, laid out as 32-bit words
    [K records, K radii | V records, V radii] from 0 and from K_PW (each region a power of
    two, as shared-memory shapes are; the words between the regions zeros). A step's BN
    records are BN * REC contiguous bytes and its radii BN * 16 (the launch checks the
    strides and the 16-byte alignment, and BN * REC is a multiple of 16), so the slot is
    one copy of 16-byte chunks (one copy: two would take a barrier between them)."""
    KCN: gl.constexpr = BN * K_REC // 4
    VCN: gl.constexpr = BN * V_REC // 4
    cl: gl.constexpr = gl.BlockedLayout([4], [32], [1], [0])
    i32: gl.constexpr = gl.pointer_type(gl.int32)
    n64 = n0.to(gl.int64)
    kcp = (kc_h + n64 * K_REC).to(i32, bitcast=True)
    krp = (kr_h + n64 * 8).to(i32, bitcast=True)
    vcp = (vc_h + n64 * V_REC).to(i32, bitcast=True)
    vrp = (vr_h + n64 * 8).to(i32, bitcast=True)
    i = gl.arange(0, K_PW + V_PW, layout=cl)
    j = i - K_PW
    src = gl.where(i < K_PW, gl.where(i < KCN, kcp + i, krp + (i - KCN)),
                   gl.where(j < VCN, vcp + j, vrp + (j - VCN)))
    live = (i < KCN + RW) | ((j >= 0) & (j < VCN + RW))
    _cp_async(ring.index(slot), src, mask=live & ok)


@gluon.jit
def _load_k(n0, kc_h, kr_h, skc_n, skr_n, koff, kroff, kok, kblk, K_B1: gl.constexpr,
            K_B2: gl.constexpr, K_B3: gl.constexpr, K_B4: gl.constexpr, RAW: gl.constexpr,
            KPAIR: gl.constexpr, kpair):
    """The K loads of the full step at key ``n0`` (``_load_step``)."""
    n64 = n0.to(gl.int64)
    if KPAIR:
        return _load_codes_kpairs((kc_h + n64 * skc_n) + koff, (kr_h + n64 * skr_n) + kroff,
                                  kok, False, K_B1, K_B2, K_B3, K_B4, kblk, kpair, RAW)
    else:
        return _load_codes((kc_h + n64 * skc_n) + koff, (kr_h + n64 * skr_n) + kroff, kok,
                           False, K_B1, K_B2, K_B3, K_B4, kblk, RAW)


@gluon.jit
def _load_v(n0, vc_h, vr_h, svc_n, svr_n, voff, vroff, vok, vblk, V_B1: gl.constexpr,
            V_B2: gl.constexpr, V_B3: gl.constexpr, V_B4: gl.constexpr, RAW: gl.constexpr):
    """The V loads of the full step at key ``n0`` (``_load_step``)."""
    n64 = n0.to(gl.int64)
    return _load_codes((vc_h + n64 * svc_n) + voff, (vr_h + n64 * svr_n) + vroff, vok, False,
                       V_B1, V_B2, V_B3, V_B4, vblk, RAW)


@gluon.jit
def _load_step(n0, kc_h, kr_h, vc_h, vr_h, skc_n, skr_n, svc_n, svr_n, koff, kroff, voff,
               vroff, kok, vok, kblk, vblk, K_B1: gl.constexpr, K_B2: gl.constexpr,
               K_B3: gl.constexpr, K_B4: gl.constexpr, V_B1: gl.constexpr,
               V_B2: gl.constexpr, V_B3: gl.constexpr, V_B4: gl.constexpr,
               RAW: gl.constexpr = False, KPAIR: gl.constexpr = False, kpair=None):
    """The K and V loads (``_load_codes``; KPAIR: K's by ``_load_codes_kpairs``, ``koff``
    and ``kpair`` in its pair layout) of the full step at key ``n0``: the per-head bases
    moved by n0 (64-bit scalars) plus the loop-invariant 32-bit offsets."""
    kraw = _load_k(n0, kc_h, kr_h, skc_n, skr_n, koff, kroff, kok, kblk, K_B1, K_B2, K_B3,
                   K_B4, RAW, KPAIR, kpair)
    vraw = _load_v(n0, vc_h, vr_h, svc_n, svr_n, voff, vroff, vok, vblk, V_B1, V_B2, V_B3,
                   V_B4, RAW)
    return kraw, vraw


@gluon.jit
def _level(n, w, base, B: gl.constexpr, LSHIFT: gl.constexpr):
    """One level of the trees: n's children from the code pairs in w (the first code at bit
    0, the second at bit B). LSHIFT (bit 0, see ``_decode_trees``) where 2 B <= 5: the
    second read unshifted through the table at lane bits B (``_tables``)."""
    if LSHIFT % 2 == 1 and 2 * B <= 5:
        c = gl.join(w, w)
        t = _tables(base, c, B)
    else:
        c = gl.join(w, w >> B)
        t = _lane_word(base, c, 1 << B)
    return _children(n, _shfl(t, c))


@gluon.jit
def _decode_trees(r, w4, w3, w2, w1a, w1b, trig_ptr, KT: gl.constexpr, B1: gl.constexpr,
                  B2: gl.constexpr, B3: gl.constexpr, B4: gl.constexpr,
                  LSHIFT: gl.constexpr = False):
    """[BN, 8] (key, block) radii and code words (``_code_words``) -> [BN, 8, 2, 2, 2, 2]
    bfloat16 decoded blocks (levels 4 to 1 as the minor dims), each tree inside one
    thread. LSHIFT is a bit set: 1, shifted tables (``_level``); 2, levels 3 and 2 folded
    (``fold_table``: 2-bit levels 3 and 2 only, the table after the trig table's plane 4)."""
    # planes of the trig table: [5, 4, KT], plane 2 the packed bf16x2 (cos, sin) words
    pk = trig_ptr + 2 * 4 * KT
    n = _children_f32(r, _shfl(_lane_word(pk + 3 * KT, w4, 1 << B4), w4))
    if LSHIFT // 2 == 1:
        # One shuffle per level-2 node (m, s) (level-3 node m, its side s) in place of one
        # per level-3 node and one per level-2 node: side s's table holds t_s(c3) (cos c2,
        # sin c2), t_0 = cos and t_1 = sin, read at lane bits 0-3 (bit 4 free): side 0's
        # with c2 at bits 0-1 and c3 at 2-3, side 1's the other way round, so that each
        # index is one bit select of words that already hold the codes there.
        fb = pk + 3 * 4 * KT
        x = gl.join(w2, w2 >> (2 * B2))     # [.., m]: c2 of (m, 0) at bits 0-1, (m, 1) at 2-3
        y = gl.join(w3 << 2, w3)            # c3_m at bits 2-3
        u = gl.join(w3, w3 >> 2)            # c3_m at bits 0-1
        idx = gl.join(_bits_0_1_of(x, y), _bits_0_1_of(u, x))
        t = gl.join(_lane_word(fb, x, 16), _lane_word(fb + 16, x, 16))
        n = _children(gl.join(n, n), _shfl(t, idx))
    else:
        n = _level(n, w3, pk + 2 * KT, B3, LSHIFT)
        n = _level(n, gl.join(w2, w2 >> (2 * B2)), pk + KT, B2, LSHIFT)
    w1 = gl.join(w1a, w1b)
    n = _level(n, gl.join(w1, w1 >> (2 * B1)), pk, B1, LSHIFT)
    return n


@gluon.jit
def _transpose8x8(p, BN: gl.constexpr):
    """Each 8 x 8 block of a bfloat16 [BN, 8] tile in the MMA accumulator layout (thread:
    row lane // 4 (+8 per register), columns 2 (lane % 4) + {0, 1}) transposed in registers
    by one ``movmatrix`` per block: the thread then holds that block's row 2 (lane % 4) +
    {0, 1} at column lane // 4, returned relabelled as [BN, 8] with rows and columns in
    place."""
    t = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r",
                                  [p], dtype=gl.bfloat16, is_pure=True, pack=2)
    # element (8 kb + i, j) of t holds p[8 kb + j, i]: swap i and j in the labels
    t = gl.reshape(t, [BN // 8, 8, 8])
    t = gl.permute(t, (0, 2, 1))
    return gl.reshape(t, [BN, 8])


@gluon.jit
def _operand_tile(raw, trig_ptr, ORDER: gl.constexpr, BN: gl.constexpr, KT: gl.constexpr,
                  B1: gl.constexpr, B2: gl.constexpr, B3: gl.constexpr, B4: gl.constexpr,
                  RAW: gl.constexpr, KPAIR: gl.constexpr = False,
                  LSHIFT: gl.constexpr = False):
    """A step's decoded K or V [BN, 128]: the trees of ``_load_codes``' words (KPAIR:
    ``_load_codes_kpairs``'), the tile [key, blk2, blk1, blk0, i3, i2, i1, i0] read in
    operand-column order (``ORDER``)."""
    if RAW:
        r, w4, w3, w2, w1a, w1b = _code_words(raw, B1)
    else:
        r, w4, w3, w2, w1a, w1b = raw
    if KPAIR:
        w4, w3, w2 = _pair_words(w4, w3, w2, r, B2, B3, B4)
    t = _decode_trees(r, w4, w3, w2, w1a, w1b, trig_ptr, KT, B1, B2, B3, B4, LSHIFT)
    t = gl.reshape(t, [BN, 2, 2, 2, 2, 2, 2, 2])
    return gl.reshape(gl.permute(t, ORDER.value), [BN, 128])


@gluon.jit
def _attn_step(TRANS: gl.constexpr, q, m_i, l_i, acc, kraw, vraw, sok, ktab_ptr, vtab_ptr,
               scale_log2, MASKED: gl.constexpr, BN: gl.constexpr,
               a_op: gl.constexpr, b_op: gl.constexpr, mma: gl.constexpr,
               K_KT: gl.constexpr, K_B1: gl.constexpr, K_B2: gl.constexpr,
               K_B3: gl.constexpr, K_B4: gl.constexpr, V_KT: gl.constexpr,
               V_B1: gl.constexpr, V_B2: gl.constexpr, V_B3: gl.constexpr,
               V_B4: gl.constexpr, RAW: gl.constexpr = False, KPAIR: gl.constexpr = False,
               LSHIFT: gl.constexpr = False):
    """One BN-key step of the online softmax, from the step's loaded K and V radii and code
    words (``_load_codes``, RAW as there).

    Default: S = Q K^T and O = P V with the group's query rows as the MMAs' 16 rows (K^T and
    V the B operands). TRANS (groups of at most 8): S^T = K Q^T and O^T = V^T P^T, the 16
    rows carrying keys and coordinates instead of a group padded to 16: half the MMAs and
    32 accumulator registers instead of 64. K and V as A operands hold the same coordinates
    per thread as they do as B operands, so the decode is the same; P^T reaches its B
    operand by two ``movmatrix`` transposes."""
    m_i, l_i, acc, p = _attn_scores(TRANS, q, m_i, l_i, acc, kraw, sok, ktab_ptr, scale_log2,
                                    MASKED, BN, a_op, b_op, mma, K_KT, K_B1, K_B2, K_B3, K_B4,
                                    RAW, KPAIR, LSHIFT)
    acc = _attn_values(TRANS, p, acc, vraw, vtab_ptr, BN, a_op, b_op, V_KT, V_B1, V_B2, V_B3,
                       V_B4, RAW, LSHIFT)
    return m_i, l_i, acc


@gluon.jit
def _attn_scores(TRANS: gl.constexpr, q, m_i, l_i, acc, kraw, sok, ktab_ptr, scale_log2,
                 MASKED: gl.constexpr, BN: gl.constexpr, a_op: gl.constexpr,
                 b_op: gl.constexpr, mma: gl.constexpr, K_KT: gl.constexpr,
                 K_B1: gl.constexpr, K_B2: gl.constexpr, K_B3: gl.constexpr,
                 K_B4: gl.constexpr, RAW: gl.constexpr, KPAIR: gl.constexpr,
                 LSHIFT: gl.constexpr):
    """``_attn_step``'s first half: the step's K decoded, the scores and the online softmax
    (the accumulator rescaled where the maximum moved); returns p for ``_attn_values``."""
    kt = _operand_tile(kraw, ktab_ptr, _K_ORDER, BN, K_KT, K_B1, K_B2, K_B3, K_B4, RAW, KPAIR,
                       LSHIFT)
    if TRANS:
        kt = gl.convert_layout(kt, a_op, assert_trivial=True)
        s = mma_v2(kt, q, gl.zeros([BN, 8], gl.float32, layout=mma)) * scale_log2
        if MASKED:
            s = gl.where(sok[:, None], s, float("-inf"))
    else:
        kt = gl.convert_layout(gl.permute(kt, (1, 0)), b_op, assert_trivial=True)
        s = mma_v2(q, kt, gl.zeros([16, BN], gl.float32, layout=mma)) * scale_log2
        if MASKED:
            s = gl.where(sok[None, :], s, float("-inf"))
    # The running maximum moves only when some query's grows by more than 8 (log2 units),
    # so the accumulator is rescaled in few steps. Against a stale maximum p stays <= 2^8:
    # far inside bfloat16's and float32's range, with the same relative rounding; the
    # partials carry the maximum they used, so the combine stays exact.
    # TRANS keeps l_i per key row too ([BN, 8], summed once at the end): the sum over keys
    # would otherwise take three shuffle rounds a step
    KEYS: gl.constexpr = 0 if TRANS else 1       # the axis of s that runs over keys
    m_cur = gl.max(s, KEYS)
    if gl.max(m_cur - m_i, 0) > 8.0:
        m_new = gl.maximum(m_i, m_cur)
        alpha = gl.exp2(m_i - m_new)
        if TRANS:
            l_i = l_i * gl.expand_dims(alpha, KEYS)
        else:
            l_i = l_i * alpha
        acc = acc * gl.expand_dims(alpha, KEYS)
        m_i = m_new
    p = gl.exp2(s - gl.expand_dims(m_i, KEYS))
    if TRANS:
        l_i = l_i + p
    else:
        l_i = l_i + gl.sum(p, KEYS)
    return m_i, l_i, acc, p


@gluon.jit
def _attn_values(TRANS: gl.constexpr, p, acc, vraw, vtab_ptr, BN: gl.constexpr,
                 a_op: gl.constexpr, b_op: gl.constexpr, V_KT: gl.constexpr,
                 V_B1: gl.constexpr, V_B2: gl.constexpr, V_B3: gl.constexpr,
                 V_B4: gl.constexpr, RAW: gl.constexpr, LSHIFT: gl.constexpr):
    """``_attn_step``'s second half: the step's V decoded and P V added to the accumulator."""
    vt = _operand_tile(vraw, vtab_ptr, _V_ORDER, BN, V_KT, V_B1, V_B2, V_B3, V_B4, RAW,
                       LSHIFT=LSHIFT)
    if TRANS:
        vt = gl.convert_layout(gl.permute(vt, (1, 0)), a_op, assert_trivial=True)
        pt = gl.convert_layout(_transpose8x8(p.to(gl.bfloat16), BN), b_op,
                              assert_trivial=True)
        acc = mma_v2(vt, pt, acc)
    else:
        vt = gl.convert_layout(vt, b_op, assert_trivial=True)
        acc = mma_v2(gl.convert_layout(p.to(gl.bfloat16), a_op), vt, acc)
    return acc


@gluon.jit
def polar_decode_attn_gluon_fwd_kernel(
    q_ptr, sq_b, sq_h,
    kc_ptr, skc_b, skc_h, skc_n, kr_ptr, skr_b, skr_h, skr_n, ktab_ptr,
    vc_ptr, svc_b, svc_h, svc_n, vr_ptr, svr_b, svr_h, svr_n, vtab_ptr,
    pacc_ptr, pml_ptr,
    Hk, N, kv_per_split, n_splits, scale_log2,
    GROUP: gl.constexpr, BN: gl.constexpr, k_lay: gl.constexpr, v_lay: gl.constexpr,
    kp_lay: gl.constexpr,
    K_KT: gl.constexpr, K_B1: gl.constexpr, K_B2: gl.constexpr, K_B3: gl.constexpr,
    K_B4: gl.constexpr,
    V_KT: gl.constexpr, V_B1: gl.constexpr, V_B2: gl.constexpr, V_B3: gl.constexpr,
    V_B4: gl.constexpr, PREFETCH: gl.constexpr = False, TRANS: gl.constexpr = False,
    PAIRS: gl.constexpr = False, KPAIR: gl.constexpr = False, LSHIFT: gl.constexpr = False,
    STAGGER: gl.constexpr = False, STAGED: gl.constexpr = False, NSTAGE: gl.constexpr = 4,
    K_REC: gl.constexpr = 0, V_REC: gl.constexpr = 0, K_PW: gl.constexpr = 0,
    V_PW: gl.constexpr = 0, RW: gl.constexpr = 0,
):
    # M: the query rows of the partials (TRANS: a group of at most 8 as the MMA's columns)
    M: gl.constexpr = 8 if TRANS else 16
    D: gl.constexpr = 128
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                  instr_shape=[16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)

    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = (pid_bh // Hk).to(gl.int64)
    hk = (pid_bh % Hk).to(gl.int64)

    # the query rows, rotated and permuted on the host (float32), as the A operand (TRANS:
    # transposed, as the B operand)
    if TRANS:
        qc = gl.arange(0, D, layout=gl.SliceLayout(1, b_op))
        qr = gl.arange(0, M, layout=gl.SliceLayout(0, b_op))
        q_row = b * sq_b + (hk * GROUP + qr.to(gl.int64)) * sq_h
        q = gl.load(q_ptr + q_row[None, :] + qc[:, None], mask=(qr < GROUP)[None, :],
                    other=0.0).to(gl.bfloat16)
    else:
        qr = gl.arange(0, M, layout=gl.SliceLayout(1, a_op))
        qc = gl.arange(0, D, layout=gl.SliceLayout(0, a_op))
        q_row = b * sq_b + (hk * GROUP + qr.to(gl.int64)) * sq_h
        q = gl.load(q_ptr + q_row[:, None] + qc[None, :], mask=(qr < GROUP)[:, None],
                    other=0.0).to(gl.bfloat16)

    start = split * kv_per_split
    end = gl.minimum(start + kv_per_split, N)
    full_end = start + ((end - start) // BN) * BN

    # TRANS: the queries are the MMA's columns, the accumulator O^T [D, M]
    q_dim: gl.constexpr = 0 if TRANS else 1
    m_i = gl.full([M], float("-inf"), gl.float32, layout=gl.SliceLayout(q_dim, mma))
    if TRANS:
        l_i = gl.zeros([BN, M], gl.float32, layout=mma)      # per key row (_attn_step)
        acc = gl.zeros([D, M], gl.float32, layout=mma)
    else:
        l_i = gl.zeros([M], gl.float32, layout=gl.SliceLayout(q_dim, mma))
        acc = gl.zeros([M, D], gl.float32, layout=mma)

    kkey = gl.arange(0, BN, layout=gl.SliceLayout(1, k_lay))[:, None]
    kblk = gl.arange(0, 8, layout=gl.SliceLayout(0, k_lay))[None, :]
    vkey = gl.arange(0, BN, layout=gl.SliceLayout(1, v_lay))[:, None]
    vblk = gl.arange(0, 8, layout=gl.SliceLayout(0, v_lay))[None, :]
    skey = gl.arange(0, BN, layout=gl.SliceLayout(1 - q_dim, mma))
    # per-head bases (64-bit), then pointers that step BN keys per iteration
    kc_h = kc_ptr + (b * skc_b + hk * skc_h)
    kr_h = kr_ptr + (b * skr_b + hk * skr_h)
    vc_h = vc_ptr + (b * svc_b + hk * svc_h)
    vr_h = vr_ptr + (b * svr_b + hk * svr_h)
    # loop-invariant 32-bit offsets of each key's record and radii inside a step
    # KPAIR: K's code words loaded per block pair ([BN, 4], _load_codes_kpairs)
    kpkey = gl.arange(0, BN, layout=gl.SliceLayout(1, kp_lay))[:, None]
    kpair = gl.arange(0, 4, layout=gl.SliceLayout(0, kp_lay))[None, :]
    if KPAIR:
        koff = kpkey * skc_n
    else:
        koff = kkey * skc_n
    kroff = kkey * skr_n + kblk
    voff = vkey * svc_n
    vroff = vkey * svr_n + vblk
    kok = kkey < BN
    vok = vkey < BN
    sok = skey < BN
    if PREFETCH:
        # the next step's loads go out before this step's trees (the last full step loads
        # itself again); the first load clamps its keys to the split (which may have no full
        # step)
        k1st = gl.minimum(start + kkey, end - 1).to(gl.int64)
        v1st = gl.minimum(start + vkey, end - 1).to(gl.int64)
        if KPAIR:
            kp1st = gl.minimum(start + kpkey, end - 1).to(gl.int64)
            kraw = _load_codes_kpairs(kc_h + kp1st * skc_n, kr_h + k1st * skr_n + kblk, kok,
                                      False, K_B1, K_B2, K_B3, K_B4, kblk, kpair, PAIRS)
        else:
            kraw = _load_codes(kc_h + k1st * skc_n, kr_h + k1st * skr_n + kblk, kok, False,
                               K_B1, K_B2, K_B3, K_B4, kblk, PAIRS)
        vraw = _load_codes(vc_h + v1st * svc_n, vr_h + v1st * svr_n + vblk, vok, False,
                           V_B1, V_B2, V_B3, V_B4, vblk, PAIRS)
        if STAGGER:
            # half a step ahead: a step's V loads go out before its K is decoded, the next
            # step's K loads once its K registers are free, so that one step's K and V are
            # held at a time, not two steps' (the last full step loads its K again)
            for n0 in range(start, full_end, BN):
                vraw = _load_v(n0, vc_h, vr_h, svc_n, svr_n, voff, vroff, vok, vblk, V_B1,
                               V_B2, V_B3, V_B4, False)
                m_i, l_i, acc, p = _attn_scores(TRANS, q, m_i, l_i, acc, kraw, sok, ktab_ptr,
                                                scale_log2, False, BN, a_op, b_op, mma, K_KT,
                                                K_B1, K_B2, K_B3, K_B4, False, KPAIR, LSHIFT)
                kraw = _load_k(gl.minimum(n0 + BN, full_end - BN), kc_h, kr_h, skc_n, skr_n,
                               koff, kroff, kok, kblk, K_B1, K_B2, K_B3, K_B4, False, KPAIR,
                               kpair)
                acc = _attn_values(TRANS, p, acc, vraw, vtab_ptr, BN, a_op, b_op, V_KT, V_B1,
                                   V_B2, V_B3, V_B4, False, LSHIFT)
        elif PAIRS:
            # two steps an iteration, the loads as loaded (RAW): the second step's loads go
            # where the first's registers were, so nothing is copied across the back edge
            # (one step an iteration with RAW loads took ~27 register moves a step)
            pair_end = start + ((full_end - start) // (2 * BN)) * (2 * BN)
            for n0 in range(start, pair_end, 2 * BN):
                ka, va = _load_step(n0 + BN, kc_h, kr_h, vc_h, vr_h, skc_n, skr_n, svc_n,
                                    svr_n, koff, kroff, voff, vroff, kok, vok, kblk, vblk,
                                    K_B1, K_B2, K_B3, K_B4, V_B1, V_B2, V_B3, V_B4, True,
                                    KPAIR=KPAIR, kpair=kpair)
                m_i, l_i, acc = _attn_step(TRANS, q, m_i, l_i, acc, kraw, vraw, sok, ktab_ptr,
                                           vtab_ptr, scale_log2, False, BN, a_op, b_op, mma,
                                           K_KT, K_B1, K_B2, K_B3, K_B4, V_KT, V_B1, V_B2,
                                           V_B3, V_B4, True, KPAIR=KPAIR, LSHIFT=LSHIFT)
                kraw, vraw = _load_step(gl.minimum(n0 + 2 * BN, full_end - BN), kc_h, kr_h,
                                        vc_h, vr_h, skc_n, skr_n, svc_n, svr_n, koff, kroff,
                                        voff, vroff, kok, vok, kblk, vblk, K_B1, K_B2, K_B3,
                                        K_B4, V_B1, V_B2, V_B3, V_B4, True,
                                        KPAIR=KPAIR, kpair=kpair)
                m_i, l_i, acc = _attn_step(TRANS, q, m_i, l_i, acc, ka, va, sok, ktab_ptr,
                                           vtab_ptr, scale_log2, False, BN, a_op, b_op, mma,
                                           K_KT, K_B1, K_B2, K_B3, K_B4, V_KT, V_B1, V_B2,
                                           V_B3, V_B4, True, KPAIR=KPAIR, LSHIFT=LSHIFT)
            if pair_end < full_end:
                # an odd full step left: the last iteration loaded it (or the first load)
                m_i, l_i, acc = _attn_step(TRANS, q, m_i, l_i, acc, kraw, vraw, sok, ktab_ptr,
                                           vtab_ptr, scale_log2, False, BN, a_op, b_op, mma,
                                           K_KT, K_B1, K_B2, K_B3, K_B4, V_KT, V_B1, V_B2,
                                           V_B3, V_B4, True, KPAIR=KPAIR, LSHIFT=LSHIFT)
        else:
            for n0 in range(start, full_end, BN):
                knext, vnext = _load_step(gl.minimum(n0 + BN, full_end - BN), kc_h, kr_h,
                                          vc_h, vr_h, skc_n, skr_n, svc_n, svr_n, koff, kroff,
                                          voff, vroff, kok, vok, kblk, vblk, K_B1, K_B2, K_B3,
                                          K_B4, V_B1, V_B2, V_B3, V_B4, KPAIR=KPAIR, kpair=kpair)
                m_i, l_i, acc = _attn_step(TRANS, q, m_i, l_i, acc, kraw, vraw, sok, ktab_ptr,
                                           vtab_ptr, scale_log2, False, BN, a_op, b_op, mma,
                                           K_KT, K_B1, K_B2, K_B3, K_B4, V_KT, V_B1, V_B2,
                                           V_B3, V_B4, KPAIR=KPAIR, LSHIFT=LSHIFT)
                kraw = knext
                vraw = vnext
    elif STAGED:
        # the full steps' codes and radii staged NSTAGE - 1 steps ahead by cp.async into a
        # ring in shared memory (no registers held for them) and read from there: a step
        # waits for its own copy group, then the barrier makes every lane's copies visible
        # and frees the slot the previous step read, which takes the next copy
        SW: gl.constexpr = K_PW + V_PW
        ring = gl.allocate_shared_memory(gl.int32, [NSTAGE, SW],
                                         gl.SwizzledSharedLayout(1, 1, 1, [0]))
        # each thread's byte addresses in slot 0
        if KPAIR:
            krec = _smem_base(koff) + kpkey * K_REC
        else:
            krec = _smem_base(koff) + kkey * K_REC
        krad = _smem_base(kroff) + (BN * K_REC + kkey * 16 + kblk * 2)
        vrec = _smem_base(voff) + (4 * K_PW + vkey * V_REC)
        vrad = _smem_base(vroff) + (4 * K_PW + BN * V_REC + vkey * 16 + vblk * 2)
        nsteps = (full_end - start) // BN
        for s in gl.static_range(NSTAGE - 1):
            _stage_step(ring, s, start + s * BN, s < nsteps, kc_h, kr_h, vc_h, vr_h, K_REC,
                        V_REC, BN, K_PW, V_PW, RW)
            async_copy.commit_group()
        for j in range(0, nsteps):
            async_copy.wait_group(NSTAGE - 2)
            _cta_barrier()
            jn = j + (NSTAGE - 1)
            _stage_step(ring, jn % NSTAGE, start + jn * BN, jn < nsteps, kc_h, kr_h, vc_h,
                        vr_h, K_REC, V_REC, BN, K_PW, V_PW, RW)
            async_copy.commit_group()
            so = (j % NSTAGE) * (4 * SW)
            if KPAIR:
                kraw = _load_codes_kpairs(krec + so, krad + so, kok, False, K_B1, K_B2, K_B3,
                                          K_B4, kblk, kpair, SMEM=True)
            else:
                kraw = _load_codes(krec + so, krad + so, kok, False, K_B1, K_B2, K_B3, K_B4,
                                   kblk, SMEM=True)
            vraw = _load_codes(vrec + so, vrad + so, vok, False, V_B1, V_B2, V_B3, V_B4, vblk,
                               SMEM=True)
            m_i, l_i, acc = _attn_step(TRANS, q, m_i, l_i, acc, kraw, vraw, sok, ktab_ptr,
                                       vtab_ptr, scale_log2, False, BN, a_op, b_op, mma,
                                       K_KT, K_B1, K_B2, K_B3, K_B4, V_KT, V_B1, V_B2, V_B3,
                                       V_B4, KPAIR=KPAIR, LSHIFT=LSHIFT)
        # the copies past the last step (zeros) land before the program ends
        async_copy.wait_group(0)
    else:
        for n0 in range(start, full_end, BN):
            kraw, vraw = _load_step(n0, kc_h, kr_h, vc_h, vr_h, skc_n, skr_n, svc_n, svr_n,
                                    koff, kroff, voff, vroff, kok, vok, kblk, vblk, K_B1, K_B2,
                                    K_B3, K_B4, V_B1, V_B2, V_B3, V_B4, KPAIR=KPAIR, kpair=kpair)
            m_i, l_i, acc = _attn_step(TRANS, q, m_i, l_i, acc, kraw, vraw, sok, ktab_ptr,
                                       vtab_ptr, scale_log2, False, BN, a_op, b_op, mma,
                                       K_KT, K_B1, K_B2, K_B3, K_B4, V_KT, V_B1, V_B2, V_B3,
                                       V_B4, KPAIR=KPAIR, LSHIFT=LSHIFT)
    if full_end < end:
        # the last, partial step: keys past the end read the last key and decode to zeros
        kpos = full_end + kkey
        vpos = full_end + vkey
        kok = kpos < end
        vok = vpos < end
        sok = full_end + skey < end
        kpc = gl.minimum(kpos, end - 1).to(gl.int64)
        vpc = gl.minimum(vpos, end - 1).to(gl.int64)
        if KPAIR:
            kppc = gl.minimum(full_end + kpkey, end - 1).to(gl.int64)
            kpart = _load_codes_kpairs(kc_h + kppc * skc_n, kr_h + kpc * skr_n + kblk, kok,
                                       True, K_B1, K_B2, K_B3, K_B4, kblk, kpair)
        else:
            kpart = _load_codes(kc_h + kpc * skc_n, kr_h + kpc * skr_n + kblk, kok, True,
                                K_B1, K_B2, K_B3, K_B4, kblk)
        vpart = _load_codes(vc_h + vpc * svc_n, vr_h + vpc * svr_n + vblk, vok, True, V_B1,
                           V_B2, V_B3, V_B4, vblk)
        m_i, l_i, acc = _attn_step(TRANS, q, m_i, l_i, acc, kpart, vpart, sok, ktab_ptr,
                                   vtab_ptr, scale_log2, True, BN, a_op, b_op, mma, K_KT,
                                   K_B1, K_B2, K_B3, K_B4, V_KT, V_B1, V_B2, V_B3, V_B4,
                                   KPAIR=KPAIR, LSHIFT=LSHIFT)

    # the partial result, columns back in coordinate order (c = 16 (nu % 8) + nu // 8:
    # v_permutation)
    rows = gl.arange(0, M, layout=gl.SliceLayout(q_dim, mma))
    cols = gl.arange(0, D, layout=gl.SliceLayout(1 - q_dim, mma))
    coord = 16 * (cols & 7) + (cols >> 3)
    # 16 rows a slot either way (the combine's tile); TRANS writes the first 8, and the
    # combine reads only the group's rows
    R: gl.constexpr = 16
    slot = pid_bh.to(gl.int64) * n_splits + split
    if TRANS:
        l_i = gl.sum(l_i, 0)
        gl.store(pacc_ptr + slot * (R * D) + rows[None, :] * D + coord[:, None], acc)
    else:
        gl.store(pacc_ptr + slot * (R * D) + rows[:, None] * D + coord[None, :], acc)
    gl.store(pml_ptr + slot * (2 * R) + rows, m_i)
    gl.store(pml_ptr + slot * (2 * R) + R + rows, l_i)


def gluon_decode_setting() -> bool | None:
    """POLARTENSOR_DECODE_GLUON (read per call): 1, decode through this kernel wherever
    ``gluon_decode_supported``; 0, never (the Triton kernel); unset (None), where it measured
    faster (``gluon_decode_auto``)."""
    if os.environ.get("POLARTENSOR_DECODE_GLUON") is None:
        return None
    return env_flag("POLARTENSOR_DECODE_GLUON", False, "the Gluon decode where it serves the "
                    "call", "the Triton kernel; unset: where measured faster")


def gluon_prefetch_setting() -> bool:
    """POLARTENSOR_GLUON_PREFETCH (read per call; default on): where the codes are not staged
    in shared memory (``gluon_staged_setting``), the Gluon decode loads step i+1's codes and
    radii before decoding step i, hiding their latency across steps (the
    first version stalled on them: results/bench/ncu_decode_2026-12-06_h100.md). Offline
    (scripts/gluon_offline_stats.py) 236 registers against 231 (still 8 one-warp programs
    per SM), 834 loop instructions against 752, and on an H100 4-6% faster at every shape
    the default sends here (0 = each step loads its own codes: results/bench/
    ab_gluon_decode_2026-12-06{d,e}_h100.md)."""
    return env_flag("POLARTENSOR_GLUON_PREFETCH", True, "prefetch the next step's codes",
                    "load each step's codes in that step")


def gluon_transposed_setting() -> bool:
    """POLARTENSOR_GLUON_TRANS (read per call; default on): groups of at most 8 queries take
    the transposed step (``_attn_step``, TRANS: S^T = K Q^T, O^T = V^T P^T, half the MMAs and
    half the accumulator). Offline (Triton 3.6, sm_90, 16 keys per step): 168 registers
    without the prefetch (12 one-warp programs per SM where the default's 231 fit 8) and 639
    loop instructions against 752; with the prefetch 222 registers and 714 against 834. On an
    H100, with the prefetch and 8 programs per SM, 1.12-1.25x faster than without it at every
    shape timed (results/bench/ab_gluon_decode_2026-12-06{f,g}_h100.md); 0 = the query rows
    as the MMA's rows (as groups over 8 always are)."""
    return env_flag("POLARTENSOR_GLUON_TRANS", True, "the transposed step for groups of "
                    "at most 8", "the query rows as the MMA's rows")


def gluon_pairs_setting() -> bool | None:
    """POLARTENSOR_GLUON_PAIRS (read per call): with the prefetch, two steps an iteration
    (PAIRS), the codes and radii kept as loaded (16-bit words zero-extended by the load
    itself) until the step that uses them, so that no register is copied across the loop's
    back edge; 1 everywhere, 0 never, unset (None) where measured faster: the step that is
    not transposed (groups over 8). Offline (Triton 3.6, sm_90, 16 keys a step,
    scripts/gluon_offline_stats.py): 654 loop instructions a step against 714 (transposed,
    255 registers against 222: still 8 programs per SM) and 780 against 834 (not
    transposed). On an H100 (results/bench/ab_gluon_decode_2026-12-06i_h100.md, group 4):
    transposed, 1.00-1.01x of one step an iteration, and with K pairs and shifted tables
    beside it 0.987-0.993x (so off there); not transposed, with K pairs and shifted
    tables, 1.053-1.077x of the former default (one step, per block) at the six shapes
    timed (the three apart not measured). Without the prefetch it changes nothing."""
    if os.environ.get("POLARTENSOR_GLUON_PAIRS") is None:
        return None
    return env_flag("POLARTENSOR_GLUON_PAIRS", False, "two steps an iteration with the "
                    "prefetch", "one step an iteration; unset: where measured faster")


def gluon_kpairs_setting() -> bool:
    """POLARTENSOR_GLUON_KPAIRS (read per call; default on): K's code words addressed and
    shifted once per block pair (``_load_codes_kpairs``: a K thread holds blocks 2j and
    2j + 1 of a key, whose upper levels share one 16-bit word). The same decoded words, so
    the same output bit for bit. Offline (Triton 3.6, sm_90, 16 keys a step, loop
    instructions a step): transposed with the prefetch 688 against 714 (228 registers
    against 222, still 8 programs per SM), 674 with the shifted tables too; the same 46
    loads a step (the compiler had already merged the loads of equal addresses). With the
    shifted tables, on an H100, 1.012-1.025x (transposed) at the six shapes timed
    (results/bench/ab_gluon_decode_2026-12-06i_h100.md); 0 = per block."""
    return env_flag("POLARTENSOR_GLUON_KPAIRS", True, "K's code words loaded per block "
                    "pair", "per block")


def gluon_lshift_setting() -> bool:
    """POLARTENSOR_GLUON_LSHIFT (read per call; default on): the second code of each pair of
    2-bit codes read through a table held at lane bits 2 (a shuffle keeps its index's low 5
    bits), not shifted down first (``_level``). The same table words, so the same output
    bit for bit. Offline 704 loop instructions a step against 714 (224 registers); measured
    together with K pairs (``gluon_kpairs_setting``); 0 = each code shifted to bit 0."""
    return env_flag("POLARTENSOR_GLUON_LSHIFT", True, "shifted tables for 2-bit code "
                    "pairs", "each code shifted to bit 0")


def gluon_fold_setting() -> bool | None:
    """POLARTENSOR_GLUON_FOLD (read per call): levels 3 and 2 of each tree in one shuffle
    per level-2 node (``_decode_trees``, ``fold_table``), 13 shuffles and 13 packed
    multiplies a block instead of 15 of each; 1 always (2-bit levels 2 and 3), 0 never,
    unset (None) where measured faster: with the staged ring. Offline (Triton 3.6, sm_90,
    the staged transposed step, 16 keys): 112 shuffles and 104 multiplies a step against
    128 and 120, for 592 loop instructions against 579 (the index of each node is one
    bit select). On an H100 (results/bench/ab_gluon_decode_2026-12-07{a,b}_h100_fold.md,
    against the same launch unfolded in one process) 1.039-1.058x at eight shapes and
    runs (batch 8 / 32K 0.1752 and 0.1754 ms against 0.1823 and 0.1822, 2.12x cuDNN).
    Not timed with the register prefetch, so off there unless asked. The decoded blocks
    round otherwise (t_s(c3) (cos c2, sin c2) rounded to bfloat16 once from float32,
    where the unfolded decode rounds t_s(c3), the level-3 node's value and then its
    product): per coordinate 3.70e-3 RMS relative error against the exact product where
    the unfolded decode has 4.20e-3 (emulated on the CPU with the paper tables:
    tests/kernels/test_decode_attention_gluon.py, ``fold_rounding_errors``), but no
    longer the Triton kernel's numbers bit for bit."""
    if os.environ.get("POLARTENSOR_GLUON_FOLD") is None:
        return None
    return env_flag("POLARTENSOR_GLUON_FOLD", False, "levels 3 and 2 folded into one "
                    "shuffle per level-2 node", "one shuffle per node of each level; unset: "
                    "with the staged ring")


def fold_table(trig: torch.Tensor) -> torch.Tensor:
    """The Gluon decode's table for ``fold``: planes 0-4 of ``trig`` ([5 (+ J), 4, KT]
    float32, ``common.trig_table``), then 32 words: at c2 | c3 << 2 and at 16 + (c3 | c2
    << 2), the bfloat16 pair (t cos c2, t sin c2) packed as plane 2 packs (cos low), t =
    cos c3 in the first 16 words and sin c3 in the second (c2, c3: 2-bit codes of levels
    2 and 3), each product rounded once from float32. Cached per table (``dispatch``'s
    table cache: by identity and version)."""
    from .dispatch import _cached

    return _cached("fold", trig, None, lambda: _fold_table(trig))


def _fold_table(trig: torch.Tensor) -> torch.Tensor:
    cos, sin = trig[0].float(), trig[1].float()
    t3 = torch.stack([cos[2, :4], sin[2, :4]])                   # [s, c3]
    lo = (t3[:, :, None] * cos[1, None, None, :4]).to(torch.bfloat16)   # [s, c3, c2]
    hi = (t3[:, :, None] * sin[1, None, None, :4]).to(torch.bfloat16)
    lo = lo.view(torch.int16).to(torch.int32) & 0xFFFF
    hi = hi.view(torch.int16).to(torch.int32) << 16
    words = (lo | hi)                                            # [s, c3, c2]
    words = torch.cat([words[0].reshape(16), words[1].t().reshape(16)]).view(torch.float32)
    return torch.cat([trig[:5].reshape(-1).float(), words]).contiguous()


def gluon_stagger_setting() -> bool:
    """POLARTENSOR_GLUON_STAGGER=1 (read per call; opt-in, measured slower): the prefetch
    half a step ahead instead of a whole step (a step's V loads issued before its K is
    decoded, the next step's K loads after): one step's codes held at a time instead of
    two, for fewer registers (Nsight Compute: the registers cap the default at 8 programs
    per SM, two warps per scheduler, and it waits on latency: results/bench/
    ncu_gluon_2026-12-06_h100.md). Transposed it builds at 168 registers (on the GPU too)
    and 631 loop instructions a step against 230 and 674, so 12 programs per SM fit in one
    round; yet on an H200 it ran 0.90-0.95x of the default at the five shapes timed, and
    not transposed (243 registers, 8 per SM) 0.93-0.94x of two steps an iteration
    (results/bench/ab_gluon_decode_2026-12-06j_h200.md). Nsight Compute on an H100 found
    why: the code loads, half a step ahead, stall it 2.48 cycles an instruction on the long
    scoreboard against the default's 0.60 (results/bench/ncu_gluon_2026-12-07_h100.md).
    Replaces two steps an iteration where both are asked."""
    return env_flag("POLARTENSOR_GLUON_STAGGER", False, "the prefetch half a step ahead",
                    "a whole step ahead")


def gluon_staged_setting() -> bool | None:
    """POLARTENSOR_GLUON_STAGED (read per call): in place of the register prefetch, each full
    step's codes and radii are copied by ``cp.async`` into a ring of ``STAGES`` steps in
    shared memory, ``STAGES - 1`` steps ahead, and read from there (``_stage_step``); 1
    wherever it fits, 0 never, unset (None) where measured faster: the transposed step
    (groups of at most 8) over at least ``STAGED_MIN_HEADS`` (batch, KV head) pairs. The
    point: load distance without the registers that held the prefetch at 8 programs per SM
    (Nsight Compute: latency-bound there; the prefetch half a
    step ahead freed the registers but stalled on its loads: results/bench/
    ncu_gluon_2026-12-07_h100.md). Offline (Triton 3.6, sm_90, transposed, 16 keys a step):
    168 registers and an 8 KB ring (12 programs per SM), 579 loop instructions a step
    against the prefetch's 230 and 674. On an H100 (results/bench/
    ab_gluon_decode_2026-12-07_h100_staged.md, 12 per SM against the prefetch's 8):
    1.06-1.17x the prefetch at the five shapes timed (batch 8 / 32K 0.1829 ms against
    0.1998, 2.05x cuDNN), where the same loop loading its own codes ran 0.93-0.98x; in the
    full benchmark (results/bench/bench_attention_2026-12-07c_h100.md) 1.07-1.15x at 64 and
    256 (batch, KV head) pairs but 0.92x at 8 (batch 1, 128K keys): ``STAGED_MIN_HEADS``. Not
    measured where not transposed (225 registers there, 8 per SM), so off there unless
    asked. Serves caches whose keys' records and radii are contiguous and 16-byte aligned
    per (batch, head) (``staged_fits``: storage of a multiple of 8 keys, as buffers allocate);
    elsewhere the call takes the prefetch."""
    if os.environ.get("POLARTENSOR_GLUON_STAGED") is None:
        return None
    return env_flag("POLARTENSOR_GLUON_STAGED", False, "stage the codes in shared memory by "
                    "cp.async", "the register prefetch; unset: where measured faster")


def staged_fits(codes: torch.Tensor, radii: torch.Tensor) -> bool:
    """Whether the staged ring can copy this storage: each key's record and its 8 float16
    radii contiguous after the previous key's, and every (batch, head)'s run 16-byte
    aligned, so that a step of 16 keys is whole 16-byte chunks."""
    rec = codes.shape[-1]
    return (codes.dtype == torch.uint8 and radii.dtype == torch.float16
            and radii.shape[-1] == 8 and codes.stride(-1) == 1 and radii.stride(-1) == 1
            and codes.stride(2) == rec and radii.stride(2) == 8
            and codes.data_ptr() % 16 == 0 and radii.data_ptr() % 16 == 0
            and all(st % 16 == 0 for st in (codes.stride(0), codes.stride(1)))
            and all((2 * st) % 16 == 0 for st in (radii.stride(0), radii.stride(1))))


STAGES = 4
# unset, the ring serves calls of at least this many (batch, KV head) pairs: on an H100
# (results/bench/bench_attention_2026-12-07c_h100.md and the A/B before it) it ran 1.06x the
# prefetch at 32, 1.07-1.16x at 64 and 256, but 0.92x at 8 (batch 1, 128K keys); between 8
# and 32 it was not measured
STAGED_MIN_HEADS = 32
# builds whose shared memory was checked to be the ring alone (``_smem_base``'s premise)
_STAGED_CHECKED: set = set()


def _ring_words(rec: int, block_n: int) -> int:
    """32-bit words of a step's records and radii in the ring: a power of two (shared-memory
    shapes are)."""
    return triton.next_power_of_2(block_n * rec // 4 + block_n * 4)


def gluon_decode_supported(q, k_cfg, v_cfg, rot_k, rot_v, k_tail, mask, group) -> bool:
    """Whether ``launch_attention_gluon`` serves this call (see the module docstring)."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] == 128
            and q.shape[-2] == 1 and 1 <= group <= 16 and k_tail is None and mask is None
            and rot_k is not None and rot_v is not None
            and all(_record_fits(c.bits) for c in (k_cfg, v_cfg)))


def takes_gluon_decode(q, k_cfg, v_cfg, rot_k, rot_v, k_tail, mask, group, bsz, hk,
                       total) -> bool:
    """Whether a decode call goes to this kernel: where it serves the call and
    POLARTENSOR_DECODE_GLUON says so, or (unset) where it measured faster."""
    use = gluon_decode_setting()
    if use is None:
        use = gluon_decode_auto(bsz, hk, total, group <= 8 and gluon_transposed_setting())
    return bool(use and total > 0 and gluon_decode_supported(q, k_cfg, v_cfg, rot_k, rot_v,
                                                             k_tail, mask, group))


def _record_fits(bits) -> bool:
    """Four levels whose code fields the kernel reads with aligned 16-bit loads inside the
    record: 2-bit upper levels and a 2- to 4-bit level 1 (paper: (4, 2, 2, 2), 46 bytes)."""
    return len(bits) == 4 and tuple(bits[1:]) == (2, 2, 2) and 2 <= bits[0] <= 4


@functools.lru_cache(maxsize=8)
def tile_layouts(block_n: int):
    """The [keys, 8 blocks] layouts of the K and V tile decodes (one warp), and K's [keys,
    4 block pairs] layout of its pair loads.

    K: key bits 0-2 on lanes 2-4 (the MMA's n), the block's bits 1-2 on lanes 0-1 and bit 0
    in a register, key bits 3+ (8-key tiles) in registers. V: key bits 1-2 on lanes 0-1 (the
    MMA's k), bits 0 and 3+ in registers, the block on lanes 2-4."""
    more = [[8 << i, 0] for i in range(block_n.bit_length() - 4)]
    k_lay = gl.DistributedLinearLayout(
        reg_bases=[[0, 1]] + more, lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[], block_bases=[], shape=[block_n, 8])
    v_lay = gl.DistributedLinearLayout(
        reg_bases=[[1, 0]] + more, lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[], block_bases=[], shape=[block_n, 8])
    # K by block pairs [keys, 4]: k_lay less the block's bit 0 (the pair's two blocks)
    kp_lay = gl.DistributedLinearLayout(
        reg_bases=more, lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=[], block_bases=[], shape=[block_n, 4])
    return k_lay, v_lay, kp_lay


_PERMUTED: dict = {}


def _permuted_rotation(rot: torch.Tensor) -> torch.Tensor:
    """S_k's rows in the K operand's column order, transposed: q @ this = (q S_k^T)[perm].
    Kept per rotation tensor while it lives (dropped when it is freed) and is not modified in
    place (its version counter)."""
    key = id(rot)
    hit = _PERMUTED.get(key)
    if hit is None or hit[0]() is not rot or hit[1] != rot._version:
        if hit is None or hit[0]() is not rot:
            weakref.finalize(rot, _PERMUTED.pop, key, None)
        hit = (weakref.ref(rot), rot._version,
               rot[k_permutation().to(rot.device)].T.contiguous())
        _PERMUTED[key] = hit
    return hit[2]


# The launch, from an H100 A/B run (results/bench/ab_gluon_decode_2026-12-06b_h100.md): 16 keys
# per step without a register cap (231 registers: 8 one-warp programs per SM) and splits for
# 8 programs per SM (one round) ran fastest of 16 or 32 keys x no cap or 168 x 8 or 12
# programs per SM at every shape timed.
PROGRAMS_PER_SM = 8
# The transposed step (groups <= 8, the default there), from an H100 A/B run of 8, 9, 10 and
# 12 programs per SM x register caps (results/bench/ab_gluon_decode_2026-12-06g_h100.md):
# alone (168 registers) 12 per SM ran fastest; with the prefetch (222 registers) 8 per SM did,
# and 9 ran 1.45-1.52x slower than 8 at three of four shapes: a second round, since each of
# an SM's four schedulers holds 16,384 registers, two warps at 222 (Nsight Compute's block
# limit: 8; results/bench/ncu_gluon_2026-12-06_h100.md).
PROGRAMS_PER_SM_TRANSPOSED = {False: 12, True: 8}     # by two steps' codes held (prefetch)


def programs_per_sm(transposed: bool, prefetch: bool, stagger: bool = False,
                    staged: bool = False) -> int:
    """The one-round split rule's programs per SM for a launch variant (measured above).
    Registers decide it: an SM's four schedulers hold 16,384 each, so 8 one-warp programs
    fit at up to 256 a thread and 12 at up to 168 (Nsight Compute's block limit at 222:
    8). The prefetch half a step ahead holds one step's codes, as no prefetch does: the
    transposed step builds at 168 with it offline, as without the prefetch."""
    two_steps_held = bool(prefetch and not stagger and not staged)
    return PROGRAMS_PER_SM_TRANSPOSED[two_steps_held] if transposed else PROGRAMS_PER_SM

BLOCK_N = 16
MAXNREG = None
# registers, spills and splits of the last launch_attention_gluon (read by the benchmarks)
LAST_LAUNCH: dict = {}
# Where the decode takes this kernel by default (POLARTENSOR_DECODE_GLUON unset): batch x
# KV heads x keys of at least 2^20. On an H100 against the Triton kernel, in two runs
# (results/bench/ab_gluon_decode_2026-12-06{b,c}_h100.md, paper, Llama heads, the step
# that is not transposed): 1.08x at batch 8 / 16K (exactly 2^20), 1.24-1.25x at batch 8 /
# 32K, 1.26-1.50x at 2^21-2^23; below it 0.55-0.90x (batch 1 / 32K, 2 / 32K, 4 / 8K, 8 / 4K,
# 16 / 4K: fixed costs, the query's rotation on the host among them, and too few steps per
# program).
GLUON_MIN_KEY_HEADS = 1 << 20
# The transposed step (groups <= 8) also from 2^19 where batch x KV heads >= 16. On an H100
# against the Triton kernel (results/bench/ab_gluon_decode_2026-12-06h_h100.md, with the
# prefetch): 1.12x at batch 2 / 32K, 1.29x at 16 / 4K, 1.16x at 4 / 16K (2^19, 16 to 128
# heads); 0.98x at batch 1 / 64K (2^19, 8 heads); 2^18: 1.01x at 4 / 8K, 0.98x at 8 / 4K,
# 0.84x at 1 / 32K. At 2^20 with 8 heads (batch 1 / 128K) 1.19x
# (bench_attention_2026-12-06j_h100.md).
GLUON_MIN_KEY_HEADS_TRANSPOSED = 1 << 19
GLUON_MIN_HEADS_TRANSPOSED = 16


def gluon_decode_auto(bsz: int, hk: int, n: int, transposed: bool) -> bool:
    """Whether the decode takes this kernel by default where it serves the call
    (``transposed``: whether the call takes the transposed step)."""
    if transposed and bsz * hk >= GLUON_MIN_HEADS_TRANSPOSED:
        return bsz * hk * n >= GLUON_MIN_KEY_HEADS_TRANSPOSED
    return bsz * hk * n >= GLUON_MIN_KEY_HEADS


def gluon_split_count(programs: int, n: int, sms: int, block_n: int = BLOCK_N,
                      per_sm: int = PROGRAMS_PER_SM) -> int:
    """Splits per (batch, KV head): about ``per_sm`` one-warp programs per SM, each of at
    least four steps."""
    return max(1, min(per_sm * sms // max(programs, 1),
                      triton.cdiv(n, 4 * block_n)))


def launch_attention_gluon(q, k_codes, k_radii, k_trig, k_cfg, v_codes, v_radii, v_trig,
                           v_cfg, rot_k, rot_v, scale, num_splits=None, block_n=BLOCK_N,
                           maxnreg=MAXNREG, out=None, prefetch=None, transposed=None,
                           pairs=None, kpairs=None, lshift=None, stagger=None,
                           staged=None, fold=None):
    """Decode attention (q_len 1) by the Gluon kernel, then the Triton combine kernel.
    Storage as ``launch_attention``'s (16-bit aligned records); ``num_splits`` None:
    ``gluon_split_count``; ``prefetch`` None: ``gluon_prefetch_setting``; ``transposed``
    None: ``gluon_transposed_setting`` (groups of at most 8 only); ``pairs`` None:
    ``gluon_pairs_setting`` (with the prefetch only; unset: when not transposed); ``kpairs`` None:
    ``gluon_kpairs_setting``; ``lshift`` None: ``gluon_lshift_setting``; ``stagger`` None:
    ``gluon_stagger_setting`` (with the prefetch only, in place of ``pairs``); ``staged``
    None: ``gluon_staged_setting`` (unset: the transposed step over at least
    ``STAGED_MIN_HEADS`` (batch, KV head) pairs), in place of the prefetch
    where ``staged_fits``; ``fold`` None: ``gluon_fold_setting`` (unset: with the ring; 2-bit
    levels 2 and 3 only). Needs at least one key."""
    from .common import _sm_count
    from .decode_attention import polar_attn_combine_kernel

    bsz, hq, tq, d = q.shape
    hk, n = k_codes.shape[1], k_codes.shape[2]
    group = hq // hk
    dev = q.device
    if n < 1:
        raise ValueError("the Gluon decode needs at least one key; an empty cache takes "
                         "launch_attention's other paths")
    if transposed is None:
        transposed = group <= 8 and gluon_transposed_setting()
    elif transposed and group > 8:
        raise ValueError(f"the transposed Gluon step serves groups of at most 8 queries per "
                         f"KV head, not {group}: pass transposed=False")
    if out is None:
        out = torch.empty(bsz, hq, tq, d, dtype=q.dtype, device=dev)
    if prefetch is None:
        prefetch = gluon_prefetch_setting()
    if pairs is None:
        pairs = gluon_pairs_setting()
    if pairs is None:
        pairs = not transposed
    if kpairs is None:
        kpairs = gluon_kpairs_setting()
    if lshift is None:
        lshift = gluon_lshift_setting()
    if stagger is None:
        stagger = gluon_stagger_setting()
    if staged is None:
        staged = gluon_staged_setting()
    if fold is None:
        fold = gluon_fold_setting()
    if staged is None:
        staged = transposed and bsz * hk >= STAGED_MIN_HEADS
    staged = bool(staged and staged_fits(k_codes, k_radii) and staged_fits(v_codes, v_radii))
    if staged:
        prefetch = False
    foldable = all(c.bits[1] == 2 and c.bits[2] == 2 for c in (k_cfg, v_cfg))
    if fold is None:
        fold = staged and foldable
    k_kt, v_kt = k_trig.shape[-1], v_trig.shape[-1]
    if fold:
        if not foldable:
            raise ValueError("the folded levels 3 and 2 (POLARTENSOR_GLUON_FOLD) need 2-bit "
                             f"levels 2 and 3, not K {k_cfg.bits} / V {v_cfg.bits}: unset it")
        k_trig, v_trig = fold_table(k_trig), fold_table(v_trig)
    if num_splits is None:
        num_splits = gluon_split_count(bsz * hk, n, _sm_count(dev), block_n,
                                       programs_per_sm(transposed, prefetch, stagger, staged))
    sk = _permuted_rotation(rot_k)
    qr = (q[:, :, 0].float() @ sk).contiguous()            # [B, Hq, D] rotated, permuted
    kv_per_split = triton.cdiv(triton.cdiv(n, num_splits), block_n) * block_n
    num_splits = triton.cdiv(n, kv_per_split)
    m_rows = 16
    slots = bsz * hk * num_splits
    pacc = torch.empty(slots * m_rows * d, dtype=torch.float32, device=dev)
    pml = torch.empty(slots * 2 * m_rows, dtype=torch.float32, device=dev)
    kb, vb = k_cfg.bits, v_cfg.bits
    k_lay, v_lay, kp_lay = tile_layouts(block_n)
    ring = {}
    if staged:
        ring = dict(STAGED=True, NSTAGE=STAGES, K_REC=k_codes.shape[-1],
                    V_REC=v_codes.shape[-1], K_PW=_ring_words(k_codes.shape[-1], block_n),
                    V_PW=_ring_words(v_codes.shape[-1], block_n), RW=block_n * 4)
    args = (
        qr, qr.stride(0), qr.stride(1),
        k_codes, k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_radii, k_radii.stride(0), k_radii.stride(1), k_radii.stride(2), k_trig,
        v_codes, v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        v_radii, v_radii.stride(0), v_radii.stride(1), v_radii.stride(2), v_trig,
        pacc, pml, hk, n, kv_per_split, num_splits, scale * _LOG2E)
    consts = dict(
        GROUP=group, BN=block_n, k_lay=k_lay, v_lay=v_lay, kp_lay=kp_lay,
        K_KT=k_kt, K_B1=kb[0], K_B2=kb[1], K_B3=kb[2], K_B4=kb[3],
        V_KT=v_kt, V_B1=vb[0], V_B2=vb[1], V_B3=vb[2], V_B4=vb[3],
        PREFETCH=bool(prefetch), TRANS=bool(transposed),
        PAIRS=bool(prefetch and pairs and not stagger), KPAIR=bool(kpairs),
        LSHIFT=int(bool(lshift)) | 2 * int(bool(fold)), STAGGER=bool(prefetch and stagger),
        **ring,
        num_warps=1,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    grid = (bsz * hk, num_splits)
    if staged:
        key = (dev.index, group, block_n, tuple(kb), tuple(vb), tuple(sorted(ring.items())),
               bool(transposed), bool(kpairs), bool(lshift), bool(fold), maxnreg)
        if key not in _STAGED_CHECKED:
            # the ring's reads address global_smem directly (_smem_base): only sound if the
            # build's shared memory is the ring and nothing else
            built = polar_decode_attn_gluon_fwd_kernel.warmup(*args, grid=grid, **consts)
            want = STAGES * 4 * (ring["K_PW"] + ring["V_PW"])
            if built.metadata.shared != want:
                raise RuntimeError(
                    f"the staged Gluon decode built with {built.metadata.shared} bytes of "
                    f"shared memory, not its ring's {want}: its reads assume the ring starts "
                    f"at the kernel's shared base; unset POLARTENSOR_GLUON_STAGED")
            _STAGED_CHECKED.add(key)
    kernel = polar_decode_attn_gluon_fwd_kernel[grid](*args, **consts)
    # what the launch compiled to, for the benchmarks (the split rule assumes a register count)
    LAST_LAUNCH.update(registers=getattr(kernel, "n_regs", None),
                       spills=getattr(kernel, "n_spills", None), splits=num_splits,
                       staged=staged, fold=bool(fold))
    polar_attn_combine_kernel[(bsz * hk, 1)](
        pacc, pml, rot_v, out, out.stride(0), out.stride(1), out.stride(2),
        hk, tq, num_splits, 1,
        GROUP=group, BLOCK_T=1, M=m_rows, D=d, JC=64, UNROT=True, RPREC="tf32x3",
        num_warps=4,
    )
    return out
