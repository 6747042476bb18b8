#!/usr/bin/env python3
"""Shared-memory bank conflicts of a Triton kernel, predicted offline from its PTX (no GPU).

Evaluates the PTX's integer arithmetic for every lane of each warp (``%tid.x``; the shared
memory base ``global_smem`` as 0), in text order and ignoring control flow, then takes every
shared-memory access whose address is a function of the thread index alone and counts the
L1 wavefronts it needs:

* ``st.shared`` / ``ld.shared`` of 4, 8 or 16 bytes per thread: the most distinct 4-byte
  words that fall into one of the 32 banks (4 for a conflict-free 16-byte warp access);
* ``ldmatrix`` / ``stmatrix`` ``.x1/.x2/.x4``: per 8x8 matrix (eight 16-byte rows, their
  addresses from eight lanes), the most distinct words in one bank, summed over matrices.

A model, checked against Nsight Compute on the H200 (``results/bench/ncu_decode.md``: the
decode attention's STS.128 7.7 wavefronts per instruction, LDSM.MT88.4 16, STSM 16,
LDS.128 4). It prints one line per access site: the instruction, how many lanes' addresses it
could evaluate, and the wavefronts against the ideal, averaged over the warps.

    python scripts/smem_bank_conflicts.py kernel.ptx [--warps 4]
    python scripts/smem_bank_conflicts.py --attention [--block-n 64] [--decode joint12]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

_LANES = 32
_MASK32 = (1 << 32) - 1

_INSTR = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.]*)\s*(.*?);\s*(?://.*)?$")


def _split_operands(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


class Evaluator:
    """Per-lane integer values of PTX registers for one warp (None: unknown)."""

    def __init__(self, warp: int):
        self.tid = np.arange(_LANES, dtype=np.int64) + _LANES * warp
        self.regs: dict[str, np.ndarray | None] = {}

    def value(self, op: str):
        op = op.strip()
        if op.startswith("%tid.x"):
            return self.tid.copy()
        if op == "global_smem":
            return np.zeros(_LANES, dtype=np.int64)
        if op.startswith("%"):
            return self.regs.get(op)
        try:
            v = int(op, 0) if not op.startswith(("0f", "0d")) else None
        except ValueError:
            return None
        return None if v is None else np.full(_LANES, v, dtype=np.int64)

    def address(self, op: str):
        """[reg+imm] -> per-lane byte address, or None."""
        m = re.match(r"\[\s*(%?\w+)\s*(?:\+\s*(-?\d+))?\s*\]", op)
        if not m:
            return None
        base = self.value(m.group(1))
        return None if base is None else base + int(m.group(2) or 0)

    def step(self, opcode: str, ops: list[str]) -> None:
        parts = opcode.split(".")
        name = parts[0]
        if name == "setp" and len(ops) >= 3 and "|" not in ops[0]:
            a, b = self.value(ops[1]), self.value(ops[2])
            self.regs[ops[0]] = (None if a is None or b is None else
                                 self._compare(parts[1], a, b, parts[2] if len(parts) > 2
                                               else ""))
            return
        if not ops or not ops[0].startswith("%") or name in ("st", "ld", "ldmatrix",
                                                              "stmatrix", "bar", "setp"):
            if name == "ld" and ops and ops[0].startswith("%"):
                self.regs[ops[0]] = None
            elif ops and ops[0].startswith("{"):
                for r in ops[0].strip("{}").split(","):
                    self.regs[r.strip()] = None
            return
        dst, src = ops[0], [self.value(o) for o in ops[1:]]
        wide = any(p in ("u64", "s64", "b64") for p in parts)
        res = None
        if all(s is not None for s in src):
            try:
                res = self._apply(name, parts, src)
            except (ZeroDivisionError, ValueError, IndexError):
                res = None
        if res is not None and res.dtype != bool and not wide and "wide" not in parts:
            res = res & _MASK32  # a 32-bit result (predicates and .wide products aside)
            if "s32" in parts:
                res = np.where(res >= 1 << 31, res - (1 << 32), res)
        self.regs[dst] = res

    @staticmethod
    def _compare(cmp, a, b, typ):
        if typ in ("u32", "b32"):
            a, b = a & _MASK32, b & _MASK32
        elif typ == "s32":
            a = np.where(a & _MASK32 >= 1 << 31, (a & _MASK32) - (1 << 32), a & _MASK32)
            b = np.where(b & _MASK32 >= 1 << 31, (b & _MASK32) - (1 << 32), b & _MASK32)
        return {"eq": a == b, "ne": a != b, "lt": a < b, "le": a <= b, "gt": a > b,
                "ge": a >= b, "lo": a < b, "ls": a <= b, "hi": a > b,
                "hs": a >= b}.get(cmp)

    # PTX integer (and predicate: numpy's &, |, ^, ~ are logical on bool arrays) operations
    _OPS = {
        "mov": lambda s: s[0], "cvt": lambda s: s[0], "cvta": lambda s: s[0],
        "add": lambda s: s[0] + s[1], "sub": lambda s: s[0] - s[1],
        "mul": lambda s: s[0] * s[1], "mad": lambda s: s[0] * s[1] + s[2],
        "shl": lambda s: s[0] << s[1], "shr": lambda s: s[0] >> s[1],
        "and": lambda s: s[0] & s[1], "or": lambda s: s[0] | s[1],
        "xor": lambda s: s[0] ^ s[1], "not": lambda s: ~s[0], "neg": lambda s: -s[0],
        "min": lambda s: np.minimum(s[0], s[1]), "max": lambda s: np.maximum(s[0], s[1]),
        "div": lambda s: s[0] // s[1], "rem": lambda s: s[0] % s[1],
        "selp": lambda s: np.where(s[2].astype(bool), s[0], s[1]),
    }

    @classmethod
    def _apply(cls, name, parts, s):
        if name in cls._OPS:
            return cls._OPS[name](s)
        if name == "bfe":
            field = (s[0] >> s[1]) & ((1 << s[2]) - 1)
            if "s32" in parts or "s64" in parts:  # sign-extended from the field's top bit
                field = np.where(field >> (s[2] - 1) & 1, field - (1 << s[2]), field)
            return field
        if name == "lop3":
            a, b, c, lut = s[0], s[1], s[2], int(s[3][0])
            out = np.zeros_like(a)
            for bit in range(32):
                ia, ib, ic = (a >> bit) & 1, (b >> bit) & 1, (c >> bit) & 1
                out |= ((lut >> (ia * 4 + ib * 2 + ic)) & 1) << bit
            return out
        return None


def _words_max_per_bank(addrs: np.ndarray, nbytes: int) -> int:
    words = set()
    for a in addrs:
        for w in range(int(a) // 4, (int(a) + nbytes + 3) // 4):
            words.add(w)
    per_bank: dict[int, int] = {}
    for w in words:
        per_bank[w % 32] = per_bank.get(w % 32, 0) + 1
    return max(per_bank.values()) if per_bank else 0


def wavefronts(kind: str, addrs: np.ndarray, nbytes: int, nmat: int) -> tuple[int, int]:
    """(predicted, ideal) wavefronts of one warp access."""
    if kind in ("ldmatrix", "stmatrix"):
        got = sum(_words_max_per_bank(addrs[8 * m: 8 * m + 8], 16) for m in range(nmat))
        return got, nmat
    lanes = len(set(int(a) for a in addrs))
    return _words_max_per_bank(addrs, nbytes), max(1, (lanes * nbytes + 127) // 128)


def analyse(ptx: str, warps: int = 4) -> list[dict]:
    lines = [ln.strip() for ln in ptx.splitlines()]
    sites: dict[int, dict] = {}
    for w in range(warps):
        ev = Evaluator(w)
        for i, ln in enumerate(lines):
            if not ln or ln.startswith(("//", ".", "$", "{", "}")):
                continue
            m = _INSTR.match(ln)
            if not m:
                continue
            opcode, ops = m.group(1), _split_operands(m.group(2))
            name = opcode.split(".")[0]
            kind = None
            if name in ("st", "ld") and ".shared" in opcode:
                kind = name
                addr_op = ops[0] if name == "st" else ops[1]
                vec = re.search(r"\.v(\d)", opcode)
                width = re.search(r"\.[bsuf](\d+)$", opcode)
                nbytes = (int(vec.group(1)) if vec else 1) * (int(width.group(1)) // 8 if
                                                               width else 4)
                nmat = 0
            elif name in ("ldmatrix", "stmatrix"):
                kind = name
                addr_op = ops[1] if name == "ldmatrix" else ops[0]
                nmat = int(re.search(r"\.x(\d)", opcode).group(1))
                nbytes = 16
            if kind:
                addrs = ev.address(addr_op)
                site = sites.setdefault(i, dict(line=i + 1, instr=opcode, evaluated=0,
                                                got=0, ideal=0))
                if addrs is not None:
                    if kind in ("ldmatrix", "stmatrix") and nmat < 4:
                        addrs = addrs[:8 * nmat]
                    got, ideal = wavefronts(kind, addrs, nbytes, nmat)
                    site["evaluated"] += 1
                    site["got"] += got
                    site["ideal"] += ideal
            ev.step(opcode, ops)
    out = []
    for s in sites.values():
        n = s["evaluated"]
        out.append(dict(line=s["line"], instr=s["instr"], warps_evaluated=n,
                        wavefronts=s["got"] / n if n else None,
                        ideal=s["ideal"] / n if n else None))
    return out


def _attention_ptx(block_n, decode):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import kernel_ir_stats as k

    grab = {}
    orig = k._counts

    def keep(compiled):
        grab["ptx"] = compiled.asm["ptx"]
        return orig(compiled)

    k._counts = keep
    try:
        k.stats("paper", 128, 4, 1, decode, block_n=block_n)
    finally:
        k._counts = orig
    return grab["ptx"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ptx", nargs="?", help="a .ptx file")
    ap.add_argument("--attention", action="store_true",
                    help="compile the decode attention (paper, d 128, group 4) and analyse it")
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--decode", default="joint12")
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args(argv)
    if args.attention:
        ptx = _attention_ptx(args.block_n, args.decode)
    elif args.ptx:
        ptx = open(args.ptx).read()
    else:
        ap.error("give a .ptx file or --attention")
    rows = analyse(ptx, args.warps)
    print("| PTX line | instruction | warps evaluated | wavefronts | ideal |")
    print("|---|---|---|---|---|")
    for r in rows:
        wf = "?" if r["wavefronts"] is None else f"{r['wavefronts']:.1f}"
        ideal = "?" if r["ideal"] is None else f"{r['ideal']:.1f}"
        print(f"| {r['line']} | {r['instr']} | {r['warps_evaluated']} | {wf} | {ideal} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
