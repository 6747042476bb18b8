#!/usr/bin/env python3
"""Global-memory sectors the fused encode's stores write per encoded row, predicted offline
from the layouts Triton gives them (no GPU).

Compiles the encode as ``encode_into_triton`` launches it on sm_90
(``kernel_ir_stats.encode_stats``), reads each ``tt.store``'s blocked layout from the TTGIR,
and matches the stores, in program order, to what the kernel writes (each level's code words,
the tail word, the radii: the same rules as ``common._encode_level``). Then, for every warp
store instruction (one register, or one vector of registers, across the 32 lanes), it counts
the distinct 32-byte sectors the lanes' addresses fall into, with records ``record_bytes``
apart from address 0. Lanes that hold a copy of another lane's element are left out (Triton
masks such duplicates). Sectors per row: the sum over a tile's instructions over its rows.

A model: it ignores which sectors L2 merges across instructions. On the H100 the paper
encode at d 128 wrote ~21 L2 sectors per row (Nsight Compute,
results/bench/ncu_encode_2026-12-06_h100.md), the number to check it against.

    PYTHONPATH=<triton 3.6> python scripts/store_sectors.py [--presets paper,polar-4]
        [--head-dims 64,128] [--stores strided,record,whole]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_LAYOUT = re.compile(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], "
                     r"threadsPerWarp = \[([\d, ]+)\], warpsPerCTA = \[([\d, ]+)\], "
                     r"order = \[([\d, ]+)\]\}>", re.M)
_STORE = re.compile(r"tt\.store [^:]*: tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#\w+)>")
_RADII_BASE = 1 << 40  # (the radii are another tensor: far from the codes, sector-aligned)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def expected_stores(cfg, d: int, bn: int, store: str, cross1: bool, store16: bool):
    """What the encode stores, in program order: (label, element type, shape, address of
    element index (None: masked off)). ``store``: POLARTENSOR_ENCODE_STORE's "strided",
    "record" (along each record), "record16" (record, odd-sized words in pairs of 16-bit
    units) or "whole" (one store per record)."""
    from polartensor.kernels.common import level_words

    w = level_words(cfg, d)
    rb = cfg.record_bytes(d)
    nb = cfg.num_blocks(d)
    esz = 2 if cfg.radius_dtype != "float32" else 4
    rty = {2: ("f16", "bf16", "i16"), 4: ("f32",)}[esz]
    radii = ("radii", rty, (bn, nb), lambda i: _RADII_BASE + (i[0] * nb + i[1]) * esz)
    if store == "whole":
        rbp = 1 << max(rb - 1, 1).bit_length()
        if store16:
            rec = ("record 16-bit", "i16", (bn, rbp // 2),
                   lambda i: (i[0] * rb + 2 * i[1]) if 2 * i[1] < rb else None)
        else:
            rec = ("record bytes", "i8", (bn, rbp),
                   lambda i: (i[0] * rb + i[1]) if i[1] < rb else None)
        return [rec, radii]
    out = []
    for lvl in range(1, w["L"] + 1):
        lv = w[f"LV{lvl - 1}"]
        b, logg, pos = lv & 15, (lv >> 4) & 3, lv >> 8
        n = d >> lvl
        if b == 0 or n < 8:
            continue  # (no code, or into the tail word)
        g = 1 << logg
        wb = (b << logg) >> 3
        wbp = 1 << ((lv >> 6) & 3)  # (WB rounded up to a power of two)
        nw = n // g
        cross = cross1 if lvl == 1 else True
        if cross and wb == 1 and store16 and pos % 2 == 0 and nw % 2 == 0:
            out.append((f"level {lvl} 16-bit", "i16", (bn, nw // 2),
                        lambda i, pos=pos: i[0] * rb + pos + 2 * i[1]))
        elif (store == "record16" and wb % 2 == 1 and wb > 1 and store16 and pos % 2 == 0
              and nw % 2 == 0):
            up = 4 if wb < 4 else 8
            out.append((f"level {lvl} 16-bit pairs", "i16", (bn, nw // 2, up),
                        lambda i, pos=pos, wb=wb: (i[0] * rb + pos + 2 * (i[1] * wb + i[2]))
                        if i[2] < wb else None))
        elif store in ("record", "record16"):
            out.append((f"level {lvl} bytes", "i8", (bn, nw, wbp),
                        lambda i, pos=pos, wb=wb: (i[0] * rb + pos + i[1] * wb + i[2])
                        if i[2] < wb else None))
        else:
            for k in range(wb):
                out.append((f"level {lvl} byte {k}", "i8", (bn, nw),
                            lambda i, pos=pos, wb=wb, k=k: i[0] * rb + pos + i[1] * wb + k))
    tb, tn = w["TAIL_BYTE"], w["TAIL_NB"]
    if store in ("record", "record16") and tn > 1:
        tnp = 2 if tn == 2 else 4 if tn <= 4 else 8
        out.append(("tail", "i8", (bn, tnp),
                    lambda i: (i[0] * rb + tb + i[1]) if i[1] < tn else None))
    else:
        for k in range(tn):
            out.append((f"tail byte {k}", "i8", (bn,), lambda i, k=k: i[0] * rb + tb + k))
    out.append(radii)
    return out


def sectors_per_row(shape, layout, addr, bn: int, elem_bytes: int) -> float:
    """Distinct 32-byte sectors per warp instruction, summed, over the tile's rows."""
    spt, tpw, wpc, order = layout
    rank = len(shape)
    vec_dim = order[0] if spt[order[0]] * elem_bytes <= 16 else None
    groups: dict[tuple, set] = {}
    for idx in itertools.product(*(range(s) for s in shape)):
        a = addr(idx)
        if a is None:
            continue
        warp_key, reg_key = [], []
        for dim in range(rank):
            tile = spt[dim] * tpw[dim] * wpc[dim]
            rep, j = divmod(idx[dim], tile)
            warp_d, r = divmod(j, spt[dim] * tpw[dim])
            elem_d = r % spt[dim]  # (the lane, r // spt, does not split an instruction)
            warp_key.append(warp_d)
            reg_key.append((rep, None if dim == vec_dim else elem_d))
        groups.setdefault((tuple(warp_key), tuple(reg_key)), set()).add(a // 32)
    return sum(len(s) for s in groups.values()) / bn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="paper,polar-3,polar-4")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--stores", default="strided,record,whole")
    args = ap.parse_args(argv)

    import torch
    from kernel_ir_stats import encode_stats

    from polartensor import quantize
    from polartensor.config import get_preset
    from polartensor.kernels.common import boundary_table
    from polartensor.kernels.encode import cross_table

    print("| preset | d | stores | record bytes | sectors per row (each store) | sectors per "
          "row | ideal |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for d in (int(v) for v in args.head_dims.split(",")):
            cfg = get_preset(preset, head_dim=d)
            x = torch.randn(2, 8, d)
            mids = boundary_table(quantize(x, cfg).centroids, cfg, torch.float64)
            cross1 = cross_table(mids, cfg)[1]
            rb = cfg.record_bytes(d)
            for store in args.stores.split(","):
                os.environ["POLARTENSOR_ENCODE_STORE"] = store
                row = encode_stats(preset, d, "reshape", keep_ttgir=True)
                ttgir, bn = row["ttgir"], row["block_rows"]
                layouts = {m.group(1): tuple(_ints(m.group(k)) for k in range(2, 6))
                           for m in _LAYOUT.finditer(ttgir)}
                stores = _STORE.findall(ttgir)
                want = expected_stores(cfg, d, bn, store, cross1, rb % 2 == 0)
                if len(stores) != len(want):
                    raise SystemExit(f"{preset} d {d} {store}: {len(stores)} stores in the "
                                     f"TTGIR, {len(want)} expected")
                parts, total = [], 0.0
                for (shape_s, ty, lay), (label, tys, shape, addr) in zip(stores, want):
                    shape_t = tuple(int(v) for v in shape_s.split("x"))
                    if shape_t != shape or ty not in (tys if isinstance(tys, tuple) else (tys,)):
                        raise SystemExit(f"{preset} d {d} {store}: TTGIR store "
                                         f"{shape_t} {ty}, expected {label} {shape} {tys}")
                    if lay not in layouts:
                        raise SystemExit(f"{label}: layout {lay} is not a blocked layout")
                    ebytes = {"i8": 1, "i16": 2, "f16": 2, "bf16": 2, "f32": 4}[ty]
                    spr = sectors_per_row(shape, layouts[lay], addr, bn, ebytes)
                    parts.append(f"{label} {spr:.2f}")
                    total += spr
                ideal = math.ceil(rb / 32) + math.ceil(cfg.num_blocks(d) * 2 / 32)
                print(f"| {preset} | {d} | {store} | {rb} | {'; '.join(parts)} | "
                      f"**{total:.2f}** | ~{ideal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
