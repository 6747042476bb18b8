#!/usr/bin/env python3
"""Time the working tree's decode-attention and encode kernels against other revisions' in
one process, interleaved, on the same inputs (a benchmark, not a test):

    python3 scripts/ab_kernels.py --snapshot main            # here: writes _ab/main/
    python3 scripts/ab_kernels.py --rev main=_ab/main --out <dir>   # on the GPU

(``gpu_validate.sh ab`` runs the second for every revision under _ab/, ``ab_tests`` each
revision's own kernel tests; carry ``_ab`` to the device, it is ignored by git.)

Why: a device session may allow only a call or two, and two benchmark processes, one per
revision, compare across processes. Here every revision's kernels are imported side by side
(the other revision's package under another name, its kernels' own module state, the
reference modules shared), each timed in rounds that alternate the order, and every output
is compared with the working tree's: decode outputs bit for bit and by max difference,
encode codes and radii by the fraction equal. The quantized caches come from the working
tree's encode, so a revision that changed the storage layout cannot be timed this way.

``--check`` (CPU under TRITON_INTERPRET=1, or CUDA): one call of each on tiny shapes, outputs
compared, no timing: how the loader is tested (tests/scripts/test_ab_kernels.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (bench_attention's timing)

# (model, query heads, KV heads, head_dim)
MODELS = {"llama3.1-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64), "gemma2-9b": (16, 8, 256)}
DECODE_SHAPES = ("llama3.1-8b:1:32768,llama3.1-8b:8:32768,llama3.1-8b:8:131072,"
                 "llama3.1-8b:32:32768,smollm2-135m:8:32768")
ENCODE_SHAPES = "llama3.1-8b:8:32768,smollm2-135m:8:32768"
# the working tree's modules a revision's kernels share (reference code and configuration;
# two copies of them would register the same torch.library ops twice)
SHARED = ("attention", "config", "polar_quant_tensor", "rotation", "packing", "codebook", "polar")


def snapshot(rev: str, dest: str | None = None) -> str:
    """git archive REV's package, tests and pyproject.toml into _ab/<rev>/ (run where the git
    history is; the tests let the GPU run each revision's own kernel tests)."""
    name = re.sub(r"\W", "_", rev)
    name = name if name.isidentifier() else "r_" + name
    dest = os.path.normpath(dest or os.path.join(ROOT, "_ab", name))
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "polartensor", "tests",
                              "pyproject.toml"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    with open(os.path.join(dest, "REVISION"), "w") as fh:
        fh.write(f"{rev} {sha}\n")
    return dest


def load_revision(alias: str, root: str):
    """The kernels of the package under ``root`` (a directory holding ``polartensor/``),
    imported as ``alias.kernels``: (decode_attention, encode) modules."""
    pkg_dir = os.path.join(root, "polartensor")
    if not os.path.isdir(os.path.join(pkg_dir, "kernels")):
        raise SystemExit(f"--rev {alias}={root}: no polartensor/kernels under it; make it "
                         "with --snapshot REV")
    if alias not in sys.modules:
        pkg = types.ModuleType(alias)
        pkg.__path__ = [pkg_dir]
        sys.modules[alias] = pkg
        for name in SHARED:
            sys.modules[f"{alias}.{name}"] = importlib.import_module(f"polartensor.{name}")
    elif getattr(sys.modules[alias], "__path__", None) != [pkg_dir]:
        raise SystemExit(f"--rev {alias}: the name is taken; pick another")
    # (else loaded before in this process, e.g. by a warm-up worker's earlier task)
    return (importlib.import_module(f"{alias}.kernels.decode_attention"),
            importlib.import_module(f"{alias}.kernels.encode"))


def _shapes(spec):
    out = []
    for item in spec.split(","):
        model, b, n = item.split(":")
        if model not in MODELS:
            raise SystemExit(f"shape {item!r}: model one of {sorted(MODELS)}")
        out.append((model, int(b), int(n)))
    return out


def _timed(fns, rounds, rep_ms, timing):
    """{name: median ms over rounds}; each round times every callable, the order rotated."""
    if not timing:
        for fn in fns.values():
            fn()
        return {name: None for name in fns}
    from bench_attention import bench

    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(bench(fns[name], rep_ms))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _storage(cfg, b, hk, n, d, dev):
    """Empty (codes, radii) storage for [b, hk, n] head vectors of ``cfg``."""
    return (torch.empty(b, hk, n, cfg.record_bytes(d), dtype=torch.uint8, device=dev),
            torch.empty(b, hk, n, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype, device=dev))


def _decode_rows(kernels, model, b, n, presets, args, dev):
    """Rows of one decode shape: every revision's attention on the working tree's caches."""
    from bench_attention import preset_pair

    from polartensor.kernels.ops import cached_rotation, tables_for
    from polartensor.polar_quant_tensor import codebook_for

    timing = not args.check
    hq, hk, d = MODELS[model]
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(b, hk, n, d, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn(b, hk, n, d, device=dev, generator=g, dtype=torch.bfloat16)
    q = torch.randn(b, hq, 1, d, device=dev, generator=g, dtype=torch.bfloat16)
    cudnn_ms = None
    if timing:
        from bench_attention import fold_gqa, sdpa_backend

        # (as bench_attention: the query group folded onto the KV heads, K/V read once; until
        # 2026-12-05 22:40 UTC this expanded K/V to every query head, 4x the bytes at Llama)
        qf = fold_gqa(q, hk)

        def cudnn():
            with sdpa_backend("cudnn"):
                return torch.nn.functional.scaled_dot_product_attention(qf, k, v)
        cudnn_ms = _timed({"cudnn": cudnn}, 1, args.rep_ms, True)["cudnn"]
    rows = []
    for preset in presets:
        # "K/V" (e.g. polar-4/polar-3, the transformers integration's default): a preset each
        cache, tables = [], []
        for x, cfg in zip((k, v), preset_pair(preset, d)):
            mids, trig = tables_for(codebook_for(cfg, device=dev), cfg)
            rot = cached_rotation(cfg.rotation, cfg.seed, d, dev)
            codes, radii = _storage(cfg, b, hk, n, d, dev)
            assert kernels["work"][1].encode_into_triton(x, rot, mids, codes, radii, cfg,
                                                         exact=False)
            cache += [codes, radii]
            tables += [(cfg, trig, rot)]
        outs = {}

        def make(mod, name, tables=tables, cache=cache, outs=outs):
            kc, kr, vc, vr = cache
            (kcfg, ktrig, krot), (vcfg, vtrig, vrot) = tables

            def call():
                outs[name] = mod.launch_attention(q, kc, kr, ktrig, kcfg, vc, vr, vtrig, vcfg,
                                                  krot, vrot, None, None, None, False,
                                                  d ** -0.5)
            return call
        fns = {name: make(mods[0], name) for name, mods in kernels.items()}
        ms = _timed(fns, args.rounds, args.rep_ms, timing)
        for fn in fns.values():  # one more call each: the outputs compared
            fn()
        for name in fns:
            row = dict(kind="decode", model=model, batch=b, context=n, d=d, preset=preset,
                       variant=name, ms=ms[name], cudnn_ms=cudnn_ms,
                       bit_equal=bool(torch.equal(outs[name], outs["work"])),
                       max_abs_diff=(outs[name].float() - outs["work"].float()).abs().max()
                       .item())
            if timing:
                row["x_vs_work"] = ms["work"] / ms[name]
                row["x_vs_cudnn"] = cudnn_ms / ms[name]
            rows.append(row)
            print(row, flush=True)
    return rows


def _encode_rows(kernels, model, b, n, presets, args, dev):
    """Rows of one encode shape: every revision's encode of the same input."""
    from bench_attention import encode_agreement

    from polartensor.config import get_preset
    from polartensor.kernels.ops import cached_rotation, tables_for
    from polartensor.polar_quant_tensor import codebook_for

    timing = not args.check
    _, hk, d = MODELS[model]
    x = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16,
                    generator=torch.Generator(device=dev).manual_seed(1))
    rows = []
    for preset in (p for p in presets if "/" not in p):  # (K/V pairs: decode only)
        cfg = get_preset(preset, head_dim=d)
        mids, _ = tables_for(codebook_for(cfg, device=dev), cfg)
        rot = cached_rotation(cfg.rotation, cfg.seed, d, dev)
        bufs = {name: _storage(cfg, b, hk, n, d, dev) for name in kernels}

        def make(mod, name, cfg=cfg, mids=mids, rot=rot, bufs=bufs):
            codes, radii = bufs[name]
            return lambda: mod.encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False)
        fns = {name: make(mods[1], name) for name, mods in kernels.items()}
        ms = _timed(fns, args.rounds, args.rep_ms, timing)
        wc, wr = bufs["work"]
        io = x.numel() * x.element_size() + wc.numel() + wr.numel() * wr.element_size()
        for name, (codes, radii) in bufs.items():
            row = dict(kind="encode", model=model, batch=b, context=n, d=d, preset=preset,
                       variant=name, ms=ms[name], **encode_agreement(codes, radii, wc, wr))
            if timing:
                row["x_vs_work"] = ms["work"] / ms[name]
                row["gbps"] = io / (ms[name] * 1e-3) / 1e9
                row["pct_copy"] = 100 * row["gbps"] * 1e9 / args.copy_bw
            rows.append(row)
            print(row, flush=True)
    return rows


def _warm(task):
    """Compile one revision's kernel for one configuration in a worker process (fills
    Triton's disk cache with exactly what the timed run launches: the real shape, with random
    code bytes and radii instead of an encode, so the big bf16 inputs are not needed)."""
    alias, root, kind, model, b, n, preset = task
    try:
        from bench_attention import preset_pair

        from polartensor.kernels.ops import cached_rotation, tables_for
        from polartensor.polar_quant_tensor import codebook_for

        if alias == "work":
            from polartensor.kernels import decode_attention as attn
            from polartensor.kernels import encode as enc
        else:
            attn, enc = load_revision(alias, root)
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hq, hk, d = MODELS[model]
        kv = []
        for cfg in dict.fromkeys(preset_pair(preset, d)):  # ("K/V": decode only)
            mids, trig = tables_for(codebook_for(cfg, device=dev), cfg)
            rot = cached_rotation(cfg.rotation, cfg.seed, d, dev)
            codes = torch.randint(0, 256, (b, hk, n, cfg.record_bytes(d)), dtype=torch.uint8,
                                  device=dev)
            radii = torch.rand(b, hk, n, cfg.num_blocks(d), device=dev).to(
                cfg.torch_radius_dtype)
            kv.append((codes, radii, trig, cfg, rot))
        if kind == "decode":
            (kc, kr, kt, kcfg, krot), (vc, vr, vt, vcfg, vrot) = kv[0], kv[-1]
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
            attn.launch_attention(q, kc, kr, kt, kcfg, vc, vr, vt, vcfg, krot, vrot,
                                  None, None, None, False, d ** -0.5)
        else:
            x = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16)
            enc.encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"warm {task}: {type(exc).__name__}: {str(exc)[:300]}"


def warm(revs, args):
    """Compile every (revision, kernel, shape, preset) in parallel worker processes first:
    Triton compiles on first launch, single-threaded, and the timed run then hits its disk
    cache."""
    import multiprocessing as mp

    tasks = []
    for alias, root in [("work", ROOT)] + list(revs):
        for kind, spec in (("decode", args.decode), ("encode", args.encode)):
            for model, b, n in (_shapes(spec) if spec else []):
                tasks += [(alias, root, kind, model, b, n, p) for p in args.presets.split(",")
                          if kind == "decode" or "/" not in p]
    t0 = time.time()
    errors = []
    with mp.get_context("spawn").Pool(max(1, min(len(tasks), (os.cpu_count() or 4) - 1))) as pool:
        errors = [e for e in pool.imap_unordered(_warm, tasks) if e]
    for e in errors:
        print(e, flush=True)
    print(f"warm-up: {len(tasks)} configurations in {time.time() - t0:.0f} s", flush=True)
    return errors


def run(revs, args, dev):
    from polartensor.kernels import decode_attention as work_attn
    from polartensor.kernels import encode as work_enc

    kernels = {"work": (work_attn, work_enc)}
    for alias, root in revs:
        kernels[alias] = load_revision(alias, root)
    presets = args.presets.split(",")
    rows = []
    for model, b, n in (_shapes(args.decode) if args.decode else []):
        rows += _decode_rows(kernels, model, b, n, presets, args, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for model, b, n in (_shapes(args.encode) if args.encode else []):
        rows += _encode_rows(kernels, model, b, n, presets, args, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def render(res) -> str:
    lines = [f"# A/B of kernels: the working tree against {', '.join(res['revisions']) or '-'}",
             "", f"- command: `{res['command']}`", f"- {res['device']}; {res['versions']}",
             f"- revisions: {res['revisions_at']}",
             f"- median of {res['rounds']} rounds, each a CUDA-graph median, order rotated per "
             "round; × vs work: the working tree's time over this one's, same run", ""]
    dec = [r for r in res["rows"] if r["kind"] == "decode"]
    if dec:
        lines += ["## Decode attention (bf16, q_len 1)", "",
                  "| model | batch | context | preset | variant | ms | × vs work | × vs cuDNN "
                  "| bit-equal | max diff |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in dec:
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['preset']} | "
                         f"{r['variant']} | {r['ms']:.4f} | {r['x_vs_work']:.3f} | "
                         f"{r['x_vs_cudnn']:.2f} | {r['bit_equal']} | {r['max_abs_diff']:.2e} |")
        lines.append("")
    enc = [r for r in res["rows"] if r["kind"] == "encode"]
    if enc:
        lines += ["## Encode (bf16 in)", "",
                  f"device copy bandwidth (read + write): {res['copy_bw'] / 1e12:.2f} TB/s", "",
                  "| model | batch | context | preset | variant | ms | × vs work | GB/s "
                  "| % of copy | codes equal | radii equal | radii max rel diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in enc:
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['preset']} | "
                         f"{r['variant']} | {r['ms']:.4f} | {r['x_vs_work']:.3f} | "
                         f"{r['gbps']:.0f} | {r['pct_copy']:.1f} | {r['codes_equal']:.6f} | "
                         f"{r['radii_equal']:.6f} | "
                         f"{r['radii_max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshot", action="append", default=[], metavar="REV",
                    help="write REV's package to _ab/<REV>/ and exit (needs git)")
    ap.add_argument("--rev", action="append", default=[], metavar="NAME=DIR",
                    help="a revision to time: DIR holds its polartensor/ (repeatable)")
    ap.add_argument("--presets", default="paper,polar-3,polar-4",
                    help="comma list; K/V (e.g. polar-4/polar-3) sets a preset each (decode)")
    ap.add_argument("--decode", default=DECODE_SHAPES, help="model:batch:context,... ('' none)")
    ap.add_argument("--encode", default=ENCODE_SHAPES, help="model:batch:context,... ('' none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=float, default=25)
    ap.add_argument("--warm", choices=("auto", "on", "off"), default="auto",
                    help="compile first in parallel worker processes (auto: when timing)")
    ap.add_argument("--check", action="store_true",
                    help="no timing: one call each, outputs compared (any device)")
    ap.add_argument("--out", default=None,
                    help="write ab_kernels.{json,md} here (--check: the JSON only)")
    args = ap.parse_args(argv)
    if args.snapshot:
        for rev in args.snapshot:
            print(snapshot(rev))
        return None
    revs = []
    for spec in args.rev:
        alias, sep, root = spec.partition("=")
        if not sep or not alias.isidentifier() or alias == "work":
            raise SystemExit(f"--rev {spec!r}: use NAME=DIR with NAME a Python identifier "
                             "other than 'work'")
        revs.append((alias, root))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.check and dev.type != "cuda":
        raise SystemExit("timing needs CUDA; --check compares outputs on any device")
    t0 = time.time()
    args.copy_bw = None
    if not args.check and args.encode:
        from bench_attention import copy_bandwidth

        args.copy_bw = copy_bandwidth()  # (bytes read + written per second, the faster way)
    do_warm = args.warm == "on" or (args.warm == "auto" and not args.check)
    warm_errors = warm(revs, args) if do_warm else []
    rows = run(revs, args, dev)
    at = {}
    for alias, root in revs:
        p = os.path.join(root, "REVISION")
        at[alias] = open(p).read().strip() if os.path.exists(p) else root
    import triton

    res = dict(command="python3 scripts/ab_kernels.py " + " ".join(sys.argv[1:] if argv is None
                                                                    else argv),
               device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               versions=f"torch {torch.__version__}, triton {triton.__version__}, Python "
                        f"{platform.python_version()}",
               revisions=[a for a, _ in revs], revisions_at=at, rounds=args.rounds,
               copy_bw=args.copy_bw,
               seconds=time.time() - t0, warm_errors=warm_errors, rows=rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ab_kernels.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        if not args.check:
            with open(os.path.join(args.out, "ab_kernels.md"), "w") as fh:
                fh.write(render(res))
    return res


if __name__ == "__main__":
    main()
