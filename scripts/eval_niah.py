#!/usr/bin/env python
"""Needle in a haystack: contexts 1K..8K x needle depths 0..100%, every cache method.

The haystack is the Paul Graham essays (real text, offline). Per cell the prompt (chat header +
haystack with a needle sentence inserted at the depth) is prefilled once in full precision and
its K/V are written into each method's cache; then the question (+ the answer's first words)
runs as a second chunk attending to the cached, quantized haystack, and the answer is decoded
greedily against it. So retrieval goes through the quantized cache, not a full-precision
prefill. Score per cell: the fraction of the needle's keywords in the answer. Needles cycle
over the cells (several needles, one prefill per cell); --needles-per-cell N runs N each.

    python scripts/eval_niah.py                      # SmolLM2: 1K-8K x 0/50/100%, 3 methods
    python scripts/eval_niah.py --depths 0,25,50,75,100 --methods full,polar:default,kivi-2,quanto-2
    python scripts/eval_niah.py --contexts 1024,2048 --depths 0,50,100 --methods full,kivi-2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from polartensor.eval import make_method
from polartensor.eval.common import load_model, load_text, markdown_table, write_results
from polartensor.eval.methods import cache_bits
from polartensor.eval.needle import NEEDLES, build_prompt, greedy_continue, score_answer
from polartensor.eval.scoring import cache_from_kv, prefill

DEFAULT_METHODS = "full,polar:default,kivi-2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny (tests)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method names")
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="prompt lengths (tokens)")
    p.add_argument("--depths", default="0,50,100",
                   help="needle depths in percent (e.g. 0,25,50,75,100 for a finer grid)")
    p.add_argument("--needles-per-cell", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--text", default="essays", help="haystack text: essays (default) or pydoc")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/eval/niah", help="output folder")
    return p.parse_args(argv)


def heatmap(grid, contexts, depths, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arr = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * len(contexts) + 2.5, 0.55 * len(depths) + 2))
    im = ax.imshow(arr, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(contexts)), [f"{c // 1024}K" if c % 1024 == 0 else str(c)
                                         for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="score")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    methods = [make_method(n) for n in names]
    model, tok = load_model(args.model, args.threads)
    max_pos = getattr(model.config, "max_position_embeddings", max(contexts))
    if max(contexts) > max_pos:
        raise SystemExit(f"context {max(contexts)} exceeds the model's {max_pos} positions")
    hay_ids = list(tok.encode(load_text(args.text)))
    if args.model == "tiny":
        hay_ids = [i % model.config.vocab_size for i in hay_ids]
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for s in ("\n", "<|im_end|>"):
        ids = tok.encode(s, add_special_tokens=False) if args.model != "tiny" else []
        if len(ids) == 1:
            stop.add(ids[0])

    cells = []
    scores = {m.name: [[0.0] * len(contexts) for _ in depths] for m in methods}
    bits = {m.name: {} for m in methods}
    errors: dict[str, str] = {}
    t_start = time.perf_counter()
    total = len(depths) * len(contexts) * args.needles_per_cell
    bar = tqdm(total=total * len(methods), desc="niah cells x methods", file=sys.stderr)
    for ci, ctx_len in enumerate(contexts):
        for di, depth in enumerate(depths):
            for k in range(args.needles_per_cell):
                needle = NEEDLES[(ci + di + k) % len(NEEDLES)] if args.needles_per_cell == 1 \
                    else NEEDLES[k % len(NEEDLES)]
                ctx, q, info = build_prompt(tok, hay_ids, needle, ctx_len, depth / 100,
                                            args.max_new_tokens)
                methods[0].prepare(model)
                _, kv = prefill(model, torch.tensor([ctx]))
                for meth in methods:
                    bar.set_postfix_str(f"{ctx_len} tok, {depth:g}%, {meth.name}")
                    if meth.name in errors:
                        bar.update(1)
                        continue
                    try:
                        meth.prepare(model)
                        cache = cache_from_kv(meth, model, kv)
                        b = cache_bits(cache)["bits_per_element"]
                        out = greedy_continue(model, cache, q, args.max_new_tokens, stop)
                    except Exception as exc:
                        errors[meth.name] = f"{type(exc).__name__}: {exc}"
                        bar.update(1)
                        continue
                    text = tok.decode(out)
                    s = score_answer(text, needle)
                    scores[meth.name][di][ci] += s / args.needles_per_cell
                    bits[meth.name].setdefault(ctx_len, b)
                    cells.append({"method": meth.name, "context": ctx_len, "depth": depth,
                                  "needle": needle.answer_prefix, "answer": text, "score": s,
                                  "bits_per_element": b, **info})
                    bar.update(1)
    bar.close()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, summary = [], []
    for meth in methods:
        grid = scores[meth.name]
        flat = [v for row in grid for v in row]
        mean = sum(flat) / len(flat)
        per_ctx = [sum(grid[d][c] for d in range(len(depths))) / len(depths)
                   for c in range(len(contexts))]
        bavg = sum(bits[meth.name].values()) / max(1, len(bits[meth.name]))
        summary.append({"name": meth.name, "label": meth.label, "family": meth.family,
                        "mean_score": mean, "per_context": dict(zip(contexts, per_ctx)),
                        "bits_per_element": bits[meth.name], "grid": grid})
        rows.append([meth.name, meth.label, bavg, mean, *per_ctx])
        if meth.name not in errors:
            heatmap(grid, contexts, depths,
                    out_dir / f"niah_{meth.name.replace(':', '_').replace('/', '_')}.png",
                    f"{meth.label}: mean score {mean:.2f} ({args.model})")
    ctx_h = [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts]
    table = markdown_table(["method", "what", "KV bits/elem (mean over contexts)", "mean score",
                            *ctx_h], rows)
    md = (f"Needle in a haystack, model `{args.model}`, haystack `{args.text}`: contexts "
          f"{contexts}, depths {depths}%, {args.needles_per_cell} needle(s) per cell from "
          f"{len(NEEDLES)} cycling; score = fraction of needle keywords in the greedy answer. "
          "Per-context columns average over depths.\n\n" + table + "\n")
    payload = {"args": vars(args), "methods": summary, "cells": cells, "errors": errors,
               "seconds_total": time.perf_counter() - t_start}
    write_results(out_dir, "niah", payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
