#!/usr/bin/env python3
"""The Gluon decode (polartensor/kernels/decode_attention_gluon.py) built for sm_90 on any
machine, no GPU needed: registers, spills and static SASS per launch variant, the offline
counts that its docstrings and docs/kernel_history.md quote. ``--kernel encode``: the Gluon
encode (kernels/encode_gluon.py), its variants the rows per tile.

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
                                                   var.stagger, var.staged))
    seen = {}

    class _Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(args=args, kwargs=kwargs)
                raise _Launched
            return launch

        def warmup(self, *args, grid, **kwargs):
            # (the staged launch builds first to check its shared memory)
            self[grid](*args, **kwargs)

    real, G.polar_decode_attn_gluon_fwd_kernel = G.polar_decode_attn_gluon_fwd_kernel, _Recorder()
    try:
        G.launch_attention_gluon(q, codes, radii, trig, cfg, codes, radii, trig, cfg, rot, rot,
                                 d ** -0.5, splits, block_n=var.block_n,
                                 maxnreg=var.maxnreg or None, prefetch=var.prefetch,
                                 transposed=var.transposed, pairs=var.pairs,
                                 kpairs=var.kpairs, lshift=var.lshift,
                                 stagger=var.stagger, staged=var.staged,
                                 fold=var.fold)
    except _Launched:
        pass
    finally:
        G.polar_decode_attn_gluon_fwd_kernel = real
    return real, seen["args"], seen["kwargs"]


def _encode_launch_args(tile: int, shape=(64, 4096)):
    """The Gluon encode's arguments as ``encode_gluon.encode_into_gluon`` passes them for
    ``tile`` rows per tile (POLARTENSOR_ENCODE_GLUON_TILE), paper at d 128, ``shape`` = (leads,
    tokens a lead; by default batch 8 x 8 heads x 4K tokens), on CPU tensors, for 132 SMs."""
    import torch

    from polartensor import quantize
    from polartensor.config import get_preset
    from polartensor.kernels import encode_gluon as EG
    from polartensor.kernels.common import boundary_table
    from polartensor.kernels.encode import cross_table, rotation_bf16x2
    from polartensor.rotation import rotation_matrix

    cfg = get_preset("paper", head_dim=128)
    x = torch.zeros(*shape, 128, dtype=torch.bfloat16)
    codes = torch.zeros(*shape, cfg.record_bytes(128), dtype=torch.uint8)
    radii = torch.zeros(*shape, cfg.num_blocks(128), dtype=cfg.torch_radius_dtype)
    rot = rotation_matrix(128, cfg.rotation, cfg.seed, torch.device("cpu"), torch.float32)
    mids = boundary_table(quantize(torch.randn(1, 1, 1, 128), cfg).centroids, cfg)
    tables, _ = cross_table(mids, cfg)
    seen = {}

    class _Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(args=args, kwargs=kwargs)
            return launch

    real = EG.polar_encode_gluon_fwd_kernel
    saved = (real, EG._sm_count, os.environ.get("POLARTENSOR_ENCODE_GLUON_TILE"))
    EG.polar_encode_gluon_fwd_kernel, EG._sm_count = _Recorder(), (lambda device: 132)
    os.environ["POLARTENSOR_ENCODE_GLUON_TILE"] = str(tile)
    try:
        EG.encode_into_gluon(x, rotation_bf16x2(rot, True, 1.0), tables, codes, radii, cfg,
                             x.shape[0] * x.shape[1])
    finally:
        EG.polar_encode_gluon_fwd_kernel, EG._sm_count = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("POLARTENSOR_ENCODE_GLUON_TILE", None)
        else:
            os.environ["POLARTENSOR_ENCODE_GLUON_TILE"] = saved[2]
    return real, seen["args"], seen["kwargs"]


def _source(var, group: int, shape=(64, 4096)):
    """The kernel's source with the signature, constexprs and 16-byte specializations that
    its launch gives (``kernel_ir_stats._signature``), and its warps. ``var`` an int: the
    Gluon encode with that many rows per tile over ``shape`` (``group`` unused)."""
    from kernel_ir_stats import _signature
    from triton.experimental.gluon._runtime import GluonASTSource

    if isinstance(var, int):
        fn, args, kwargs = _encode_launch_args(var, shape)
    else:
        fn, args, kwargs = _launch_args(var, group)
    sig, consts, attrs = _signature(fn, args, kwargs)
    names = list(sig)
    src = GluonASTSource(fn=fn, signature=sig, attrs=attrs,
                         constexprs={(names.index(k),): v for k, v in consts.items()})
    opts = dict(num_warps=kwargs["num_warps"])     # (the register cap: ptxas_counts)
    return src, opts


def trace(var, group: int, shape=(64, 4096)) -> str:
    """The kernel traced to Triton GPU IR for sm_90 (text)."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    src, opts = _source(var, group, shape)
    opts = backend.parse_options(opts)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    return str(src.make_ir(target, opts, backend.get_codegen_implementation(opts),
                           backend.get_module_map(), ctx))


def build(var, group: int, shape=(64, 4096)) -> dict:
    """Registers, spills and static SASS (whole kernel and its main loop) for sm_90."""
    import triton
    from kernel_ir_stats import ptxas_counts
    from triton.backends.compiler import GPUTarget

    src, opts = _source(var, group, shape)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    stats = ptxas_counts(compiled.asm["ptx"], None if isinstance(var, int) else var.maxnreg or None)
    # (static shared memory, as the launch asks for it: how many programs fit an SM)
    return dict(stats, shared_bytes=compiled.metadata.shared)


def main(argv=None) -> int:
    # (here, not at import: a test that loads this module keeps its interpreter; triton is
    # imported only below)
    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--groups", default="4", help="query heads per KV head")
    ap.add_argument("--trace-only", action="store_true")
    ap.add_argument("--kernel", choices=("attention", "encode"), default="attention",
                    help="encode: the Gluon encode (kernels/encode_gluon.py), --variants "
                         "its rows per tile (default 128,64)")
    ap.add_argument("--encode-shape", default="64x4096",
                    help="encode: LEADSxTOKENS, the rows encoded (tokens a lead: 1 is a "
                         "decode step's append)")
    args = ap.parse_args(argv)
    from ab_gluon_decode import parse_variant  # imports triton: after the pop above

    shape = tuple(int(v) for v in args.encode_shape.split("x"))
    failed = False
    if args.kernel == "encode":
        tiles = "128,64" if args.variants == DEFAULT_VARIANTS else args.variants
        runs = [(text, 0) for text in tiles.split(",")]
    else:
        runs = [(text, g) for text in args.variants.split(",")
                for g in map(int, args.groups.split(","))]
    for text, group in runs:
        var = int(text) if args.kernel == "encode" else parse_variant(text)
        if not isinstance(var, int) and var.transposed and group > 8:
            continue
        row = dict(variant=text, group=group)
        try:
            if args.trace_only:
                ir_text = trace(var, group, shape)
                row.update(traced=True, movmatrix="movmatrix" in ir_text)
                if isinstance(var, int):
                    # the MMAs asynchronous, x by TMA, shared-memory round trips (none
                    # unless POLARTENSOR_ENCODE_GLUON_STAGE=1)
                    row.update(async_mmas=ir_text.count("isAsync = true"),
                               tma_loads=ir_text.count("async_tma_copy_global_to_local"),
                               shared_round_trips=ir_text.count("ttg.local_load")
                               + ir_text.count("ttg.local_store"))
            else:
                stats = build(var, group, shape)
                row.update({k: stats[k] for k in ("registers", "spill_store_bytes",
                                                  "spill_load_bytes", "sass_instructions",
                                                  "loop_sass_instructions", "ptxas_notes",
                                                  "shared_bytes", "loop_ops")})
                if isinstance(var, int):
                    # (the loop's wait for the second tile's MMAs: in the PTX after the
                    # first tile's stores; Triton 3.6's ptxas hoists it above all of them)
                    row["stores_before_full_wait"] = stats["stores_before_full_wait"]
        except Exception as exc:  # noqa: BLE001 - reported per variant, exit status 1
            failed = True
            row.update(error=f"{type(exc).__name__}: {str(exc)[-600:]}")
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
