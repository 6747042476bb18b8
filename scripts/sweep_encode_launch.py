#!/usr/bin/env python3
# ruff: noqa: B023  (the timed closures run inside the loop iteration that makes them)
"""Encode launch settings (rows per program, warps, register cap) against the device copy
bandwidth measured in the same run: bfloat16 input, batch 8 x 32K tokens x the model's KV
heads, the default encode (quantizer 'cross', the bf16x2 rotation), every preset given
(results: results/bench/encode_launch_sweep.{json,md}):

    OUT=<dir> python3 scripts/sweep_encode_launch.py [--presets paper,polar-4]

Each row also checks that the launch wrote the same codes and radii as the default launch
(the arithmetic does not depend on the tile shape, so they should be equal bit for bit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = [("llama3.1-8b", 8, 128), ("smollm2-135m", 3, 64), ("gemma2-9b", 8, 256)]
# (rows per program, warps, register cap; 0: none). Defaults (bfloat16 x, as timed here): 64
# rows and 4 warps at d 64; at d 128 128 rows and 8 warps where every level has <= 4 bits
# (persistent under a 128-register cap, see _PERSIST128), 64 rows and 4 warps under a
# 128-register cap where the widest has 5 (polar-4), 64 rows and 4 warps uncapped above;
# 128 rows and 8 warps at d 256. History: in coordinate order the d-128 encode compiled to
# 193 registers uncapped, and a 168 cap was 1.22x faster (H200, 2026-11-29 15:00 UTC); with
# the register-order columns paper takes 160 uncapped and the cap stopped paying
# (encode_launch_sweep.md). cap0: no cap.
# The last field sets environment settings for the call: POLARTENSOR_ENCODE_PERM=0 times the
# rotation's output columns in coordinate order (the encode before the register-order
# columns), POLARTENSOR_ENCODE_SEARCH=binary the binary boundary search (the default counts
# boundaries one by one), both at the default launch.
_PERM0 = {"POLARTENSOR_ENCODE_PERM": "0"}
_BINARY = {"POLARTENSOR_ENCODE_SEARCH": "binary"}
# the persistent launch (S loaded once per program) with 1, 2 or 3 pipeline stages (x copied
# ahead into shared memory while a tile is encoded; d <= 128 only, elsewhere it is the default).
# Its tiles are the default launch's: since a41d312 128 rows and 8 warps under a 128-register
# cap at d 128 where every level has <= 4 bits (64 rows and 4 warps before), so there
# default_persist_s1 is the default itself.
_PERSIST = [{"POLARTENSOR_ENCODE_PERSIST": "1", "POLARTENSOR_ENCODE_STAGES": s}
            for s in ("1", "2", "3")]
# the persistent launch on 128-row, 8-warp tiles at d 128 (one stage: S's two parts and x
# take 96 KB of shared memory, two programs per SM). Offline (Triton 3.6, sm_90, paper) it
# takes 153 registers uncapped (so one program per SM, launched so) and 128 under a
# 128-register cap, with 16 bytes of spills. Timed on an H100
# (results/bench/encode_launch_sweep_persist_2026-12-06_h100.md, same run) against one
# program per tile: capped 1.08x (paper), 1.04x (polar-3); uncapped 0.74-0.76x. The capped
# launch is the default there since; _PER_TILE times the default launch with one program per
# tile (POLARTENSOR_ENCODE_PERSIST=0), the default before.
_PERSIST128 = [(128, 8, None, dict(_PERSIST[0], POLARTENSOR_ENCODE_PER_SM="1")),
               (128, 8, 128, _PERSIST[0])]
_PER_TILE = [(None, None, None, {"POLARTENSOR_ENCODE_PERSIST": "0"})]
# the one-MMA bfloat16 rotation (POLARTENSOR_ENCODE_ROT=bf16; codes differ from the default's
# at cell boundaries, so its rows are not expected "same"): per tile, under a 128-register cap
# (4 programs per SM), and persistent with 2 or 4 programs per SM
_BF16 = {"POLARTENSOR_ENCODE_ROT": "bf16"}
_BF16_LAUNCHES = [(None, None, None, _BF16), (None, None, 128, _BF16)] + [
    (None, None, None, dict(_BF16, POLARTENSOR_ENCODE_PERSIST="1",
                            POLARTENSOR_ENCODE_STAGES=st, POLARTENSOR_ENCODE_PER_SM=per))
    for st, per in (("1", "2"), ("1", "4"), ("2", "4"))]
# the code stores (POLARTENSOR_ENCODE_STORE): the default is record16 at every head_dim (since
# eb259a5; with 128-row tiles and 8 warps at d 128 where every level has <= 4 bits). Timed
# beside it: the default stores at the former 64-row launch, the strided stores there and at
# the default launch (the former default), record (odd-sized words byte by byte), record16
# named explicitly (the default's twin), and whole records
_STRIDED = {"POLARTENSOR_ENCODE_STORE": "strided"}
_RECORD = {"POLARTENSOR_ENCODE_STORE": "record"}
_WHOLE = {"POLARTENSOR_ENCODE_STORE": "whole"}
_RECORD16 = {"POLARTENSOR_ENCODE_STORE": "record16"}
_STORE_LAUNCHES = [(64, 4, None, {}), (64, 4, None, _STRIDED), (None, None, None, _STRIDED),
                   (None, None, None, _RECORD), (None, None, None, _RECORD16),
                   (None, None, None, _WHOLE), (None, None, None, dict(_WHOLE, **_BF16))]
# the preset with rotation="permuted_hadamard" at the default launch (the "_rotation" key is
# not an environment variable): S is a scaled sign matrix, so the bfloat16 rotation takes one
# exact MMA instead of two (encode.sign_matrix_scale). Another rotation gives other codes, so
# its rows are not expected "same"; the tests check it against the reference.
_HADAMARD = [(None, None, None, {"_rotation": "permuted_hadamard"})]
# 16 warps on 128- and 256-row tiles: at d 128 S is read from L2 once per tile, 64 KB (high
# and low parts) for 128 rows of 256 bytes, so 256-row tiles halve those reads. Offline
# (Triton 3.6, sm_90, scripts/kernel_ir_stats.py --num-warps) 256 rows and 16 warps take
# 127-128 registers without spills at d 128; 128 rows and 16 warps spill 16-52 bytes for
# polar-3 and polar-4. Timed on an H100 at 39ed07b
# (results/bench/encode_launch_sweep_wide16_2026-12-06_h100.md, same run): slower than the
# default, 256 rows 0.85-0.87x, 128 rows 0.34-0.43x (one program per SM where the default
# fits two: halving S's reads did not pay for the lost overlap between programs)
_WIDE16 = [(256, 16, None, {}), (128, 16, None, {}),
           (256, 16, None, {"_rotation": "permuted_hadamard"})]
# the persistent launch (forced on: at d 128 the default already is, except with
# permuted_hadamard) asking L2 for x one or two tiles before it loads them
# (POLARTENSOR_ENCODE_L2PF), and without (l2pf0). Offline (Triton 3.6, sm_90, paper d 128,
# 128-register cap) 1221 -> 1238 loop SASS instructions, spills 16 -> 60 bytes.
_L2PF = [(None, None, None, {"POLARTENSOR_ENCODE_PERSIST": "1", "POLARTENSOR_ENCODE_L2PF": n})
         for n in ("0", "1", "2")] + [
    (None, None, None, {"POLARTENSOR_ENCODE_PERSIST": "1", "POLARTENSOR_ENCODE_L2PF": n,
                        "_rotation": "permuted_hadamard"}) for n in ("0", "1")]
# x's tiles by TMA through a tensor descriptor (POLARTENSOR_ENCODE_TMA=1, persistent): the
# MMA reads the copy in shared memory, with no register round trip, shared store or barrier
# of its own. The pipeliner issues the copy num_stages - 1 tiles ahead, at the end of the
# tile before, so 2 stages overlap it only with other programs and 3 with a whole tile; one
# stage copies and waits in place, which with the L2 prefetch (l2pf1) waits on L2 only.
# Offline (Triton 3.6, sm_90, paper d 128): the default tiles (128 rows, 8 warps, 128-register
# cap) with 1 stage 96 KB of shared memory as now (two programs per SM), no spills, 1156
# loop SASS instructions (1163 with l2pf1) against the default's 1221; 3 stages, uncapped,
# 168 KB (one per SM), 176 registers, 1124; 64 rows, 4 warps, 2 stages, uncapped: 100 KB (two
# per SM), 168 registers, 1049 per 64 rows.
_TMA = {"POLARTENSOR_ENCODE_PERSIST": "1", "POLARTENSOR_ENCODE_TMA": "1"}
_TMA_LAUNCHES = [
    (None, None, None, dict(_TMA, POLARTENSOR_ENCODE_STAGES="1")),
    (None, None, None, dict(_TMA, POLARTENSOR_ENCODE_STAGES="1", POLARTENSOR_ENCODE_L2PF="1")),
    (64, 4, None, dict(_TMA, POLARTENSOR_ENCODE_PER_SM="2", POLARTENSOR_ENCODE_STAGES="2")),
    (64, 4, None, dict(_TMA, POLARTENSOR_ENCODE_PER_SM="2", POLARTENSOR_ENCODE_STAGES="2",
                       POLARTENSOR_ENCODE_L2PF="1")),
    (128, 8, None, dict(_TMA, POLARTENSOR_ENCODE_PER_SM="1", POLARTENSOR_ENCODE_STAGES="3"))]
# the Gluon encode (kernels/encode_gluon.py, POLARTENSOR_ENCODE_GLUON=1; paper at d 128 on
# sm_90): two tiles an iteration, the second's MMAs in flight while the first is quantized,
# x by TMA two (b3: three) tiles deep; 64-row tiles (its default since 2026-12-07: 4 warps,
# two programs per SM) and 128-row ones (8 warps, one per SM), each named by its tile (until
# 2026-12-07 "default_gluon" and "default_gluon_b3" were 128 rows). Offline (Triton 3.6,
# sm_90): 255 registers, no spills, 1915 loop SASS instructions per two tiles, no
# shared-memory round trip. H100, paper (encode_launch_sweep_2026-12-07a_h100.md): 64 rows
# 1.18x the Triton default, 128 rows 1.06x, 128 rows with 3 buffers 1.03x.
_GLUON = [(None, None, None, {"POLARTENSOR_ENCODE_GLUON": "1",
                              "POLARTENSOR_ENCODE_GLUON_TILE": tile, **bufs})
          for tile in ("64", "128") for bufs in ({}, {"POLARTENSOR_ENCODE_GLUON_BUFS": "3"})]
# 64-row tiles with 3 buffers at two programs per SM (2 x 114,720 bytes of shared memory
# offline; H100 1.17x, encode_launch_sweep_2026-12-07b_h100.md), and the Triton kernel named
# ("default_triton": the Gluon encode's baseline, which it replaces by default since
# 2026-12-07 where it applies)
# (unstaged: the staged stores, the default since 2b246fd, do not fit two such programs)
_GLUON += [(None, None, None, {"POLARTENSOR_ENCODE_GLUON": "1",
                               "POLARTENSOR_ENCODE_GLUON_TILE": "64",
                               "POLARTENSOR_ENCODE_GLUON_BUFS": "3",
                               "POLARTENSOR_ENCODE_GLUON_PER_SM": "2",
                               "POLARTENSOR_ENCODE_GLUON_STAGE": "0"}),
           (None, None, None, {"POLARTENSOR_ENCODE_GLUON": "0"})]
# codes and radii stored from the accumulator layout, not staged in shared memory
# (POLARTENSOR_ENCODE_GLUON_STAGE=0, "_unstaged"; the default until 2b246fd, whose stores
# wrote 6.2 bytes of each 32-byte sector on the H100), at both tiles
_GLUON += [(None, None, None, {"POLARTENSOR_ENCODE_GLUON": "1",
                               "POLARTENSOR_ENCODE_GLUON_TILE": tile,
                               "POLARTENSOR_ENCODE_GLUON_STAGE": "0"}) for tile in ("64", "128")]
# one tile an iteration in two column halves (POLARTENSOR_ENCODE_GLUON_HALVES=1: 168 registers
# offline, Triton 3.6), at 64-row tiles (two programs an SM: shared memory), at 128 rows, and
# in three warp-specialized warpgroups of 64-row tiles sharing S (GROUPS=3: 12 warps an SM)
_GLUON += [(None, None, None, {"POLARTENSOR_ENCODE_GLUON": "1",
                               "POLARTENSOR_ENCODE_GLUON_TILE": tile,
                               "POLARTENSOR_ENCODE_GLUON_HALVES": "1"}) for tile in ("64", "128")]
_GLUON += [(None, None, None, {"POLARTENSOR_ENCODE_GLUON": "1",
                               "POLARTENSOR_ENCODE_GLUON_TILE": "64",
                               "POLARTENSOR_ENCODE_GLUON_HALVES": "1",
                               "POLARTENSOR_ENCODE_GLUON_GROUPS": "3",
                               "POLARTENSOR_ENCODE_GLUON_PER_SM": "1"})]
# (the Gluon launches' name suffixes, in order, by setting and value)
_GLUON_SUFFIXES = [("STAGE", "1", "_stage"), ("STAGE", "0", "_unstaged"),
                   ("HALVES", "1", "_halves"), ("GROUPS", "3", "_g3")]
LAUNCHES = [(None, None, None, _PERM0), (None, None, 0, _PERM0), (None, None, 0, {}),
            (None, None, None, _BINARY),
            (16, 4, None, {}), (32, 4, None, {}), (32, 8, None, {}), (64, 8, None, {}),
            (128, 4, None, {}), (128, 8, None, {}), (64, 4, 168, {}), (64, 4, 128, {}),
            (32, 4, 128, {})] + [(None, None, None, env) for env in _PERSIST] + _PERSIST128 \
    + _PER_TILE + _BF16_LAUNCHES \
    + _STORE_LAUNCHES + _HADAMARD + _WIDE16 + _L2PF + _TMA_LAUNCHES + _GLUON


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="paper,polar-4")
    ap.add_argument("--models", default=",".join(m for m, _, _ in MODELS),
                    help="comma-separated subset of " + ", ".join(m for m, _, _ in MODELS))
    ap.add_argument("--launches", default="",
                    help="comma-separated launch names to time beside the default (e.g. "
                         "default_binary,cap0); empty: all")
    args = ap.parse_args()
    models = [m for m in MODELS if m[0] in args.models.split(",")]
    if not models:
        ap.error(f"--models {args.models!r}: none of " + ", ".join(m for m, _, _ in MODELS))
    import triton
    from bench_attention import COPY_METHODS, bench, copy_bandwidth, encode_agreement

    from polartensor.config import get_preset
    from polartensor.kernels.encode import encode_into_triton
    from polartensor.kernels.ops import cached_rotation, tables_for
    from polartensor.polar_quant_tensor import codebook_for

    dev = "cuda"
    out_dir = os.environ.get("OUT", "encode_sweep_out")
    os.makedirs(out_dir, exist_ok=True)
    copy_bw = copy_bandwidth()
    meta = dict(command=(f"python3 scripts/sweep_encode_launch.py --presets {args.presets} "
                         f"--models {args.models}"
                         + (f" --launches {args.launches}" if args.launches else "")),
                gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                copy_tbps=copy_bw / 1e12,
                copy_tbps_methods={k: v / 1e12 for k, v in COPY_METHODS.items()})
    rows = []
    for model, hk, d in models:
        b, n = 8, 32768
        x = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16)
        for preset in args.presets.split(","):
            cfg = get_preset(preset, head_dim=d)
            mids, _ = tables_for(codebook_for(cfg, device=dev), cfg)
            rot = cached_rotation(cfg.rotation, cfg.seed, d, dev)
            shape_c = (b, hk, n, cfg.record_bytes(d))
            shape_r = (b, hk, n, cfg.num_blocks(d))
            ref_c = torch.empty(shape_c, dtype=torch.uint8, device=dev)
            ref_r = torch.empty(shape_r, dtype=cfg.torch_radius_dtype, device=dev)
            # bytes read and written: x in, codes and radii out
            io = (x.numel() * x.element_size() + ref_c.numel()
                  + ref_r.numel() * ref_r.element_size())
            encode_into_triton(x, rot, mids, ref_c, ref_r, cfg, exact=False)
            default_ms = None
            for bn, warps, cap, env in [(None, None, None, {})] + LAUNCHES:
                codes = torch.full_like(ref_c, 7)
                radii = torch.zeros_like(ref_r)
                kw = dict(block_rows=bn, num_warps=warps, maxnreg=cap)
                name = ("default" if bn is None and cap is None else
                        "" if bn is None else f"bn{bn}_w{warps}")
                if cap is not None:
                    name += f"_cap{cap}"
                if env.get("POLARTENSOR_ENCODE_PERM") == "0":
                    name += "_perm0"
                if env.get("POLARTENSOR_ENCODE_SEARCH") == "binary":
                    name += "_binary"
                if env.get("POLARTENSOR_ENCODE_ROT") == "bf16":
                    name += "_rotbf16"
                if "POLARTENSOR_ENCODE_STORE" in env:
                    name += "_store_" + env["POLARTENSOR_ENCODE_STORE"]
                if env.get("POLARTENSOR_ENCODE_PERSIST") == "0":
                    name += "_per_tile"
                if (env.get("POLARTENSOR_ENCODE_PERSIST") == "1"
                        and "POLARTENSOR_ENCODE_STAGES" not in env):
                    name += "_persist"
                if "POLARTENSOR_ENCODE_STAGES" in env:
                    name += f"_persist_s{env['POLARTENSOR_ENCODE_STAGES']}"
                if "POLARTENSOR_ENCODE_PER_SM" in env:
                    name += f"_{env['POLARTENSOR_ENCODE_PER_SM']}per_sm"
                if env.get("POLARTENSOR_ENCODE_TMA") == "1":
                    name += "_tma"
                if env.get("POLARTENSOR_ENCODE_GLUON") == "1":
                    name += "_gluon" + env.get("POLARTENSOR_ENCODE_GLUON_TILE", "")
                    if "POLARTENSOR_ENCODE_GLUON_BUFS" in env:
                        name += f"_b{env['POLARTENSOR_ENCODE_GLUON_BUFS']}"
                    if "POLARTENSOR_ENCODE_GLUON_PER_SM" in env:
                        name += f"_{env['POLARTENSOR_ENCODE_GLUON_PER_SM']}per_sm"
                    for key, value, suffix in _GLUON_SUFFIXES:
                        if env.get("POLARTENSOR_ENCODE_GLUON_" + key) == value:
                            name += suffix
                if env.get("POLARTENSOR_ENCODE_GLUON") == "0":
                    name += "_triton"
                if "POLARTENSOR_ENCODE_L2PF" in env:
                    name += f"_l2pf{env['POLARTENSOR_ENCODE_L2PF']}"
                env = dict(env)
                if name != "default":
                    # (every launch but the default and the Gluon ones times the Triton
                    # kernel, whichever encode is the default)
                    env.setdefault("POLARTENSOR_ENCODE_GLUON", "0")
                rotation = env.pop("_rotation", None)
                if rotation:
                    name += "_" + rotation
                row = dict(model=model, d=d, preset=preset, launch=name.strip("_"))
                if (args.launches and row["launch"] != "default"
                        and row["launch"] not in args.launches.split(",")):
                    continue
                rcfg, rrot, rmids = cfg, rot, mids
                if rotation:
                    rcfg = dataclasses.replace(cfg, rotation=rotation)
                    rrot = cached_rotation(rcfg.rotation, rcfg.seed, d, dev)
                    rmids, _ = tables_for(codebook_for(rcfg, device=dev), rcfg)
                try:
                    def fn(kw=kw, codes=codes, radii=radii, x=x, env=env):
                        # (read per call: the CUDA graph captures the launch they give)
                        os.environ.update(env)
                        try:
                            return encode_into_triton(x, rrot, rmids, codes, radii, rcfg,
                                                      exact=False, **kw)
                        finally:
                            for key in env:
                                os.environ.pop(key, None)
                    ms = bench(fn)
                    row.update(ms=ms, pct_copy=100 * io / (ms * 1e-3) / copy_bw,
                               same_codes=bool(torch.equal(codes, ref_c)),
                               same_radii=bool(torch.equal(radii, ref_r)),
                               # (a launch may sum the rotation in another order: then a few
                               # codes at cell boundaries and radii in the last bit differ)
                               **encode_agreement(codes, radii, ref_c, ref_r))
                    if name == "default":
                        default_ms = ms
                    row["x_vs_default"] = default_ms / ms
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                rows.append(row)
                print(row, flush=True)
        del x
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "encode_launch_sweep.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = ["# Encode launch sweep", "",
             f"- command: `{meta['command']}`",
             f"- GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, "
             f"Python {meta['python']}; {meta['date']}",
             f"- device copy bandwidth (read + write): {meta['copy_tbps']:.2f} TB/s, the faster of "
             + ", ".join(f"{k} {v:.2f}" for k, v in meta["copy_tbps_methods"].items()),
             "- bfloat16 input, batch 8 x 32K tokens x KV heads; median of CUDA-graph replays; "
             "× vs default: the default launch's time over this one's, same run", "",
             "| model | d | preset | launch | ms | % of copy bandwidth | × vs default | "
             "same codes, radii | code bytes, radii equal | radii max rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['d']} | {r['preset']} | {r['launch']} | "
                         f"error: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['d']} | {r['preset']} | {r['launch']} | "
                         f"{r['ms']:.4f} | {r['pct_copy']:.1f} | {r['x_vs_default']:.2f} | "
                         f"{r['same_codes']}, {r['same_radii']} | "
                         f"{r['codes_equal']:.6f}, {r['radii_equal']:.6f} | "
                         f"{r['radii_max_rel_diff']:.1e} |")
    with open(os.path.join(out_dir, "encode_launch_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
