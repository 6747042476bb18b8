#!/usr/bin/env python3
# ruff: noqa: B023  (the timed closures run inside the loop iteration that makes them)
"""Decode launch settings (keys per step, warps, register cap) against cuDNN bf16 SDPA in the
same run, q_len 1 (results: results/bench/decode_launch_sweep*.{json,md}):

    OUT=<dir> python3 scripts/sweep_decode_launch.py [--splits waves|fixed|sweep] [--presets paper]
        [--shapes llama3.1-8b:8:32768,...] [--settings 64:4:128,128:4:168,...]
        [--env POLARTENSOR_DECODE_MMA=qk,vp]

``--splits waves`` (the default) lets each launch pick its split count as the library does
(from the compiled kernel's resident programs per SM, which depend on warps and the
register cap); ``fixed`` uses ~8 programs per SM for every setting; ``sweep`` times,
with the default launch settings, every split count that gives a distinct number of key steps
per split (down to an eighth of the largest count), beside the library's own choice, and
records the compiled kernel's resident programs per SM, so that a split rule can be checked
against the measured optimum (results/bench/decode_split_sweep*). Each row also records
the largest difference from the default launch's output (the key order of the online softmax
changes with the step size and the split count, so small differences are expected).
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [("llama3.1-8b", 32, 8, 128, [(8, 32768), (1, 32768), (1, 131072), (32, 4096)]),
          ("smollm2-135m", 9, 3, 64, [(8, 32768)])]


def with_env(name: str | None, value: str | None, fn):
    """``fn`` run with the per-call setting ``name`` at ``value`` (None: unset), restored
    after; a CUDA graph captured around it keeps the kernel the setting chose."""
    if name is None:
        return fn

    def run():
        saved = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        try:
            return fn()
        finally:
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved
    return run


def main():
    import argparse

    # the Triton kernel's launch is what this sweeps: keep the Gluon decode, which the
    # default takes for large paper-preset decodes, out unless asked for
    os.environ.setdefault("POLARTENSOR_DECODE_GLUON", "0")
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", choices=("waves", "fixed", "sweep"), default="waves")
    ap.add_argument("--shapes", default=None, help="model:batch:context,... (default: the "
                    "built-in list), e.g. llama3.1-8b:8:32768,llama3.1-8b:32:131072")
    ap.add_argument("--presets", default="paper", help="comma-separated presets")
    ap.add_argument("--settings", default=None, help="block_n:warps:maxnreg,... to time "
                    "(maxnreg 0: no cap; 'default': the launch without explicit settings; "
                    "unset: 64/128 keys x 4/8 warps x no/128/168 cap)")
    ap.add_argument("--env", default=None, help="NAME=v1,v2,...: also vary one per-call "
                    "setting, every value with every launch setting ('unset': the library's "
                    "rule), e.g. POLARTENSOR_DECODE_MMA=qk,vp")
    args = ap.parse_args()
    env_name, env_values = None, [None]
    if args.env:
        env_name, _, values = args.env.partition("=")
        env_values = [None if v == "unset" else v for v in values.split(",")]
    shapes = SHAPES
    if args.shapes:
        dims = {m: (hq, hk, d) for m, hq, hk, d, _ in SHAPES}
        picked: dict = {}
        for item in args.shapes.split(","):
            m, b, n = item.split(":")
            if m not in dims:
                raise SystemExit(f"--shapes: unknown model {m!r}; use one of {sorted(dims)}")
            picked.setdefault(m, []).append((int(b), int(n)))
        shapes = [(m, *dims[m], bn) for m, bn in picked.items()]
    settings = [(bn, w, r) for bn in (64, 128) for w in (4, 8) for r in (None, 128, 168)]
    if args.settings:
        settings = [(None, None, None) if x == "default" else
                    tuple(int(v) or None for v in x.split(":"))
                    for x in args.settings.split(",")]
    import triton.testing
    from profile_decode import quantized
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from polartensor.config import get_preset
    from polartensor.kernels import decode_attention
    from polartensor.kernels.decode_attention import launch_attention

    if args.splits == "sweep":
        settings = [(None, None, None)]
        asked: list = []
        rule = decode_attention._split_count

        def recording_rule(*a, **kw):  # the library's requested split count, per launch
            asked.append(rule(*a, **kw))
            return asked[-1]

        decode_attention._split_count = recording_rule
        per_sm_of = decode_attention._split_kernel_blocks_per_sm

        def recording_per_sm(kw, *a):  # keys per step and resident programs, per launch
            asked.append((kw["BN"], per_sm_of(kw, *a)))
            return asked[-1][1]

        decode_attention._split_kernel_blocks_per_sm = recording_per_sm

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median")

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    for model, hq, hk, d, sizes, preset in ((*s, p) for s in shapes
                                            for p in args.presets.split(",")):
        cfg = get_preset(preset, head_dim=d)
        for b, n in sizes:
            k = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16)
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
            kq, vq = quantized(k, cfg), quantized(v, cfg)
            qf = q.reshape(b, hk, hq // hk, d)  # GQA folded into q_len: exact for q_len 1

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(qf, k, v, scale=d ** -0.5)

            base = bench(cudnn)

            def ours(**kw):
                return lambda: launch_attention(q, kq[0], kq[1], kq[2], cfg, vq[0], vq[1],
                                                vq[2], cfg, kq[3], kq[3], scale=d ** -0.5, **kw)

            ref = ours()()
            if args.splits == "sweep":
                sweep_splits(rows, ours, ref, bench, base, asked,
                             dict(model=model, preset=preset, batch=b, context=n), n, sms)
                k = v = kq = vq = None
                torch.cuda.empty_cache()
                continue
            for (bn, warps, maxnreg), env_value in itertools.product(settings, env_values):
                splits = None  # the library's choice
                if args.splits == "fixed" and bn is not None:
                    mul = 8 if b * hk * 8 < sms * 8 else 4
                    splits = max(1, min(-(-mul * sms // (b * hk)), n // (bn * 4)))
                fn = with_env(env_name, env_value, ours(block_n=bn, num_warps=warps,
                                                        num_splits=splits, maxnreg=maxnreg))
                try:
                    diff = (fn().float() - ref.float()).abs().max().item()
                    ms = bench(fn)
                except Exception as exc:  # noqa: BLE001
                    print("ERROR", model, preset, b, n, bn, warps, maxnreg, env_value,
                          str(exc)[:200])
                    continue
                row = dict(model=model, preset=preset, batch=b, context=n, block_n=bn,
                           warps=warps, maxnreg=maxnreg, splits=splits or "waves", ms=ms,
                           cudnn_ms=base, x_vs_cudnn=base / ms, max_diff=diff)
                if env_name:
                    row[env_name] = env_value or "unset"
                rows.append(row)
                print(row, flush=True)
                save(rows)  # after every row: a run cut off by a time limit keeps its rows
            k = v = kq = vq = None  # free before the next shape
            torch.cuda.empty_cache()
    save(rows)


def sweep_splits(rows, ours, ref, bench, base, asked, shape, n, sms):
    """Time every split count with a distinct step count (default launch settings), and the
    library's own choice (``splits='auto'``)."""
    import triton

    from polartensor.kernels.decode_attention import _split_candidates

    asked.clear()
    auto = ours()
    auto()
    launch = [a for a in asked if isinstance(a, tuple)]
    if not launch:
        print("SKIP (the launch did not split)", shape)
        return
    bn, per_sm = launch[0]
    chosen = next((a for a in asked if not isinstance(a, tuple)), None)
    steps = triton.cdiv(n, bn)
    max_splits = triton.cdiv(n, bn * 4)
    counts = [c for c in _split_candidates(steps, max_splits) if c >= max(1, max_splits // 8)]
    common = dict(shape, block_n=bn, per_sm=per_sm, sms=sms, cudnn_ms=base,
                  library_asked=chosen,
                  library_splits=(triton.cdiv(steps, triton.cdiv(steps, chosen))
                                  if chosen else None))
    for splits in ["auto", *counts]:
        fn = auto if splits == "auto" else ours(num_splits=splits)
        try:
            diff = (fn().float() - ref.float()).abs().max().item()
            ms = bench(fn)
        except Exception as exc:  # noqa: BLE001
            print("ERROR", shape, splits, str(exc)[:200])
            continue
        row = dict(common, splits=splits, steps_per_split=(
            None if splits == "auto" else triton.cdiv(steps, splits)), ms=ms,
            x_vs_cudnn=base / ms, max_diff=diff)
        rows.append(row)
        print(row, flush=True)
        save(rows)


def save(rows: list) -> None:
    with open(os.path.join(os.environ.get("OUT", "."), "decode_launch_sweep.json"), "w") as fh:
        json.dump(rows, fh, indent=0)


if __name__ == "__main__":
    main()
