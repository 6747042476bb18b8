"""Attention over the quantized cache: one kernel for decode (split-K, flash-decoding) and
chunked prefill (query tiles, one split), plus the split combine.

Each program serves one (batch, KV head): every query head of the GQA group and a tile of query
positions form the rows of one [M, D] block, so each K/V record is decoded once per program.
The query is rotated in the kernel (q S^T), scored against the rotated keys decoded from codes
with cos/sin tables (no trig), values are accumulated in the rotated domain with an online
softmax, and the output is un-rotated once (o S) when it is final. An optional full-precision
tail (already rotated, [B, Hk, NT, D]) follows the quantized tokens.

Reference: ``polartensor.attention.polar_sdpa`` (see ``kernels/naive.py``).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .common import (
    PACKED_DECODE,
    _sm_count,
    decode_tile,
    env_choice,
    env_flag,
    interpreting,
    level_words,
)
from .tree_decode import code16_aligned, decode_tile_joined

__all__ = ["polar_decode_attn_fwd_kernel", "polar_attn_combine_kernel", "launch_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _by_row(x, KEY: tl.constexpr):
    """A per-row vector broadcast against a score tile whose key axis is KEY."""
    if KEY == 1:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _by_key(x, KEY: tl.constexpr):
    """A per-key vector broadcast against a score tile whose key axis is KEY."""
    if KEY == 1:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _scores_update(q, kt, vt, pos, keep_kv, t_idx, row_valid, b, h, m_i, l_i, acc,
                   mask_ptr, sm_b, sm_h, sm_t, sm_n, total, Tq, scale_log2,
                   MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DT: tl.constexpr,
                   PREC: tl.constexpr, MMA_T: tl.constexpr = 0):
    """One key tile of the online softmax. ``MMA_T`` (``decode_mma_setting``): 0, S = Q K^T
    [M, BN] and O += P V; 1, the accumulator kept transposed, [D, M], and P @ V as V^T P^T;
    2, the scores transposed too (S^T = K Q^T, [BN, M]: the softmax runs along axis 0)."""
    if MMA_T == 2:
        KEY: tl.constexpr = 0
        s = tl.dot(kt.to(DT), tl.trans(q), input_precision=PREC) * scale_log2
    else:
        KEY: tl.constexpr = 1
        s = tl.dot(q, tl.trans(kt.to(DT)), input_precision=PREC) * scale_log2
    keep = _by_key(keep_kv, KEY) & _by_row(row_valid, KEY)
    if CAUSAL:
        keep = keep & (_by_key(pos, KEY) <= _by_row(t_idx + (total - Tq), KEY))
    if MASK_KIND != 0:
        mptr = (mask_ptr + b * sm_b + _by_row(h * sm_h + t_idx.to(tl.int64) * sm_t, KEY)
                + _by_key(pos.to(tl.int64) * sm_n, KEY))
        mv = tl.load(mptr, mask=keep, other=0)
        if MASK_KIND == 1:
            keep = keep & (mv != 0)
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, KEY))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - _by_row(m_use, KEY))
    l_i = l_i * alpha + tl.sum(p, KEY)
    if MMA_T == 2:
        acc = acc * alpha[None, :] + tl.dot(tl.trans(vt.to(DT)), p.to(DT),
                                             input_precision=PREC)
    elif MMA_T == 1:
        acc = acc * alpha[None, :] + tl.dot(tl.trans(vt.to(DT)), tl.trans(p.to(DT)),
                                             input_precision=PREC)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), vt.to(DT), input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _unrotate_store(o, rotv_ptr, out_ptr, out_row_off, row_valid, M: tl.constexpr,
                    D: tl.constexpr, JC: tl.constexpr, UNROT: tl.constexpr, PREC: tl.constexpr):
    """out = o @ S_v (rows of o are rotated-domain outputs), stored in out's dtype."""
    kk = tl.arange(0, D)
    if UNROT:
        for j0 in tl.static_range(0, D, JC):
            jj = j0 + tl.arange(0, JC)
            sv = tl.load(rotv_ptr + kk[:, None] * D + jj[None, :])
            oj = tl.dot(o, sv, input_precision=PREC)
            tl.store(out_ptr + out_row_off[:, None] + jj[None, :],
                     oj.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        tl.store(out_ptr + out_row_off[:, None] + kk[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


# Sizes and counts are not specialised on (== 1, % 16), so one compiled kernel serves every
# sequence length, batch and split count of a configuration.
@triton.jit(do_not_specialize=["sm_b", "sm_h", "sm_t", "sm_n", "Hk", "Tq", "N", "NT",
                               "kv_per_split", "n_splits", "n_ttiles"])
def polar_decode_attn_fwd_kernel(
    q_ptr, sq_b, sq_h, sq_t,
    rotk_ptr, rotv_ptr,
    kc_ptr, skc_b, skc_h, skc_n, kr_ptr, skr_b, skr_h, skr_n, ktab_ptr,
    vc_ptr, svc_b, svc_h, svc_n, vr_ptr, svr_b, svr_h, svr_n, vtab_ptr,
    kt_ptr, skt_b, skt_h, skt_n, vt_ptr, svt_b, svt_h, svt_n,
    mask_ptr, sm_b, sm_h, sm_t, sm_n,
    out_ptr, so_b, so_h, so_t,
    pacc_ptr, pml_ptr,
    Hk, Tq, N, NT, kv_per_split, n_splits, n_ttiles, scale_log2,
    GROUP: tl.constexpr, BLOCK_T: tl.constexpr, M: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, KCH: tl.constexpr,
    K_KT: tl.constexpr, K_L: tl.constexpr, K_NB: tl.constexpr, K_TB: tl.constexpr,
    K_TNB: tl.constexpr, K_LV0: tl.constexpr, K_LV1: tl.constexpr, K_LV2: tl.constexpr,
    K_LV3: tl.constexpr, K_LV4: tl.constexpr, K_LV5: tl.constexpr, K_LV6: tl.constexpr,
    K_LV7: tl.constexpr,
    V_KT: tl.constexpr, V_L: tl.constexpr, V_NB: tl.constexpr, V_TB: tl.constexpr,
    V_TNB: tl.constexpr, V_LV0: tl.constexpr, V_LV1: tl.constexpr, V_LV2: tl.constexpr,
    V_LV3: tl.constexpr, V_LV4: tl.constexpr, V_LV5: tl.constexpr, V_LV6: tl.constexpr,
    V_LV7: tl.constexpr,
    HAS_TAIL: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
    SINGLE: tl.constexpr, ROTQ: tl.constexpr, UNROT: tl.constexpr, DT: tl.constexpr,
    PREC: tl.constexpr, RPREC: tl.constexpr, PACK: tl.constexpr, MMA_T: tl.constexpr = 0,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // Hk).to(tl.int64)
    hk = (pid_bh % Hk).to(tl.int64)
    t0 = pid_t * BLOCK_T

    rows = tl.arange(0, M)
    g = rows // BLOCK_T
    t_idx = t0 + rows % BLOCK_T
    row_valid = (g < GROUP) & (t_idx < Tq)
    h = hk * GROUP + g.to(tl.int64)
    q_row = b * sq_b + h * sq_h + t_idx.to(tl.int64) * sq_t
    dd = tl.arange(0, D)

    # Rotate the query rows: q_rot = q @ S_k^T (S_k^T[k, j] = S_k[j, k]).
    if ROTQ:
        q = tl.zeros((M, D), dtype=tl.float32)
        for k0 in tl.static_range(0, D, KCH):
            kk = k0 + tl.arange(0, KCH)
            qc = tl.load(q_ptr + q_row[:, None] + kk[None, :], mask=row_valid[:, None],
                         other=0.0).to(tl.float32)
            st = tl.load(rotk_ptr + dd[None, :] * D + kk[:, None])
            q += tl.dot(qc, st, input_precision=RPREC)
    else:
        q = tl.load(q_ptr + q_row[:, None] + dd[None, :], mask=row_valid[:, None],
                    other=0.0).to(tl.float32)
    q = q.to(DT)

    total = N + NT
    start = split * kv_per_split
    end = tl.minimum(start + kv_per_split, total)
    if CAUSAL:
        # Bottom-right aligned: row t sees keys j <= t + total - Tq.
        end = tl.minimum(end, tl.minimum(t0 + BLOCK_T, Tq) + total - Tq)

    m_i = tl.full((M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((M,), dtype=tl.float32)
    if MMA_T:
        acc = tl.zeros((D, M), dtype=tl.float32)
    else:
        acc = tl.zeros((M, D), dtype=tl.float32)

    qend = tl.minimum(end, N)
    for n0 in range(start, qend, BN):
        pos = n0 + tl.arange(0, BN)
        kv_ok = pos < qend
        pos64 = pos.to(tl.int64)
        kt = decode_tile(kc_ptr, kr_ptr, ktab_ptr, b * skc_b + hk * skc_h + pos64 * skc_n,
                         b * skr_b + hk * skr_h + pos64 * skr_n, kv_ok, BN, D, K_KT, K_L,
                         K_NB, K_TB, K_TNB, K_LV0, K_LV1, K_LV2, K_LV3, K_LV4, K_LV5,
                         K_LV6, K_LV7, PACK)
        vt = decode_tile(vc_ptr, vr_ptr, vtab_ptr, b * svc_b + hk * svc_h + pos64 * svc_n,
                         b * svr_b + hk * svr_h + pos64 * svr_n, kv_ok, BN, D, V_KT, V_L,
                         V_NB, V_TB, V_TNB, V_LV0, V_LV1, V_LV2, V_LV3, V_LV4, V_LV5,
                         V_LV6, V_LV7, PACK)
        m_i, l_i, acc = _scores_update(q, kt, vt, pos, kv_ok, t_idx, row_valid, b, h, m_i,
                                       l_i, acc, mask_ptr, sm_b, sm_h, sm_t, sm_n, total, Tq,
                                       scale_log2, MASK_KIND, CAUSAL, DT, PREC, MMA_T)
    if HAS_TAIL:
        for n0 in range(tl.maximum(start, N), end, BN):
            pos = n0 + tl.arange(0, BN)
            kv_ok = pos < end
            tp = (pos - N).to(tl.int64)
            kt = tl.load(kt_ptr + (b * skt_b + hk * skt_h + tp * skt_n)[:, None] + dd[None, :],
                         mask=kv_ok[:, None], other=0.0).to(tl.float32)
            vt = tl.load(vt_ptr + (b * svt_b + hk * svt_h + tp * svt_n)[:, None] + dd[None, :],
                         mask=kv_ok[:, None], other=0.0).to(tl.float32)
            m_i, l_i, acc = _scores_update(q, kt, vt, pos, kv_ok, t_idx, row_valid, b, h,
                                           m_i, l_i, acc, mask_ptr, sm_b, sm_h, sm_t, sm_n,
                                           total, Tq, scale_log2, MASK_KIND, CAUSAL, DT, PREC,
                                           MMA_T)

    if MMA_T:
        acc = tl.trans(acc)
    if SINGLE:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_row = b * so_b + h.to(tl.int64) * so_h + t_idx.to(tl.int64) * so_t
        _unrotate_store(o, rotv_ptr, out_ptr, out_row, row_valid, M, D, KCH, UNROT, RPREC)
    else:
        slot = (pid_bh.to(tl.int64) * n_ttiles + pid_t) * n_splits + split
        tl.store(pacc_ptr + slot * (M * D) + rows[:, None] * D + dd[None, :], acc)
        tl.store(pml_ptr + slot * (2 * M) + rows, m_i)
        tl.store(pml_ptr + slot * (2 * M) + M + rows, l_i)


@triton.jit(do_not_specialize=["Hk", "Tq", "n_splits", "n_ttiles"])
def polar_attn_combine_kernel(
    pacc_ptr, pml_ptr, rotv_ptr, out_ptr, so_b, so_h, so_t,
    Hk, Tq, n_splits, n_ttiles,
    GROUP: tl.constexpr, BLOCK_T: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    JC: tl.constexpr, UNROT: tl.constexpr, RPREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = (pid_bh // Hk).to(tl.int64)
    hk = (pid_bh % Hk).to(tl.int64)
    rows = tl.arange(0, M)
    g = rows // BLOCK_T
    t_idx = pid_t * BLOCK_T + rows % BLOCK_T
    row_valid = (g < GROUP) & (t_idx < Tq)
    h = hk * GROUP + g
    dd = tl.arange(0, D)
    m_i = tl.full((M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((M,), dtype=tl.float32)
    acc = tl.zeros((M, D), dtype=tl.float32)
    base = (pid_bh.to(tl.int64) * n_ttiles + pid_t) * n_splits
    for s in range(n_splits):
        slot = base + s
        # rows past the group are never written by the Gluon decode's transposed step
        ms = tl.load(pml_ptr + slot * (2 * M) + rows, mask=row_valid, other=float("-inf"))
        ls = tl.load(pml_ptr + slot * (2 * M) + M + rows, mask=row_valid, other=0.0)
        a_s = tl.load(pacc_ptr + slot * (M * D) + rows[:, None] * D + dd[None, :],
                      mask=row_valid[:, None], other=0.0)
        m_new = tl.maximum(m_i, ms)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        c_old = tl.exp2(m_i - m_use)
        c_new = tl.exp2(ms - m_use)
        l_i = l_i * c_old + ls * c_new
        acc = acc * c_old[:, None] + a_s * c_new[:, None]
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_row = b * so_b + h.to(tl.int64) * so_h + t_idx.to(tl.int64) * so_t
    _unrotate_store(o, rotv_ptr, out_ptr, out_row, row_valid, M, D, JC, UNROT, RPREC)


_TL_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_BLOCKS_PER_SM: dict = {}


def _blocks_per_sm(compiled, device: torch.device) -> int | None:
    """Programs of a compiled kernel resident on one SM at once (registers, shared memory,
    warps), or None where the device or Triton does not say."""
    try:
        compiled._init_handles()
        regs, shared = int(compiled.n_regs), int(compiled.metadata.shared)
        warps = int(compiled.metadata.num_warps)
        props = torch.cuda.get_device_properties(device)
    except Exception:  # noqa: BLE001 - an estimate only: the caller keeps its default
        return None
    sm_regs = getattr(props, "regs_per_multiprocessor", 65536)
    sm_shared = getattr(props, "shared_memory_per_multiprocessor", 233472)
    sm_threads = getattr(props, "max_threads_per_multi_processor", 2048)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256      # registers go to warps in 256s
    by_regs = sm_regs // (per_warp * warps)
    by_shared = sm_shared // (shared + 1024) if shared else 32  # 1 KB per block for the driver
    by_threads = sm_threads // (32 * warps)
    return max(1, min(by_regs, by_shared, by_threads, 32))


# Throughput of an SM running c of the split kernel's programs, relative to a full SM (c >=
# 3 or c >= its resident limit): fit on an H100 sweep of every split count (paper and polar-4,
# Llama and SmolLM2 heads, batch 1-16, 4K-128K keys; results/bench/decode_split_sweep_h100.md):
# one program alone ran a step in 0.54x the time of three sharing the SM (so at 0.62 of the
# SM's throughput), two in 0.68-0.73x (at 0.89-0.95).
_SM_SHARE = {1: 0.65, 2: 0.9}


def _split_candidates(steps: int, max_splits: int) -> list:
    """The split counts the launch keeps as they are (cdiv(steps, cdiv(steps, x)) for x in
    1..max_splits: each gives a distinct number of steps per split), in O(sqrt(steps))
    rather than one per x: 2048 candidates at 1M keys took 7 ms of Python per new length.
    Beyond sqrt(steps) splits, the steps per split take every value down to
    cdiv(steps, max_splits), so those counts come from the steps instead."""
    max_splits = min(max_splits, steps)
    lim = math.isqrt(steps) + 1
    counts = {triton.cdiv(steps, triton.cdiv(steps, x)) for x in range(1, min(max_splits, lim) + 1)}
    counts.update(triton.cdiv(steps, per) for per in range(triton.cdiv(steps, max_splits),
                                                           triton.cdiv(steps, lim) + 1))
    return sorted(c for c in counts if c <= max_splits)


@functools.lru_cache(maxsize=4096)
def _split_count(want: int, max_splits: int, progs: int, per_sm: int, sms: int,
                 steps: int) -> int:
    """The split count with the least modeled time, for ``progs`` (batch x KV head) programs
    of ``steps`` key steps each, ``per_sm`` resident programs per SM, on ``sms`` SMs.

    The time is set by the most loaded SM. Programs go out in grid order, one split index for
    every head at a time, so the last splits (shorter where the steps do not divide evenly)
    go out last. Model: whole rounds of ``per_sm x sms`` programs, then a last round of c
    programs on the most loaded SM, each SM at ``_SM_SHARE[c]`` of its throughput; last
    splits of at most half the steps take the slots the last round left free (sharing its
    SMs), and a round of their own where those do not suffice. A program costs its steps
    plus one (its prologue and its partial result), a round one step more (its ragged end).

    The earlier rule costed a partial wave by its share of all slots: at Llama batch 1 / 32K
    it took 43 splits of 6 steps (344 programs: 80 SMs run 3) over 32 of 8 (2 on every SM),
    0.069 vs 0.066 ms measured. Among counts within 2% of the cheapest: the one closest to
    ``want``, then the fewer. Fit on the sweep and two A/B runs against the earlier rule
    (results/bench/ab_kernels_2026-12-06{h,i}_h100.md, 31 shapes in all): every pick ran
    within 1% of the fastest count timed but three, 3-4% slower (Llama batch 2 / 128K: 49
    splits against 24; SmolLM2 batch 4 / 8K paper: 11 against 16)."""
    slots = per_sm * sms

    def share(c):
        return 1.0 if c >= min(per_sm, 3) else _SM_SHARE[c]

    costs = []
    for s in _split_candidates(steps, max_splits):
        per = triton.cdiv(steps, s)              # steps of every split but the last
        last = steps - (s - 1) * per
        short = 2 * last <= per
        rounds, rest = divmod(progs * (s - 1 if short else s), slots)
        cost = rounds * (per_sm * (per + 1) + 1)
        free = slots - rest if rest else 0
        if rest:
            c = triton.cdiv(rest, sms)
            # the short splits that fit the round's free slots share its SMs
            ct = triton.cdiv(rest + min(progs, free), sms) if short else c
            cost += (c * (per + 1) + (ct - c) * (last + 1)) / share(ct) + 1
        if short and progs > free:
            c = triton.cdiv(progs - free, sms)
            cost += c * (last + 1) / share(c) + 1
        costs.append((cost, s))
    floor = min(c for c, _ in costs)
    return min((s for c, s in costs if c <= floor * 1.02), key=lambda s: (abs(s - want), s))


def joint12_setting() -> bool | None:
    """POLARTENSOR_JOINT12 (read per call): 1, the packed decode takes levels 1 and 2 in one
    step through a joint table wherever the configuration has one (common.joint12_bits: paper,
    polar-3, polar-3.25); 0, never; unset (None), where measured faster. On the H200
    (results/bench/bench_joint12.md), at d 128 in the launch of 64 keys per step under a
    128-register cap (batch 8-32, 8 KV heads), the paper preset was 5-6% faster with it than
    with the per-level gathers (batch 8 / 32K: 0.511 vs 0.539 ms) but slower under the
    168-register cap (batch 1, 7-8%) and at d 64 (up to 11%), and polar-3 was 3-12% slower
    everywhere. The per-level tables by warp shuffles (``auto_decode_shfl``) beat it in turn
    (H100, results/bench/bench_decode_shfl.md: 1.10-1.12x in all five such rows), so unset
    takes it only where the shuffles are off (POLARTENSOR_DECODE_SHFL=0)."""
    v = os.environ.get("POLARTENSOR_JOINT12")
    if v is None:
        return None
    return env_flag("POLARTENSOR_JOINT12", False, "joint table of levels 1 and 2 wherever "
                    "there is one", "one step per level; unset: where measured faster")


def decode_shfl_setting() -> bool | None:
    """POLARTENSOR_DECODE_SHFL (read per call): 1, the packed decode reads its per-level
    tables of at most 32 words (level 1's packed bf16x2 words up to 5 bits, the (cos, sin)
    pairs of levels up to 4 bits) from registers, one word per lane, by warp shuffles instead
    of global gathers (PACK 3; 4 where the joint table of levels 1 and 2 is on, whose 8 KB
    stay a gather); 0, gathers; unset (None), ``auto_decode_shfl``. The same table words
    either way: on an H100 the attention was bit-equal at d 128 and, in a few d-64 rows
    (kq), one bf16 rounding apart (results/bench/bench_decode_shfl.md). Why: Nsight on the
    H200 counted ~45 M of the attention's ~96 M L1 wavefronts as global loads, the table
    gathers among them with up to ~25 tag look-ups per instruction
    (results/bench/ncu_decode.md); a shuffle needs neither L1 nor a 64-bit address."""
    v = os.environ.get("POLARTENSOR_DECODE_SHFL")
    if v is None:
        return None
    return env_flag("POLARTENSOR_DECODE_SHFL", False, "per-level tables by warp shuffles",
                    "table gathers from global memory; unset: where measured faster")


def auto_decode_shfl(mode: str, d: int, rows: int, q_dtype: torch.dtype, pack) -> bool:
    """Whether the packed decode reads its small tables by warp shuffles
    (``decode_shfl_setting``) where the GPU measured it faster; the same choice on every
    backend.

    Measured on an H100 (results/bench/bench_decode_shfl.md; bfloat16 queries, q_len 1,
    batch 1-32, 4K-128K keys, against the gathers in the same run): at d 128 without the
    joint table (PACK 1) the shuffles ran 1.003-1.50x as fast in 21 of 22 rows (paper batch
    8 / 4K: 0.063 vs 0.094 ms, polar-3 batch 8 / 32K: 0.429 vs 0.464 ms) and 0.95x in the
    other (polar-4 batch 1 / 4K); beside the joint table (PACK 2 -> 4: the paper preset at
    batch >= 8 with long contexts) 0.92-0.95x, but without it (PACK 3) 1.10-1.12x faster
    than the joint table's gathers there, so the joint table now gives way where this rule
    holds (``joint12_setting``); at d 64 (kq) 0.89-1.03x. Prefill tiles, other dtypes and
    d 256 were not measured: gathers. A second run (after the rule) agreed: the default ran
    1.02-1.46x as fast as the gathers in 19 of 22 such rows, 0.98-0.99x in the other three."""
    return (mode == "decode" and rows <= 16 and q_dtype == torch.bfloat16 and d == 128
            and pack == 1)


_DECODE_MMAS = {"qk": 0, "vp": 1, "kq": 2}


def decode_mma_setting() -> int | None:
    """POLARTENSOR_DECODE_MMA (read per call): how the decode's two products meet the tensor
    cores. ``qk``: S = Q K^T and O = P V, the query rows as the MMA's M (16 rows, mma.sync).
    ``vp``: O^T = V^T P^T with the accumulator kept transposed. ``kq`` (both transposed):
    S^T = K Q^T and O^T = V^T P^T, keys and head_dim as M (wgmma on sm_90), the softmax over
    the key axis. ``auto`` (the default; returns None): ``auto_decode_mma`` per launch.

    Why (offline, Triton 3.6, sm_90, paper d 128, 64 keys per step under the 128-register
    cap; scripts/smem_bank_conflicts.py, whose model reproduces Nsight's counts on the H200):
    in ``qk`` V's transposed ldmatrix reads keys {0, 1, 8, 9, 16, 17, 24, 25} of the tile
    per 8x8 matrix, which the swizzle maps onto two of eight bank groups (16 wavefronts where
    4 would do), P's stmatrix conflicts 4-way and K's tile stores 2-way: 332 shared-memory
    wavefronts per warp and key tile against 192 ideal. ``vp``: 208 (176 ideal), loop SASS
    1098 -> 1065, spills 1630 -> 1938 bytes. ``kq``: 152, none of them conflicts (plus the
    wgmma's own operand reads), loop SASS 1009, spills 1870 bytes."""
    v = env_choice("POLARTENSOR_DECODE_MMA", ("auto",) + tuple(_DECODE_MMAS))
    return None if v == "auto" else _DECODE_MMAS[v]


def auto_decode_mma(mode: str, d: int, rows: int, q_dtype: torch.dtype, k_cfg,
                    v_cfg) -> int:
    """The MMA orientation (``decode_mma_setting``) where the GPU measured it faster; the
    same choice on every backend, so that the interpreter tests the kernel the GPU runs.

    Measured on an H100 (results/bench/bench_decode_mma.md; bfloat16 queries, q_len 1, batch
    1-32, 4K-128K keys, 54 rows): at d 64 (SmolLM2) ``kq`` ran 1.03-1.19x as fast as ``qk``
    in all 27 rows; at d 128 (Llama) ``vp`` ran faster for the presets with 4-bit level-1
    angles (paper, polar-3) in 17 of 18 rows, up to 1.16x (batch 8 / 32K paper: 0.451 vs
    0.500 ms; the other row 0.98x), while for polar-4 (5-bit level 1) ``vp`` ran 0.91-1.00x
    and ``kq`` 0.70-1.04x, both under the launch then taken (64 keys per step under a
    128-register cap at batch 8-32); under 128 keys and a 168 cap ``kq`` became the faster
    (below). Prefill tiles (more than 16 query rows), other dtypes, d 256 and
    the opt-out tile decodes (POLARTENSOR_DECODE=joined or reshape) were not measured:
    ``qk``."""
    if mode != "decode" or rows > 16 or q_dtype != torch.bfloat16 or not PACKED_DECODE:
        return 0
    if d == 64:
        return _DECODE_MMAS["kq"]
    if d == 128 and all(c.bits[0] <= 4 for c in (k_cfg, v_cfg)):
        return _DECODE_MMAS["vp"]
    if d == 128:
        # Wider level-1 angles (polar-4 and up, or a pair with one): kq, with 128 keys per
        # step under a 168-register cap (launch_attention). On an H100 against qk under the
        # launch before (64 keys, 128 cap, at batch 8 and 32), in one A/B run
        # (results/bench/ab_kernels_2026-12-06e_h100.md, Llama heads): batch 8 / 32K polar-4
        # 1.24x, polar-4/polar-3 1.31x, polar-4.5 1.23x, polar-5 1.19x; batch 1 1.09-1.14x,
        # batch 32 1.05-1.26x, batch 8 / 128K 1.17-1.27x. paper and polar-3 keep vp: kq ran
        # them 0.91-0.97x (ab_kernels_2026-12-06d_h100.md and -f). Offline (Triton 3.6,
        # sm_90) vp and qk copy the query's register fragment into place for every mma.sync
        # (~190 moves per 128-key step); kq reads it by wgmma from shared memory.
        return _DECODE_MMAS["kq"]
    return 0


def _cfg_args(prefix: str, w: dict, kt: int) -> dict:
    out = {f"{prefix}_KT": kt, f"{prefix}_L": w["L"], f"{prefix}_NB": w["NB"],
           f"{prefix}_TB": w["TAIL_BYTE"], f"{prefix}_TNB": w["TAIL_NB"]}
    for i in range(8):
        out[f"{prefix}_LV{i}"] = w[f"LV{i}"]
    return out


def launch_attention(
    q: torch.Tensor,            # [B, Hq, Tq, D]
    k_codes: torch.Tensor, k_radii: torch.Tensor, k_trig: torch.Tensor, k_cfg,
    v_codes: torch.Tensor, v_radii: torch.Tensor, v_trig: torch.Tensor, v_cfg,
    rot_k: torch.Tensor | None, rot_v: torch.Tensor | None,
    k_tail: torch.Tensor | None = None, v_tail: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,   # expanded to [B, Hq, Tq, N + NT] (strides may be 0)
    is_causal: bool = False, scale: float = 1.0,
    mode: str = "auto", num_splits: int | None = None, block_n: int | None = None,
    block_t: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    maxnreg: int | None = None, out: torch.Tensor | None = None, pack: bool | None = None,
    split_rule: str = "waves",
) -> torch.Tensor:
    """Launch decode (split-K + combine) or prefill (query tiles) attention. Shapes are
    already validated; K/V storage is [B, Hk, N, R] / [B, Hk, N, NB] with unit last stride."""
    if split_rule not in ("waves", "per_sm"):
        raise ValueError(f"split_rule={split_rule!r}: use 'waves' (the default: the count "
                         "that loads the busiest SM least, from the kernel's resident "
                         "programs) or 'per_sm' (~8 programs per SM)")
    bsz, hq, tq, d = q.shape
    hk, n = k_codes.shape[1], k_codes.shape[2]
    group = hq // hk
    nt = 0 if k_tail is None else k_tail.shape[2]
    total = n + nt
    interp = interpreting()
    dev = q.device
    if out is None:
        out = torch.empty(bsz, hq, tq, d, dtype=q.dtype, device=dev)
    if mode == "auto":
        from .prefill_attention import dequant_min_q

        dq_min = None if interp else dequant_min_q()
        mode = ("decode" if tq <= 16 else
                "dequant" if dq_min is not None and tq >= dq_min else "prefill")
    if mode == "dequant":
        from .prefill_attention import dequant_sdpa

        return dequant_sdpa(q, k_codes, k_radii, k_trig, k_cfg, v_codes, v_radii, v_trig,
                            v_cfg, rot_k, rot_v, k_tail, v_tail, mask, is_causal, scale, out)
    k_codes = code16_aligned(k_codes)
    v_codes = code16_aligned(v_codes)
    if (mode == "decode" and not interp and block_n is None and block_t is None
            and num_warps is None and maxnreg is None and pack is None):
        from . import decode_attention_gluon as dg

        # the Gluon decode (operands decoded in registers) where it serves the call and,
        # unless POLARTENSOR_DECODE_GLUON says otherwise, where it measured faster
        if dg.takes_gluon_decode(q, k_cfg, v_cfg, rot_k, rot_v, k_tail, mask, group, bsz, hk,
                                 total):
            return dg.launch_attention_gluon(
                q, k_codes, k_radii, k_trig, k_cfg, v_codes, v_radii, v_trig, v_cfg, rot_k,
                rot_v, scale, num_splits, out=out)
    # the per-call settings, read once (None: the measured rules below)
    mma_t, shfl, joint12 = decode_mma_setting(), decode_shfl_setting(), joint12_setting()
    gp = _next_pow2(group)
    if interp:
        dt, prec, rprec = tl.float32, "ieee", "ieee"
    else:
        dt = _TL_DT[q.dtype]
        prec = "tf32x3" if q.dtype == torch.float32 else "tf32"
        rprec = "tf32x3"
    # Rows of the [M, D] q/acc tiles. At d 256, M 64 overflowed the H200's 227 KB of shared
    # memory (the combine kernel refused to launch; the attention kernel read out of range
    # under compute-sanitizer), so M stays at 32 there.
    max_rows = 32 if d >= 256 else 128
    joint12_auto = False
    if mode == "decode":
        bt = block_t or min(_next_pow2(tq), max(1, max_rows // gp))
        # 128 keys per step at d <= 128 with <= 16 query rows: best or within 2% of best of 16
        # launch settings on the H200 at batch 1/8/32 (32K/4K keys, d 128) and batch 8 (d 64),
        # paper preset, q_len 1. More rows take 64 keys (see the check after this branch).
        bn = block_n or (16 if interp else (32 if d >= 256 else (128 if gp * bt <= 16 else 64)))
        warps = num_warps or 4
        progs = bsz * hk * triton.cdiv(tq, bt)
        if (not interp and block_n is None and maxnreg is None and num_warps is None
                and d == 128 and gp * bt <= 16):
            if mma_t is None:
                mma_t = auto_decode_mma(mode, d, gp * bt, q.dtype, k_cfg, v_cfg)
            if (progs >= 64 and total >= 8192 and mma_t in (_DECODE_MMAS["vp"],
                                                             _DECODE_MMAS["kq"])
                    and shfl is not False):
                # Many programs with the vp orientation and the shuffle tables (paper,
                # polar-3), or kq (polar-4 and up, auto_decode_mma): 128 keys per step under
                # a 168-register cap. On an H100
                # (results/bench/decode_launch_sweep_shfl.md) 1.05-1.11x as fast as 64 keys
                # under a 128 cap in all 12 rows (batch 8-32, 8K-128K keys; paper batch 8 /
                # 32K: 0.369 vs 0.406 ms), but 0.89-0.91x at batch 32 / 4K, and 0.99-1.01x
                # for polar-4 (qk), which keep the rule below.
                maxnreg = 168
            elif progs >= 64 and (total >= 8192 or progs >= 256):
                # Many (batch, KV head) programs: 64 keys per step under a 128-register cap
                # (16 warps per SM instead of 8). On the H200 (paper preset): 0.70 vs 0.80 ms
                # at Llama batch 8 / 32K, 9-10% faster at batch 8 / 128K and batch 32 /
                # 32K-128K (results/bench/bench_decode_register_cap.md); with the 16-bit code
                # loads 0.284 vs 0.333 ms at batch 32 / 4K (results/bench/
                # decode_launch_sweep_waves.md). At batch 8 / 4K it was 17% slower, hence 8K
                # tokens or 256 programs.
                bn, maxnreg = 64, 128
                joint12_auto = all(c.levels <= 4 for c in (k_cfg, v_cfg))
            elif progs < 64:
                # Few programs (batch 1-7 at 8 KV heads): 128 keys per step under a 168-register
                # cap. On the H200 with the 16-bit code loads (paper preset, split counts by
                # waves): 0.289 vs 0.395 ms at Llama batch 1 / 128K, 0.094 vs 0.095 ms at 32K
                # (results/bench/decode_launch_sweep_waves.md).
                maxnreg = 168
    else:
        bt = block_t or min(_next_pow2(tq), max(1, (32 if interp else max_rows) // gp))
        bn = block_n or (16 if interp else (32 if d >= 256 else 64))
        warps = num_warps or (4 if d <= 64 else 8)
    if not interp and d <= 128 and gp * bt > 16 and bn != 64:
        # Seen on the H200 (Triton 3.6, d 128, 64 query rows per program): 32 keys per step
        # gave outputs with relative error 1.2 or an illegal memory access, 128 keys wrong
        # outputs; 64 keys (the default) matched the reference. Not root-caused.
        raise ValueError(
            f"block_n={bn} with {gp * bt} query rows per program (group {group} x "
            f"{bt} queries): such launches returned wrong outputs on an H200; use "
            "block_n=64 (the default) when more than 16 rows share a program at d <= 128.")
    m_rows = max(16, gp * bt)
    n_ttiles = triton.cdiv(tq, bt)
    # Triton 3.6 (the H200 stack's) fails to compile the packed decode with more than 32 query
    # rows per program at d <= 128 ("Illegal shared layout" in TritonGPUOptimizeDotOperands,
    # reproduced offline with scripts/kernel_ir_stats.py --q-len 16 --decodes packed); 3.9
    # compiles it. Such launches (q_len > 8 at group 4, or group > 8) keep the float32 decode,
    # under the interpreter too, so that every backend launches the same kernel.
    pack_ok = gp * bt <= 32
    if pack is None:
        # bfloat16 queries, whose tensor-core operands are bfloat16 anyway: level 1 decoded
        # with packed bf16x2 table words and multiplies (POLARTENSOR_DECODE=joined: never)
        pack = PACKED_DECODE and dt == tl.bfloat16 and pack_ok
    elif pack:
        if decode_tile is not decode_tile_joined:
            raise ValueError("pack=True needs the joined tile decode (POLARTENSOR_DECODE="
                             "packed or joined, not reshape)")
        if not interp and dt != tl.bfloat16:
            raise ValueError(f"pack=True decodes in bfloat16: it needs bfloat16 queries, got "
                             f"{q.dtype}; use pack=None or cast the queries")
        if not pack_ok:
            raise ValueError(f"pack=True with {gp * bt} query rows per program (group {group} "
                             f"x {bt} queries) does not compile with Triton 3.6; pass "
                             "block_t <= 32 // group, or pack=None for the float32 decode")
    has_joint = pack and k_trig.shape[0] > 5 and v_trig.shape[0] > 5
    if shfl is None:
        # beside a joint table forced on, the shuffles measured slower (auto_decode_shfl)
        shfl = (auto_decode_shfl(mode, d, gp * bt, q.dtype, pack)
                and not (joint12 and has_joint))
    if joint12 is None:
        # where the shuffles serve the per-level tables, they beat the joint table (H100,
        # results/bench/bench_decode_shfl_joint12.md: paper batch 8 / 32K 0.406 vs 0.452 ms)
        joint12 = joint12_auto and not shfl
    if joint12 and has_joint:
        # levels 1 and 2 through the joint tables the trig tables carry (PACK == 2)
        pack = 2
    if pack and shfl:
        # per-level tables by warp shuffles (PACK == 3; 4 with the joint table)
        pack = 4 if pack == 2 else 3
    if mma_t is None:
        mma_t = auto_decode_mma(mode, d, gp * bt, q.dtype, k_cfg, v_cfg)
    has_tail = nt > 0
    kt = k_tail if has_tail else q
    vt = v_tail if has_tail else q
    if mask is None:
        mask_kind, mask_t, ms = 0, q, (0, 0, 0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_t, ms = mask, mask.stride()
    kch = min(d, 64)
    kw = dict(
        GROUP=group, BLOCK_T=bt, M=m_rows, BN=bn, D=d, KCH=kch,
        **_cfg_args("K", level_words(k_cfg, d), k_trig.shape[-1]),
        **_cfg_args("V", level_words(v_cfg, d), v_trig.shape[-1]),
        HAS_TAIL=has_tail, MASK_KIND=mask_kind, CAUSAL=bool(is_causal),
        ROTQ=rot_k is not None, UNROT=rot_v is not None, DT=dt, PREC=prec, RPREC=rprec,
        PACK=pack, MMA_T=mma_t, num_warps=warps,
    )
    # One stage: the loop's loads are gathers feeding table look-ups; software pipelining
    # would multi-buffer them in shared memory (over the 227 KB limit at 3 stages, d 128).
    kw["num_stages"] = 1 if num_stages is None else num_stages
    if maxnreg is not None and not interp:
        kw["maxnreg"] = maxnreg

    def args(pacc, pml, kv_per_split, num_splits):
        return (
            q, q.stride(0), q.stride(1), q.stride(2),
            rot_k if rot_k is not None else q, rot_v if rot_v is not None else q,
            k_codes, k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
            k_radii, k_radii.stride(0), k_radii.stride(1), k_radii.stride(2), k_trig,
            v_codes, v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
            v_radii, v_radii.stride(0), v_radii.stride(1), v_radii.stride(2), v_trig,
            kt, kt.stride(0), kt.stride(1), kt.stride(2),
            vt, vt.stride(0), vt.stride(1), vt.stride(2),
            mask_t, ms[0], ms[1], ms[2], ms[3],
            out, out.stride(0), out.stride(1), out.stride(2),
            pacc, pml,
            hk, tq, n, nt, kv_per_split, num_splits, n_ttiles, scale * _LOG2E,
        )

    if mode == "decode":
        if num_splits is None:
            # ~8 programs per SM measured best on the H200 (batch 8, 32K, d 128; see
            # results/bench/bench_attention.md, sweep): decode of the codes is the bottleneck,
            # and more, shorter splits keep every SM busy. On the GPU the count is then the
            # one whose programs load the busiest SM least, from the compiled kernel's
            # resident programs per SM (_split_count; the first such rule, by waves:
            # results/bench/bench_decode_splits.md, 1.10-1.22x at batch 1 / 32K-128K and
            # batch 8 / 4K and 128K; the per-SM model: decode_split_sweep_h100.md).
            want = triton.cdiv(8 * _sm_count(dev), max(progs, 1))
            min_chunk = bn * (2 if interp else 4)
            max_splits = triton.cdiv(max(total, 1), min_chunk)
            num_splits = max(1, min(want, max_splits))
            per_sm = (None if interp or split_rule == "per_sm"
                      else _split_kernel_blocks_per_sm(kw, args, dev))
            if per_sm is not None and num_splits > 1:
                num_splits = _split_count(want, max_splits, progs, per_sm, _sm_count(dev),
                                          triton.cdiv(max(total, 1), bn))
        kv_per_split = triton.cdiv(triton.cdiv(max(total, 1), num_splits), bn) * bn
        num_splits = max(1, triton.cdiv(max(total, 1), kv_per_split))
    else:
        num_splits = 1
        kv_per_split = max(total, 1)
    single = num_splits == 1
    if single:
        pacc = pml = out
    else:
        slots = bsz * hk * n_ttiles * num_splits
        pacc = torch.empty(slots * m_rows * d, dtype=torch.float32, device=dev)
        pml = torch.empty(slots * 2 * m_rows, dtype=torch.float32, device=dev)
    grid = (bsz * hk, n_ttiles, num_splits)
    polar_decode_attn_fwd_kernel[grid](*args(pacc, pml, kv_per_split, num_splits),
                                       SINGLE=single, **kw)
    if not single:
        polar_attn_combine_kernel[(bsz * hk, n_ttiles)](
            pacc, pml, rot_v if rot_v is not None else q, out,
            out.stride(0), out.stride(1), out.stride(2),
            hk, tq, num_splits, n_ttiles,
            GROUP=group, BLOCK_T=bt, M=m_rows, D=d, JC=kch, UNROT=rot_v is not None,
            RPREC=rprec, num_warps=4,
        )
    return out


def _split_kernel_blocks_per_sm(kw: dict, args, dev: torch.device) -> int | None:
    """Resident programs per SM of the split attention kernel of this configuration, from its
    compiled binary (compiled once here if not yet; cached per configuration and device)."""
    key = (dev.index, tuple(kw.items()))  # kw is built in one order: no sort on the hot path
    if key not in _BLOCKS_PER_SM:
        scratch = torch.empty(16, dtype=torch.float32, device=dev)
        try:
            compiled = polar_decode_attn_fwd_kernel.warmup(
                *args(scratch, scratch, 64, 2), grid=(1,), SINGLE=False, **kw)
        except Exception:  # noqa: BLE001 - the launch itself reports a real problem
            compiled = None
        _BLOCKS_PER_SM[key] = None if compiled is None else _blocks_per_sm(compiled, dev)
    return _BLOCKS_PER_SM[key]
