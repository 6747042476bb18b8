#!/usr/bin/env python3
"""The Gluon decode (polartensor/kernels/decode_attention_gluon.py) built for sm_90 on any
machine, no GPU needed: registers, spills and static SASS per launch variant, the offline
counts that its docstrings and docs/kernel_history.md quote.

    python scripts/gluon_offline_stats.py                      # the default variants
    python scripts/gluon_offline_stats.py --variants 16:0:pf:tr,16:200:pf:tr --groups 4,8
    python scripts/gluon_offline_stats.py --trace-only         # trace to Triton GPU IR only

Variants are ``scripts/ab_gluon_decode.py``'s (``parse_variant``: ``block_n:maxnreg`` then
flags, maxnreg 0 for no cap), each built for every group of ``--groups`` it serves (the
transposed step: at most 8). ``--trace-only`` stops at Triton GPU IR: every shape, layout and
``convert_layout(..., assert_trivial=True)`` is checked there, in about 0.1 s a variant
(the tests run it); the full build also assembles with the ptxas bundled with Triton. One
JSON line per variant and group; the exit status is 1 if any failed.

Measured with Triton 3.6 (the GPU stack) for the numbers quoted in the docs; other Triton
versions build the same source with other counts. TRITON_INTERPRET is dropped: the
interpreter replaces the functions that Gluon traces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_VARIANTS = "16:0,16:0:pf,16:0:tr,16:0:pf:tr,16:0:pf:tr:kp:ls,16:0:pf:pr:kp:ls"


class _Launched(Exception):
    """Raised by the stand-in kernel once it has the launch's arguments."""


def _launch_args(var, group: int):
    """The Gluon kernel's arguments as ``launch_attention_gluon`` passes them for a launch
    variant (``ab_gluon_decode.Variant``) and query group, at Llama
    heads (8 KV heads, d 128), batch 8, 32K keys, paper, split for 132 SMs: the launch runs
    on CPU tensors up to the kernel, which a stand-in records."""
    import torch

    from polartensor import quantize
    from polartensor.config import get_preset
    from polartensor.kernels import decode_attention_gluon as G
    from polartensor.kernels.common import trig_table
    from polartensor.rotation import rotation_matrix

    b, hk, n, d = 8, 8, 32768, 128
    cfg = get_preset("paper", head_dim=d)
    small = quantize(torch.randn(1, 1, 1, d), cfg)
    trig = trig_table(small.centroids, cfg.bits)
    codes = torch.empty(b, hk, n, small.codes.shape[-1], dtype=small.codes.dtype)
    radii = torch.empty(b, hk, n, small.radii.shape[-1], dtype=small.radii.dtype)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, torch.device("cpu"), torch.float32)
    q = torch.zeros(b, hk * group, 1, d, dtype=torch.bfloat16)
    splits = G.gluon_split_count(b * hk, n, 132, var.block_n,
                                 G.programs_per_sm(var.transposed, var.prefetch,
                                                   var.stagger))
    seen = {}

    class _Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(args=args, kwargs=kwargs)
                raise _Launched
            return launch

    real, G.polar_decode_attn_gluon_fwd_kernel = G.polar_decode_attn_gluon_fwd_kernel, _Recorder()
    try:
        G.launch_attention_gluon(q, codes, radii, trig, cfg, codes, radii, trig, cfg, rot, rot,
                                 d ** -0.5, splits, block_n=var.block_n,
                                 maxnreg=var.maxnreg or None, prefetch=var.prefetch,
                                 transposed=var.transposed, pairs=var.pairs,
                                 kpairs=var.kpairs, lshift=var.lshift,
                                 stagger=var.stagger)
    except _Launched:
        pass
    finally:
        G.polar_decode_attn_gluon_fwd_kernel = real
    return real, seen["args"], seen["kwargs"]


def _source(var, group: int):
    """The kernel's source with the signature, constexprs and 16-byte specializations that
    its launch gives (``kernel_ir_stats._signature``), and its warps."""
    from kernel_ir_stats import _signature
    from triton.experimental.gluon._runtime import GluonASTSource

    fn, args, kwargs = _launch_args(var, group)
    sig, consts, attrs = _signature(fn, args, kwargs)
    names = list(sig)
    src = GluonASTSource(fn=fn, signature=sig, attrs=attrs,
                         constexprs={(names.index(k),): v for k, v in consts.items()})
    opts = dict(num_warps=kwargs["num_warps"])     # (the register cap: ptxas_counts)
    return src, opts


def trace(var, group: int) -> str:
    """The kernel traced to Triton GPU IR for sm_90 (text)."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    src, opts = _source(var, group)
    opts = backend.parse_options(opts)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    return str(src.make_ir(target, opts, backend.get_codegen_implementation(opts),
                           backend.get_module_map(), ctx))


def build(var, group: int) -> dict:
    """Registers, spills and static SASS (whole kernel and its main loop) for sm_90."""
    import triton
    from kernel_ir_stats import ptxas_counts
    from triton.backends.compiler import GPUTarget

    src, opts = _source(var, group)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    return ptxas_counts(compiled.asm["ptx"], var.maxnreg or None)


def main(argv=None) -> int:
    # (here, not at import: a test that loads this module keeps its interpreter; triton is
    # imported only below)
    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--groups", default="4", help="query heads per KV head")
    ap.add_argument("--trace-only", action="store_true")
    args = ap.parse_args(argv)
    from ab_gluon_decode import parse_variant  # imports triton: after the pop above

    failed = False
    runs = [(text, g) for text in args.variants.split(",")
            for g in map(int, args.groups.split(","))]
    for text, group in runs:
        var = parse_variant(text)
        if var.transposed and group > 8:
            continue
        row = dict(variant=text, group=group)
        try:
            if args.trace_only:
                ir_text = trace(var, group)
                row.update(traced=True, movmatrix="movmatrix" in ir_text)
            else:
                stats = build(var, group)
                row.update({k: stats[k] for k in ("registers", "spill_store_bytes",
                                                  "spill_load_bytes", "sass_instructions",
                                                  "loop_sass_instructions", "loop_ops")})
        except Exception as exc:  # noqa: BLE001 - reported per variant, exit status 1
            failed = True
            row.update(error=f"{type(exc).__name__}: {str(exc)[-600:]}")
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
