"""The main job: a needle in an essay haystack, answered with the PolarQuant cache and the full one.

``python -m polartensor`` loads SmolLM2-135M-Instruct (from the package registry, converted once
to a local cache; never a model hub), hides a fact in ~2K tokens of Paul Graham essays, asks
for it, and answers twice: with transformers' full-precision DynamicCache (attention "sdpa") and
with :class:`~polartensor.integrations.transformers.PolarQuantCache` (attention "polar"). It
prints both answers, the KV bytes each cache holds, the compression ratio and decode tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEEDLE = "The special magic number for the blue harbor is 7294."
QUESTION = "What is the special magic number for the blue harbor?"
ANSWER_PREFIX = "The special magic number for the blue harbor is"
ANSWER = "7294"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str = "", end: str = "\n") -> None:
    print(msg, end=end, flush=True)


@contextlib.contextmanager
def progress(what: str, every: float = 5.0):
    """Print ``what ...``, a heartbeat every ``every`` seconds while it runs, then the time."""
    log(f"  {what} ...", end="")
    start = time.perf_counter()
    done = threading.Event()

    def beat():
        while not done.wait(every):
            log(f" {time.perf_counter() - start:.0f}s", end="")

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        log(f" done in {time.perf_counter() - start:.1f} s")


def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def build_needle_prompt(tok, n_tokens: int = 2000, depth: float = 0.5, needle: str = NEEDLE,
                        question: str = QUESTION, answer_prefix: str = ANSWER_PREFIX):
    """Tokenized chat prompt: ~``n_tokens`` of essays with ``needle`` at ``depth``, then the
    question; the assistant turn starts with ``answer_prefix``. Returns (BatchEncoding, answer).
    """
    from .assets import essay_haystack

    marker = "@@HAYSTACK@@"
    chat = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                   add_generation_prompt=True)
    pre, post = chat.split(marker)
    hay_ids = _encode(tok, essay_haystack()[: n_tokens * 8])[:n_tokens]
    cut = int(round(depth * len(hay_ids)))
    text = tok.decode(hay_ids[:cut])
    # Put the needle right after the nearest sentence end, so it reads as its own sentence.
    end = max(text.rfind(". "), text.rfind(".\n"))
    if end > len(text) // 2:
        text = text[: end + 1]
    before, after = text, tok.decode(hay_ids[cut:])
    body = f"{before} {needle} {after}\n\n{question} Answer using the text above."
    ids = _encode(tok, pre + body + post + answer_prefix)
    enc = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                          dtype=torch.long)}
    from transformers import BatchEncoding

    return BatchEncoding(enc), ANSWER if needle == NEEDLE else None


class _Timer:
    """A generate() streamer that records when the prompt and each new token arrive."""

    def __init__(self, tok, echo: bool):
        self.tok, self.echo = tok, echo
        self.times: list[float] = []
        self.ids: list[int] = []
        self.printed = ""

    def put(self, value):
        if not self.times and len(self.ids) == 0 and value.numel() > 1:
            self.times.append(time.perf_counter())  # the prompt arrives before prefill
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(x) for x in value.flatten())
        if self.echo:
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            log(text[len(self.printed):], end="")
            self.printed = text

    def end(self):
        pass


def run_answer(model, tok, enc, cache=None, max_new_tokens: int = 16, echo: bool = False,
               attention: str | None = None) -> dict:
    """Greedy answer for ``enc``; ``cache`` None means the full-precision DynamicCache.

    Returns text, token ids, prefill seconds (to the first token), decode tokens/s (after the
    first token), and the bytes the cache holds at the end (with what a DynamicCache holds).
    """
    from transformers import DynamicCache

    from .integrations.transformers import PolarQuantCache, generate_kwargs

    impl = attention or ("polar" if isinstance(cache, PolarQuantCache) else "sdpa")
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)
    if cache is None:
        cache = DynamicCache()
    timer = _Timer(tok, echo)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=timer, pad_token_id=tok.eos_token_id,
                             **generate_kwargs(cache))
    new = out[0, enc["input_ids"].shape[1]:]
    times = timer.times[1:] if len(timer.times) > 1 else [time.perf_counter()]
    n = len(times)
    prefill_s = times[0] - start
    decode_tps = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else \
        float("nan")
    if isinstance(cache, PolarQuantCache):
        held, dense = cache.memory_bytes(), cache.dense_bytes()
    else:
        held = sum(layer.keys.numel() * layer.keys.element_size()
                   + layer.values.numel() * layer.values.element_size()
                   for layer in cache.layers if layer.keys is not None)
        dense = held
    return {"text": tok.decode(new, skip_special_tokens=True), "ids": new.tolist(),
            "prefill_s": prefill_s, "decode_tps": decode_tps, "new_tokens": int(new.numel()),
            "kv_bytes": held, "dense_bytes": dense, "cache": cache}


def greedy_continue(model, first_token: torch.Tensor, cache, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy decode from ``first_token`` [B, 1] on a filled cache (batch 1 expected)."""
    from .integrations.transformers import generate_kwargs

    tok, mask, out_ids = first_token, attention_mask, [int(first_token[0, 0])]
    with torch.no_grad():
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and out_ids[-1] == eos_token_id:
                break
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            logits = model(input_ids=tok, attention_mask=mask, use_cache=True,
                           **generate_kwargs(cache)).logits
            tok = logits[:, -1:].argmax(-1)
            out_ids.append(int(tok[0, 0]))
    return out_ids


def answers_with_shared_prefill(model, tok, enc, kv_config=None, max_new_tokens: int = 12):
    """(full-cache answer, PolarQuant answer) for one prompt, sharing a single prefill.

    Prefill attention is full precision in both cases, so one forward pass into a
    DynamicCache serves both: its K/V are then quantized into a PolarQuantCache
    (:meth:`PolarQuantCache.from_cache`, the same as prefilling with it) and each cache decodes
    greedily on its own. Half the prefill cost of two generate() calls.
    """
    from transformers import DynamicCache

    from .integrations.transformers import PolarQuantCache, generate_kwargs

    if model.config._attn_implementation != "polar":
        model.set_attn_implementation("polar")  # plain K/V take the SDPA path
    enc = enc.to(model.device)
    dyn = DynamicCache()
    with torch.no_grad():
        logits = model(**enc, use_cache=True, **generate_kwargs(dyn)).logits
    pq = PolarQuantCache.from_cache(dyn, kv_config, attention="polar")
    first = logits[:, -1:].argmax(-1)
    texts = []
    for cache in (dyn, pq):
        ids = greedy_continue(model, first, cache, enc["attention_mask"], max_new_tokens,
                              tok.eos_token_id)
        texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts[0], texts[1]


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m polartensor",
        description="Needle in an essay haystack with SmolLM2-135M-Instruct: PolarQuant KV "
                    "cache vs the full cache.")
    ap.add_argument("--tokens", type=int, default=2000, help="haystack tokens (default 2000)")
    ap.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1]")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--key", default=None, help="key preset (default: the recommended one)")
    ap.add_argument("--value", default=None, help="value preset (default: the recommended one)")
    ap.add_argument("--residual", type=int, default=0,
                    help="keep the most recent N tokens in full precision")
    args = ap.parse_args(argv)
    # every argument checked before the model loads: argparse errors, not tracebacks later
    if not 0.0 <= args.depth <= 1.0:
        ap.error("--depth must be in [0, 1]")
    if args.tokens < 1:
        ap.error(f"--tokens must be >= 1, got {args.tokens}")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)

    from . import assets
    from .integrations.transformers import PolarQuantCache, PolarQuantKVConfig

    try:
        kv = PolarQuantKVConfig(key_config=args.key, value_config=args.value,
                                residual_length=args.residual)
    except ValueError as exc:
        ap.error(f"--key/--value/--residual: {exc}")
    log("polartensor: PolarQuant KV cache (Han et al., arXiv 2502.02617) on a real model")
    log(f"  model: SmolLM2-135M-Instruct on {args.device} ({str(dtype).removeprefix('torch.')})")
    with progress("loading the model (first run: download + one-time conversion)"):
        model, tok = assets.load_smollm2(dtype, args.device)
    with progress(f"building a {args.tokens}-token essay haystack, needle at "
                  f"{args.depth:.0%} depth"):
        enc, answer = build_needle_prompt(tok, args.tokens, args.depth)
    n_prompt = enc["input_ids"].shape[1]
    text_cfg = model.config
    hd = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // \
        text_cfg.num_attention_heads
    kcfg, vcfg = kv.key_config_for(hd), kv.value_config_for(hd)
    log(f"  needle:   {NEEDLE}")
    log(f"  question: {QUESTION}")
    log(f"  prompt:   {n_prompt} tokens")
    log(f"  PolarQuant keys {kv.key_config if isinstance(kv.key_config, str) else 'custom'} "
        f"({kcfg.bits_per_coordinate(hd):.3f} bits/coord), values "
        f"{kv.value_config if isinstance(kv.value_config, str) else 'custom'} "
        f"({vcfg.bits_per_coordinate(hd):.3f} bits/coord)"
        + (f", last {args.residual} tokens full precision" if args.residual else ""))

    results = {}
    for name, make in (("full cache", lambda: None),
                       ("PolarQuant", lambda: PolarQuantCache(kv, model_config=model.config))):
        log(f"\n[{name}] prefill {n_prompt} tokens, then greedy decode "
            f"(up to {args.max_new_tokens} tokens):")
        log(f"  answer: {ANSWER_PREFIX}", end="")
        res = run_answer(model, tok, enc, make(), args.max_new_tokens, echo=True)
        log("")
        log(f"  prefill + first token {res['prefill_s']:.2f} s, decode "
            f"{res['decode_tps']:.1f} tokens/s, KV cache {_fmt_bytes(res['kv_bytes'])}")
        results[name] = res

    full, pq = results["full cache"], results["PolarQuant"]
    ratio = pq["dense_bytes"] / pq["kv_bytes"]  # same tokens in a DynamicCache / held
    el_bits = torch.finfo(dtype).bits
    rows = [
        ("answer", *(ANSWER_PREFIX + r["text"] for r in (full, pq))),
        ("needle found", *("yes" if answer in r["text"] else "no" for r in (full, pq))),
        ("same tokens", "", "yes" if full["ids"] == pq["ids"] else "no"),
        ("KV cache bytes", _fmt_bytes(full["kv_bytes"]), _fmt_bytes(pq["kv_bytes"])),
        (f"compression vs {str(dtype).removeprefix('torch.')}", "1.00x", f"{ratio:.2f}x"),
        *([("compression vs 16-bit", "", f"{ratio * 16 / el_bits:.2f}x")]
          if el_bits != 16 else []),
        ("prefill + 1st token", f"{full['prefill_s']:.2f} s", f"{pq['prefill_s']:.2f} s"),
        ("decode tokens/s", f"{full['decode_tps']:.1f}", f"{pq['decode_tps']:.1f}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len("full (DynamicCache)"), *(len(r[1]) for r in rows))
    log("")
    log(f"{'':{w0}}  {'full (DynamicCache)':{w1}}  PolarQuant")
    for r in rows:
        log(f"{r[0]:{w0}}  {r[1]:{w1}}  {r[2]}")
    cache = pq["cache"]
    log("")
    log(cache.memory_report())
    if not args.device.startswith("cuda"):
        log("(on CPU, attention over the quantized cache runs the PyTorch reference, which "
            "dequantizes the cache every step; on CUDA it runs the Triton kernels)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
