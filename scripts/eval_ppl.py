#!/usr/bin/env python
"""Perplexity and next-token KL vs KV bits per element, every cache method side by side.

Held-out real text (the second half of the Paul Graham essays by default, never used for
calibration) is cut into windows of ``--context`` + ``--score`` tokens. Per window the context
is prefilled once in full precision, its K/V are written into each method's cache, and the next
``--score`` tokens run as one chunk attending to that (quantized) cache. Per method: mean
next-token KL to the full cache, perplexity, top-1 agreement, and the bits per K/V element the
cache holds (codes + scales/zeros/radii + full-precision window, floats counted at 16 bits).

    python scripts/eval_ppl.py                       # SmolLM2, all methods, 4 windows
    python scripts/eval_ppl.py --methods full,kivi-2,polar:paper --windows 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from polartensor.eval import available_methods, cache_bits, make_method
from polartensor.eval.common import (
    load_model,
    load_text,
    markdown_table,
    plot_frontier,
    write_results,
)
from polartensor.eval.methods import describe_cache
from polartensor.eval.scoring import cache_from_kv, forward, kl_and_nll, prefill


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny (tests)")
    p.add_argument("--text", default="heldout", help="heldout (default), pydoc or essays")
    p.add_argument("--methods", default="all",
                   help="comma-separated method names; 'all' is every baseline and preset")
    p.add_argument("--context", type=int, default=1024, help="quantized context tokens")
    p.add_argument("--score", type=int, default=256, help="scored tokens per window")
    p.add_argument("--windows", type=int, default=4, help="windows spread over the text")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: all cores, 1 if the machine is busy)")
    p.add_argument("--out", default="results/eval/ppl", help="output folder")
    p.add_argument("--stem", default="ppl", help="output file stem")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the frontier PNG from an existing <out>/<stem>.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        import json

        data = json.loads((Path(args.out) / f"{args.stem}.json").read_text())
        a = data["args"]
        plot_frontier(data["rows"], Path(args.out) / f"{args.stem}_frontier.png",
                      f"KV-cache quality frontier, {a['model']}, {a['context']}-token quantized "
                      f"context, {data['scored_tokens']} scored tokens", metrics=("kl", "ppl"))
        return data
    names = []
    for m in (m.strip() for m in args.methods.split(",")):
        for n in (available_methods() if m == "all" else [m] if m else []):
            if n not in names:
                names.append(n)
    if "full" not in names:
        names = ["full", *names]
    else:
        names = ["full", *[n for n in names if n != "full"]]
    model, tok = load_model(args.model, args.threads)
    ids = torch.tensor(tok.encode(load_text(args.text)), dtype=torch.long)
    if args.model == "tiny":
        ids = ids % model.config.vocab_size
    span = args.context + args.score + 1
    if len(ids) < span:
        raise SystemExit(f"text has {len(ids)} tokens, need {span} per window")
    stride = max(1, (len(ids) - span) // max(1, args.windows - 1)) if args.windows > 1 else 0
    starts = [i * stride for i in range(args.windows)]

    methods = [make_method(n) for n in names]
    stats = {n: {"kl": [], "nll": [], "top1": [], "bits": [], "seconds": 0.0} for n in names}
    errors: dict[str, str] = {}
    t_start = time.perf_counter()
    bar = tqdm(total=len(starts) * len(methods), desc="ppl windows x methods", file=sys.stderr)
    for s in starts:
        ctx = ids[s:s + args.context].unsqueeze(0)
        chunk = ids[s + args.context:s + args.context + args.score].unsqueeze(0)
        targets = ids[s + args.context + 1:s + span].unsqueeze(0)
        methods[0].prepare(model)
        _, kv = prefill(model, ctx)
        ref = None
        for meth in methods:
            bar.set_postfix_str(meth.name)
            if meth.name in errors:
                bar.update(1)
                continue
            t0 = time.perf_counter()
            try:
                meth.prepare(model)
                cache = cache_from_kv(meth, model, kv)
                bits = cache_bits(cache)["bits_per_element"]
                st_conf = describe_cache(cache)
                logits = forward(model, chunk, cache).logits.float()
            except Exception as exc:  # a baseline that cannot run here: report it, go on
                errors[meth.name] = f"{type(exc).__name__}: {exc}"
                bar.update(1)
                continue
            if ref is None:
                ref = logits
            r = kl_and_nll(ref, logits, targets)
            st = stats[meth.name]
            st["kl"].append(float(r["kl"].mean()))
            st["nll"].extend(r["nll"].flatten().tolist())
            st["top1"].append(float(r["top1_agree"].mean()))
            st["bits"].append(bits)
            st["config"] = st_conf
            st["seconds"] += time.perf_counter() - t0
            bar.update(1)
    bar.close()

    rows = []
    for meth in methods:
        st = stats[meth.name]
        if not st["kl"]:
            continue
        rows.append({
            "name": meth.name, "label": meth.label, "family": meth.family,
            "bits_per_element": sum(st["bits"]) / len(st["bits"]),
            "kl": sum(st["kl"]) / len(st["kl"]),
            "ppl": math.exp(sum(st["nll"]) / len(st["nll"])),
            "top1_agree": sum(st["top1"]) / len(st["top1"]),
            "kl_per_window": st["kl"], "seconds": st["seconds"], "details": meth.details,
            "config": st.get("config", {}),
        })
    out = Path(args.out)
    full_ppl = rows[0]["ppl"] if rows else float("nan")
    table = markdown_table(
        ["method", "what", "KV bits/elem", "KL to full", "ppl", "ppl vs full", "top-1 agree"],
        [[r["name"], r["label"], r["bits_per_element"], r["kl"], r["ppl"],
          f"{100 * (r['ppl'] / full_ppl - 1):+.1f}%", r["top1_agree"]] for r in rows])
    ntok = len(starts) * args.score
    md = (f"Perplexity / KL on `{args.text}` text, model `{args.model}`: {len(starts)} windows, "
          f"each {args.context} context tokens held in the cache and the next {args.score} "
          f"scored ({ntok} scored tokens per method). Bits per element measured on the cache "
          "holding the context (floats counted at 16 bits).\n\n" + table + "\n")
    payload = {"args": vars(args), "rows": rows, "errors": errors, "scored_tokens": ntok,
               "seconds_total": time.perf_counter() - t_start}
    write_results(out, args.stem, payload, md)
    if rows:
        plot_frontier(rows, out / f"{args.stem}_frontier.png",
                      f"KV-cache quality frontier, {args.model}, {args.context}-token quantized "
                      f"context, {ntok} scored tokens", metrics=("kl", "ppl"))
    print(md)
    return payload


if __name__ == "__main__":
    main()
