#!/usr/bin/env python3
# ruff: noqa: B023  (benchmark closures run inside the loop iteration that makes them)
"""Benchmark (not a test): PolarQuant decode / prefill attention and encode on one GPU.

One process, side by side in the same run:
- decode attention (q_len 1): our split-K kernel over the quantized cache vs PyTorch SDPA on a
  bf16 cache (cuDNN and flash backends) vs "dequantize then SDPA" (our dequant kernel writes a
  bf16 rotated cache, then cuDNN SDPA), for batch 1/8/32, contexts 4K/32K/128K, Llama-3.1-8B
  heads (32 q / 8 kv, d 128) and SmolLM2 heads (9 / 3, d 64), every preset, and key/value
  preset pairs named ``K/V`` (``polar-4/polar-3``: the transformers integration's default
  cache);
- encode throughput (bytes in + out per second) against the measured device copy bandwidth;
- chunked prefill (2K new tokens on a 32K quantized cache) vs bf16 SDPA.

Every contender is timed as CUDA-graph replays (triton.testing.do_bench_cudagraph, median), so
launch overhead is excluded for all alike. GQA for the bf16 baselines folds the query group
into the query length (q_len 1 per head, so this is exact), reading each KV head once.
A failing configuration records its error and the run goes on.

    python scripts/bench_attention.py --out results/bench
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import signal
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODELS = [("llama3.1-8b", 32, 8, 128), ("smollm2-135m", 9, 3, 64)]
BATCHES = [1, 8, 32]
CONTEXTS = [4096, 32768, 131072]
TARGET = ("llama3.1-8b", 8, 32768, "paper")


def preset_pair(name: str, d: int):
    """The key and value configurations a ``--presets`` entry names: ``K/V`` (e.g.
    ``polar-4/polar-3``, the transformers integration's default cache) or one preset for
    both."""
    from polartensor.config import get_preset

    k_name, sep, v_name = name.partition("/")
    if sep and (not k_name or not v_name or "/" in v_name):
        raise ValueError(f"preset {name!r}: use one preset or KEY/VALUE, e.g. polar-4/polar-3")
    return get_preset(k_name, head_dim=d), get_preset(v_name or k_name, head_dim=d)


def bench(fn, rep_ms=30):
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def encode_agreement(codes, radii, ref_codes, ref_radii) -> dict:
    """How far one encode's output is from another's: the fractions of code bytes and radii
    equal, and the radii's largest relative difference."""
    rel = (radii.float() - ref_radii.float()).abs() / ref_radii.float().abs().clamp_min(1e-30)
    return dict(codes_equal=float((codes == ref_codes).float().mean().item()),
                radii_equal=float((radii == ref_radii).float().mean().item()),
                radii_max_rel_diff=float(rel.max().item()))


COPY_METHODS: dict = {}


def copy_bandwidth():
    """The device's copy bandwidth (bytes read + written per second): the faster of a
    captured memcpy (``copy_``, which a CUDA graph may hand to a copy engine) and an
    elementwise kernel on the SMs (``neg`` of int32, the same bytes each way). Both are kept
    in COPY_METHODS. (Until 2026-12-05 only the memcpy was timed: 2.71 TB/s on the H200 and
    2.44 on the H100, below what SDPA itself read, so the percentages of it were too high.)"""
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    a32, b32 = a.view(torch.int32), b.view(torch.int32)
    runs = {"memcpy": lambda: b.copy_(a), "sm_kernel": lambda: torch.neg(a32, out=b32)}
    bench(runs["memcpy"], rep_ms=200)  # clocks up from idle first
    for name, fn in runs.items():
        COPY_METHODS[name] = 2 * n / (bench(fn, rep_ms=100) * 1e-3)
    return max(COPY_METHODS.values())


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION,
                        "flash": SDPBackend.FLASH_ATTENTION}[name])


def fold_gqa(q, hk):
    """[B, Hq, 1, D] -> [B, Hk, group, D]: decode GQA as q_len=group per KV head (exact)."""
    b, hq, t, d = q.shape
    return q.reshape(b, hk, (hq // hk) * t, d)


class Row(dict):
    pass


# (block_n, num_warps, num_stages) at d = 128
SWEEP = [(32, 4, 1), (64, 4, 1), (64, 8, 1), (128, 4, 1), (128, 8, 1), (64, 4, 2), (32, 4, 2)]


def _tiny_cache(cfg, b, hk, n, d, dev):
    from profile_decode import quantized

    from polartensor.kernels.ops import tables_for
    from polartensor.polar_quant_tensor import codebook_for

    x = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16)
    mids, _ = tables_for(codebook_for(cfg, device=dev), cfg)
    return x, mids, quantized(x, cfg)


def warm_task(task):
    """Compile one kernel configuration in a worker process (fills Triton's disk cache with
    exactly what the timed run launches: same constexprs, dtypes and specialisations)."""
    try:
        from polartensor.kernels.decode_attention import launch_attention
        from polartensor.kernels.dequant import dequantize_rotated_triton
        from polartensor.kernels.encode import encode_into_triton

        dev = torch.device("cuda")
        kind, hq, hk, d, preset, kw = task
        cfg, v_cfg = preset_pair(preset, d)
        x, mids, c = _tiny_cache(cfg, 1, hk, 1024, d, dev)
        cv = c if v_cfg == cfg else _tiny_cache(v_cfg, 1, hk, 1024, d, dev)[2]
        if kind == "decode":
            q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.bfloat16)
            launch_attention(q, c[0], c[1], c[2], cfg, cv[0], cv[1], cv[2], v_cfg, c[3], cv[3],
                             None, None, None, False, d ** -0.5, num_splits=2, **kw)
        elif kind == "dequant":
            dequantize_rotated_triton(c[0], c[1], c[2], cfg, d, torch.bfloat16)
            if v_cfg != cfg:
                dequantize_rotated_triton(cv[0], cv[1], cv[2], v_cfg, d, torch.bfloat16)
        elif kind == "encode":
            encode_into_triton(x, c[3], mids, c[0], c[1], cfg, exact=False, **kw)
        elif kind == "prefill":
            q = torch.randn(1, hq, 512, d, device=dev, dtype=torch.bfloat16)
            t = torch.randn(1, hk, 512, d, device=dev)
            launch_attention(q, c[0], c[1], c[2], cfg, c[0], c[1], c[2], cfg, c[3], c[3], t, t,
                             None, kw["causal"], d ** -0.5, mode="prefill")
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"warm {task}: {type(exc).__name__}: {str(exc)[:300]}"


def warm_tasks(presets, sections=("sweep", "encode", "prefill", "decode"), joined=False):
    tasks = []
    for _model, hq, hk, d in MODELS:
        for p in presets:
            if "decode" in sections:
                tasks += [("decode", hq, hk, d, p, {}), ("dequant", hq, hk, d, p, {})]
                if d == 128:  # launch_attention's launch for many programs over long caches
                    tasks += [("decode", hq, hk, d, p, {"block_n": 64, "maxnreg": 128})]
                if joined:
                    tasks += [("decode", hq, hk, d, p, {"pack": False})]
                    if d == 128:
                        tasks += [("decode", hq, hk, d, p,
                                   {"block_n": 64, "maxnreg": 128, "pack": False})]
            if "encode" in sections and "/" not in p:  # (encode rows: one preset each)
                tasks += [("encode", hq, hk, d, p, {"pre_rotate": False}),
                          ("encode", hq, hk, d, p, {"pre_rotate": False, "quantizer": "cross",
                                                    "rotation_mma": "bf16x2"})]
        if "prefill" in sections:
            tasks += [("prefill", hq, hk, d, "paper", {"causal": c}) for c in (False, True)]
        if "encode" in sections:
            tasks += [("encode", hq, hk, d, "paper", {"pre_rotate": True}),
                      ("encode", hq, hk, d, "paper", {"pre_rotate": False, "block_rows": 16}),
                      ("encode", hq, hk, d, "paper", {"pre_rotate": False, "block_rows": 32})]
        if d == 128 and "sweep" in sections:
            tasks += [("decode", hq, hk, d, "paper",
                       {"block_n": bn, "num_warps": w, "num_stages": st})
                      for bn, w, st in SWEEP]
    return tasks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases")
    ap.add_argument("--presets", default="all")
    ap.add_argument("--quick", action="store_true", help="target config only (smoke run)")
    ap.add_argument("--no-warm", action="store_true", help="skip the parallel compile")
    ap.add_argument("--joined", action="store_true", help="decode table: also time the "
                    "float32 tile decode (launch_attention pack=False, POLARTENSOR_DECODE="
                    "joined) beside the default packed one, in the same run")
    ap.add_argument("--decode-mma", action="store_true",
                    help="decode table: also time each MMA orientation "
                         "(POLARTENSOR_DECODE_MMA=qk, =vp and =kq) beside the default "
                         "(auto: the orientation measured fastest per configuration), in "
                         "the same run")
    ap.add_argument("--shfl", action="store_true", help="decode table: also time the "
                    "per-level tables read by warp shuffles everywhere (POLARTENSOR_DECODE_SHFL"
                    "=1) and nowhere (=0) beside the default, in the same run")
    ap.add_argument("--joint12", action="store_true", help="decode table: also time the "
                    "joint table of levels 1 and 2 everywhere (POLARTENSOR_JOINT12=1) and "
                    "nowhere (=0) beside the default, in the same run")
    ap.add_argument("--splits-baseline", action="store_true", help="decode table: also time "
                    "the previous split rule (~8 programs per SM, split_rule='per_sm') beside "
                    "the default wave-filling one, in the same run")
    ap.add_argument("--sections", default="sweep,encode,prefill,decode",
                    help="comma-separated subset of sweep, encode, prefill, decode")
    args = ap.parse_args()
    t_start = time.time()

    import triton

    from polartensor.config import PRESETS, get_preset
    from polartensor.kernels import common, tree_decode
    from polartensor.kernels.decode_attention import launch_attention
    from polartensor.kernels.decode_attention_gluon import LAST_LAUNCH, takes_gluon_decode
    from polartensor.kernels.dequant import dequantize_rotated_triton
    from polartensor.kernels.encode import encode_into_triton
    from polartensor.kernels.ops import cached_rotation, tables_for
    from polartensor.polar_quant_tensor import codebook_for

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    env = dict(
        command="python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(), python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        decode=common._DECODE,
        code16=tree_decode._CODE16.value,
        encode_persist=os.environ.get("POLARTENSOR_ENCODE_PERSIST", "auto"),
    )
    print(env, flush=True)
    result = dict(env=env, copy_bw=None, decode=[], sweep=[], encode=[], prefill=[],
                  errors=[])
    presets = sorted(PRESETS) if args.presets == "all" else args.presets.split(",")
    if "paper" in presets:
        presets = ["paper"] + [p for p in presets if p != "paper"]
    for p in presets:
        preset_pair(p, 128)  # (a wrong name stops the run here, not in its middle)
    sections = set(args.sections.split(","))

    def save():
        """Write the JSON and markdown of what has run so far (also at exit, so that a run
        stopped by SIGTERM, e.g. a ``timeout``, keeps its finished rows)."""
        result["elapsed_s"] = time.time() - t_start
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_attention.json"), "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        md = render_markdown(result)
        with open(os.path.join(args.out, "bench_attention.md"), "w") as fh:
            fh.write(md)
        return md

    def stop_on_term(signum, frame):
        result["errors"].append(f"stopped by signal {signum}: later cases did not run")
        raise SystemExit(128 + signum)

    atexit.register(save)
    signal.signal(signal.SIGTERM, stop_on_term)

    def over_budget():
        return time.time() - t_start > args.budget_s

    def record_error(where, exc):
        msg = f"{where}: {type(exc).__name__}: {str(exc)[:300]}"
        print("ERROR", msg, flush=True)
        result["errors"].append(msg)

    try:
        result["copy_bw"] = copy_bandwidth()
        result["copy_bw_methods"] = dict(COPY_METHODS)
    except Exception as exc:  # noqa: BLE001
        record_error("copy", exc)
    copy_bw = result["copy_bw"] or 4.2e12
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)

    # Compile every kernel configuration in parallel worker processes first (Triton compiles
    # on first launch, single-threaded; the disk cache then serves the timed run).
    if not args.no_warm:
        import multiprocessing as mp

        t0 = time.time()
        tasks = warm_tasks(presets, sections, args.joined)
        workers = max(1, min(len(tasks), (os.cpu_count() or 4) - 1))
        with mp.get_context("spawn").Pool(workers) as pool:
            for err in pool.imap_unordered(warm_task, tasks):
                if err:
                    record_error("warm-up", RuntimeError(err))
        result["warm_s"] = time.time() - t0
        print(f"warm-up: {len(tasks)} kernel configurations in {result['warm_s']:.0f} s",
              flush=True)

    # -- quantized caches ------------------------------------------------------------------
    from profile_decode import quantized as quantize_cache  # (codes, radii, trig, rotation)

    def decode_row(base, method, preset, nbytes, make):
        """One decode-table row: time the callable ``make()`` returns (with extra fields), or
        record the error; appended to the result and printed either way."""
        try:
            fn, extra = make()
            ms = bench(fn)
            row = dict(base, method=method, preset=preset, ms=ms, bytes=nbytes,
                       tbps=nbytes / (ms * 1e-3) / 1e12, **extra)
        except Exception as exc:  # noqa: BLE001
            record_error(f"decode {method} {preset} {base}", exc)
            row = dict(base, method=method, preset=preset, error=str(exc)[:200])
        result["decode"].append(row)
        print(row, flush=True)
        return row

    def ours_fn(q, kq, vq, cfg, scale, v_cfg=None, **kw):
        codes_k, radii_k, trig_k, rot_k = kq
        codes_v, radii_v, trig_v, rot_v = vq
        return lambda: launch_attention(q, codes_k, radii_k, trig_k, cfg, codes_v, radii_v,
                                        trig_v, v_cfg or cfg, rot_k, rot_v, None, None, None,
                                        False, scale, **kw)

    # -- decode: launch-parameter sweep at the target shape (d = 128, paper) ----------------
    for model, hq, hk, d in (MODELS[:1] if "sweep" in sections else []):
        b, n = 8, 32768
        try:
            g = torch.Generator(device=dev).manual_seed(0)
            k = torch.randn(b, hk, n, d, device=dev, generator=g, dtype=torch.bfloat16)
            v = torch.randn(b, hk, n, d, device=dev, generator=g, dtype=torch.bfloat16)
            q = torch.randn(b, hq, 1, d, device=dev, generator=g, dtype=torch.bfloat16)
            cfg = get_preset("paper", head_dim=d)
            kq, vq = quantize_cache(k, cfg), quantize_cache(v, cfg)
            qbytes = sum(t.numel() * t.element_size() for t in (kq[0], kq[1], vq[0], vq[1]))
            for bn, warps, stages in SWEEP:
                for mul in (1, 2, 4, 8):
                    splits = max(1, math.ceil(mul * props.multi_processor_count / (b * hk)))
                    kw = dict(block_n=bn, num_warps=warps, num_stages=stages, num_splits=splits)
                    try:
                        ms = bench(ours_fn(q, kq, vq, cfg, d ** -0.5, **kw))
                    except Exception as exc:  # noqa: BLE001
                        record_error(f"sweep {model} {kw}", exc)
                        continue
                    row = dict(model=model, d=d, **kw, ms=ms, tbps=qbytes / (ms * 1e-3) / 1e12)
                    result["sweep"].append(row)
                    print("sweep", row, flush=True)
            # where the time goes: K+V decode alone (dequant kernel, bf16 out) at this shape
            try:
                ms = bench(lambda kq=kq, vq=vq: (
                    dequantize_rotated_triton(kq[0], kq[1], kq[2], cfg, d, torch.bfloat16),
                    dequantize_rotated_triton(vq[0], vq[1], vq[2], cfg, d, torch.bfloat16)))
                result["dequant_only_ms"] = ms
                print("dequant K+V only", ms, flush=True)
            except Exception as exc:  # noqa: BLE001
                record_error("dequant-only", exc)
            del k, v, q, kq, vq
        except Exception as exc:  # noqa: BLE001
            record_error(f"sweep {model}", exc)
        torch.cuda.empty_cache()

    # -- encode throughput --------------------------------------------------------------------
    for model, _hq, hk, d in (MODELS if "encode" in sections else []):
        b, n = 8, 32768
        try:
            x = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16)
        except Exception as exc:  # noqa: BLE001
            record_error(f"encode alloc {model}", exc)
            continue
        for preset in [p for p in presets if "/" not in p]:  # (one preset per encode row)
            cfg = get_preset(preset, head_dim=d)
            cent = codebook_for(cfg, device=dev)
            mids, _ = tables_for(cent, cfg)
            codes = torch.empty(b, hk, n, cfg.record_bytes(d), dtype=torch.uint8, device=dev)
            radii = torch.empty(b, hk, n, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                                device=dev)
            rot = cached_rotation(cfg.rotation, cfg.seed, d, dev)
            io = (x.numel() * x.element_size() + codes.numel()
                  + radii.numel() * radii.element_size())
            # the default encode (quantizer='cross', rotation_mma='bf16x2', the launch
            # POLARTENSOR_ENCODE_PERSIST=auto picks: persistent at d 128 where every level has
            # <= 4 bits; the env records the setting) beside one program per tile, the
            # persistent launch and the former default (atan2, tf32x3), every preset;
            # explicit so the environment cannot blur the others
            fast = dict(pre_rotate=False, quantizer="cross", rotation_mma="bf16x2",
                        persistent=False)
            variants = [("fused", dict(fast, persistent=None)),
                        ("fused_per_tile", fast),
                        ("fused_persistent", dict(fast, persistent=True)),
                        ("fused_atan2_tf32x3", dict(pre_rotate=False, quantizer="atan2",
                                                    rotation_mma="tf32x3"))]
            if preset == "paper":
                variants += [("fused_cross_tf32x3", dict(fast, rotation_mma="tf32x3")),
                             ("fused_atan2_bf16x2", dict(fast, quantizer="atan2")),
                             ("fused_bn16", dict(fast, block_rows=16)),
                             ("fused_bn32", dict(fast, block_rows=32)),
                             ("torch_matmul_then_kernel", dict(fast, pre_rotate=True))]
                if d == 128 and torch.cuda.get_device_capability() == (9, 0):
                    # the Gluon encode (kernels/encode_gluon.py; sm_90, paper, d 128) and
                    # the Triton kernel, each named, whichever the default is
                    variants += [(f"fused_{k}", dict(fast, persistent=None,
                                                     _env={"POLARTENSOR_ENCODE_GLUON": v}))
                                 for k, v in (("gluon", "1"), ("triton", "0"))]
            for name, kw in variants:
                kw = dict(kw)
                env = kw.pop("_env", {})
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    ms = bench(lambda kw=kw, x=x: encode_into_triton(
                        x, rot, mids, codes, radii, cfg, exact=False, **kw))
                    row = dict(model=model, d=d, preset=preset, variant=name,
                               vectors=x.numel() // d, ms=ms, bytes=io, gbps=io / (ms * 1e-3) / 1e9,
                               pct_copy=100 * io / (ms * 1e-3) / copy_bw)
                except Exception as exc:  # noqa: BLE001
                    record_error(f"encode {model} {preset} {name}", exc)
                    row = dict(model=model, d=d, preset=preset, variant=name,
                               error=str(exc)[:200])
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                result["encode"].append(row)
                print(row, flush=True)
        del x
        torch.cuda.empty_cache()

    # -- chunked prefill ------------------------------------------------------------------------
    for model, hq, hk, d in (MODELS if "prefill" in sections else []):
        b, n, t = 1, 32768, 2048
        scale = d ** -0.5
        try:
            g = torch.Generator(device=dev).manual_seed(2)
            k = torch.randn(b, hk, n + t, d, device=dev, generator=g, dtype=torch.bfloat16)
            v = torch.randn(b, hk, n + t, d, device=dev, generator=g, dtype=torch.bfloat16)
            q = torch.randn(b, hq, t, d, device=dev, generator=g, dtype=torch.bfloat16)
            base = dict(model=model, hq=hq, hk=hk, d=d, batch=b, context=n, chunk=t)
            kx = k.repeat_interleave(hq // hk, dim=1)
            vx = v.repeat_interleave(hq // hk, dim=1)
            flops = 4 * b * hq * t * (n + t) * d
            for bk in ("cudnn", "flash"):
                try:
                    def f(bk=bk, q=q, kx=kx, vx=vx):
                        with sdpa_backend(bk):
                            return F.scaled_dot_product_attention(q, kx, vx, scale=scale)
                    ms = bench(f)
                    row = dict(base, method=f"sdpa_bf16_{bk}", causal=False, ms=ms,
                               tflops=flops / (ms * 1e-3) / 1e12)
                except Exception as exc:  # noqa: BLE001
                    record_error(f"prefill {bk} {model}", exc)
                    row = dict(base, method=f"sdpa_bf16_{bk}", error=str(exc)[:200])
                result["prefill"].append(row)
                print(row, flush=True)
            del kx, vx
            cfg = get_preset("paper", head_dim=d)
            kq, vq = quantize_cache(k[:, :, :n], cfg), quantize_cache(v[:, :, :n], cfg)
            rot = kq[3]
            kt = (k[:, :, n:].float() @ rot.T)
            vt = (v[:, :, n:].float() @ rot.T)
            # "prefill": the fused kernel with query tiles; "dequant": dequantize the cache
            # once + PyTorch SDPA (what "auto" picks from POLARTENSOR_DEQUANT_MIN_Q query tokens).
            for mode, method in (("prefill", "polar_triton"), ("dequant", "polar_dequant_sdpa")):
                for causal in (False, True):
                    try:
                        fn = (lambda causal=causal, q=q, kq=kq, vq=vq, kt=kt, vt=vt, mode=mode:
                              launch_attention(q, kq[0], kq[1], kq[2], cfg, vq[0], vq[1], vq[2],
                                               cfg, rot, rot, kt, vt, None, causal, scale,
                                               mode=mode))
                        ms = bench(fn)
                        row = dict(base, method=method, preset="paper", causal=causal, ms=ms,
                                   tflops=flops / (ms * 1e-3) / 1e12 / (2 if causal else 1))
                    except Exception as exc:  # noqa: BLE001
                        record_error(f"prefill {method} {model} causal={causal}", exc)
                        row = dict(base, method=method, preset="paper", causal=causal,
                                   error=str(exc)[:200])
                    result["prefill"].append(row)
                    print(row, flush=True)
            # the causal dequant path with a materialised mask instead of the flash kernel
            # (POLARTENSOR_CAUSAL_FLASH=0, read per call: set while the graph is captured)
            try:
                os.environ["POLARTENSOR_CAUSAL_FLASH"] = "0"
                ms = bench(lambda q=q, kq=kq, vq=vq, kt=kt, vt=vt: launch_attention(
                    q, kq[0], kq[1], kq[2], cfg, vq[0], vq[1], vq[2], cfg, rot, rot, kt, vt,
                    None, True, scale, mode="dequant"))
                row = dict(base, method="polar_dequant_masked_causal", preset="paper",
                           causal=True, ms=ms, tflops=flops / (ms * 1e-3) / 1e12 / 2)
            except Exception as exc:  # noqa: BLE001
                record_error(f"prefill polar_dequant_masked_causal {model}", exc)
                row = dict(base, method="polar_dequant_masked_causal", preset="paper",
                           causal=True, error=str(exc)[:200])
            finally:
                os.environ.pop("POLARTENSOR_CAUSAL_FLASH", None)
            result["prefill"].append(row)
            print(row, flush=True)
            del k, v, q, kq, vq, kt, vt
        except Exception as exc:  # noqa: BLE001
            record_error(f"prefill {model}", exc)
            traceback.print_exc()
        torch.cuda.empty_cache()

    # -- decode table -------------------------------------------------------------------------
    cases = []
    for model, hq, hk, d in (MODELS if "decode" in sections else []):
        for n in CONTEXTS:
            for b in BATCHES:
                cases.append((model, hq, hk, d, b, n))
    # the target first, so it is always measured
    cases.sort(key=lambda c: (c[0], c[4], c[5]) != (TARGET[0], TARGET[1], TARGET[2]))
    if args.quick:
        cases = cases[:1]
    for model, hq, hk, d, b, n in cases:
        if over_budget():
            result["errors"].append(f"decode {model} b={b} n={n}: skipped (time budget)")
            continue
        scale = d ** -0.5
        try:
            g = torch.Generator(device=dev).manual_seed(1)
            k = torch.randn(b, hk, n, d, device=dev, generator=g, dtype=torch.bfloat16)
            v = torch.randn(b, hk, n, d, device=dev, generator=g, dtype=torch.bfloat16)
            q = torch.randn(b, hq, 1, d, device=dev, generator=g, dtype=torch.bfloat16)
        except Exception as exc:  # noqa: BLE001
            record_error(f"decode alloc {model} b={b} n={n}", exc)
            continue
        bf16_bytes = 2 * k.numel() * k.element_size()
        base = dict(model=model, hq=hq, hk=hk, d=d, batch=b, context=n)
        qf = fold_gqa(q, hk)
        for bk in ("cudnn", "flash"):
            def f(bk=bk, qf=qf, k=k, v=v):
                with sdpa_backend(bk):
                    return F.scaled_dot_product_attention(qf, k, v, scale=scale)
            decode_row(base, f"sdpa_bf16_{bk}", None, bf16_bytes, lambda f=f: (f, {}))
        for preset in presets:
            cfg, v_cfg = preset_pair(preset, d)
            try:
                kq, vq = quantize_cache(k, cfg), quantize_cache(v, v_cfg)
                qbytes = sum(t.numel() * t.element_size() for t in (kq[0], kq[1], vq[0], vq[1]))
                ms = bench(ours_fn(q, kq, vq, cfg, scale, v_cfg))
                # which decode the default took (decode_attention_gluon's rule)
                gluon = takes_gluon_decode(q, cfg, v_cfg, kq[3], vq[3], None, None, hq // hk,
                                           b, hk, n)
                row = dict(base, method="polar_triton", preset=preset, ms=ms, bytes=qbytes,
                           tbps=qbytes / (ms * 1e-3) / 1e12,
                           kernel="gluon" if gluon else "triton")
                if gluon:
                    # whether its codes went through the shared-memory ring (the last launch
                    # was the default's)
                    row["staged"] = bool(LAST_LAUNCH.get("staged"))
            except Exception as exc:  # noqa: BLE001
                record_error(f"decode ours {preset} {base}", exc)
                row = dict(base, method="polar_triton", preset=preset, error=str(exc)[:200])
                kq = vq = None
            result["decode"].append(row)
            print(row, flush=True)
            if kq is None:
                continue
            if args.splits_baseline:
                decode_row(base, "polar_triton_per_sm_splits", preset, qbytes,
                           lambda kq=kq, vq=vq, cfg=cfg, v_cfg=v_cfg, q=q: (
                               ours_fn(q, kq, vq, cfg, scale, v_cfg, split_rule="per_sm"), {}))
            def env_fn(kq=kq, vq=vq, cfg=cfg, v_cfg=v_cfg, q=q, name="", value="1"):
                """Our decode with one setting forced (read per call: set while the graph
                is captured), and its largest difference from the default's output."""
                default = ours_fn(q, kq, vq, cfg, scale, v_cfg)()
                launch = ours_fn(q, kq, vq, cfg, scale, v_cfg)

                def forced():
                    os.environ[name] = value
                    try:
                        return launch()
                    finally:
                        os.environ.pop(name, None)
                diff = (forced().float() - default.float()).abs().max().item()
                return forced, {"max_abs_diff_vs_default": diff}
            # one row per forced value of a per-call setting: (flag, variable, rows)
            forced_rows = [
                # where the default took the Gluon decode, the Triton kernel beside it
                (row.get("kernel") == "gluon", "POLARTENSOR_DECODE_GLUON",
                 (("polar_triton_kernel", "0"),)),
                # where its codes went through the ring, the register prefetch beside it
                (row.get("staged", False), "POLARTENSOR_GLUON_STAGED",
                 (("polar_gluon_prefetch", "0"),)),
                (args.joint12, "POLARTENSOR_JOINT12",
                 (("polar_triton_joint12", "1"), ("polar_triton_joint12_off", "0"))),
                (args.shfl, "POLARTENSOR_DECODE_SHFL",
                 (("polar_triton_shfl", "1"), ("polar_triton_shfl_off", "0"))),
                (args.decode_mma, "POLARTENSOR_DECODE_MMA",
                 tuple((f"polar_triton_mma_{v}", v) for v in ("qk", "vp", "kq"))),
            ]
            for wanted, name, methods in forced_rows:
                for method, value in methods if wanted else ():
                    decode_row(base, method, preset, qbytes,
                               lambda name=name, value=value: env_fn(name=name, value=value))
            def again_fn(kq=kq, vq=vq, cfg=cfg, v_cfg=v_cfg, q=q):
                # the default timed once more, after the other rows at its shape: its first
                # timing follows the quantization directly and has read slower than identical
                # launches timed later at the larger shapes
                launch = ours_fn(q, kq, vq, cfg, scale, v_cfg)
                diff = (launch().float() - launch().float()).abs().max().item()
                return launch, {"max_abs_diff_vs_default": diff}
            decode_row(base, "polar_triton_again", preset, qbytes, again_fn)
            if args.joined:
                def joined_fn(kq=kq, vq=vq, cfg=cfg, v_cfg=v_cfg, q=q):
                    default = ours_fn(q, kq, vq, cfg, scale, v_cfg)()
                    joined = ours_fn(q, kq, vq, cfg, scale, v_cfg, pack=False)
                    diff = (joined().float() - default.float()).abs().max().item()
                    return joined, {"max_abs_diff_vs_default": diff}
                decode_row(base, "polar_triton_joined", preset, qbytes, joined_fn)

            def deq_sdpa(kq=kq, vq=vq, cfg=cfg, v_cfg=v_cfg, qf=qf):
                kd = dequantize_rotated_triton(kq[0], kq[1], kq[2], cfg, d, torch.bfloat16)
                vd = dequantize_rotated_triton(vq[0], vq[1], vq[2], v_cfg, d, torch.bfloat16)
                qr = (qf.float() @ kq[3].T).to(torch.bfloat16)
                with sdpa_backend("cudnn"):
                    o = F.scaled_dot_product_attention(qr, kd, vd, scale=scale)
                return (o.float() @ vq[3]).to(torch.bfloat16)

            decode_row(base, "dequant_then_sdpa", preset, qbytes, lambda f=deq_sdpa: (f, {}))
            del kq, vq
        del k, v, q, qf
        torch.cuda.empty_cache()

    atexit.unregister(save)
    print(save())


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def _versus_table(out, keyed, shapes, presets, method, title, alt_heads, with_cudnn=False,
                  diff_key=None):
    """A same-run table of ours against another decode ``method``: its time, ours vs it, and
    optionally it vs cuDNN and the recorded output difference (``diff_key``)."""
    heads = ["model", "batch", "context", "preset", "ours ms", *alt_heads]
    out += ["", title, "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for m, b, n in shapes:
        cu = keyed.get((m, b, n, "sdpa_bf16_cudnn", None), {}).get("ms")
        for p in presets:
            om = keyed.get((m, b, n, "polar_triton", p), {}).get("ms")
            alt = keyed.get((m, b, n, method, p), {})
            am = alt.get("ms")
            if not (om or am):
                continue
            cells = [m, b, f"{n // 1024}K", p, _fmt(om, ".4f"), _fmt(am, ".4f"),
                     _fmt(am / om if om and am else None, ".2f")]
            if with_cudnn:
                cells.append(_fmt(cu / am if cu and am else None, ".2f"))
            if diff_key:
                cells.append(_fmt(alt.get(diff_key), ".2e"))
            out.append("| " + " | ".join(str(c) for c in cells) + " |")


def render_markdown(res) -> str:
    env = res["env"]
    out = ["# PolarQuant attention benchmark", "",
           f"- command: `{env['command']}`",
           f"- GPU: {env['gpu']} ({env['sms']} SMs); torch {env['torch']}, triton "
           f"{env['triton']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}",
           f"- tile decode: {env.get('decode', '?')} (POLARTENSOR_DECODE)"
           + ("; code loads: " + ("16-bit" if env.get("code16", False) else "byte")
              + " (POLARTENSOR_CODE16)" if "code16" in env else ""),
           f"- date: {env['date']}; run took {res.get('elapsed_s', 0):.0f} s",
           f"- device copy bandwidth (read + write): "
           f"{_fmt((res['copy_bw'] or 0) / 1e12, '.2f')} TB/s, the faster of "
           + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in
                       (res.get("copy_bw_methods") or {}).items()),
           "- times: median of CUDA-graph replays (triton.testing.do_bench_cudagraph); "
           "every ratio is against a baseline measured in this run",
           "- TB/s: cache bytes read (bf16 K+V for SDPA; codes + radii of K+V for ours and "
           "for dequantize-then-SDPA) over the time", ""]
    dec = res["decode"]
    out += ["## Decode attention (q_len 1)", "",
            "| model | batch | context | preset | ours ms | ours TB/s | cuDNN bf16 ms | "
            "flash bf16 ms | dequant+SDPA ms | × vs cuDNN | × vs flash | × vs dequant |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for r in dec:
        keyed[(r["model"], r["batch"], r["context"], r["method"], r.get("preset"))] = r
    shapes = sorted({(r["model"], r["batch"], r["context"]) for r in dec},
                    key=lambda s: (s[0], s[2], s[1]))
    presets = []
    for r in dec:
        if r.get("preset") and r["preset"] not in presets:
            presets.append(r["preset"])
    for m, b, n in shapes:
        cu = keyed.get((m, b, n, "sdpa_bf16_cudnn", None), {}).get("ms")
        fl = keyed.get((m, b, n, "sdpa_bf16_flash", None), {}).get("ms")
        for p in presets:
            o = keyed.get((m, b, n, "polar_triton", p), {})
            dq = keyed.get((m, b, n, "dequant_then_sdpa", p), {}).get("ms")
            om = o.get("ms")
            out.append(
                f"| {m} | {b} | {n // 1024}K | {p} | {_fmt(om, '.4f')} "
                f"| {_fmt(o.get('tbps'), '.2f')}"
                f" | {_fmt(cu, '.4f')} | {_fmt(fl, '.4f')} | {_fmt(dq, '.4f')}"
                f" | {_fmt(cu / om if cu and om else None, '.2f')}"
                f" | {_fmt(fl / om if fl and om else None, '.2f')}"
                f" | {_fmt(dq / om if dq and om else None, '.2f')} |")
    # same-run comparisons of the default against one other decode each: (method, title,
    # column heads; with cuDNN and output-difference columns where the heads name them)
    versus = [
        ("polar_triton_joined",
         "Default (packed bf16x2 level 1) vs float32 tile decode (`pack=False`, "
         "`POLARTENSOR_DECODE=joined`), same run:",
         ["float32-decode ms", "× ours vs float32 decode", "× float32 decode vs cuDNN",
          "max abs diff vs ours"]),
        ("polar_triton_joint12",
         "Default (the joint table of levels 1 and 2 where measured faster: "
         "POLARTENSOR_JOINT12 unset) vs it everywhere (`POLARTENSOR_JOINT12=1`; "
         "polar-4 has none: the same kernel), same run:",
         ["joint12 ms", "× ours vs joint12", "× joint12 vs cuDNN", "max abs diff vs ours"]),
        ("polar_triton_joint12_off",
         "Default vs one step per level everywhere (`POLARTENSOR_JOINT12=0`), same run:",
         ["per-level ms", "× ours vs per-level", "× per-level vs cuDNN",
          "max abs diff vs ours"]),
        ("polar_triton_mma_qk",
         "Default (`POLARTENSOR_DECODE_MMA=auto`) vs S = Q K^T and O = P V, the query rows "
         "as the MMA's M (`POLARTENSOR_DECODE_MMA=qk`), same run:",
         ["qk ms", "× ours vs qk", "× qk vs cuDNN", "max abs diff vs ours"]),
        ("polar_triton_mma_vp",
         "Default vs P @ V as V^T P^T with the accumulator transposed "
         "(`POLARTENSOR_DECODE_MMA=vp`), same run:",
         ["vp ms", "× ours vs vp", "× vp vs cuDNN", "max abs diff vs ours"]),
        ("polar_triton_mma_kq",
         "Default vs both products transposed, S^T = K Q^T and O^T = V^T P^T "
         "(`POLARTENSOR_DECODE_MMA=kq`), same run:",
         ["kq ms", "× ours vs kq", "× kq vs cuDNN", "max abs diff vs ours"]),
        ("polar_triton_shfl",
         "Default (the per-level tables read by warp shuffles where measured faster: "
         "POLARTENSOR_DECODE_SHFL unset) vs shuffles everywhere (`POLARTENSOR_DECODE_SHFL=1`; "
         "beside the joint table too), same run:",
         ["shfl ms", "× ours vs shfl", "× shfl vs cuDNN", "max abs diff vs ours"]),
        ("polar_triton_shfl_off",
         "Default vs table gathers everywhere (`POLARTENSOR_DECODE_SHFL=0`), same run:",
         ["gathers ms", "× ours vs gathers", "× gathers vs cuDNN", "max abs diff vs ours"]),
        ("polar_triton_kernel",
         "Default (the Gluon decode where it applies: paper-shaped caches, batch x KV heads "
         "x keys >= 2^20, or >= 2^19 over >= 16 batch x KV heads with groups <= 8) vs "
         "the Triton kernel (`POLARTENSOR_DECODE_GLUON=0`), same run:",
         ["Triton kernel ms", "× ours vs Triton kernel", "× Triton kernel vs cuDNN",
          "max abs diff vs ours"]),
        ("polar_gluon_prefetch",
         "Default (the Gluon decode's codes staged in shared memory by cp.async, where its "
         "step is transposed: groups <= 8) vs its register prefetch "
         "(`POLARTENSOR_GLUON_STAGED=0`), same run:",
         ["prefetch ms", "× ours vs prefetch", "× prefetch vs cuDNN",
          "max abs diff vs ours"]),
        ("polar_triton_again",
         "The default timed first at its shape (right after the quantization) vs the same "
         "launch timed again after every other row there, same run (the difference: two "
         "launches on the same inputs):",
         ["again ms", "× first vs again", "× again vs cuDNN", "max abs diff vs ours"]),
        ("polar_triton_per_sm_splits",
         "Split count: default (no nearly empty last wave) vs the previous rule "
         "(~8 programs per SM, `split_rule='per_sm'`), same run:",
         ["per-SM rule ms", "× ours vs per-SM rule"]),
    ]
    for method, title, heads in versus:
        if any(r["method"] == method for r in dec):
            full = len(heads) == 4
            _versus_table(out, keyed, shapes, presets, method, title, heads, with_cudnn=full,
                          diff_key="max_abs_diff_vs_default" if full else None)
    out += ["", "bf16 SDPA achieved TB/s:", ""]
    for m, b, n in shapes:
        for bk in ("cudnn", "flash"):
            r = keyed.get((m, b, n, f"sdpa_bf16_{bk}", None), {})
            if r.get("tbps"):
                out.append(f"- {m} b={b} {n // 1024}K {bk}: {r['ms']:.4f} ms, "
                           f"{r['tbps']:.2f} TB/s")
    if res.get("dequant_only_ms"):
        out += ["", f"Decode of the K+V codes alone (dequant kernel writing bf16, batch 8, 32K, "
                f"d 128, paper): {res['dequant_only_ms']:.4f} ms."]
    if res["sweep"]:
        out += ["", "## Decode launch-parameter sweep (batch 8, 32K, paper preset)", "",
                "| model | block_n | warps | stages | splits | ms | TB/s |",
                "|---|---|---|---|---|---|---|"]
        for r in res["sweep"]:
            out.append(f"| {r['model']} | {r['block_n']} | {r['num_warps']} | "
                       f"{r.get('num_stages', 1)} | {r['num_splits']} | {r['ms']:.4f} | "
                       f"{r['tbps']:.2f} |")
    if res["encode"]:
        out += ["", "## Encode / append (bf16 input, batch 8 x 32K tokens x KV heads)", "",
                "fused: the default launch (the Gluon encode on sm_90 for paper at d 128, "
                "else the Triton kernel with POLARTENSOR_ENCODE_PERSIST="
                f"{res['env'].get('encode_persist', 'auto')}: persistent at d 128 where every "
                "level has <= 4 bits); fused_per_tile: one program per tile; fused_persistent: "
                "persistent wherever it applies (both the Triton kernel); fused_gluon and "
                "fused_triton: the Gluon encode (sm_90, paper, d 128) and the Triton kernel "
                "at the default launch (POLARTENSOR_ENCODE_GLUON=1 and =0).", "",
                "| model | preset | variant | ms | GB/s (in + out) | % of copy bandwidth |",
                "|---|---|---|---|---|---|"]
        for r in res["encode"]:
            out.append(f"| {r['model']} | {r['preset']} | {r['variant']} | "
                       f"{_fmt(r.get('ms'), '.4f')} | {_fmt(r.get('gbps'), '.0f')} | "
                       f"{_fmt(r.get('pct_copy'), '.1f')} |")
    if res["prefill"]:
        out += ["", "## Chunked prefill (2K new tokens on a 32K cache, batch 1)", "",
                "× vs cuDNN: against non-causal cuDNN bf16 SDPA over the same K/V in this run "
                "(causal rows do about half the work).", "",
                "| model | method | causal | ms | TFLOP/s (visible) | × vs cuDNN |",
                "|---|---|---|---|---|---|"]
        cudnn = {r["model"]: r.get("ms") for r in res["prefill"]
                 if r["method"] == "sdpa_bf16_cudnn"}
        for r in res["prefill"]:
            cu, ms = cudnn.get(r["model"]), r.get("ms")
            out.append(f"| {r['model']} | {r['method']} | {r.get('causal', False)} | "
                       f"{_fmt(ms, '.3f')} | {_fmt(r.get('tflops'), '.1f')} | "
                       f"{_fmt(cu / ms if cu and ms else None, '.2f')} |")
    if res["errors"]:
        out += ["", "## Errors / skipped", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
