#!/usr/bin/env python
"""LongBench tasks from a local data directory (LongBench's own jsonl format), every method.

Per example the prompt is split where LongBench's template puts the context: the part up to the
end of the context is prefilled once in full precision (middle-truncated to --max-length like
LongBench) and written into each method's cache; the rest of the prompt (the question) runs as a
second chunk attending to the quantized cache, and the answer is decoded greedily against it
(at most LongBench's max generation length for the dataset). Scores use LongBench's metrics.

Data cannot be downloaded on our machines. With LongBench's data (unzip its data.zip so that
DIR/hotpotqa.jsonl etc. exist):

    python scripts/eval_longbench.py --data-dir DIR --datasets hotpotqa,multifieldqa_en,...

Without it, make and run the small fixture generated from the offline essays (same format):

    python scripts/eval_longbench.py --make-fixture results/eval/longbench/fixture
    python scripts/eval_longbench.py --data-dir results/eval/longbench/fixture
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from polartensor.eval import make_method
from polartensor.eval.common import load_model, markdown_table, write_results
from polartensor.eval.longbench import (
    DATASET_MAXLEN,
    NO_CHAT,
    PROMPTS,
    load_dataset,
    make_fixture,
    score_dataset,
    split_prompt,
)
from polartensor.eval.methods import cache_bits
from polartensor.eval.needle import greedy_continue, prompt_parts
from polartensor.eval.scoring import cache_from_kv, prefill

DEFAULT_METHODS = "full,polar:default,polar:polar-4,kivi-2,quanto-2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="results/eval/longbench/fixture")
    p.add_argument("--datasets", default="auto",
                   help="comma-separated LongBench dataset names, or auto (every known "
                   "<name>.jsonl in --data-dir)")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny (tests)")
    p.add_argument("--limit", type=int, default=None, help="examples per dataset")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt token budget (default: model positions - max generation)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on LongBench's per-dataset generation length")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--make-fixture", metavar="DIR", default=None,
                   help="write the essay-based fixture in LongBench format to DIR and exit")
    p.add_argument("--fixture-examples", type=int, default=4)
    p.add_argument("--fixture-paragraphs", type=int, default=8)
    p.add_argument("--out", default="results/eval/longbench")
    return p.parse_args(argv)


def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def build_ids(tok, dataset: str, doc: dict, budget: int, vocab: int | None):
    head, tail = split_prompt(dataset, doc)
    pre, post = ("", "") if dataset in NO_CHAT else prompt_parts(tok)
    if post == "\n" and not getattr(tok, "chat_template", None):
        post = ""
    ctx = _encode(tok, pre + head)
    q = _encode(tok, tail + post)
    if vocab:
        ctx, q = [i % vocab for i in ctx], [i % vocab for i in q]
    room = budget - len(q)
    if len(ctx) > room:  # LongBench truncates the middle of the prompt
        half = room // 2
        ctx = ctx[:half] + ctx[len(ctx) - (room - half):]
    return ctx, q


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.make_fixture:
        from polartensor.eval.common import load_text

        texts = [load_text("heldout")] if args.model != "tiny" else [load_text("pydoc")]
        names = make_fixture(args.make_fixture, texts, n=args.fixture_examples,
                             paragraphs=args.fixture_paragraphs)
        print(f"wrote LongBench-format fixture {names} to {args.make_fixture}")
        return {"fixture": names}
    data_dir = Path(args.data_dir)
    if args.datasets == "auto":
        datasets = [n for n in PROMPTS if (data_dir / f"{n}.jsonl").is_file()]
        if not datasets:
            raise SystemExit(f"no LongBench <dataset>.jsonl files in {data_dir}")
    else:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in datasets:
        if d not in PROMPTS:
            raise SystemExit(f"unknown LongBench dataset {d!r}; known: {sorted(PROMPTS)}")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [make_method(n) for n in names]
    model, tok = load_model(args.model, args.threads)
    vocab = model.config.vocab_size if args.model == "tiny" else None
    positions = getattr(model.config, "max_position_embeddings", 8192)
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if args.model != "tiny":
        ids = _encode(tok, "<|im_end|>")
        if len(ids) == 1:
            stop.add(ids[0])

    docs = {d: load_dataset(data_dir, d, args.limit) for d in datasets}
    preds = {m.name: {d: [] for d in datasets} for m in methods}
    bits = {m.name: [] for m in methods}
    errors: dict[str, str] = {}
    records = []
    t_start = time.perf_counter()
    total = sum(len(v) for v in docs.values()) * len(methods)
    bar = tqdm(total=total, desc="longbench examples x methods", file=sys.stderr)
    for d in datasets:
        gen = DATASET_MAXLEN[d] if args.max_new_tokens is None else \
            min(DATASET_MAXLEN[d], args.max_new_tokens)
        budget = (args.max_length or positions) - gen
        for doc in docs[d]:
            ctx, q = build_ids(tok, d, doc, budget, vocab)
            methods[0].prepare(model)
            _, kv = prefill(model, torch.tensor([ctx]))
            for meth in methods:
                bar.set_postfix_str(f"{d}, {meth.name}")
                if meth.name in errors:
                    bar.update(1)
                    continue
                try:
                    meth.prepare(model)
                    cache = cache_from_kv(meth, model, kv)
                    bits[meth.name].append(cache_bits(cache)["bits_per_element"])
                    out = greedy_continue(model, cache, q, gen, stop)
                except Exception as exc:
                    errors[meth.name] = f"{type(exc).__name__}: {exc}"
                    bar.update(1)
                    continue
                text = tok.decode(out)
                preds[meth.name][d].append(text)
                records.append({"method": meth.name, "dataset": d, "_id": doc.get("_id"),
                                "tokens": len(ctx) + len(q), "pred": text,
                                "answers": doc["answers"]})
                bar.update(1)
    bar.close()

    rows, summary = [], []
    for meth in methods:
        per = {d: score_dataset(d, preds[meth.name][d], docs[d][:len(preds[meth.name][d])])
               for d in datasets}
        vals = [v for v in per.values() if v == v]
        avg = sum(vals) / len(vals) if vals else float("nan")
        b = sum(bits[meth.name]) / len(bits[meth.name]) if bits[meth.name] else float("nan")
        summary.append({"name": meth.name, "label": meth.label, "family": meth.family,
                        "scores": per, "average": avg, "bits_per_element": b})
        rows.append([meth.name, meth.label, b, *[per[d] for d in datasets], avg])
    table = markdown_table(["method", "what", "KV bits/elem", *datasets, "average"], rows)
    n_ex = {d: len(v) for d, v in docs.items()}
    md = (f"LongBench-format run on `{data_dir}` ({n_ex} examples), model `{args.model}`: "
          "LongBench prompts, generation lengths and metrics (x100); the context goes through "
          "each method's cache, the question attends to it.\n\n" + table + "\n")
    payload = {"args": vars(args), "methods": summary, "records": records, "errors": errors,
               "examples": n_ex, "seconds_total": time.perf_counter() - t_start}
    write_results(Path(args.out), "longbench", payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
