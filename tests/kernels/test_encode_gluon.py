"""The Gluon encode (kernels/encode_gluon.py) == the Triton encode, byte for byte.

Traced for sm_90 on any machine; run only on an sm_90 GPU (wgmma and TMA; Gluon has no
interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polartensor import quantize
from polartensor.config import get_preset
from polartensor.kernels import encode_gluon
from polartensor.kernels.common import boundary_table
from polartensor.kernels.encode import encode_into_triton
from polartensor.rotation import rotation_matrix

ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_sm90 = pytest.mark.skipif(not ON_SM90, reason="the Gluon encode runs wgmma and TMA: "
                                "an sm_90 GPU only (Gluon has no interpreter)")


def _offline_stats(*args: str, stage: str = "1") -> dict:
    """scripts/gluon_offline_stats.py --kernel encode ``args``, in a subprocess (the
    interpreter, which CI runs under, replaces the functions that Gluon traces), with
    POLARTENSOR_ENCODE_GLUON_STAGE=``stage``: its rows by variant."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "gluon_offline_stats.py"),
                          "--kernel", "encode", *args],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, POLARTENSOR_ENCODE_GLUON_STAGE=stage))
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows, res.stdout[-2000:] + res.stderr[-2000:]
    return {r["variant"]: r for r in rows}


@pytest.fixture(scope="module")
def traced():
    rows = {stage: _offline_stats("--trace-only", "--variants", "128,64", stage=stage)
            for stage in ("0", "1")}
    assert all(len(r) == 2 for r in rows.values()), rows
    return rows


@pytest.mark.xdist_group("gluon_encode_traces")  # one worker traces for all four
@pytest.mark.parametrize("tile", ["128", "64"])
@pytest.mark.parametrize("stage", ["0", "1"])
def test_gluon_encode_traces_async(traced, tile, stage):
    """Both tiles trace for sm_90, stores staged (the default) or not: asynchronous MMAs (two
    in the issuing helper, called for both tiles of an iteration), TMA loads (S's two parts
    and the first two x tiles in the kernel, one in the refilling helper: the traced IR
    keeps helpers as functions); values through shared memory after the MMA only where the
    stores are staged."""
    row = traced[stage][tile]
    assert row.get("traced") is True, row.get("error")
    assert row["async_mmas"] == 2
    assert row["tma_loads"] == 5
    assert (row["shared_round_trips"] > 0) == (stage == "1"), row


@pytest.mark.parametrize("groups", ["1", "3"])
def test_gluon_encode_halves_build(groups, monkeypatch):
    """POLARTENSOR_ENCODE_GLUON_HALVES=1 at 64-row tiles, one warpgroup or three
    (warp-specialized): traced with four asynchronous MMAs a group's tile and S's four
    column-half loads, and built for sm_90 with every wgmma asynchronous (no C7514-C7516)
    and, with Triton 3.6 (the GPU stack's), under the 168 registers that three programs'
    (or three groups') warps need."""
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_HALVES", "1")
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_GROUPS", groups)
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_PER_SM", "1")
    row = _offline_stats("--trace-only", "--variants", "64")["64"]
    assert row.get("traced") is True, row.get("error")
    assert row["async_mmas"] == 4 * int(groups)
    assert row["tma_loads"] == 4 + 3 * int(groups)      # S's 4; a group's 2 first x, 1 refill
    row = _offline_stats("--variants", "64")["64"]
    assert "error" not in row, row["error"]
    assert not [n for n in row["ptxas_notes"] if n in ("C7514", "C7515", "C7516")]
    import triton
    if triton.__version__.startswith("3.6"):
        assert row["registers"] <= 168, row


@pytest.mark.parametrize("tile,stage", [("128", "1"), ("64", "1"), ("64", "0")])
def test_gluon_encode_wgmma_stays_asynchronous(tile, stage):
    """Built for sm_90 and assembled by the ptxas bundled with Triton, at both tiles with the
    staged stores (the default) and at 64 rows without: no wgmma serialized (ptxas notes
    C7514-C7516; an accumulator in flight across the loop's back edge caused C7514).
    (Registers and spills depend on the Triton version: with 3.6, the GPU stack's, 255 and
    none; with 3.9 44 bytes of spills unstaged, so they are not asserted here.)"""
    row = _offline_stats("--variants", tile, stage=stage)[tile]
    assert "error" not in row, row["error"]
    assert not [n for n in row["ptxas_notes"] if n in ("C7514", "C7515", "C7516")]


@pytest.mark.parametrize("shape", ["1x1", "3x1"])
def test_gluon_encode_traces_one_token_a_lead(shape):
    """One token a lead (a decode step's append; one lead, one row): Triton makes an integer
    argument equal to 1 a constant, and the kernel once called ``.to`` on T there, which
    failed to compile on the H100 (2026-12-07). Traced with the launch's specialization."""
    rows = _offline_stats("--trace-only", "--variants", "128,64", "--encode-shape", shape)
    assert all(r.get("traced") is True for r in rows.values()), rows


def test_gluon_encode_stage_setting(monkeypatch):
    """POLARTENSOR_ENCODE_GLUON_STAGE: on by default, 0 off, anything else refused by name;
    on, three buffers at two programs per SM are refused (past half an SM's shared memory)
    with the fixes named; off, or at one program per SM, they are taken."""
    monkeypatch.delenv("POLARTENSOR_ENCODE_GLUON_STAGE", raising=False)
    assert encode_gluon.gluon_encode_stage_setting() is True
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_STAGE", "0")
    assert encode_gluon.gluon_encode_stage_setting() is False
    for key, value in (("TILE", "64"), ("BUFS", "3"), ("PER_SM", "2")):
        monkeypatch.setenv(f"POLARTENSOR_ENCODE_GLUON_{key}", value)
    assert encode_gluon.gluon_encode_launch() == (64, 3, 2)
    monkeypatch.delenv("POLARTENSOR_ENCODE_GLUON_STAGE")
    with pytest.raises(ValueError, match="STAGE=1 .*3 buffers.*BUFS=2.*PER_SM=1.*STAGE=0"):
        encode_gluon.gluon_encode_launch()
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_PER_SM", "1")
    assert encode_gluon.gluon_encode_launch() == (64, 3, 1)
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_STAGE", "on")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_GLUON_STAGE='on'"):
        encode_gluon.gluon_encode_stage_setting()


def test_gluon_encode_halves_and_groups_settings(monkeypatch):
    """POLARTENSOR_ENCODE_GLUON_HALVES: off by default; GROUPS 1 by default. Refused by name:
    the halves without the staged stores, three groups without the halves or off their one
    launch (64-row tiles, 2 buffers, one program an SM), anything but 1 or 3 groups; three
    groups take one program an SM under auto."""
    for key in ("TILE", "BUFS", "PER_SM", "STAGE", "HALVES", "GROUPS"):
        monkeypatch.delenv(f"POLARTENSOR_ENCODE_GLUON_{key}", raising=False)
    assert encode_gluon.gluon_encode_halves_setting() is False
    assert encode_gluon.gluon_encode_groups_setting() == 1
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_HALVES", "1")
    assert encode_gluon.gluon_encode_launch() == (64, 2, 2)
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_STAGE", "0")
    with pytest.raises(ValueError, match="HALVES=1 with POLARTENSOR_ENCODE_GLUON_STAGE=0"):
        encode_gluon.gluon_encode_launch()
    monkeypatch.delenv("POLARTENSOR_ENCODE_GLUON_STAGE")
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_GROUPS", "3")
    assert encode_gluon.gluon_encode_launch() == (64, 2, 1)
    for key, value in (("PER_SM", "2"), ("TILE", "128"), ("BUFS", "3"), ("HALVES", "0")):
        monkeypatch.setenv(f"POLARTENSOR_ENCODE_GLUON_{key}", value)
        with pytest.raises(ValueError, match="GROUPS=3 runs three 64-row warpgroups"):
            encode_gluon.gluon_encode_launch()
        monkeypatch.delenv(f"POLARTENSOR_ENCODE_GLUON_{key}")
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_GROUPS", "2")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_GLUON_GROUPS='2'"):
        encode_gluon.gluon_encode_launch()


def test_half_order_puts_whole_blocks_in_a_thread():
    """half_order: a permutation in which each column half holds four whole blocks, and a
    [rows, 64] wgmma accumulator's thread (columns 8 j + 2 (lane % 4) + e) holds one whole
    16-coordinate block, block 4 h + lane % 4 of half h."""
    order = encode_gluon.half_order(128)
    assert sorted(order.tolist()) == list(range(128))
    for h in range(2):
        for lane4 in range(4):
            cols = [64 * h + 8 * j + 2 * lane4 + e for j in range(8) for e in range(2)]
            assert sorted(order[cols].tolist()) == list(range(16 * (4 * h + lane4),
                                                             16 * (4 * h + lane4) + 16))


def test_gluon_encode_settings(monkeypatch):
    """POLARTENSOR_ENCODE_GLUON: on by default, 0 off, anything else refused by name; the
    encode refuses a bad value also where the Gluon encode cannot run."""
    monkeypatch.delenv("POLARTENSOR_ENCODE_GLUON", raising=False)
    assert encode_gluon.gluon_encode_setting() is True
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON", "0")
    assert encode_gluon.gluon_encode_setting() is False
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON", "yes")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_GLUON='yes'"):
        encode_gluon.gluon_encode_setting()
    cfg = get_preset("paper", head_dim=128)
    x = torch.randn(1, 3, 128).to(torch.bfloat16)
    codes = torch.zeros(1, 3, cfg.record_bytes(128), dtype=torch.uint8)
    radii = torch.zeros(1, 3, 8, dtype=cfg.torch_radius_dtype)
    rot = rotation_matrix(128, cfg.rotation, cfg.seed, "cpu", torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_GLUON='yes'"):
        encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False)


def test_gluon_encode_scope():
    """Served: bfloat16 rows of 128 coordinates, evenly strided, the paper preset, on an sm_90
    GPU; not: other presets, head_dims, dtypes, strides, or any CPU tensor."""
    dev = "cuda" if ON_SM90 else "cpu"
    paper = get_preset("paper", head_dim=128)

    def applies(x, cfg=paper):
        d = x.shape[-1]
        codes = torch.zeros(*x.shape[:-1], cfg.record_bytes(d), dtype=torch.uint8, device=dev)
        radii = torch.zeros(*x.shape[:-1], cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                            device=dev)
        return encode_gluon.gluon_encode_applies(x, cfg, d, radii, codes)

    x = torch.zeros(2, 40, 128, dtype=torch.bfloat16, device=dev)
    assert applies(x) is ON_SM90
    assert applies(x.half()) is False
    assert applies(torch.zeros(2, 44, 128, dtype=torch.bfloat16, device=dev)[:, :40]) is False
    assert applies(x, get_preset("polar-3", head_dim=128)) is False
    assert applies(torch.zeros(2, 40, 64, dtype=torch.bfloat16, device=dev),
                   get_preset("paper", head_dim=64)) is False


def _spy_gluon(monkeypatch):
    """Record the Gluon encode's launches (the kernel still runs): the list of grids, and the
    kernel itself."""
    launched, real = [], encode_gluon.polar_encode_gluon_fwd_kernel

    class _Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(encode_gluon, "polar_encode_gluon_fwd_kernel", _Spy())
    return launched, real


def _encode(x, cfg, rot, mids, env, monkeypatch, off=3, **launch):
    """Codes and radii written at an offset into wider buffers (the bytes around them kept),
    under the environment ``env`` and ``encode_into_triton``'s ``launch`` arguments; and
    whether the Gluon kernel ran."""
    launched, real = _spy_gluon(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    lead, t, d = x.shape
    g = torch.Generator().manual_seed(t)
    store = torch.randint(0, 256, (lead, t + off + 2, cfg.record_bytes(d)), generator=g,
                          dtype=torch.uint8).to(x.device)
    before = store.clone()
    radii = torch.full((lead, t, cfg.num_blocks(d)), -7.0, dtype=cfg.torch_radius_dtype,
                       device=x.device)
    assert encode_into_triton(x, rot, mids, store[:, off:off + t], radii, cfg, exact=False,
                              **launch)
    assert torch.equal(store[:, :off], before[:, :off])
    assert torch.equal(store[:, off + t:], before[:, off + t:])
    monkeypatch.setattr(encode_gluon, "polar_encode_gluon_fwd_kernel", real)
    return store, radii, bool(launched)


def _assert_gluon_equals_triton(x, cfg, rot, mids, env, monkeypatch):
    """Under ``env``, the Gluon encode ran and wrote the Triton encode's code bytes and radii
    bit for bit (``_encode`` with POLARTENSOR_ENCODE_GLUON 0, then 1)."""
    want_c, want_r, ran = _encode(x, cfg, rot, mids, dict(env, POLARTENSOR_ENCODE_GLUON="0"),
                                  monkeypatch)
    assert not ran
    got_c, got_r, ran = _encode(x, cfg, rot, mids, dict(env, POLARTENSOR_ENCODE_GLUON="1"),
                                monkeypatch)
    assert ran
    assert torch.equal(got_c, want_c)
    assert torch.equal(got_r.view(torch.uint16), want_r.view(torch.uint16))


@needs_sm90
@settings(max_examples=16, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lead=st.integers(1, 12), t=st.integers(1, 3000), tile=st.sampled_from(["128", "64"]),
       bufs=st.sampled_from(["2", "3"]), two_per_sm=st.booleans(), stage=st.booleans(),
       loop=st.sampled_from(["tiles", "halves", "groups3"]),
       scale=st.sampled_from([1e-3, 1.0, 40.0]), zeros=st.booleans())
def test_gluon_encode_matches_triton(lead, t, tile, bufs, two_per_sm, stage, loop, scale, zeros,
                                     monkeypatch):
    """The same code bytes and radii as the Triton encode for any number of rows (tiles past
    the end, rows crossing lead boundaries, a program with one tile or many), at each tile
    size, x ring depth and (64-row tiles) programs per SM, with the stores staged or not
    (POLARTENSOR_ENCODE_GLUON_STAGE), two tiles an iteration or one in column halves
    (POLARTENSOR_ENCODE_GLUON_HALVES, staged), in one warpgroup or three
    (POLARTENSOR_ENCODE_GLUON_GROUPS); rows of zeros and exact zeros in a row (the sign-bit
    quadrants) included."""
    cfg = get_preset("paper", head_dim=128)
    g = torch.Generator().manual_seed(lead * 7919 + t)
    x = torch.randn(lead, t, 128, generator=g) * scale
    if zeros:
        x[:, ::3] = 0.0
        x[..., 5::7] = 0.0
    x = x.to(torch.bfloat16).cuda()
    rot = rotation_matrix(128, cfg.rotation, cfg.seed, "cuda", torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    stage = stage or loop != "tiles"
    env = {"POLARTENSOR_ENCODE_GLUON_TILE": tile, "POLARTENSOR_ENCODE_GLUON_BUFS": bufs,
           "POLARTENSOR_ENCODE_GLUON_PER_SM": "2" if two_per_sm and tile == "64"
           and not (stage and bufs == "3") else "auto",
           "POLARTENSOR_ENCODE_GLUON_STAGE": "1" if stage else "0",
           "POLARTENSOR_ENCODE_GLUON_HALVES": "0" if loop == "tiles" else "1",
           "POLARTENSOR_ENCODE_GLUON_GROUPS": "3" if loop == "groups3" else "1"}
    if loop == "groups3":
        env.update(POLARTENSOR_ENCODE_GLUON_TILE="64", POLARTENSOR_ENCODE_GLUON_BUFS="2",
                   POLARTENSOR_ENCODE_GLUON_PER_SM="1")
    _assert_gluon_equals_triton(x, cfg, rot, mids, env, monkeypatch)


@needs_sm90
@pytest.mark.parametrize("groups,tile", [("1", "64"), ("1", "128"), ("3", "64")])
@pytest.mark.parametrize("lead,t", [(1, 1), (5, 77), (8, 4096), (3, 1000)])
def test_gluon_encode_halves_matches_triton(groups, tile, lead, t, monkeypatch):
    """The column halves (POLARTENSOR_ENCODE_GLUON_HALVES=1), one warpgroup a program or
    three (GROUPS=3, warp-specialized): the Triton encode's bytes and radii with one row, a
    few tiles (fewer than the programs' groups), many tiles a group, and rows crossing lead
    boundaries."""
    cfg = get_preset("paper", head_dim=128)
    g = torch.Generator().manual_seed(lead * 31 + t)
    x = (torch.randn(lead, t, 128, generator=g) * 3.0).to(torch.bfloat16).cuda()
    rot = rotation_matrix(128, cfg.rotation, cfg.seed, "cuda", torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    env = {"POLARTENSOR_ENCODE_GLUON_HALVES": "1", "POLARTENSOR_ENCODE_GLUON_GROUPS": groups,
           "POLARTENSOR_ENCODE_GLUON_TILE": tile, "POLARTENSOR_ENCODE_GLUON_BUFS": "2",
           "POLARTENSOR_ENCODE_GLUON_PER_SM": "1" if groups == "3" else "auto"}
    _assert_gluon_equals_triton(x, cfg, rot, mids, env, monkeypatch)


@needs_sm90
def test_gluon_encode_takes_the_default_launch_only(monkeypatch):
    """With no setting, paper at d 128 in bfloat16 takes the Gluon encode, and a launch asked
    for by argument (persistent=, block rows) the Triton kernel; the bytes are the same.
    (Both launches persistent: the Triton kernel per tile contracts the rotation in two
    chunks of 64 and may differ from the persistent one in a radius's last bit,
    ``test_encode_launch_settings_equal_default``; on the H100 it did, 2026-12-07.)"""
    monkeypatch.delenv("POLARTENSOR_ENCODE_GLUON", raising=False)
    cfg = get_preset("paper", head_dim=128)
    x = torch.randn(3, 700, 128).to(torch.bfloat16).cuda()
    rot = rotation_matrix(128, cfg.rotation, cfg.seed, "cuda", torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    got_c, got_r, ran = _encode(x, cfg, rot, mids, {}, monkeypatch)
    assert ran
    for kw in (dict(persistent=True), dict(block_rows=64, persistent=True)):
        want_c, want_r, ran = _encode(x, cfg, rot, mids, {}, monkeypatch, **kw)
        assert not ran, kw
        assert torch.equal(got_c, want_c) and torch.equal(got_r, want_r), kw


@needs_sm90
@pytest.mark.parametrize("stage", ["0", "1"])
@pytest.mark.parametrize("pad", [0, 1, 2, 4])
def test_gluon_encode_radii_views_at_any_alignment(pad, stage, monkeypatch):
    """Radii rows that start 0, 1, 2 or 4 elements into a wider buffer (a view): the Gluon
    encode, its stores staged or not, writes the Triton kernel's radii there and nothing
    beside them."""
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_STAGE", stage)
    cfg = get_preset("paper", head_dim=128)
    g = torch.Generator().manual_seed(pad + 5)
    x = (torch.randn(2, 77, 128, generator=g) * 3).to(torch.bfloat16).cuda()
    rot = rotation_matrix(128, cfg.rotation, cfg.seed, "cuda", torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    launched, _ = _spy_gluon(monkeypatch)
    out = []
    for gluon in ("0", "1"):
        monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON", gluon)
        wide = torch.full((2, 77, 8 + pad + 1), -3.0, dtype=cfg.torch_radius_dtype,
                          device="cuda")
        codes = torch.zeros(2, 77, cfg.record_bytes(128), dtype=torch.uint8, device="cuda")
        assert encode_into_triton(x, rot, mids, codes, wide[..., pad:pad + 8], cfg,
                                  exact=False)
        out.append((codes, wide))
        assert len(launched) == int(gluon)      # the Gluon encode ran only when asked
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1].view(torch.uint16), out[1][1].view(torch.uint16))
    assert (out[1][1][..., :pad] == -3.0).all() and (out[1][1][..., pad + 8:] == -3.0).all()


def test_gluon_encode_launch_settings(monkeypatch):
    """Tile, ring depth and programs per SM: the defaults (64 rows, two buffers, two programs
    per SM), one per SM with three buffers, two with the unstaged stores, and two 128-row
    programs refused by name."""
    for key in ("TILE", "BUFS", "PER_SM", "STAGE"):
        monkeypatch.delenv(f"POLARTENSOR_ENCODE_GLUON_{key}", raising=False)
    assert encode_gluon.gluon_encode_launch() == (64, 2, 2)
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_BUFS", "3")
    assert encode_gluon.gluon_encode_launch() == (64, 3, 1)
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_PER_SM", "2")
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_STAGE", "0")
    assert encode_gluon.gluon_encode_launch() == (64, 3, 2)
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_TILE", "128")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_GLUON_PER_SM=2 with 128-row"):
        encode_gluon.gluon_encode_launch()
    monkeypatch.setenv("POLARTENSOR_ENCODE_GLUON_PER_SM", "3")
    with pytest.raises(ValueError, match="POLARTENSOR_ENCODE_GLUON_PER_SM='3'"):
        encode_gluon.gluon_encode_launch()


@needs_sm90
def test_gluon_encode_falls_back_outside_its_scope(monkeypatch):
    """With the setting on, a preset it does not serve (polar-3) takes the Triton kernel,
    and the result is that kernel's."""
    cfg = get_preset("polar-3", head_dim=128)
    x = torch.randn(2, 300, 128).to(torch.bfloat16).cuda()
    rot = rotation_matrix(128, cfg.rotation, cfg.seed, "cuda", torch.float32)
    mids = boundary_table(quantize(x[..., :1, :].float(), cfg).centroids, cfg, torch.float64)
    want = _encode(x, cfg, rot, mids, {"POLARTENSOR_ENCODE_GLUON": "0"}, monkeypatch)
    got = _encode(x, cfg, rot, mids, {"POLARTENSOR_ENCODE_GLUON": "1"}, monkeypatch)
    assert not got[2]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
