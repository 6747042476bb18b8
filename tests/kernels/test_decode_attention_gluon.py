"""The Gluon decode attention (kernels/decode_attention_gluon.py) == reference polar_sdpa.

The operand permutations are checked everywhere; the kernel itself only on CUDA (Gluon
compiles for the GPU and has no interpreter)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polartensor import polar_sdpa, quantize
from polartensor.config import get_preset
from polartensor.kernels.common import trig_table
from polartensor.kernels.decode_attention_gluon import (
    LAST_LAUNCH,
    fold_table,
    gluon_decode_supported,
    k_permutation,
    launch_attention_gluon,
    v_permutation,
)
from polartensor.rotation import rotation_matrix

ON_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="the Gluon kernel compiles for CUDA only; "
                               "Triton's interpreter cannot run Gluon")


def test_k_permutation_is_the_mma_operand_order():
    """Column kappa of S = Q K^T's B operand (mma m16n8k16: k = 16 t + 8 h + 2 (lane % 4) +
    e in each thread) holds block 2 (lane % 4) + (t >> 2), coordinate (t & 3) h e of it:
    each thread's 32 columns are two whole 16-coordinate blocks."""
    perm = k_permutation()
    assert sorted(perm.tolist()) == list(range(128))
    for kap in range(128):
        e, tig, h, t = kap & 1, (kap >> 1) & 3, (kap >> 3) & 1, kap >> 4
        assert perm[kap] == 16 * (2 * tig + (t >> 2)) + ((t & 3) << 2 | h << 1 | e)
    for tig in range(4):
        cols = [16 * t + 8 * h + 2 * tig + e for t in range(8) for h in range(2)
                for e in range(2)]
        assert sorted(perm[cols].tolist()) == list(range(32 * tig, 32 * tig + 32))


def test_v_permutation_is_the_mma_operand_order():
    """Column nu = lane // 4 + 8 u of O = P V's B operand holds block lane // 4, coordinate u:
    each thread's 16 columns are one whole block."""
    perm = v_permutation()
    assert sorted(perm.tolist()) == list(range(128))
    for g in range(8):
        assert perm[[g + 8 * u for u in range(16)]].tolist() == list(range(16 * g, 16 * g + 16))


def test_supported_scope():
    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    paper = get_preset("paper", head_dim=128)
    polar4 = get_preset("polar-4", head_dim=128)
    # (on the CPU nothing is served: the kernel is CUDA only)
    rot = torch.eye(128)
    assert not gluon_decode_supported(q, paper, paper, rot, rot, None, None, 4)
    if ON_GPU:
        qc, rot = q.cuda(), rot.cuda()
        assert gluon_decode_supported(qc, paper, paper, rot, rot, None, None, 4)
        assert not gluon_decode_supported(qc, polar4, polar4, rot, rot, None, None, 4)
        assert not gluon_decode_supported(qc, paper, paper, None, None, None, None, 4)
        assert not gluon_decode_supported(qc.float(), paper, paper, rot, rot, None, None, 4)
        assert not gluon_decode_supported(qc.expand(1, 8, 2, 128), paper, paper, rot, rot,
                                          None, None, 4)


@needs_gpu
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(b=st.integers(1, 3), hk=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 7, 16]),
       n=st.integers(1, 3000), splits=st.integers(1, 9), block_n=st.sampled_from([16, 32]),
       prefetch=st.booleans(), transposed=st.booleans(), pairs=st.booleans(),
       kpairs=st.booleans(), lshift=st.booleans(), stagger=st.booleans(),
       staged=st.booleans(), fold=st.booleans(), seed=st.integers(0, 2**16))
def test_gluon_decode_matches_reference(b, hk, group, n, splits, block_n, prefetch,
                                        transposed, pairs, kpairs, lshift, stagger, staged,
                                        fold, seed):
    """Every launch variant against the reference; the transposed step where it serves
    (groups of at most 8); two steps an iteration (with the prefetch), which with up to 9
    splits of up to 3000 keys meets an even and an odd number of full steps. K's loads by
    block pairs and the shifted tables decode the same words from the same tables, and the
    prefetch half a step ahead (stagger) and the codes staged in shared memory (staged) only
    move loads, so each gives the same output bit for bit as the launch without them. The
    staged launch reads the cache from storage whose capacity is a multiple of 8 keys (as
    a cache's own is), which it needs, and must have taken the ring. The folded levels 3
    and 2 (fold) round the decoded blocks otherwise: close to the launch without them, and
    the other settings bit for bit with it."""
    d = 128
    cfg = get_preset("paper", head_dim=d)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hk * group, 1, d, generator=g).to(torch.bfloat16).cuda()
    k = quantize(torch.randn(b, hk, n, d, generator=g).cuda(), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).cuda(), cfg)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, q.device, torch.float32).contiguous()
    trig = trig_table(k.centroids, cfg.bits)
    kc, kr, vc, vr = k.codes, k.radii, v.codes, v.radii
    if staged:
        kc, kr, vc, vr = (_in_capacity(t, -(-n // 8) * 8) for t in (kc, kr, vc, vr))
    out = launch_attention_gluon(q, kc, kr, trig, cfg, vc, vr, trig, cfg,
                                 rot, rot, 1 / math.sqrt(d), splits, block_n=block_n,
                                 prefetch=prefetch, transposed=transposed and group <= 8,
                                 pairs=pairs, kpairs=kpairs, lshift=lshift, stagger=stagger,
                                 staged=staged, fold=fold)
    assert LAST_LAUNCH["staged"] is staged
    ref = polar_sdpa(q.float(), k, v, enable_gqa=group > 1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    if kpairs or lshift or (stagger and prefetch) or staged:
        plain = launch_attention_gluon(
            q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg, rot, rot,
            1 / math.sqrt(d), splits, block_n=block_n, prefetch=prefetch,
            transposed=transposed and group <= 8, pairs=pairs, kpairs=False, lshift=False,
            stagger=False, staged=False, fold=fold)
        assert torch.equal(out, plain)
    if fold:
        unfolded = launch_attention_gluon(
            q, k.codes, k.radii, trig, cfg, v.codes, v.radii, trig, cfg, rot, rot,
            1 / math.sqrt(d), splits, block_n=block_n, prefetch=prefetch,
            transposed=transposed and group <= 8, pairs=pairs, fold=False)
        diff = (out.double() - unfolded.double()).norm() / unfolded.double().norm()
        assert diff <= 1e-2, f"folded against unfolded: relative difference {diff:.2e}"
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err <= 2e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("preset", ["paper", "polar-3"])
def test_fold_table_serves_the_kernels_indices(preset):
    """``fold_table``'s two 16-word tables read as ``_decode_trees`` reads them: for every
    level-3 code c3 and level-2 codes of both sides, the index the kernel builds (one bit
    select of words holding the codes, bits from 4 on left as they are: the tables repeat
    there) finds t_s(c3) (cos c2, sin c2) in bfloat16, each product rounded once."""
    cfg = get_preset(preset, head_dim=128)
    k = quantize(torch.randn(1, 1, 4, 128), cfg)
    trig = trig_table(k.centroids, cfg.bits)
    table = fold_table(trig)
    assert table.dtype == torch.float32 and table.numel() == trig[:5].numel() + 32
    assert torch.equal(table[:trig[:5].numel()], trig[:5].reshape(-1))
    assert fold_table(trig) is table                    # cached per table
    words = table[trig[:5].numel():].view(torch.int32)
    cos, sin = k.centroids.double().cos(), k.centroids.double().sin()
    for w2 in range(256):                               # one block's four level-2 codes
        for w3 in range(16):                            # its two level-3 codes
            hi = (w2 >> 8 | w3 << 8) & ~0xFF            # neighbours' bits above: ignored
            for m in range(2):
                c3 = (w3 >> 2 * m) & 3
                x = (w2 | hi) >> 4 * m                  # the kernel's words for node m
                y = (w3 | hi) << 2 if m == 0 else w3 | hi
                u = w3 | hi if m == 0 else (w3 | hi) >> 2
                for s, idx in ((0, (x & 3) | (y & ~3)), (1, (u & 3) | (x & ~3))):
                    c2 = (w2 >> (4 * m + 2 * s)) & 3
                    word = int(words[16 * s + (idx & 15)]) & 0xFFFFFFFF
                    t = (cos if s == 0 else sin)[2, c3]
                    want = [t * cos[1, c2], t * sin[1, c2]]
                    got = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32)
                    got = got.to(torch.int16).view(torch.bfloat16).double()
                    ref = torch.tensor(want).float().to(torch.bfloat16).double()
                    assert torch.equal(got, ref), (w2, w3, m, s)


def _unpack(words: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """The bfloat16 half (0: low, cos; 1: high, sin) of packed table words, as float64."""
    w = words.view(torch.int32)
    half = torch.where(side == 0, w & 0xFFFF, (w >> 16) & 0xFFFF)
    return half.to(torch.int16).view(torch.bfloat16).double()


def fold_rounding_errors(n: int = 100_000, seed: int = 0) -> tuple[float, float]:
    """RMS relative error against the exact r t4 t3 t2 t1 of one decoded coordinate, the
    unfolded decode's and the folded one's, emulating the kernel's arithmetic on the paper
    tables: the radius rounded to bfloat16, then one bfloat16 rounding per multiply by a
    table word (``mul.rn.bf16x2``: the product of two bfloat16 numbers is exact in float32),
    levels 3 and 2 from ``fold_table``'s word where folded."""
    cfg = get_preset("paper", head_dim=128)
    k = quantize(torch.randn(1, 1, 4, 128), cfg)
    trig = trig_table(k.centroids, cfg.bits)
    packed, fold = trig[2], fold_table(trig)[trig[:5].numel():]
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, dtype=torch.float64, generator=g) * 8 + 0.25
    code = [torch.randint(0, 16 if lv == 0 else 4, (n,), generator=g) for lv in range(4)]
    side = [torch.randint(0, 2, (n,), generator=g) for _ in range(4)]
    ang = k.centroids.double()
    exact = r.clone()
    for lv in range(4):
        a = ang[lv, code[lv]]
        exact = exact * torch.where(side[lv] == 0, a.cos(), a.sin())

    def bf(x):
        return x.to(torch.bfloat16).double()

    def factor(lv):
        return _unpack(packed[lv, code[lv]], side[lv])
    n4 = bf(bf(r) * factor(3))
    unfolded = bf(bf(bf(n4 * factor(2)) * factor(1)) * factor(0))
    c2, c3 = code[1], code[2]
    idx = torch.where(side[2] == 0, c2 | c3 << 2, 16 + (c3 | c2 << 2))
    folded = bf(bf(n4 * _unpack(fold[idx], side[1])) * factor(0))
    return tuple(((v - exact).norm() / exact.norm()).item() for v in (unfolded, folded))


def test_fold_rounds_nearer_the_exact_product():
    """The folded levels round each level-2 node's factor once from float32 where the
    unfolded decode rounds the level-3 table value, the level-3 node and then its product:
    per coordinate the folded decode is no further from the exact product (3.70e-3 against
    4.20e-3 RMS relative with these draws), though no longer equal to the unfolded one."""
    unfolded, folded = fold_rounding_errors()
    assert folded < unfolded < 6e-3, (unfolded, folded)


def _in_capacity(t: torch.Tensor, cap: int) -> torch.Tensor:
    """``t`` [B, H, N, X] as the first N keys of storage holding ``cap`` keys a head."""
    buf = torch.zeros(*t.shape[:2], cap, t.shape[3], dtype=t.dtype, device=t.device)
    buf[:, :, :t.shape[2]] = t
    return buf[:, :, :t.shape[2]]


def test_staged_fits_needs_whole_aligned_runs():
    """The staged ring copies a step's records and radii as 16-byte chunks: storage whose
    keys follow each other and whose (batch, head) runs start 16-byte aligned fits; a
    capacity not a multiple of 8 keys, a strided key axis or a misaligned start does not
    (such a call takes the default loop)."""
    from polartensor.kernels.decode_attention_gluon import staged_fits

    k = quantize(torch.randn(2, 3, 40, 128), "paper")
    assert k.codes.shape[-1] == 46 and k.radii.shape[-1] == 8
    assert staged_fits(k.codes, k.radii)
    assert staged_fits(_in_capacity(k.codes[:, :, :37], 40), _in_capacity(k.radii[:, :, :37], 40))
    odd = quantize(torch.randn(2, 3, 37, 128), "paper")
    assert not staged_fits(odd.codes, odd.radii)                 # 37 x 46 bytes a head
    assert not staged_fits(k.codes[:, :, ::2], k.radii[:, :, ::2])
    flat = torch.zeros(2 * 3 * 40 * 46 + 2, dtype=torch.uint8)
    shifted = flat[2:].view(2, 3, 40, 46)
    assert not staged_fits(shifted, k.radii)


class _Launched(Exception):
    pass


def _staged_launch(monkeypatch, group, n=40, cap=None, staged=None, env=None, batch=16,
                   fold_env=None):
    """The STAGED constexpr that ``launch_attention_gluon`` gives the kernel (CPU tensors,
    the kernel replaced by a recorder that stops the launch), and the ring's constexprs."""
    from polartensor.kernels import decode_attention_gluon as dg

    for name, value in (("POLARTENSOR_GLUON_STAGED", env),
                        ("POLARTENSOR_GLUON_FOLD", fold_env)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    for name in ("POLARTENSOR_GLUON_TRANS", "POLARTENSOR_GLUON_LSHIFT"):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    class _Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(kwargs, args=args)
                raise _Launched
            return launch

        def warmup(self, *args, grid, **kwargs):
            seen.update(kwargs, args=args, warmed=True)
            raise _Launched

    monkeypatch.setattr(dg, "polar_decode_attn_gluon_fwd_kernel", _Recorder())
    monkeypatch.setattr("polartensor.kernels.common._sm_count", lambda device: 132)
    d = 128
    cfg = get_preset("paper", head_dim=d)
    k = quantize(torch.randn(batch, 2, n, d), cfg)
    kc, kr = k.codes, k.radii
    if cap is not None:
        kc, kr = _in_capacity(kc, cap), _in_capacity(kr, cap)
    q = torch.zeros(batch, 2 * group, 1, d, dtype=torch.bfloat16)
    trig = trig_table(k.centroids, cfg.bits)
    with pytest.raises(_Launched):
        launch_attention_gluon(q, kc, kr, trig, cfg, kc, kr, trig, cfg, torch.eye(d),
                               torch.eye(d), 1 / math.sqrt(d), 2, staged=staged)
    return seen


def test_staged_ring_is_the_default_of_the_transposed_step(monkeypatch):
    """Unset, the codes are staged in shared memory where the transposed step runs (groups of
    at most 8) over at least STAGED_MIN_HEADS (batch, KV head) pairs (where it measured
    faster) and the storage fits, and the prefetch is off then; fewer pairs (batch 1 here:
    2) and groups over 8 keep the prefetch unless POLARTENSOR_GLUON_STAGED=1; 0 turns it
    off; storage that does not fit (40 keys in storage of 45: 45 x 46 bytes a head) takes
    the prefetch. The staged build is checked (warmup) before its first launch."""
    seen = _staged_launch(monkeypatch, 4)
    assert seen["STAGED"] is True and seen["PREFETCH"] is False and seen["TRANS"] is True
    assert seen["warmed"] and seen["K_REC"] == 46 and seen["K_PW"] == 256
    assert seen["RW"] == 64 and seen["NSTAGE"] == 4
    seen = _staged_launch(monkeypatch, 16)
    assert seen.get("STAGED", False) is False and seen["PREFETCH"] is True
    seen = _staged_launch(monkeypatch, 4, batch=1)
    assert seen.get("STAGED", False) is False and seen["PREFETCH"] is True
    assert _staged_launch(monkeypatch, 4, batch=1, env="1")["STAGED"] is True
    assert _staged_launch(monkeypatch, 4, batch=1, staged=True)["STAGED"] is True
    assert _staged_launch(monkeypatch, 16, env="1")["STAGED"] is True
    assert _staged_launch(monkeypatch, 4, env="0").get("STAGED", False) is False
    assert _staged_launch(monkeypatch, 4, staged=False).get("STAGED", False) is False
    misfit = _staged_launch(monkeypatch, 4, cap=45)
    assert misfit.get("STAGED", False) is False and misfit["PREFETCH"] is True
    assert _staged_launch(monkeypatch, 4, cap=48)["STAGED"] is True


def test_folded_levels_go_with_the_staged_ring(monkeypatch):
    """Unset, levels 3 and 2 are folded (LSHIFT's bit 1, beside the shifted tables' bit 0)
    where the ring runs, where it measured faster, and the kernel gets ``fold_table``'s
    table; the prefetch keeps the unfolded decode unless POLARTENSOR_GLUON_FOLD=1, and 0
    turns the fold off with the ring too."""
    tables = 5 * 4 * 16                                 # planes 0-4 of the paper's trig table
    staged = _staged_launch(monkeypatch, 4)
    assert staged["STAGED"] is True and staged["LSHIFT"] == 3
    assert staged["args"][11].shape == staged["args"][20].shape == (tables + 32,)
    prefetch = _staged_launch(monkeypatch, 16)
    assert prefetch["PREFETCH"] is True and prefetch["LSHIFT"] == 1
    assert prefetch["args"][11].dim() == 3                # the trig table as it came
    assert _staged_launch(monkeypatch, 16, fold_env="1")["LSHIFT"] == 3
    assert _staged_launch(monkeypatch, 4, fold_env="0")["LSHIFT"] == 1


def test_transposed_step_refuses_groups_over_8():
    """Asked for explicitly, the transposed step names the group it cannot serve (checked
    before anything is launched, so on every device)."""
    d, n = 128, 40
    cfg = get_preset("paper", head_dim=d)
    q = torch.zeros(1, 16, 1, d, dtype=torch.bfloat16)
    k = quantize(torch.randn(1, 1, n, d), cfg)
    rot = torch.eye(d)
    trig = trig_table(k.centroids, cfg.bits)
    with pytest.raises(ValueError, match="at most 8 queries per KV head, not 16"):
        launch_attention_gluon(q, k.codes, k.radii, trig, cfg, k.codes, k.radii, trig, cfg,
                               rot, rot, 1 / math.sqrt(d), 2, transposed=True)


@pytest.fixture
def gluon_calls(monkeypatch):
    """A list that grows by one per launch of the Gluon decode."""
    from polartensor.kernels import decode_attention_gluon as dg

    calls = []
    real = dg.launch_attention_gluon

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(dg, "launch_attention_gluon", spy)
    return calls


@needs_gpu
@pytest.mark.parametrize("setting", ["1", "0"])
def test_sdpa_routes_to_gluon_decode(monkeypatch, gluon_calls, setting):
    """F.scaled_dot_product_attention on the quantized cache takes the Gluon decode with
    POLARTENSOR_DECODE_GLUON=1 (and not with 0), and matches the reference either way."""
    import torch.nn.functional as F

    monkeypatch.setenv("POLARTENSOR_DECODE_GLUON", setting)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 1, 128, generator=g).to(torch.bfloat16).cuda()
    k = quantize(torch.randn(2, 2, 700, 128, generator=g).cuda(), "paper")
    v = quantize(torch.randn(2, 2, 700, 128, generator=g).cuda(), "paper")
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert len(gluon_calls) == (1 if setting == "1" else 0)
    ref = polar_sdpa(q.float(), k, v, enable_gqa=True)
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err <= 2e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("env,getter,default", [
    ("POLARTENSOR_GLUON_PREFETCH", "gluon_prefetch_setting", True),
    ("POLARTENSOR_GLUON_TRANS", "gluon_transposed_setting", True),
    ("POLARTENSOR_GLUON_PAIRS", "gluon_pairs_setting", None),
    ("POLARTENSOR_GLUON_KPAIRS", "gluon_kpairs_setting", True),
    ("POLARTENSOR_GLUON_LSHIFT", "gluon_lshift_setting", True),
    ("POLARTENSOR_GLUON_STAGGER", "gluon_stagger_setting", False),
    ("POLARTENSOR_GLUON_STAGED", "gluon_staged_setting", None),
    ("POLARTENSOR_GLUON_FOLD", "gluon_fold_setting", None),
])
def test_gluon_switches_read_and_reject(monkeypatch, env, getter, default):
    """Each on/off setting of the Gluon decode: its default unset, 0 and 1 read per call,
    anything else refused with the variable's name."""
    from polartensor.kernels import decode_attention_gluon as dg

    read = getattr(dg, getter)
    monkeypatch.delenv(env, raising=False)
    assert read() is default
    for text, want in (("0", False), ("1", True)):
        monkeypatch.setenv(env, text)
        assert read() is want
    for bad in ("2", "on", "true"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=env):
            read()


def test_gluon_decode_setting_three_ways(monkeypatch):
    """POLARTENSOR_DECODE_GLUON: unset (None: the measured default), 0, 1; else refused."""
    from polartensor.kernels.decode_attention_gluon import gluon_decode_setting

    monkeypatch.delenv("POLARTENSOR_DECODE_GLUON", raising=False)
    assert gluon_decode_setting() is None
    monkeypatch.setenv("POLARTENSOR_DECODE_GLUON", "0")
    assert gluon_decode_setting() is False
    monkeypatch.setenv("POLARTENSOR_DECODE_GLUON", "1")
    assert gluon_decode_setting() is True
    monkeypatch.setenv("POLARTENSOR_DECODE_GLUON", "yes")
    with pytest.raises(ValueError, match="POLARTENSOR_DECODE_GLUON"):
        gluon_decode_setting()


def test_gluon_default_from_the_measured_size():
    """By default, from 2^20 (batch x KV heads x keys) up, where it measured faster; with the
    transposed step also from 2^19 where batch x KV heads >= 16."""
    from polartensor.kernels.decode_attention_gluon import gluon_decode_auto

    for tr in (False, True):
        assert gluon_decode_auto(8, 8, 16384, tr) and gluon_decode_auto(8, 8, 32768, tr)
        assert gluon_decode_auto(1, 8, 131072, tr) and gluon_decode_auto(2, 8, 131072, tr)
        assert not gluon_decode_auto(1, 8, 32768, tr) and not gluon_decode_auto(1, 8, 65536, tr)
        assert not gluon_decode_auto(4, 8, 8192, tr) and not gluon_decode_auto(8, 8, 4096, tr)
    assert not gluon_decode_auto(8, 8, 16383, False) and not gluon_decode_auto(16, 8, 4096, False)
    assert gluon_decode_auto(16, 8, 4096, True) and gluon_decode_auto(2, 8, 32768, True)
    assert not gluon_decode_auto(2, 8, 32767, True)


@needs_gpu
def test_large_decode_takes_gluon_by_default(monkeypatch, gluon_calls):
    """Unset POLARTENSOR_DECODE_GLUON: a decode of 2^20 key-heads over 8 heads, or 2^19 over
    16 (the transposed step's threshold), goes to the Gluon kernel, one just below to the
    Triton kernel; all match the reference."""
    import torch.nn.functional as F

    monkeypatch.delenv("POLARTENSOR_DECODE_GLUON", raising=False)
    monkeypatch.delenv("POLARTENSOR_GLUON_TRANS", raising=False)
    g = torch.Generator().manual_seed(5)
    for b, n, routed in ((1, 131072, 1), (1, 131071, 0), (2, 32768, 1), (2, 32767, 0)):
        gluon_calls.clear()
        q = torch.randn(b, 32, 1, 128, generator=g).to(torch.bfloat16).cuda()
        k = quantize(torch.randn(b, 8, n, 128, generator=g).cuda(), "paper")
        v = quantize(torch.randn(b, 8, n, 128, generator=g).cuda(), "paper")
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert len(gluon_calls) == routed
        ref = polar_sdpa(q.float(), k, v, enable_gqa=True)
        err = (out.double() - ref.double()).norm() / ref.double().norm()
        assert err <= 2e-2, f"n={n}: relative error {err:.2e}"


@needs_gpu
@pytest.mark.parametrize("staged", [False, True])
def test_gluon_decode_int64_offsets(staged):
    """A cache whose batch stride puts later batch rows past 2^31 elements (the per-head
    bases are 64-bit; offsets inside a step are 32-bit), through the prefetch and (storage
    of a capacity that is a multiple of 8 keys) through the staged ring's copies."""
    d, cfg = 128, get_preset("paper", head_dim=128)
    cap = (1 << 31) // (2 * cfg.record_bytes(d)) + 1000
    if staged:
        cap = -(-cap // 8) * 8
    codes = torch.zeros(3, 1, cap, cfg.record_bytes(d), dtype=torch.uint8, device="cuda")
    radii = torch.zeros(3, 1, cap, cfg.num_blocks(d), dtype=torch.float16, device="cuda")
    assert codes.stride(0) * 2 > 2**31
    g = torch.Generator().manual_seed(9)
    ref = quantize(torch.randn(3, 1, 300, d, generator=g).cuda(), cfg)
    codes[:, :, :300] = ref.codes
    radii[:, :, :300] = ref.radii
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, codes.device, torch.float32).contiguous()
    trig = trig_table(ref.centroids, cfg.bits)
    q = torch.randn(3, 4, 1, d, generator=g).to(torch.bfloat16).cuda()
    out = launch_attention_gluon(q, codes[:, :, :300], radii[:, :, :300], trig, cfg,
                                 codes[:, :, :300], radii[:, :, :300], trig, cfg, rot, rot,
                                 d ** -0.5, 3, staged=staged)
    assert LAST_LAUNCH["staged"] is staged
    want = polar_sdpa(q.float(), ref, ref, enable_gqa=True)
    err = (out.double() - want.double()).norm() / want.double().norm()
    assert err <= 2e-2, f"relative error {err:.2e}"


def test_permuted_rotation_cache_follows_the_tensor():
    """The host's permuted S_k is q's rotation in operand order, kept per live tensor and
    recomputed after an in-place change."""
    import gc

    from polartensor.kernels import decode_attention_gluon as dg

    rot = torch.randn(128, 128)
    q = torch.randn(3, 128)
    first = dg._permuted_rotation(rot)
    assert dg._permuted_rotation(rot) is first
    torch.testing.assert_close(q @ first, (q @ rot.T)[:, k_permutation()], rtol=1e-5,
                               atol=1e-4)
    rot.mul_(2)
    again = dg._permuted_rotation(rot)
    assert again is not first
    # (float32 sums of 128 products in another order: one element in 384 went past the
    # default 1.3e-6 relative on a GPU machine's CPU)
    torch.testing.assert_close(q @ again, (q @ rot.T)[:, k_permutation()], rtol=1e-5,
                               atol=1e-4)
    other = torch.randn(128, 128)
    dg._permuted_rotation(other)
    key = id(other)
    del other
    gc.collect()
    assert key not in dg._PERMUTED


def test_takes_gluon_decode_needs_setting_size_and_scope(monkeypatch):
    """The dispatch's one decision: the setting (or, unset, the measured size), at least one
    key, and a call the kernel serves (never a CPU tensor)."""
    from polartensor.kernels.decode_attention_gluon import takes_gluon_decode

    paper = get_preset("paper", head_dim=128)
    rot = torch.eye(128)
    q = torch.zeros(1, 32, 1, 128, dtype=torch.bfloat16)
    monkeypatch.setenv("POLARTENSOR_DECODE_GLUON", "1")
    assert not takes_gluon_decode(q, paper, paper, rot, rot, None, None, 4, 1, 8, 1 << 17)
    if ON_GPU:
        qc, rc = q.cuda(), rot.cuda()
        assert takes_gluon_decode(qc, paper, paper, rc, rc, None, None, 4, 1, 8, 10)
        assert not takes_gluon_decode(qc, paper, paper, rc, rc, None, None, 4, 1, 8, 0)
        monkeypatch.delenv("POLARTENSOR_DECODE_GLUON")
        assert takes_gluon_decode(qc, paper, paper, rc, rc, None, None, 4, 1, 8, 1 << 17)
        assert not takes_gluon_decode(qc, paper, paper, rc, rc, None, None, 4, 1, 8, 1000)
        monkeypatch.setenv("POLARTENSOR_DECODE_GLUON", "0")
        assert not takes_gluon_decode(qc, paper, paper, rc, rc, None, None, 4, 1, 8, 1 << 17)


def test_split_count_fills_one_round():
    """Splits put about ``per_sm`` programs on each SM (one round), each of >= 4 steps."""
    from polartensor.kernels.decode_attention_gluon import (
        PROGRAMS_PER_SM_TRANSPOSED,
        gluon_split_count,
        programs_per_sm,
    )

    # batch 8 x 8 KV heads on 132 SMs: 8 per SM -> 16 splits, 12 per SM -> 24
    assert gluon_split_count(64, 32768, 132) == 16
    assert gluon_split_count(64, 32768, 132, per_sm=PROGRAMS_PER_SM_TRANSPOSED[False]) == 24
    assert gluon_split_count(64, 32768, 132, per_sm=PROGRAMS_PER_SM_TRANSPOSED[True]) == 16
    # each launch variant's rule: transposed 12 alone, 8 with the prefetch; else 8
    assert [programs_per_sm(tr, pf) for tr in (False, True) for pf in (False, True)] == [
        8, 8, 12, 8]
    # the prefetch half a step ahead: transposed 12 (168 registers), else 8; nothing
    # without the prefetch
    assert [programs_per_sm(tr, pf, True) for tr in (False, True) for pf in (False, True)] == [
        8, 8, 12, 12]
    # the codes staged in shared memory hold no step in registers: as without the prefetch
    assert [programs_per_sm(tr, pf, False, True) for tr in (False, True)
            for pf in (False, True)] == [8, 8, 12, 12]
    # short caches: no split shorter than four 16-key steps; never fewer than one split
    assert gluon_split_count(1, 200, 132) == 4
    assert gluon_split_count(4096, 32768, 132) == 1



# (scripts/ab_gluon_decode.py's variants) x groups; the transposed step serves groups <= 8
_TRACE_VARIANTS = ["16:0", "16:0:pf", "32:0", "32:0:pf", "16:0:tr", "16:0:pf:tr", "32:0:tr",
                   "32:0:pf:tr", "16:0:pf:pr", "16:0:pf:tr:pr", "32:0:pf:tr:pr", "16:0:kp",
                   "16:0:pf:tr:kp", "16:0:pf:tr:pr:kp", "32:0:pf:kp", "16:0:tr:ls",
                   "16:0:pf:tr:pr:kp:ls", "32:0:pf:kp:ls", "16:0:pf:tr:kp:ls:sg",
                   "16:0:pf:sg", "32:0:pf:tr:sg", "16:0:tr:kp:ls:st", "16:0:kp:ls:st",
                   "32:0:tr:st", "16:128:tr:kp:ls:st", "16:0:tr:kp:ls:st:fd", "16:0:pf:fd"]
_TRACE_GROUPS = [1, 4, 7, 8, 16]
_TRACES = [(v, g) for v in _TRACE_VARIANTS for g in _TRACE_GROUPS
           if not ("tr" in v.split(":") and g > 8)]


@pytest.fixture(scope="module")
def traced():
    """scripts/gluon_offline_stats.py --trace-only over the variants, in a subprocess: the
    interpreter (which CI runs under) replaces the functions that Gluon traces."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, os.path.join(root, "scripts",
                                                       "gluon_offline_stats.py"),
                          "--trace-only", "--variants", ",".join(_TRACE_VARIANTS),
                          "--groups", ",".join(map(str, _TRACE_GROUPS))],
                         capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(_TRACES), res.stdout[-2000:] + res.stderr[-2000:]
    return {(r["variant"], r["group"]): r for r in rows}


# one xdist worker runs the module's trace subprocess (a minute on a CI core) for all of them
@pytest.mark.xdist_group("gluon_decode_traces")
@pytest.mark.parametrize("variant,group", _TRACES)
def test_kernel_traces_with_trivial_operand_layouts(traced, variant, group):
    """Every launch variant traces for sm_90 on any machine: the decoded K and V tiles reach
    the MMA operands (and, transposed, P^T its B operand) with no data movement. (A 32-key
    transposed step once failed here: a reshape of the wrong size.)"""
    row = traced[(variant, group)]
    assert row.get("traced") is True, row.get("error")
    assert row["movmatrix"] == ("tr" in variant.split(":"))
