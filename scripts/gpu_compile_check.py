"""torch.compile of a model's one-token decode step with a PolarQuantCache, compiled vs eager.

For each case (path x head_dim x dtype x cache) a tiny random Llama prefills a prompt eagerly,
then runs ``--steps`` teacher-forced one-token decode steps (the same tokens for eager and
compiled, so a near-tie cannot make the two runs diverge), once with ``model.forward`` and once
with ``torch.compile(model.forward)``. One line per case::

    PASS|FAIL  path=... head_dim=... dtype=... cache=...  max_abs_diff=... rel=...
               graph_breaks=N graphs=N

Paths: ``reference`` (pure PyTorch: ``POLARTENSOR_REFERENCE=1``) and ``kernel`` (the Triton
kernels, the CUDA default: ``POLARTENSOR_REFERENCE`` unset). It is read at call time by
``polartensor.kernels.dispatch.use_triton``, which each case checks routes as intended.
Caches: ``static`` (max_cache_len, what CUDA graphs want; quantized attention + fused encode),
``dynamic`` (the default paper mode: prompt quantized, generated tokens in a full-precision
tail) and ``quantize-generated`` (dynamic, every token quantized). Exits 1 if any case FAILs
(numerics, an exception, a cache of the wrong length, or, with ``--fullgraph``, any graph
break).

On a CUDA machine, from the repository root (polartensor imports torchao; on a GPU image
without it: ``python -m pip install --no-index --no-deps torchao-0.18.0-*.whl``)::

    python scripts/gpu_compile_check.py                 # all cases, Inductor
    python scripts/gpu_compile_check.py --fullgraph     # graph breaks are failures

CPU dry run (reference path with aot_eager; the kernel path runs under the Triton interpreter,
slowly): ``python scripts/gpu_compile_check.py --device cpu --paths reference``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

PATHS = ("reference", "kernel")
CACHES = ("static", "dynamic", "quantize-generated")
DTYPES = ("bfloat16", "float32")
# Relative tolerance on max|compiled - eager| / max|eager| per step logits. A wrong cache,
# rotation or mask gives O(1); compiler fusions move bf16 by a few ulps of the activations.
TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    p.add_argument("--steps", type=int, default=4, help="decode steps per case")
    p.add_argument("--backend", default=None,
                   help="torch.compile backend (default: inductor on cuda, aot_eager on cpu)")
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    p.add_argument("--fullgraph", action="store_true",
                   help="compile with fullgraph=True: any graph break is a FAIL")
    p.add_argument("--verbose", action="store_true", help="print tracebacks and break reasons")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and "kernel" in args.paths:
        # The interpreter must be chosen before triton is imported (and kept: switching it
        # off later breaks it); reference cases are routed by POLARTENSOR_REFERENCE.
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import torch
    import transformers

    from polartensor.kernels import dispatch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL: no CUDA device (use --device cpu for a dry run)")
        return 1
    backend = args.backend or ("inductor" if args.device == "cuda" else "aot_eager")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, triton "
          f"{triton_version}, python {sys.version.split()[0]}, device {where}, backend "
          f"{backend}, mode {args.mode}, fullgraph {args.fullgraph}")

    results = []
    for path in args.paths:
        for head_dim in args.head_dims:
            for dtype_name in args.dtypes:
                for cache_kind in args.caches:
                    results.append(run_case(args, backend, dispatch, path, head_dim,
                                            dtype_name, cache_kind))
    failed = [r for r in results if not r]
    print(f"{len(results) - len(failed)}/{len(results)} cases passed")
    return 1 if failed else 0


def _set_path(path: str) -> None:
    if path == "kernel":
        os.environ.pop("POLARTENSOR_REFERENCE", None)
    else:
        os.environ["POLARTENSOR_REFERENCE"] = "1"


def tiny_llama(head_dim: int, dtype, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=head_dim, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("polar")
    return model


def decode(model, step_fn, cache, ids, mask, tokens, capacity):
    """Eager prefill, then one step per column of ``tokens``; returns [B, steps, vocab] fp32."""
    import torch

    from polartensor.integrations.transformers import generate_kwargs

    model(input_ids=ids, attention_mask=mask, use_cache=True, **generate_kwargs(cache))
    b, t = ids.shape
    pos = mask.sum(-1, keepdim=True) - 1
    out = []
    for i in range(tokens.shape[1]):
        pos = pos + 1
        width = capacity if capacity else t + i + 1  # a static cache: one mask width
        m = torch.cat([mask, mask.new_ones(b, width - t)], dim=1)
        logits = step_fn(input_ids=tokens[:, i:i + 1], attention_mask=m, position_ids=pos,
                         use_cache=True, **generate_kwargs(cache)).logits
        out.append(logits[:, -1].float())
    return torch.stack(out, 1)


def run_case(args, backend, dispatch, path, head_dim, dtype_name, cache_kind) -> bool:
    import torch
    from torch._dynamo.utils import counters

    from polartensor.integrations.transformers import PolarQuantCache

    name = (f"path={path:<9} head_dim={head_dim:<3} dtype={dtype_name:<8} "
            f"cache={cache_kind:<18}")
    dtype = getattr(torch, dtype_name)
    dev = args.device
    _set_path(path)
    t0 = time.time()
    try:
        routed = dispatch.use_triton(torch.device(dev))
        if routed != (path == "kernel"):
            raise RuntimeError(f"use_triton({dev}) is {routed} on the {path} path")
        model = tiny_llama(head_dim, dtype, dev)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 256, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        ids[1, :3], mask[1, :3] = 0, 0  # left padding in one row
        tokens = torch.randint(3, 256, (2, args.steps), generator=g)
        ids, mask, tokens = ids.to(dev), mask.to(dev), tokens.to(dev)
        capacity = ids.shape[1] + args.steps + 4 if cache_kind == "static" else 0

        def new_cache():
            if cache_kind == "static":
                return PolarQuantCache(max_cache_len=capacity, model_config=model.config)
            return PolarQuantCache(quantize_generated=cache_kind == "quantize-generated",
                                   model_config=model.config)

        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            eager_cache = new_cache()
            eager = decode(model, model.forward, eager_cache, ids, mask, tokens, capacity)
            step = torch.compile(model.forward, backend=backend, mode=args.mode,
                                 fullgraph=args.fullgraph)
            cache = new_cache()
            compiled = decode(model, step, cache, ids, mask, tokens, capacity)
        if dev == "cuda":
            torch.cuda.synchronize()
        breaks = sum(counters["graph_break"].values())
        graphs = counters["stats"]["unique_graphs"]
        diff = (compiled - eager).abs().max().item()
        scale = eager.abs().max().item()
        rel = diff / max(scale, 1e-12)
        want = ids.shape[1] + args.steps
        problems = []
        if not (torch.isfinite(compiled).all() and torch.isfinite(eager).all()):
            problems.append("non-finite logits")
        if rel > TOLERANCE[dtype_name]:
            problems.append(f"rel diff {rel:.2e} > {TOLERANCE[dtype_name]:.0e}")
        for label, c in (("compiled", cache), ("eager", eager_cache)):
            n = int(c.get_seq_length())
            if n != want:
                problems.append(f"{label} cache holds {n} tokens, expected {want}")
        if args.fullgraph and breaks:
            problems.append("graph break under fullgraph")
        status = "FAIL" if problems else "PASS"
        print(f"{status}  {name} max_abs_diff={diff:.3e} rel={rel:.2e} graph_breaks={breaks} "
              f"graphs={graphs} ({time.time() - t0:.1f}s)"
              + (f"  [{'; '.join(problems)}]" if problems else ""), flush=True)
        if args.verbose and breaks:
            for reason, n in counters["graph_break"].items():
                print(f"    graph break x{n}: {reason[:300]}")
        return not problems
    except Exception as exc:  # one line per case; --verbose for the traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"FAIL  {name} error {type(exc).__name__}: {first} ({time.time() - t0:.1f}s)",
              flush=True)
        if args.verbose:
            traceback.print_exc()
        return False


if __name__ == "__main__":
    sys.exit(main())
