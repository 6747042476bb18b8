"""Compile the attention kernel for sm_90 offline (no GPU needed) and count what makes the tile
decode slow: register-layout conversions (``ttg.convert_layout``, shared-memory round trips),
shared-memory allocations and loads in the TTGIR, and barriers / shared-memory loads and stores
in the PTX. A proxy for GPU time when no GPU is at hand, not a substitute for the benchmark.
``--kernel encode`` does the same for the fused encode kernel.

    python scripts/kernel_ir_stats.py                      # both tile decodes, paper + polar-4
    python scripts/kernel_ir_stats.py --presets paper --head-dims 64,128 --q-len 1,64
    python scripts/kernel_ir_stats.py --kernel encode      # the fused encode kernel

Each row compiles one configuration (a few seconds). It needs Triton's NVIDIA backend (part of
the standard triton wheel); it does not touch a GPU driver.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import sys

import torch
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.uint8: "*u8", torch.int32: "*i32", torch.bool: "*i1"}


# Compile with the divisibility attributes a real launch gives (--no-specialize: without, as
# the tables in results/bench/kernel_ir_stats.md before 2026-11-29 12:50 UTC were made).
SPECIALIZE = True
# A launch that names no num_stages gets Triton's CUDA default, three: the offline compile must
# too, or it misses what the software pipeliner does to a kernel's loops (it did: the encode's
# tile loop double-buffered S, 536 KB of shared memory at d 256, which only the H200 showed).
_DEFAULT_STAGES = 3
PACKED_DECODES = ("packed", "joint12", "shfl", "joint12_shfl")


def _signature(fn, args, kwargs):
    """Signature, constexprs and the specialization attributes a launch would give: 16-byte
    divisibility of pointers and of integers, which is what lets Triton emit vector loads,
    and integers equal to 1 made constants (neither for ``do_not_specialize`` ones)."""
    params = list(inspect.signature(fn.fn).parameters)
    dns = {p if isinstance(p, str) else params[p] for p in (fn.do_not_specialize or [])}
    sig, consts, attrs = {}, {}, {}
    for i, (p, a) in enumerate(zip(params, args)):
        if isinstance(a, torch.Tensor):
            sig[p] = _PTR[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[p] = "i1"
        elif isinstance(a, int) and a == 1 and p not in dns:
            sig[p], consts[p] = "constexpr", 1  # (as the launch does: a constant 1)
        elif isinstance(a, int):
            sig[p] = "i64" if abs(a) >= 2**31 else "i32"
            if a % 16 == 0 and p not in dns:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[p] = "fp32"
        elif isinstance(a, (TensorDescriptor, GluonTensorDescriptor)):
            sig[p] = mangle_type(a)  # (the launch's own type string, with a Gluon layout)
        else:
            raise TypeError(f"{p}: {type(a).__name__}")
    defaults = inspect.signature(fn.fn).parameters
    for p in params[len(args):]:
        sig[p] = "constexpr"
        consts[p] = kwargs[p] if p in kwargs else defaults[p].default
    return sig, consts, attrs


def stats(preset: str, d: int, group: int, q_len: int, decode: str, dtype=torch.bfloat16,
          block_n: int | None = None, ptxas: bool = False, maxnreg: int | None = None,
          num_warps: int | None = None):
    """Compile the attention kernel as launch_attention would launch it; return the counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    from polartensor import quantize
    from polartensor.config import get_preset
    from polartensor.kernels import common, decode_attention
    from polartensor.kernels.common import trig_table
    from polartensor.rotation import rotation_matrix

    cfg = get_preset(preset, head_dim=d)
    k = quantize(torch.randn(1, 2, 64, d), cfg)
    q = torch.randn(1, 2 * group, q_len, d).to(dtype)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, "cpu", torch.float32).contiguous()
    trig = trig_table(k.centroids, cfg.bits)
    captured = {}

    class _Capture:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                captured.setdefault("args", (args, dict(kwargs)))
            return launch

    kernel = decode_attention.polar_decode_attn_fwd_kernel
    saved = (decode_attention.polar_decode_attn_fwd_kernel,
             decode_attention.polar_attn_combine_kernel, decode_attention.decode_tile)
    # packed: the joined decode, pack=True; joint12: and levels 1 and 2 through the joint
    # table (each set explicitly, so that the library's default rule cannot blur the rows)
    # shfl: per-level tables by warp shuffles (POLARTENSOR_DECODE_SHFL=1, no joint table);
    # joint12_shfl: the joint table and shuffles for the other levels
    env = {"packed": {"POLARTENSOR_JOINT12": "0", "POLARTENSOR_DECODE_SHFL": "0"},
           "joint12": {"POLARTENSOR_JOINT12": "1", "POLARTENSOR_DECODE_SHFL": "0"},
           "shfl": {"POLARTENSOR_JOINT12": "0", "POLARTENSOR_DECODE_SHFL": "1"},
           "joint12_shfl": {"POLARTENSOR_JOINT12": "1", "POLARTENSOR_DECODE_SHFL": "1"}
           }.get(decode, {})
    env_saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    if decode in ("joined", *PACKED_DECODES):
        from polartensor.kernels.tree_decode import decode_tile_joined
        decode_attention.decode_tile = decode_tile_joined
    else:
        decode_attention.decode_tile = common.decode_tile_reshape
    decode_attention.polar_decode_attn_fwd_kernel = _Capture()
    decode_attention.polar_attn_combine_kernel = _Capture()
    interp = os.environ.pop("TRITON_INTERPRET", None)  # launch with the GPU's tile sizes
    try:
        decode_attention.launch_attention(
            q, k.codes, k.radii, trig, cfg, k.codes, k.radii, trig, cfg, rot, rot, scale=0.1,
            mode="decode" if q_len <= 16 else "prefill", num_splits=2 if q_len <= 16 else None,
            block_n=block_n, num_warps=num_warps, pack=decode in PACKED_DECODES)
        args, kwargs = captured["args"]
        opts = {"num_warps": kwargs.pop("num_warps", 4),
                "num_stages": kwargs.pop("num_stages", _DEFAULT_STAGES)}
        sig, consts, attrs = _signature(kernel, args, kwargs)
        # The jit function binds decode_tile at compile time; drop its cached hash so a swap
        # between calls in one process takes effect.
        if hasattr(kernel, "hash"):
            kernel.hash = None
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts,
                                        attrs=attrs if SPECIALIZE else None)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    finally:
        (decode_attention.polar_decode_attn_fwd_kernel,
         decode_attention.polar_attn_combine_kernel, decode_attention.decode_tile) = saved
        if interp is not None:
            os.environ["TRITON_INTERPRET"] = interp
        for key, value in env_saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if hasattr(kernel, "hash"):
            kernel.hash = None
    out = dict(preset=preset, d=d, group=group, q_len=q_len, decode=decode,
               block_n=captured["args"][1].get("BN"), num_warps=opts["num_warps"],
               **_counts(compiled))
    if ptxas:
        out.update(maxnreg=maxnreg, **ptxas_counts(compiled.asm["ptx"], maxnreg))
    return out


def ptxas_counts(ptx: str, maxnreg: int | None = None) -> dict:
    """Registers, spill bytes and static SASS instructions of a kernel's PTX, assembled for
    sm_90a by the ptxas bundled with Triton (when it is older than the PTX ISA that Triton
    writes, the ``.version`` line is lowered to the newest it names, which these kernels
    tolerate).
    ``maxnreg`` caps registers as Triton's ``maxnreg`` launch option does (a ``.maxnreg``
    directive; ptxas ignores -maxrregcount for kernels with ``.reqntid``).
    KERNEL_IR_SASS_DIR (environment): also write each kernel's SASS there, numbered in order
    (and its TTGIR, LLVM IR and PTX, see ``_counts``)."""
    import subprocess
    import tempfile

    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if maxnreg:
        ptx = re.sub(r"^(\.reqntid [\d, ]+)", rf"\1\n.maxnreg {maxnreg}", ptx, flags=re.M)
    with tempfile.TemporaryDirectory() as td:
        src, cubin = os.path.join(td, "k.ptx"), os.path.join(td, "k.cubin")

        def assemble(text):
            with open(src, "w") as fh:
                fh.write(text)
            res = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", src,
                                  "-o", cubin], capture_output=True, text=True)
            return res, res.stdout + res.stderr

        res, log = assemble(ptx)
        newest = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", log)
        if res.returncode and newest:
            # The bundled ptxas may be older than the PTX ISA Triton writes (ptxas 12.9 with
            # Triton 3.9: ISA 8.8; ptxas 12.8 with Triton 3.6: ISA 8.7): declare the newest
            # ISA it accepts, which these kernels' instructions fit.
            res, log = assemble(re.sub(r"^\.version \d+\.\d+", f".version {newest[1]}", ptx,
                                       flags=re.M))
        if res.returncode:
            raise RuntimeError(f"ptxas failed: {log[-500:]}")
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True).stdout
    _dump_ir({"sass": sass}, f"_cap{maxnreg or 0}")
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs[0]) if regs else None,
                # ptxas's performance notes, such as C7514: wgmma serialized
                ptxas_notes=sorted(set(re.findall(r"\((C7\d{3})\)", log))),
                spill_store_bytes=int(spill[0][0]) if spill else None,
                spill_load_bytes=int(spill[0][1]) if spill else None,
                sass_instructions=len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, flags=re.M)),
                **sass_loop_ops(sass))


def sass_loop_ops(sass: str, top: int = 16) -> dict:
    """The kernel's longest loop (the span of its longest backward branch): static SASS
    instructions per iteration and the most frequent opcodes (predicates and modifiers after
    the first dot dropped: ``LDG.E.U8`` counts as ``LDG``)."""
    ins = [(int(a, 16), t.strip()) for a, t in
           re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]

    def unpredicated(text):
        return re.sub(r"^@!?U?P\w+\s+", "", text)

    def histogram(lo, hi):
        ops: dict = {}
        for addr, text in ins:
            if lo <= addr <= hi:
                name = unpredicated(text).split()[0].split(".")[0]
                ops[name] = ops.get(name, 0) + 1
        return ops

    # the whole kernel's opcodes too (kernels without a loop, such as the encode)
    whole = histogram(0, float("inf"))
    kernel_ops = dict(sorted(whole.items(), key=lambda kv: -kv[1])[:top])
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    if not loops:
        return dict(loop_sass_instructions=0, loop_ops={}, kernel_ops=kernel_ops)
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    ops = histogram(lo, hi)
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    # where the loop first waits for all its wgmma groups: how many global stores come
    # before that wait (the Gluon encode means the first tile's to come first)
    body = [text for addr, text in ins if lo <= addr <= hi]
    full = [i for i, text in enumerate(body)
            if re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0\b", text)]
    stores = None if not full else sum(
        1 for text in body[:full[0]] if unpredicated(text).startswith("STG"))
    return dict(loop_sass_instructions=sum(ops.values()), loop_ops=dict(ranked),
                kernel_ops=kernel_ops, stores_before_full_wait=stores)


def _dump_ir(texts: dict, suffix: str = "") -> None:
    """With KERNEL_IR_SASS_DIR set, write each text as k<NNN><suffix>.<ext> there, numbered by
    the files of the first extension already written (for reading the instructions behind the
    counts)."""
    out_dir = os.environ.get("KERNEL_IR_SASS_DIR")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    first = next(iter(texts))
    n = len([f for f in os.listdir(out_dir) if f.endswith("." + first)])
    for ext, text in texts.items():
        with open(os.path.join(out_dir, f"k{n:03d}{suffix}.{ext}"), "w") as fh:
            fh.write(text)


def _counts(compiled) -> dict:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    _dump_ir({ext: compiled.asm[ext] for ext in ("ttgir", "llir", "ptx") if ext in compiled.asm})
    return dict(
        convert_layout=len(re.findall(r"ttg\.convert_layout", ttgir)),
        local_alloc=len(re.findall(r"ttg\.local_alloc", ttgir)),
        ttgir_loads=len(re.findall(r"tt\.load", ttgir)),
        shared_bytes=compiled.metadata.shared,
        ptx_lines=ptx.count("\n"),
        ptx_barriers=len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx)),
        ptx_shared_st=len(re.findall(r"\bst\.shared", ptx)),
        ptx_shared_ld=len(re.findall(r"\bld\.shared", ptx)),
    )


def encode_stats(preset: str, d: int, variant: str, dtype=torch.bfloat16,
                 block_rows: int | None = None, ptxas: bool = False,
                 maxnreg: int | None = None, keep_ttgir: bool = False,
                 num_warps: int | None = None):
    """Compile the fused encode kernel as encode_into_triton launches it on the GPU (float32
    path, rotation fused as a tl.dot, ``dtype`` input); ``variant``: "reshape"
    (encode.polar_encode_fwd_kernel, the only one since the split encode was removed).
    ``keep_ttgir``: the row also holds the TTGIR text (scripts/store_sectors.py reads it).
    ``num_warps``: with ``block_rows``, the warps per program (default: the GPU's pick)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from polartensor import quantize
    from polartensor.config import get_preset
    from polartensor.kernels import encode
    from polartensor.kernels.common import boundary_table
    from polartensor.rotation import rotation_matrix

    cfg = get_preset(preset, head_dim=d)
    x = torch.randn(2, 64, d).to(dtype)
    rot = rotation_matrix(d, cfg.rotation, cfg.seed, "cpu", torch.float32).contiguous()
    mids = boundary_table(quantize(x[:, :1].float(), cfg).centroids, cfg, torch.float64)
    codes = torch.empty(2, 64, cfg.record_bytes(d), dtype=torch.uint8)
    radii = torch.empty(2, 64, cfg.num_blocks(d), dtype=cfg.torch_radius_dtype)
    if variant not in ("reshape", "persistent"):
        raise ValueError(f"encode variant {variant!r}: 'reshape' (one program per tile) or "
                         "'persistent' (persistent=True)")
    kernel = encode.polar_encode_fwd_kernel
    captured = {}

    class _Capture:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                captured["args"] = (args, dict(kwargs))
            return launch

    # block_rows None: encode_into_triton's GPU default launch (rows and warps)
    saved = encode._encode_kernel
    encode._encode_kernel = _Capture()
    interp = os.environ.pop("TRITON_INTERPRET", None)  # launch with the GPU's tile sizes
    try:
        encode.encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False,
                                  block_rows=block_rows, num_warps=num_warps,
                                  persistent=variant == "persistent")
        args, kwargs = captured["args"]
        opts = {"num_warps": kwargs.pop("num_warps", 4),
                "num_stages": kwargs.pop("num_stages", _DEFAULT_STAGES)}
        sig, consts, attrs = _signature(kernel, args, kwargs)
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts,
                                        attrs=attrs if SPECIALIZE else None)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    finally:
        encode._encode_kernel = saved
        if interp is not None:
            os.environ["TRITON_INTERPRET"] = interp
    out = dict(preset=preset, d=d, encode=variant, block_rows=consts["BN"],
               num_warps=opts["num_warps"], **_counts(compiled))
    if ptxas:
        out.update(maxnreg=maxnreg, **ptxas_counts(compiled.asm["ptx"], maxnreg))
    if keep_ttgir:
        out["ttgir"] = compiled.asm["ttgir"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="paper,polar-4")
    ap.add_argument("--head-dims", default="128")
    ap.add_argument("--q-len", default="1", help="1..16: decode; more: prefill tiles")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--decodes", default="reshape,joined",
                    help="reshape, joined, packed (joined with packed bf16x2 level 1), "
                    "joint12 (packed, levels 1 and 2 through the joint table), shfl (packed, "
                    "per-level tables by warp shuffles), joint12_shfl (both)")
    ap.add_argument("--kernel", choices=("attention", "encode"), default="attention")
    ap.add_argument("--encodes", default="reshape", help="--kernel encode: variants")
    ap.add_argument("--block-rows", default="", help="--kernel encode: tile rows to compile "
                    "(comma list; default: what encode_into_triton picks on the GPU)")
    ap.add_argument("--num-warps", default="", help="warps per program (comma list; "
                    "default: what encode_into_triton or launch_attention picks on the GPU)")
    ap.add_argument("--block-n", default="", help="--kernel attention: keys per step (comma "
                    "list; default: what launch_attention picks on the GPU)")
    ap.add_argument("--ptxas", action="store_true", help="also assemble with the bundled "
                    "ptxas: registers, spill bytes, static SASS instructions")
    ap.add_argument("--maxnreg", default="", help="with --ptxas: register caps (comma list)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--no-specialize", action="store_true", help="compile without the "
                    "16-byte divisibility attributes of a real launch (as the older tables)")
    args = ap.parse_args(argv)
    global SPECIALIZE
    SPECIALIZE = not args.no_specialize
    counts = ["convert_layout", "local_alloc", "ttgir_loads", "shared_bytes", "ptx_lines",
              "ptx_barriers", "ptx_shared_st", "ptx_shared_ld"]
    split = str.split
    if args.kernel == "encode":
        cols = ["preset", "d", "encode", "block_rows", "num_warps", *counts]
        if args.ptxas:
            cols.append("maxnreg")
        jobs = (lambda p=p, d=d, v=v, bn=bn, w=w, cap=cap: encode_stats(
                    p, d, v, block_rows=int(bn) if bn else None, ptxas=args.ptxas,
                    maxnreg=int(cap) if cap else None, num_warps=int(w) if w else None)
                for p, d, v, bn, w, cap in itertools.product(
                    split(args.presets, ","), map(int, split(args.head_dims, ",")),
                    split(args.encodes, ","), split(args.block_rows, ","),
                    split(args.num_warps, ","), split(args.maxnreg, ",")))
    else:
        cols = ["preset", "d", "q_len", "decode", "block_n", "num_warps", *counts]
        if args.ptxas:
            cols.append("maxnreg")
        jobs = (lambda p=p, d=d, tq=tq, dec=dec, bn=bn, w=w, cap=cap: stats(
                    p, d, args.group, tq, dec, block_n=int(bn) if bn else None,
                    ptxas=args.ptxas, maxnreg=int(cap) if cap else None,
                    num_warps=int(w) if w else None)
                for p, d, tq, dec, bn, w, cap in itertools.product(
                    split(args.presets, ","), map(int, split(args.head_dims, ",")),
                    map(int, split(args.q_len, ",")), split(args.decodes, ","),
                    split(args.block_n, ","), split(args.num_warps, ","),
                    split(args.maxnreg, ",")))
    if args.ptxas:
        cols += ["registers", "spill_store_bytes", "spill_load_bytes", "sass_instructions",
                 "loop_sass_instructions"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rows = []
    for job in jobs:
        r = job()
        rows.append(r)
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0

if __name__ == "__main__":
    sys.exit(main())
