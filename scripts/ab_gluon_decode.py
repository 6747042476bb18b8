#!/usr/bin/env python3
"""The Gluon decode attention (register-operand tree decode) against the Triton kernel and
cuDNN bf16 SDPA, in one process on the same inputs (CUDA only):

    python3 scripts/ab_gluon_decode.py --out $OUT/gluon

For each shape: the outputs of both kernels are compared (they decode the same bfloat16
keys and values; the relative difference is printed and must stay under 2e-2), then every
launch variant (keys per step x register cap x programs per SM) is timed as CUDA-graph
replays, the order rotated per round, with cuDNN and the Triton default beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_attention import bench, fold_gqa, sdpa_backend  # noqa: E402
from profile_decode import quantized  # noqa: E402

from polartensor.config import get_preset  # noqa: E402
from polartensor.kernels.decode_attention import launch_attention  # noqa: E402
from polartensor.kernels.decode_attention_gluon import (  # noqa: E402
    LAST_LAUNCH,
    gluon_split_count,
    launch_attention_gluon,
)


def _shape_row(args, preset, cfg, b, n, variants, per_sm, sms, dev):
    """Check and time every variant at one shape; the row of results."""
    hq, hk, d = 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(1)
    k = torch.randn(b, hk, n, d, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn(b, hk, n, d, device=dev, generator=g, dtype=torch.bfloat16)
    q = torch.randn(b, hq, 1, d, device=dev, generator=g, dtype=torch.bfloat16)
    kq, vq = quantized(k, cfg), quantized(v, cfg)
    scale = d ** -0.5

    def triton_fn():
        # the Triton kernel even where launch_attention's default takes the Gluon decode
        # (read per call, so set while a CUDA graph is captured)
        os.environ["POLARTENSOR_DECODE_GLUON"] = "0"
        try:
            return launch_attention(q, kq[0], kq[1], kq[2], cfg, vq[0], vq[1], vq[2], cfg,
                                    kq[3], vq[3], scale=scale)
        finally:
            os.environ.pop("POLARTENSOR_DECODE_GLUON", None)

    ref = triton_fn().float()
    fns = {"triton": triton_fn}
    qf = fold_gqa(q, hk)

    def cudnn_fn():
        with sdpa_backend("cudnn"):
            return F.scaled_dot_product_attention(qf, k, v, scale=scale)
    fns["cudnn"] = cudnn_fn
    checks = {}
    for var in variants:
        for ps in ([var.per_sm] if var.per_sm else per_sm):
            splits = gluon_split_count(b * hk, n, sms, var.block_n, ps)
            name = var.label(ps)

            def fn(var=var, splits=splits):
                return launch_attention_gluon(q, kq[0], kq[1], kq[2], cfg, vq[0], vq[1],
                                              vq[2], cfg, kq[3], vq[3], scale,
                                              splits, block_n=var.block_n,
                                              maxnreg=var.maxnreg or None,
                                              prefetch=var.prefetch,
                                              transposed=var.transposed, pairs=var.pairs,
                                              kpairs=var.kpairs, lshift=var.lshift,
                                              stagger=var.stagger, staged=var.staged,
                                              fold=var.fold)
            try:
                out = fn().float()
                err = ((out - ref).norm() / ref.norm()).item()
            except Exception as exc:  # noqa: BLE001
                print(f"{name}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                checks[name] = dict(error=str(exc)[:400])
                continue
            regs, spills = LAST_LAUNCH.get("registers"), LAST_LAUNCH.get("spills")
            checks[name] = dict(rel_diff_vs_triton=err, splits=splits, registers=regs,
                                spills=spills)
            print(f"{preset} b{b} n{n} {name} splits {splits}: rel diff vs triton "
                  f"{err:.2e}, {regs} registers, {spills} spills", flush=True)
            if not err < 2e-2:
                print("  MISMATCH: not timed", flush=True)
                continue
            fns[name] = fn
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(bench(fns[name], args.rep_ms))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = min((x for x in med if x.startswith("gluon")), key=med.get, default=None)
    row = dict(preset=preset, batch=b, context=n, ms=med, checks=checks, best=best)
    if best:
        row["best_vs_triton"] = med["triton"] / med[best]
        row["best_vs_cudnn"] = med["cudnn"] / med[best]
        row["triton_vs_cudnn"] = med["cudnn"] / med["triton"]
    return row


def render_markdown(res: dict) -> str:
    """The markdown table of a result: per shape the fastest Gluon launch against the
    Triton kernel and cuDNN of the same run."""
    meta = res["meta"]
    lines = [f"# Gluon decode vs Triton decode vs cuDNN ({meta['gpu']})", "",
             f"- command: `{meta['command']}`",
             f"- torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}",
             "- median of rounds of CUDA-graph medians, order rotated; Llama heads 32/8, d 128",
             "", "| preset | batch | context | cuDNN ms | Triton ms | best Gluon | Gluon ms | "
             "Gluon / Triton | Gluon vs cuDNN | Triton vs cuDNN | best's registers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if not r.get("best"):
            continue
        lines.append(f"| {r['preset']} | {r['batch']} | {r['context']} | {r['ms']['cudnn']:.4f} "
                     f"| {r['ms']['triton']:.4f} | {r['best']} | {r['ms'][r['best']]:.4f} | "
                     f"{r['best_vs_triton']:.2f}x | {r['best_vs_cudnn']:.2f}x | "
                     f"{r['triton_vs_cudnn']:.2f}x | "
                     f"{r.get('checks', {}).get(r['best'], {}).get('registers', '?')} |")
    return "\n".join(lines) + "\n"


class Variant(NamedTuple):
    block_n: int
    maxnreg: int          # 0: no cap
    prefetch: bool        # :pf, POLARTENSOR_GLUON_PREFETCH
    transposed: bool      # :tr, POLARTENSOR_GLUON_TRANS
    pairs: bool           # :pr (with :pf), POLARTENSOR_GLUON_PAIRS
    kpairs: bool = False  # :kp, POLARTENSOR_GLUON_KPAIRS
    lshift: bool = False  # :ls, POLARTENSOR_GLUON_LSHIFT
    stagger: bool = False  # :sg (with :pf), POLARTENSOR_GLUON_STAGGER
    staged: bool = False  # :st (without :pf), POLARTENSOR_GLUON_STAGED
    fold: bool = False    # :fd, POLARTENSOR_GLUON_FOLD
    per_sm: int = 0       # @N: only at N programs per SM (0: each of --per-sm)

    @property
    def name(self) -> str:
        return self.label()

    def label(self, per_sm: int | None = None) -> str:
        """The variant's name in results, with the programs per SM it ran at if given."""
        ps = "" if per_sm is None else f"_ps{per_sm}"
        return (f"gluon_bn{self.block_n}_cap{self.maxnreg}{ps}"
                + "".join(f"_{f}" for f, on in zip(_FLAGS, self[2:2 + len(_FLAGS)]) if on))


_FLAGS = ("pf", "tr", "pr", "kp", "ls", "sg", "st", "fd")


def parse_variant(text: str) -> Variant:
    """'block_n:maxnreg[:pf][:tr][:pr][:kp][:ls][:sg][:st][:fd][@N]' -> Variant (pairs: two
    steps an iteration, and sg: the prefetch half a step ahead, with the prefetch only; st:
    the codes staged in shared memory, in place of the prefetch; fd: levels 3 and 2 folded;
    @N: timed at N programs per SM only)."""
    text, _, at = text.partition("@")
    parts = text.split(":")
    flags = parts[2:]
    if at and not at.isdigit():
        raise ValueError(f"variant {text!r}@{at}: @N takes a number of programs per SM")
    if (len(parts) < 2 or not all(p.isdigit() for p in parts[:2])
            or any(f not in _FLAGS for f in flags)
            or (("pr" in flags or "sg" in flags) and "pf" not in flags)
            or ("st" in flags and "pf" in flags)):
        raise ValueError(f"variant {text!r}: use block_n:maxnreg (0: no cap), then any of "
                         f":pf, :tr, :pr and :sg (with :pf), :kp and :ls, :st (without :pf), "
                         f":fd, e.g. 16:0:pf:tr")
    return Variant(int(parts[0]), int(parts[1]), *(f in flags for f in _FLAGS),
                   per_sm=int(at or 0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gluon_ab")
    ap.add_argument("--shapes", default="3:1000,8:32768,1:32768,32:8192,8:4096,8:131072,2:131072")
    ap.add_argument("--presets", default="paper")
    ap.add_argument("--variants", default="16:0:pf:tr:kp:ls,16:0:pf:tr,16:0:pf:pr:kp:ls,16:0:pf",
                    help="block_n:maxnreg (0: no cap), :pf for the prefetch of the next "
                    "step's codes (POLARTENSOR_GLUON_PREFETCH), :tr for the transposed step "
                    "(POLARTENSOR_GLUON_TRANS), :pr (with :pf) for two steps an iteration "
                    "(POLARTENSOR_GLUON_PAIRS), :kp for K's code words loaded per block pair "
                    "(POLARTENSOR_GLUON_KPAIRS), :ls for shifted tables of 2-bit code pairs "
                    "(POLARTENSOR_GLUON_LSHIFT), :sg (with :pf) for the prefetch half a step "
                    "ahead (POLARTENSOR_GLUON_STAGGER), :st (without :pf) for the codes "
                    "staged in shared memory by cp.async (POLARTENSOR_GLUON_STAGED), :fd for "
                    "levels 3 and 2 folded into one shuffle (POLARTENSOR_GLUON_FOLD)")
    ap.add_argument("--per-sm", default="8,12", help="programs per SM to try (the splits)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=25)
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    import triton

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                command="python3 scripts/ab_gluon_decode.py " + " ".join(sys.argv[1:]))
    print(meta, flush=True)
    rows = []
    variants = [parse_variant(v) for v in args.variants.split(",")]
    per_sm = [int(x) for x in args.per_sm.split(",")]
    for preset in args.presets.split(","):
        cfg = get_preset(preset, head_dim=128)
        for shape in args.shapes.split(","):
            if time.time() - t_start > args.budget_s:
                print("budget spent: stopping", flush=True)
                break
            b, n = (int(x) for x in shape.split(":"))
            row = _shape_row(args, preset, cfg, b, n, variants, per_sm, sms, dev)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    res = dict(meta=meta, rows=rows)
    with open(os.path.join(args.out, "ab_gluon_decode.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    md = render_markdown(res)
    with open(os.path.join(args.out, "ab_gluon_decode.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
