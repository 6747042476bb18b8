"""Scoring continuations against a cached (quantized) context: KL to the full cache, NLL.

The protocol every script here uses: the context is prefilled once in full precision (prefill
attention is full precision for every cache compared, as in transformers' quantized caches),
its per-layer K/V are written into each method's fresh cache exactly as a prefill would write
them, and then the scored tokens run as a second chunk that attends to what the cache holds.
So every scored token sees a quantized context; only its own chunk is full precision.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache

from .methods import Method

__all__ = [
    "CACHE_KWARG",
    "cache_from_kv",
    "end_prompt",
    "forward",
    "kl_and_nll",
    "prefill",
]


def _cache_kwarg() -> str:
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


CACHE_KWARG = _cache_kwarg()  # "cache" from transformers 5.2x on, "past_key_values" before


@torch.no_grad()
def forward(model, input_ids: torch.Tensor, cache: Cache | None = None, **kwargs):
    """``model(input_ids, <cache kwarg>=cache, use_cache=True)``; returns the output object."""
    extra = {CACHE_KWARG: cache} if cache is not None else {}
    return model(input_ids=input_ids, use_cache=cache is not None, **extra, **kwargs)


def _out_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
    """Full-precision prefill: (logits, [(keys, values) per layer])."""
    cache = DynamicCache(config=model.config)
    out = forward(model, input_ids, cache)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return out.logits, kv


def cache_from_kv(method: Method, model, kv: list[tuple]) -> Cache:
    """A fresh cache of ``method`` holding the prefilled K/V (written as a prefill writes them)."""
    cache = method.new_cache(model)
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    end_prompt(cache)
    return cache


def end_prompt(cache: Cache) -> None:
    """Tell a PolarQuantCache its prompt is complete, so that the multi-token continuations a
    scorer feeds next count as generated tokens, not as more (chunked) prompt."""
    if hasattr(cache, "end_prompt"):
        cache.end_prompt()


def kl_and_nll(ref_logits: torch.Tensor, logits: torch.Tensor,
               targets: torch.Tensor | None = None) -> dict:
    """Per-token KL(ref || method) and (with targets) NLL of the method, as float64 tensors."""
    ref = F.log_softmax(ref_logits.double(), dim=-1)
    lp = F.log_softmax(logits.double(), dim=-1)
    kl = (ref.exp() * (ref - lp)).sum(-1)
    out = {"kl": kl, "top1_agree": (ref.argmax(-1) == lp.argmax(-1)).double()}
    if targets is not None:
        out["nll"] = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return out


def summarize(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan
