"""lm-eval harness integration: a ``polarquant`` model type whose KV cache is quantized.

``PolarQuantLM`` is an ``HFLM`` subclass registered as ``polarquant``:

- **generation** (``generate_until`` tasks) runs ``model.generate`` with a fresh
  :class:`~polartensor.integrations.transformers.PolarQuantCache` (or any other cache method of
  :mod:`polartensor.eval.methods`) per batch, and the model's attention set to "polar";
- **loglikelihood** tasks: lm-eval normally scores a request in one prefill pass with no cache,
  where a quantized cache changes nothing. With ``quantize_context=True`` (the default) each
  request is scored by chunked prefill: the context (all but its last token) is prefilled into
  a fresh quantized cache, then the last context token and the continuation run as a second
  chunk (or chunks of ``score_chunk`` tokens) attending to that cache. So every continuation
  token is scored against a quantized context. ``quantize_context=False`` is lm-eval's
  standard single pass.

``--model_args`` (all optional; lm-eval's own HFLM arguments pass through):

    pretrained=smollm2        the offline SmolLM2-135M-Instruct (default) or a model dir/id
    method=...                any cache method: full, kivi-2, quanto-4, hqq-2, polar:paper,
                              polar:polar-4/polar-3+r128 ... (overrides the PolarQuant knobs)
    preset=default            PolarQuant key/value pairing or single preset for K and V
    key_preset=, value_preset=  separate presets for keys and values
    levels=4,bits=4-2-2-2     an explicit config for K and V (bits dash-separated, or one int)
    residual_window=0         most recent tokens kept in full precision
    codebook=offline          offline (analytic) or online (fitted per layer at prefill)
    quantize_generated=False  False: the paper's mode (the prompt is quantized, tokens appended
                              after it stay full precision); True: those are quantized too
    quantize_context=True     chunked-prefill scoring of loglikelihood requests
    score_chunk=0             continuation chunk size for that scoring (0: one chunk)
    threads=                  intra-op CPU threads (default: all cores, 1 if the machine is busy)

Command line (lm-eval's ``lm_eval`` command does not import third-party modules, so run ours;
it registers the model and hands every flag to lm-eval's own CLI)::

    python -m polartensor.integrations.lm_eval --model polarquant \
        --model_args preset=paper,residual_window=0 --device cpu --batch_size 1 \
        --include_path polartensor/integrations/lm_eval_tasks --tasks polar_essay_next
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import PRESETS
from ..eval.methods import Method, make_method
from ..eval.scoring import CACHE_KWARG, end_prompt

__all__ = ["PolarQuantLM", "TASKS_DIR", "build_method", "main"]

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


def _parse_bits(bits) -> tuple[int, ...] | int:
    if isinstance(bits, int):
        return bits
    parts = [p for p in str(bits).replace(":", "-").replace(" ", "-").split("-") if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"bits={bits!r}: give one int or one per level, e.g. bits=4-2-2-2")
    return tuple(int(p) for p in parts) if len(parts) > 1 else int(parts[0])


def build_method(method: str | None = None, preset: str = "default",
                 key_preset: str | None = None, value_preset: str | None = None,
                 levels: int | None = None, bits=None, residual_window: int = 0,
                 codebook: str = "offline", quantize_generated: bool = False) -> Method:
    """The cache method the model args describe (see the module docstring)."""
    if method:
        return make_method(str(method))
    if codebook not in ("offline", "online"):
        raise ValueError(f"codebook must be offline or online, got {codebook!r}")
    qgen = _as_bool(quantize_generated)
    suffix = ("+online" if codebook == "online" else "") + \
        (f"+r{int(residual_window)}" if residual_window else "") + ("+qgen" if qgen else "")
    if levels is None and bits is None:
        spec = preset
        if key_preset or value_preset:
            # the side not given comes from ``preset``: a single preset, or a pairing's side
            from ..integrations import transformers as polar_tf

            dk, dv = (preset, preset) if preset in PRESETS else polar_tf.kv_preset(preset)
            if not (isinstance(dk, str) and isinstance(dv, str)):
                raise ValueError(f"preset {preset!r} pairs configs, not preset names: pass "
                                 "both key_preset= and value_preset=")
            spec = f"{key_preset or dk}/{value_preset or dv}"
        return make_method(f"polar:{spec}{suffix}")
    # an explicit config for keys and values
    from ..config import PolarQuantConfig
    from ..integrations import transformers as polar_tf

    cfg = PolarQuantConfig(levels=int(levels) if levels is not None else 4,
                           bits=_parse_bits(bits if bits is not None else 2),
                           codebook=codebook)
    rw = int(residual_window)

    def factory(model):
        return polar_tf.PolarQuantCache(key_config=cfg, value_config=cfg, residual_length=rw,
                                        attention="polar", quantize_generated=qgen)

    name = f"polar:levels={cfg.levels},bits={'-'.join(map(str, cfg.bits))}{suffix}"
    return Method(name, "polarquant", f"PolarQuant levels={cfg.levels} bits={cfg.bits}",
                  "polar", factory, {"config": repr(cfg), "residual_length": rw})


def _as_bool(v) -> bool:
    """A model-args flag: a bool, 0/1, or true/false (yes/no, on/off) in any case."""
    if isinstance(v, str):
        word = v.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    elif isinstance(v, (bool, int)) and v in (0, 1):
        return bool(v)
    raise ValueError(f"expected true or false, got {v!r}")


class PolarQuantLM(HFLM):
    """HFLM whose KV cache is PolarQuant (or another method of polartensor.eval.methods)."""

    def __init__(self, pretrained="smollm2", method: str | None = None, preset: str = "default",
                 key_preset: str | None = None, value_preset: str | None = None,
                 levels: int | None = None, bits=None, residual_window: int = 0,
                 codebook: str = "offline", quantize_generated: bool = False,
                 quantize_context: bool = True,
                 score_chunk: int = 0, threads: int | None = None, **kwargs) -> None:
        from ..eval.common import set_threads

        set_threads(None if threads is None else int(threads))
        if isinstance(pretrained, str) and pretrained == "smollm2":
            from ..assets import load_smollm2

            dtype = kwargs.pop("dtype", None)
            dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" \
                else torch.float32
            device = kwargs.get("device") or "cpu"
            pretrained, tok = load_smollm2(dtype, device)
            kwargs.setdefault("tokenizer", tok)
        kwargs.setdefault("device", "cpu")
        super().__init__(pretrained=pretrained, **kwargs)
        self.method = build_method(method, preset, key_preset, value_preset, levels, bits,
                                   int(residual_window), codebook, quantize_generated)
        self.method.prepare(self.model)
        self.quantize_context = _as_bool(quantize_context)
        self.score_chunk = int(score_chunk)
        self._splits: dict[int, dict[tuple, int]] = {}
        self._warned_rolling = False

    # -- generation --------------------------------------------------------------------------
    def new_cache(self):
        return self.method.new_cache(self.model)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        generation_kwargs = dict(generation_kwargs)
        generation_kwargs.pop("past_key_values", None)
        generation_kwargs.pop("cache", None)
        generation_kwargs[CACHE_KWARG] = self.new_cache()
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- loglikelihood against a quantized context ------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if not self.quantize_context or self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        splits: dict[int, dict[tuple, int]] = {}
        for _, ctx, cont in requests:
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]
            split = len(inp) - len(cont)
            table = splits.setdefault(len(inp), {})
            key = tuple(inp)
            table[key] = min(split, table.get(key, split))
        self._splits = splits
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        finally:
            self._splits = {}

    def _find_split(self, row: torch.Tensor) -> tuple[int, int] | None:
        toks = row.tolist()
        for n in sorted(self._splits, reverse=True):
            if n <= len(toks):
                split = self._splits[n].get(tuple(toks[:n]))
                if split is not None:
                    return n, split
        return None

    @torch.no_grad()
    def _chunked_logits(self, ids: torch.Tensor, split: int) -> torch.Tensor:
        """Logits [1, n, V]: prefill ids[:split] into a fresh cache, then the rest in chunks."""
        cache = self.new_cache()
        kw = {CACHE_KWARG: cache, "use_cache": True}
        outs = [self.model(input_ids=ids[:, :split], **kw).logits]
        end_prompt(cache)  # the continuation's chunks are scored as generated tokens
        step = self.score_chunk if self.score_chunk > 0 else ids.shape[1]
        for s in range(split, ids.shape[1], step):
            outs.append(self.model(input_ids=ids[:, s:s + step], **kw).logits)
        return torch.cat(outs, dim=1)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if not self._splits or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        rows = []
        plain = None
        for b in range(inps.shape[0]):
            found = self._find_split(inps[b])
            if found is not None and found[1] < 1:
                # no context (loglikelihood_rolling's windows, perplexity): with score_chunk
                # the window's first chunk is prefilled and each later chunk is scored
                # against the quantized cache of those before it; without, nothing here
                # is quantized, which is said once
                if self.score_chunk > 0:
                    found = (found[0], min(self.score_chunk, found[0]))
                elif not self._warned_rolling and self.method.family != "full":
                    self._warned_rolling = True
                    warnings.warn(
                        "polarquant: requests without a context (loglikelihood_rolling, "
                        "perplexity) are scored in one full-precision pass, so the KV cache's "
                        "quantization does not enter them; pass score_chunk=N to score them "
                        "in chunks of N tokens against the quantized cache of earlier chunks",
                        stacklevel=2)
            if found is None or found[1] < 1:
                if plain is None:
                    plain = super()._model_call(inps)
                rows.append(plain[b:b + 1])
                continue
            n, split = found
            logits = self._chunked_logits(inps[b:b + 1, :n], split)
            if n < inps.shape[1]:
                pad = logits.new_zeros(1, inps.shape[1] - n, logits.shape[-1])
                logits = torch.cat([logits, pad], dim=1)
            rows.append(logits)
        return torch.cat(rows, dim=0)


# Registered on import. Under ``python -m`` this file runs as __main__: the entry point below
# imports the package module instead, so the model is registered exactly once.
if __name__ != "__main__":
    register_model("polarquant")(PolarQuantLM)


def main(argv: list[str] | None = None) -> None:
    """``python -m polartensor.integrations.lm_eval <lm-eval flags>``: lm-eval's own CLI with
    the ``polarquant`` model registered (and our task folder added when --include_path is
    not given)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from polartensor.integrations.lm_eval import main as _main

    _main()
