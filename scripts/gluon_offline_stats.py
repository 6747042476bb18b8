#!/usr/bin/env python3
"""The Gluon decode (polartensor/kernels/decode_attention_gluon.py) built for sm_90 on any
machine, no GPU needed: registers, spills and static SASS per launch variant, the offline
counts that its docstrings and docs/kernel_history.md quote.

    python scripts/gluon_offline_stats.py                      # the default variants
    python scripts/gluon_offline_stats.py --variants 16:0:pf:tr,16:200:pf:tr --groups 4,8
    python scripts/gluon_offline_stats.py --trace-only         # trace to Triton GPU IR only

Variants are ``scripts/ab_gluon_decode.py``'s (``block_n:maxnreg[:pf][:tr]``, maxnreg 0 for
no cap), each built for every group of ``--groups`` it serves (the transposed step: at most
8). ``--trace-only`` stops at Triton GPU IR: every shape, layout and
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

DEFAULT_VARIANTS = "16:0,16:0:pf,16:0:tr,16:0:pf:tr,16:200:pf:tr"


def _source(trans: bool, prefetch: bool, block_n: int, group: int):
    from triton.experimental.gluon._runtime import GluonASTSource

    from polartensor.kernels import decode_attention_gluon as G

    fn = G.polar_decode_attn_gluon_fwd_kernel
    k_lay, v_lay = G.tile_layouts(block_n)
    # the paper preset's levels, as the kernel serves them
    consts = dict(TRANS=trans, PREFETCH=prefetch, GROUP=group, BN=block_n, k_lay=k_lay,
                  v_lay=v_lay, K_KT=16, K_B1=4, K_B2=2, K_B3=2, K_B4=2, V_KT=16, V_B1=4,
                  V_B2=2, V_B3=2, V_B4=2)
    ptrs = dict(q_ptr="*fp32", kc_ptr="*u8", kr_ptr="*fp16", ktab_ptr="*fp32",
                vc_ptr="*u8", vr_ptr="*fp16", vtab_ptr="*fp32", pacc_ptr="*fp32",
                pml_ptr="*fp32")
    names = fn.arg_names
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a == "scale_log2"
                                                       else "i32") for a in names}
    return GluonASTSource(fn=fn, signature=sig,
                          constexprs={(names.index(k),): v for k, v in consts.items()})


def trace(trans: bool, prefetch: bool, block_n: int, group: int) -> str:
    """The kernel traced to Triton GPU IR for sm_90 (text)."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    opts = backend.parse_options(dict(num_warps=1))
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    src = _source(trans, prefetch, block_n, group)
    return str(src.make_ir(target, opts, backend.get_codegen_implementation(opts),
                           backend.get_module_map(), ctx))


def build(trans: bool, prefetch: bool, block_n: int, group: int,
          maxnreg: int | None) -> dict:
    """Registers, spills and static SASS (whole kernel and its main loop) for sm_90."""
    import triton
    from kernel_ir_stats import ptxas_counts
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(_source(trans, prefetch, block_n, group),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1))
    return ptxas_counts(compiled.asm["ptx"], maxnreg)


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
        block_n, cap, prefetch, trans = parse_variant(text)
        if trans and group > 8:
            continue
        row = dict(variant=text, group=group)
        try:
            if args.trace_only:
                ir_text = trace(trans, prefetch, block_n, group)
                row.update(traced=True, movmatrix="movmatrix" in ir_text)
            else:
                stats = build(trans, prefetch, block_n, group, cap or None)
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
