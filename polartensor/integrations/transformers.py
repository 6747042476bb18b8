"""Hugging Face transformers integration: a PolarQuant KV cache, a "polar" attention function.

Two ways to turn it on::

    from polartensor.integrations.transformers import PolarQuantCache, PolarQuantKVConfig, quantize_

    quantize_(model, PolarQuantKVConfig())           # then plain model.generate(...) is quantized
    model.generate(**inputs, past_key_values=PolarQuantCache())   # or per call

(``torchao.quantization.quantize_(model, PolarQuantKVConfig(), filter_fn=polar_kv_filter)``
does the same as our ``quantize_``: torchao's default filter only visits Linear layers.)

Semantics of :class:`PolarQuantCache`, per layer:

- **Prefill** (the layer holds no tokens): attention runs in full precision on the incoming K/V;
  afterwards the prompt's K/V are quantized into the cache (all but the last ``residual_length``
  tokens, which stay full precision).
- **Decode / chunked prefill**: the new tokens are appended first, then the queries attend to
  exactly what the cache holds: a quantized prefix plus an optional full-precision tail.
  By default generated tokens stay in 16-bit (the paper's mode; quantizing them before they
  are attended to cost ~9x in KL on SmolLM2); ``quantize_generated=True`` quantizes them too
  (bounded memory for long generations); ``residual_length=N`` keeps the
  most recent N tokens in full precision and quantizes older ones in chunks of ``flush_chunk``.
- Keys and values have separate configs (keys are far more sensitive than values).

The cache hands attention a :class:`~polartensor.PolarQuantTensor` (or a :class:`MixedKV` when a
full-precision tail exists). The "polar" attention function registered here runs our SDPA on
it. A model whose attention is still "sdpa"/"eager" gets dequantized K/V instead (correct, but
it dequantizes the whole cache every step, like transformers' ``QuantizedCache``); a warning
says how to switch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
import types
import warnings
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .._quiet import quiet_imports

with quiet_imports():
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention import combined_mask, with_causal
from ..config import PRESETS, PolarQuantConfig, get_preset
from ..kernels import dispatch
from ..kv_buffer import PolarKVBuffer
from ..polar_quant_tensor import PolarQuantTensor
from ..rotation import rotate, unrotate

try:
    from torchao.core.config import AOBaseConfig
    from torchao.quantization.transform_module import register_quantize_module_handler
except ImportError:  # pragma: no cover - a GPU image without torchao
    from ..config import AOBaseConfig  # type: ignore[attr-defined]

    register_quantize_module_handler = None

__all__ = [
    "ATTENTION_NAME",
    "DEFAULT_KEY_PRESET",
    "DEFAULT_VALUE_PRESET",
    "KV_PRESETS",
    "MixedKV",
    "PolarQuantCache",
    "PolarQuantKVConfig",
    "PolarQuantLayer",
    "attend",
    "disable_polar_kv",
    "enable_polar_kv",
    "polar_attention_forward",
    "polar_kv_filter",
    "quantize_",
    "register",
]

ATTENTION_NAME = "polar"

# The recommended default, in ONE place. Each is a preset name of polartensor.config.PRESETS
# (resolved for the model's head_dim) or a PolarQuantConfig. From the distortion sweep
# (results/distortion/distortion.md, SmolLM2, offline codebooks): keys polar-4 / values polar-3
# is the best pair at a 3.5-bit budget (3.625 b/coord average at head_dim 64, next-token
# KL 0.012 vs the full cache; the paper preset on both costs 3.875 b/coord).
DEFAULT_KEY_PRESET: str | PolarQuantConfig = "polar-4"
DEFAULT_VALUE_PRESET: str | PolarQuantConfig = "polar-3"

# Named key/value pairings: name -> (key preset or config, value preset or config).
# "default" resolves DEFAULT_KEY_PRESET / DEFAULT_VALUE_PRESET at use time; every single
# preset name also names the pairing that uses it for both keys and values.
KV_PRESETS: dict[str, tuple[str | PolarQuantConfig, str | PolarQuantConfig]] = {
    **{name: (name, name) for name in PRESETS},
    # Best (key, value) pair per average bit budget in the distortion sweep.
    "kv-2.5": ("polar-3", "polar-2"),
    "kv-3": ("polar-3.5", "polar-2.5"),
    "kv-3.5": ("polar-4", "polar-3"),
    "kv-4": ("polar-4.5", "polar-3.5"),
}

_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ATTENTION_MODES = ("auto", "polar", "dequantize")
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


# -- configuration --------------------------------------------------------------------------------
ConfigLike = PolarQuantConfig | str


def _check_config_like(cfg, what: str) -> ConfigLike:
    if isinstance(cfg, PolarQuantConfig):
        return cfg
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown preset {cfg!r} for {what}; known presets: {sorted(PRESETS)}")
        return cfg
    raise TypeError(
        f"{what} must be a PolarQuantConfig, a preset name or None, got {type(cfg).__name__}"
    )


def resolve_config(cfg: ConfigLike, head_dim: int | None = None) -> PolarQuantConfig:
    """A PolarQuantConfig from a config or a preset name (presets adapt to ``head_dim``)."""
    if isinstance(cfg, PolarQuantConfig):
        return cfg
    return get_preset(cfg, head_dim)


def kv_preset(name: str) -> tuple[ConfigLike, ConfigLike]:
    """(key, value) presets or configs of a named pairing ("default" or a name in KV_PRESETS)."""
    if name == "default":
        pair = (DEFAULT_KEY_PRESET, DEFAULT_VALUE_PRESET)
    elif name in KV_PRESETS:
        pair = KV_PRESETS[name]
    else:
        raise ValueError(
            f"unknown key/value preset {name!r}; known: {sorted(['default', *KV_PRESETS])} "
            "(or pass key_config=/value_config= with single presets or PolarQuantConfigs)"
        )
    return _check_config_like(pair[0], "key preset"), _check_config_like(pair[1], "value preset")


@dataclasses.dataclass(frozen=True)
class PolarQuantKVConfig(AOBaseConfig):
    """How a model's KV cache is quantized (for :class:`PolarQuantCache` and ``quantize_``).

    key_config / value_config: a PolarQuantConfig or a preset name of
        ``polartensor.config.PRESETS`` (resolved for the model's head_dim); None: the
        recommended default, DEFAULT_KEY_PRESET / DEFAULT_VALUE_PRESET.
    residual_length: the most recent N tokens stay full precision (0: none).
    flush_chunk: tokens leaving the residual window are quantized this many at a time
        (default min(residual_length, 32)).
    quantize_generated: False (the default) is the paper's mode: the prompt is quantized,
        generated tokens are kept in full precision. True quantizes every token before it is
        attended to (bounded memory for long generations, but each token then attends to its
        own quantized key: on SmolLM2 the paper preset's KL rose from 0.025 to 0.229,
        results/eval/ppl). None: True for a static cache (max_cache_len), else False.
    skip_layers: layer indices that keep a plain full-precision cache (dynamic caches only:
        a static cache refuses them).
    online_codebooks: fit each layer's codebooks on its prompt K/V at prefill (the paper's best
        quality; slower prefill) instead of the analytic offline codebooks.
    max_cache_len: a static capacity (what torch.compile / CUDA graphs want); the cache
        then never reallocates and raises when full. Needs residual_length=0 and
        quantize_generated=True.
    attention: "auto" (quantized K/V go to attention when the model uses the "polar"
        attention, else they are dequantized), "polar" (always quantized) or "dequantize".
    """

    key_config: PolarQuantConfig | str | None = None
    value_config: PolarQuantConfig | str | None = None
    residual_length: int = 0
    flush_chunk: int | None = None
    quantize_generated: bool | None = None
    skip_layers: tuple[int, ...] = ()
    online_codebooks: bool = False
    max_cache_len: int | None = None
    attention: str = "auto"

    def __post_init__(self) -> None:
        kc = DEFAULT_KEY_PRESET if self.key_config is None else self.key_config
        vc = DEFAULT_VALUE_PRESET if self.value_config is None else self.value_config
        object.__setattr__(self, "key_config", _check_config_like(kc, "key_config"))
        object.__setattr__(self, "value_config", _check_config_like(vc, "value_config"))
        val = self.residual_length
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {val!r}")
        chunk = self.flush_chunk
        if chunk is None:
            chunk = max(1, min(self.residual_length, 32))
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"flush_chunk must be an int >= 1, got {self.flush_chunk!r}")
        object.__setattr__(self, "flush_chunk", chunk)
        try:
            if isinstance(self.skip_layers, (str, bytes)) or any(
                    isinstance(i, bool) for i in self.skip_layers):
                raise TypeError
            # operator.index: 0.7 or "1" are not layer indices (int() would make them some)
            skip = tuple(sorted({operator.index(i) for i in self.skip_layers}))
        except TypeError as exc:
            raise ValueError(f"skip_layers must be int layer indices, got {self.skip_layers!r}") \
                from exc
        if any(i < 0 for i in skip):
            raise ValueError(f"skip_layers must be non-negative layer indices, got {skip}")
        object.__setattr__(self, "skip_layers", skip)
        # a string such as "False" would read as true: only real booleans are taken
        for name in ("quantize_generated", "online_codebooks"):
            val = getattr(self, name)
            if not (val is None and name == "quantize_generated") and not isinstance(val, bool):
                raise ValueError(f"{name} must be True or False, got {val!r}")
        if self.quantize_generated is None:
            object.__setattr__(self, "quantize_generated", self.max_cache_len is not None)
        if self.max_cache_len is not None:
            n = self.max_cache_len
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"max_cache_len must be a positive int, got {n!r}")
            if self.residual_length or not self.quantize_generated:
                raise ValueError(
                    "a static cache (max_cache_len) quantizes every token: it needs "
                    "residual_length=0 and quantize_generated=True"
                )
            if self.skip_layers:
                # transformers sizes one mask from layer 0 and drops it at decode unless
                # every layer is static: full-precision layers beside static ones would let
                # the static layers attend to their unwritten rows, or fail on the mask size
                raise ValueError(
                    "a static cache (max_cache_len) cannot skip layers (skip_layers="
                    f"{self.skip_layers}): use skip_layers with a dynamic cache "
                    "(max_cache_len=None), or quantize every layer"
                )
        if self.attention not in _ATTENTION_MODES:
            raise ValueError(f"attention must be one of {_ATTENTION_MODES}, got {self.attention!r}")

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> PolarQuantKVConfig:
        """A named key/value pairing (see KV_PRESETS), with any other field overridden."""
        kc, vc = kv_preset(name)
        return cls(**{"key_config": kc, "value_config": vc, **overrides})

    def replace(self, **changes) -> PolarQuantKVConfig:
        return dataclasses.replace(self, **changes)

    def _resolve(self, cfg: ConfigLike, head_dim: int | None) -> PolarQuantConfig:
        out = resolve_config(cfg, head_dim)
        return out.replace(codebook="online") if self.online_codebooks else out

    def key_config_for(self, head_dim: int | None = None) -> PolarQuantConfig:
        """The key PolarQuantConfig for a head_dim (presets adapt their depth to it)."""
        return self._resolve(self.key_config, head_dim)

    def value_config_for(self, head_dim: int | None = None) -> PolarQuantConfig:
        return self._resolve(self.value_config, head_dim)

    def check_head_dims(self, key_head_dim: int, value_head_dim: int | None = None) -> None:
        """Raise a ValueError naming the fix when a head_dim does not fit the configs."""
        value_head_dim = key_head_dim if value_head_dim is None else value_head_dim
        for what, cfg, d in (("key", self.key_config, key_head_dim),
                             ("value", self.value_config, value_head_dim)):
            resolved = resolve_config(cfg, d)
            try:
                resolved.check_head_dim(d)
            except ValueError as exc:
                raise ValueError(f"{what} config {_short(resolved)} does not fit head_dim {d}: "
                                 f"{exc}") from None


def _short(cfg: PolarQuantConfig) -> str:
    return f"(levels={cfg.levels}, bits={cfg.bits}, radius_dtype={cfg.radius_dtype})"


def _resolve_kv_config(config, overrides: dict) -> PolarQuantKVConfig:
    if isinstance(config, PolarQuantKVConfig):
        base = config
    elif config is None:
        base = None
    elif isinstance(config, str):
        base = PolarQuantKVConfig.preset(config)
    elif isinstance(config, PolarQuantConfig):
        # One config for both keys and values.
        base = PolarQuantKVConfig(key_config=config, value_config=config)
    else:
        raise TypeError(
            "config must be a PolarQuantKVConfig, a key/value preset name, a PolarQuantConfig "
            f"(used for keys and values) or None, got {type(config).__name__}"
        )
    if base is None:
        return PolarQuantKVConfig(**overrides)
    return base.replace(**overrides) if overrides else base


# -- keys/values with a full-precision tail -------------------------------------------------------
class MixedKV:
    """One layer's keys (or values) as [quantized prefix | full-precision tail] along seq.

    What :class:`PolarQuantCache` hands the "polar" attention when some cached tokens are not
    quantized (residual window, paper mode). ``dequantize()`` gives the plain tensor.

    ``config`` is the quantized part's PolarQuantConfig. The cache passes it in from the layer:
    under torch.compile a non-tensor attribute of a PolarQuantTensor created inside the
    compiled region cannot be read (Dynamo cannot wrap it), while the layer's config can.
    """

    __slots__ = ("quantized", "tail", "config")

    def __init__(self, quantized: PolarQuantTensor, tail: torch.Tensor,
                 config: PolarQuantConfig | None = None) -> None:
        self.quantized = quantized
        self.tail = tail
        self.config = quantized.config if config is None else config

    @property
    def shape(self) -> torch.Size:
        q = self.quantized.shape
        return torch.Size((*q[:-2], q[-2] + self.tail.shape[-2], q[-1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.tail.dtype

    @property
    def device(self) -> torch.device:
        return self.tail.device

    def dim(self) -> int:
        return self.tail.dim()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        return torch.cat([self.quantized.dequantize(dtype), self.tail.to(dtype)], dim=-2)

    def __repr__(self) -> str:
        return (f"MixedKV(quantized={tuple(self.quantized.shape)}, "
                f"tail={tuple(self.tail.shape)}, dtype={self.dtype})")


def _split(t) -> tuple[PolarQuantTensor | None, torch.Tensor | None]:
    if isinstance(t, MixedKV):
        return t.quantized, t.tail
    if isinstance(t, PolarQuantTensor):
        return t, None
    return None, t


# -- attention -------------------------------------------------------------------------------------
def attend(
    query: torch.Tensor,
    key,
    value,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA of ``query`` [B, Hq, q, D] over keys/values that are plain, quantized or mixed.

    ``is_causal`` is bottom-right aligned (new queries after cached tokens) and may be combined
    with ``attn_mask``. The single call site for attention over the cache: a fused
    "quantized + full-precision tail" kernel runs where the kernels run
    (``polartensor.kernels.dispatch.scaled_dot_product_attention_with_tail``), else the
    PyTorch reference below.
    """
    kq, kt = _split(key)
    vq, vt = _split(value)
    if (kq is None) != (vq is None) or (kt is None) != (vt is None):
        raise TypeError("keys and values must be split the same way (quantized / tail)")
    if kq is None:
        return _plain_sdpa(query, kt, vt, attn_mask, is_causal, scale, enable_gqa, dropout_p)
    if dropout_p:
        raise NotImplementedError("dropout is not supported on a quantized cache (inference only)")
    if kt is None:
        # Routed by PolarQuantTensor.__torch_function__ to polartensor.kernels.dispatch.
        return F.scaled_dot_product_attention(
            query, kq, vq, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    out = dispatch.scaled_dot_product_attention_with_tail(
        query, kq, vq, kt, vt, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, key_config=key.config, value_config=value.config)
    if out is not None:  # the fused kernel took it (CUDA, or CPU under the interpreter)
        return out
    return _reference_with_tail(query, kq, vq, kt, vt, attn_mask, is_causal, scale,
                                key.config, value.config)


def _plain_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa, dropout_p):
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if is_causal and q_len != kv_len:
        # torch's is_causal is top-left aligned; ours is bottom-right.
        attn_mask = with_causal(attn_mask, q_len, kv_len, query.device)
        is_causal = False
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(
        query, key.to(query.dtype), value.to(query.dtype), attn_mask=attn_mask,
        dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs,
    )


def _reference_with_tail(query, kq, vq, kt, vt, attn_mask, is_causal, scale, kcfg, vcfg):
    """Exact joint softmax over [quantized prefix | full-precision tail] (PyTorch reference).

    The quantized part is scored in the rotated domain (rotate the query once) and its
    weighted values are un-rotated once, as in polar_sdpa; the tail is plain attention.
    ``kcfg`` / ``vcfg``: the configs of ``kq`` / ``vq`` (see MixedKV.config).
    """
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    hq, hk = query.shape[-3], kq.shape[-3]
    if hq % hk:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hk}")
    group = hq // hk
    d = query.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = query.to(work)
    q_rot = rotate(q, kcfg.rotation, kcfg.seed)
    k_rot, v_rot = kq.dequantize_rotated(work), vq.dequantize_rotated(work)
    k_t, v_t = kt.to(work), vt.to(work)
    if group > 1:
        k_rot, v_rot, k_t, v_t = (t.repeat_interleave(group, dim=-3)
                                  for t in (k_rot, v_rot, k_t, v_t))
    nq = k_rot.shape[-2]
    scores = torch.cat([q_rot @ k_rot.transpose(-1, -2), q @ k_t.transpose(-1, -2)], dim=-1)
    scores = scores * scale
    kv_len = scores.shape[-1]
    bias = combined_mask(attn_mask, is_causal, q.shape[-2], kv_len, q.device, work)
    if bias is not None:
        scores = scores + bias
    dead = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    p = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    out = unrotate(p[..., :nq] @ v_rot, vcfg.rotation, vcfg.seed) + p[..., nq:] @ v_t
    return out.to(query.dtype)


# The prefill update hands plain K/V to attention; noting the last one lets the "polar"
# attention tell the layer that it is in use (so decode can hand it quantized K/V).
_LAST_PREFILL: list = [None, None]


def _note_prefill(layer: PolarQuantLayer, key_states: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return
    _LAST_PREFILL[0] = weakref.ref(key_states)
    _LAST_PREFILL[1] = weakref.ref(layer)


def _mark_polar(key) -> None:
    if torch.compiler.is_compiling() or _LAST_PREFILL[0] is None:
        return
    if _LAST_PREFILL[0]() is key:
        layer = _LAST_PREFILL[1]()
        if layer is not None and layer.polar_attention is None:
            layer.polar_attention = True
    _LAST_PREFILL[0] = _LAST_PREFILL[1] = None


_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit softcapping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
}


def polar_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function "polar": SDPA over a plain, quantized or mixed cache.

    query [B, Hq, q, D]; key/value [B, Hkv, kv, D] as plain tensors (prefill, skipped layers),
    PolarQuantTensor or MixedKV; attention_mask a bool/additive [B, 1|H, q, kv] mask or None.
    Returns (output [B, q, Hq, D], None).
    """
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"the 'polar' attention does not support {what} ({name}=...); this model "
                "cannot use the PolarQuant cache"
            )
    _mark_polar(key)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 4 and mask.shape[-1] > kv_len:
            # A static cache's mask spans its capacity; during prefill only the prompt's
            # positions (which start at 0) are passed to attention.
            mask = mask[..., :kv_len]
        causal = False
    else:
        causal = bool(is_causal) and q_len > 1
    enable_gqa = query.shape[-3] != key.shape[-3]
    out = attend(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling,
                 enable_gqa=enable_gqa, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def polar_mask(*args, **kwargs):
    """The mask function registered for "polar": transformers' SDPA mask (bool, True = attend).

    Without a registered mask function transformers would build no mask for a custom attention
    name, and padded batches would silently attend to padding.
    """
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the "polar" attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, polar_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, polar_mask)


register()


# -- the full-precision tail -----------------------------------------------------------------------
class _FpTail:
    """A growable full-precision K/V buffer for the tokens not (yet) quantized."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def _ensure(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        if self.k is not None and needed <= self.k.shape[-2]:
            return
        cap = max(needed, 2 * (self.k.shape[-2] if self.k is not None else 0), 16)
        nk = k.new_empty((*k.shape[:-2], cap, k.shape[-1]))
        nv = v.new_empty((*v.shape[:-2], cap, v.shape[-1]))
        if self.length:
            nk[..., : self.length, :].copy_(self.k[..., : self.length, :])
            nv[..., : self.length, :].copy_(self.v[..., : self.length, :])
        self.k, self.v = nk, nv

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[-2]
        end = self.length + t
        self._ensure(k, v, end)
        self.k[..., self.length:end, :].copy_(k)
        self.v[..., self.length:end, :].copy_(v)
        self.length = end

    def view(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.length:
            return None, None
        return self.k[..., : self.length, :], self.v[..., : self.length, :]

    def pop_front(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the oldest ``n`` tokens and return them (copies)."""
        k, v = self.k[..., :n, :].clone(), self.v[..., :n, :].clone()
        rest = self.length - n
        if rest:
            self.k[..., :rest, :].copy_(self.k[..., n: self.length, :].clone())
            self.v[..., :rest, :].copy_(self.v[..., n: self.length, :].clone())
        self.length = rest
        return k, v

    def crop(self, length: int) -> None:
        self.length = max(0, min(self.length, length))

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            index = index.to(self.k.device)
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)

    def nbytes(self) -> int:
        if not self.length:
            return 0
        k, v = self.view()
        return k.numel() * k.element_size() + v.numel() * v.element_size()


# -- cache layer -----------------------------------------------------------------------------------
class PolarQuantLayer(CacheLayerMixin):
    """One attention layer's cache: K and V in PolarKVBuffers (+ a full-precision tail)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, config: PolarQuantKVConfig | None = None, layer_idx: int | None = None):
        super().__init__()
        self.config = config if config is not None else PolarQuantKVConfig()
        self.layer_idx = layer_idx
        self.key_config: PolarQuantConfig | None = None  # resolved for head_dim at first update
        self.value_config: PolarQuantConfig | None = None
        self.residual_length = self.config.residual_length
        self.flush_chunk = self.config.flush_chunk
        self.quantize_generated = self.config.quantize_generated
        self.max_cache_len = self.config.max_cache_len
        self.static = self.max_cache_len is not None
        if self.static:
            self.is_compileable = True
            self.cumulative_length = torch.tensor(0, dtype=torch.long)
        self.polar_attention: bool | None = {
            "auto": None, "polar": True, "dequantize": False}[self.config.attention]
        self._kbuf: PolarKVBuffer | None = None
        self._vbuf: PolarKVBuffer | None = None
        self._tail = _FpTail()
        self._filled = False  # static layers: has the prompt been written?
        self._prompt = False  # dynamic layers: is the prompt still coming (chunked prefill)?
        # static layers: cumulative_length as a host int while every step ran eagerly (None
        # after a compiled one), so that the capacity check costs no device sync
        self._len_host: int | None = 0

    def __repr__(self) -> str:
        return (f"PolarQuantLayer(layer={self.layer_idx}, tokens={self._seq_len_int()}, "
                f"static={self.static}, residual_length={self.residual_length})")

    # -- initialization ----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        where = f" (layer {self.layer_idx})" if self.layer_idx is not None else ""
        for what, t in (("key", key_states), ("value", value_states)):
            if isinstance(t, PolarQuantTensor) or not isinstance(t, torch.Tensor):
                raise TypeError(f"PolarQuantCache.update expects plain {what} tensors{where}")
            if t.dtype not in _MODEL_DTYPES:
                raise TypeError(
                    f"PolarQuantCache supports float16, bfloat16 and float32 K/V; got {what} "
                    f"dtype {t.dtype}{where}. Load the model in one of those dtypes."
                )
            if t.dim() != 4:
                raise ValueError(f"expected {what} states [batch, heads, seq, head_dim], got "
                                 f"shape {tuple(t.shape)}{where}")
        self.config.check_head_dims(key_states.shape[-1], value_states.shape[-1])
        self.key_config = self.config.key_config_for(key_states.shape[-1])
        self.value_config = self.config.value_config_for(value_states.shape[-1])
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        cap = self.max_cache_len or 0
        self._kbuf = PolarKVBuffer(self.key_config, capacity=cap, static=self.static,
                                   dtype=key_states.dtype)
        self._vbuf = PolarKVBuffer(self.value_config, capacity=cap, static=self.static,
                                   dtype=value_states.dtype)
        if self.static:
            self.cumulative_length = self.cumulative_length.to(self.device)
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """K and V of one update agree with each other and with what the layer holds (a
        mismatch would otherwise broadcast into the buffers or split K from V)."""
        where = f" (layer {self.layer_idx})" if self.layer_idx is not None else ""
        want_k = (self.batch_size, self.num_heads, key_states.shape[-2], self.k_head_dim)
        want_v = (self.batch_size, self.num_heads, key_states.shape[-2], self.v_head_dim)
        for what, t, want in (("key", key_states, want_k), ("value", value_states, want_v)):
            if not isinstance(t, torch.Tensor) or isinstance(t, PolarQuantTensor):
                raise TypeError(f"PolarQuantCache.update expects plain {what} tensors{where}")
            if tuple(t.shape) != want:
                raise ValueError(
                    f"PolarQuantCache.update{where}: {what} states of shape {tuple(t.shape)}, "
                    f"expected {list(want)} [batch, heads, new tokens, head_dim] (the cache holds "
                    f"batch {self.batch_size}, {self.num_heads} heads, head_dims "
                    f"{self.k_head_dim}/{self.v_head_dim}; keys and values of the same tokens)"
                )
            if t.device != self.device:
                raise ValueError(f"PolarQuantCache.update{where}: {what} states on {t.device}, "
                                 f"the cache on {self.device}")

    # -- update ------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)
        out_k, out_v = key_states, value_states
        key_states, value_states = key_states.detach(), value_states.detach()  # inference cache
        if self.static:
            return self._update_static(key_states, value_states, out_k, out_v)
        t = key_states.shape[-2]
        if self._seq_len_int() == 0:  # prefill: full-precision attention, then quantize
            keep = min(t, self.residual_length)
            nq = t - keep
            if nq:
                self._kbuf.append(key_states[..., :nq, :])
                self._vbuf.append(value_states[..., :nq, :])
            if keep:
                self._tail.append(key_states[..., nq:, :], value_states[..., nq:, :])
            self._prompt = True
            _note_prefill(self, out_k)
            return out_k, out_v
        if self._prompt and t > 1 and not self.quantize_generated:
            # Until the first one-token step (or a crop, or end_prompt()), multi-token updates
            # are more of the prompt (a chunked prefill): quantized as the first chunk was.
            # Each chunk stays in the tail while it is attended to at full precision (the
            # attention reads the tail in place) and is quantized at the next update.
            self._flush_prompt()
            self._tail.append(key_states, value_states)
            return self._read()
        self.end_prompt()
        if self.residual_length == 0 and self.quantize_generated:
            self._kbuf.append(key_states, check_finite=False)
            self._vbuf.append(value_states, check_finite=False)
        else:
            self._tail.append(key_states, value_states)
            over = self._tail.length - self.residual_length
            if self.quantize_generated and over >= self.flush_chunk:
                self._flush(over)
        return self._read()

    def _flush_prompt(self) -> None:
        over = self._tail.length - self.residual_length
        if over > 0:
            self._flush(over, check_finite=True)

    def end_prompt(self) -> None:
        """The prompt is complete: later multi-token updates are generated (or scored)
        tokens, kept as generated tokens are (``quantize_generated``), not quantized as more
        prompt; the last prompt chunk leaves the tail as the residual window allows."""
        if self._prompt:
            self._flush_prompt()
            self._prompt = False

    def _flush(self, n: int, check_finite: bool = False) -> None:
        k, v = self._tail.pop_front(n)
        self._kbuf.append(k, check_finite=check_finite)
        self._vbuf.append(v, check_finite=check_finite)

    def _quantized_views(self):
        n = self._kbuf.length if (self._kbuf is not None and self._kbuf.initialized) else 0
        if not n:
            return None, None
        return self._kbuf.view(), self._vbuf.view()

    def _read(self):
        kq, vq = self._quantized_views()
        kt, vt = self._tail.view()
        if not self._use_polar():
            return self._dequantized(kq, kt), self._dequantized(vq, vt)
        if kt is None:
            return kq, vq
        if kq is None:
            return kt, vt
        return MixedKV(kq, kt, self.key_config), MixedKV(vq, vt, self.value_config)

    def _dequantized(self, q, tail):
        if self.polar_attention is None:  # "auto" and no "polar" attention seen
            _warn_dequantize()
        if q is None:
            return tail
        dq = q.dequantize(self.dtype)
        return dq if tail is None else torch.cat([dq, tail], dim=-2)

    def _use_polar(self) -> bool:
        return bool(self.polar_attention)

    def _update_static(self, key_states, value_states, out_k, out_v):
        t = key_states.shape[-2]
        compiling = torch.compiler.is_compiling()
        if not self._filled:
            if t > self.max_cache_len:
                raise ValueError(self._full_message(0, t))
            self._kbuf.append(key_states)
            self._vbuf.append(value_states)
            self.cumulative_length.fill_(t)
            self._len_host = None if compiling else t
            self._filled = True
            if not torch.compiler.is_compiling():
                for buf in (self._kbuf, self._vbuf):
                    torch._dynamo.mark_static_address(buf.codes)
                    torch._dynamo.mark_static_address(buf.radii)
                torch._dynamo.mark_static_address(self.cumulative_length)
            _note_prefill(self, out_k)
            return out_k, out_v
        if not compiling:
            # eagerly, past max_cache_len is an error naming it (index_copy_ would fail with a
            # bare index error on the CPU, a device assert on the GPU); compiled steps cannot
            # read the length without breaking the graph
            n = self._len_host if self._len_host is not None else int(self.cumulative_length)
            if n + t > self.max_cache_len:
                raise ValueError(self._full_message(n, t))
        pos = torch.arange(t, device=self.device) + self.cumulative_length
        for buf, x in ((self._kbuf, key_states), (self._vbuf, value_states)):
            # Encode into small temporaries (the fused kernel where it runs), then scatter them
            # at the tensor position: no Python-int offsets, so a compiled step never recompiles.
            codes = buf.codes.new_empty((*buf.codes.shape[:-2], t, buf.codes.shape[-1]))
            radii = buf.radii.new_empty((*buf.radii.shape[:-2], t, buf.radii.shape[-1]))
            dispatch.encode_into(x, buf.config, buf.centroids, codes, radii, check_finite=False)
            # into the first max_cache_len rows only: the storage's spare rows (rounded up to
            # 8 tokens) must not take a token past the end silently
            dim = buf.codes.dim() - 2
            buf.codes.narrow(dim, 0, buf.capacity).index_copy_(dim, pos, codes)
            buf.radii.narrow(dim, 0, buf.capacity).index_copy_(dim, pos, radii)
        self.cumulative_length.add_(t)  # after the writes: a refused token leaves no trace
        self._len_host = None if compiling else n + t
        kq, vq = self._kbuf.view(self.max_cache_len), self._vbuf.view(self.max_cache_len)
        if not self._use_polar():
            if self.polar_attention is None:
                _warn_dequantize()
            return kq.dequantize(self.dtype), vq.dequantize(self.dtype)
        return kq, vq

    def _full_message(self, held: int, new: int) -> str:
        where = f" (layer {self.layer_idx})" if self.layer_idx is not None else ""
        return (f"static PolarQuantCache{where} is full: max_cache_len={self.max_cache_len}, "
                f"{held} tokens held and {new} new; create the cache with a larger "
                "max_cache_len (prompt + generated tokens)")

    # -- sizes -------------------------------------------------------------------------------
    def _seq_len_int(self) -> int:
        if not self.is_initialized:
            return 0
        if self.static:
            return int(self.cumulative_length) if self._filled else 0
        nq = self._kbuf.length if self._kbuf.initialized else 0
        return nq + self._tail.length

    def get_seq_length(self):
        if self.static:
            # A tensor, as in transformers' StaticLayer: reading it would break a compiled graph.
            return self.cumulative_length if (self.is_initialized and self._filled) else 0
        return self._seq_len_int()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self.max_cache_len, 0
        return self._seq_len_int() + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len if self.static else -1

    # -- management --------------------------------------------------------------------------
    def reset(self) -> None:
        if self.static and self.is_initialized:
            self.cumulative_length.zero_()
            self._len_host = 0
            self._kbuf.reset()
            self._vbuf.reset()
            self._filled = False
            return
        self._kbuf = self._vbuf = None
        self._tail = _FpTail()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: remove that many tokens from the end. Positive (transformers <= 5.17
        legacy): keep that many tokens. Zero: nothing."""
        if self.is_initialized and not self.static:
            self.end_prompt()  # a crop (assisted decoding's verification) ends the prompt
        cur = self._seq_len_int()
        if tokens_to_remove == 0 or cur == 0:
            return
        keep = max(cur + tokens_to_remove, 0) if tokens_to_remove < 0 else min(tokens_to_remove,
                                                                                cur)
        if self.static:
            self.cumulative_length.fill_(keep)
            self._len_host = keep
            if keep == 0:
                self._filled = False
                self._kbuf.reset()
                self._vbuf.reset()
            return
        nq = self._kbuf.length if self._kbuf.initialized else 0
        if keep >= nq:
            self._tail.crop(keep - nq)
        else:
            self._tail.crop(0)
            self._kbuf.crop(keep)
            self._vbuf.crop(keep)

    def _reorder(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        if self.static:
            if index.numel() != self.batch_size:
                raise ValueError("a static PolarQuantCache cannot change its batch size")
            if self._kbuf.initialized:
                for buf in (self._kbuf, self._vbuf):
                    buf.codes.copy_(buf.codes.index_select(0, index))
                    buf.radii.copy_(buf.radii.index_select(0, index))
            return
        for buf in (self._kbuf, self._vbuf):
            if buf.initialized:
                buf.reorder(index, dim=0)
        self._tail.reorder(index)
        self.batch_size = int(index.numel())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._reorder(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = torch.as_tensor(indices)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().flatten()
            self._reorder(idx.long())

    def offload(self):
        raise NotImplementedError("PolarQuantCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("PolarQuantCache does not support offloading")

    # -- inspection --------------------------------------------------------------------------
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The K and V the cache holds, as plain tensors [B, H, seq, D] (for tests/debugging)."""
        n = self._seq_len_int()
        if not n:
            return None, None
        if self.static:
            return (self._kbuf.view(n).dequantize(self.dtype),
                    self._vbuf.view(n).dequantize(self.dtype))
        kq, vq = self._quantized_views()
        kt, vt = self._tail.view()
        cat = (lambda q, t: t if q is None else
               (q.dequantize(self.dtype) if t is None else
                torch.cat([q.dequantize(self.dtype), t], dim=-2)))
        return cat(kq, kt), cat(vq, vt)

    def memory_usage(self) -> dict:
        """Bytes held for the cached tokens: quantized keys/values (codes, radii, codebook),
        the full-precision tail, and what a plain (DynamicCache) layer would hold."""
        n = self._seq_len_int()
        if not n:
            return {"tokens": 0, "key_bytes": 0, "value_bytes": 0, "residual_bytes": 0,
                    "total_bytes": 0, "dense_bytes": 0}
        if self.static:
            kb = self._kbuf.view(n).memory_bytes()
            vb = self._vbuf.view(n).memory_bytes()
        else:
            kq, vq = self._quantized_views()
            kb = kq.memory_bytes() if kq is not None else 0
            vb = vq.memory_bytes() if vq is not None else 0
        rb = 0 if self.static else self._tail.nbytes()
        el = torch.empty((), dtype=self.dtype).element_size()
        dense = self.batch_size * self.num_heads * n * (self.k_head_dim + self.v_head_dim) * el
        return {"tokens": n, "key_bytes": kb, "value_bytes": vb, "residual_bytes": rb,
                "total_bytes": kb + vb + rb, "dense_bytes": dense}


_WARNED = {"dequantize": False}


def _warn_dequantize() -> None:
    if _WARNED["dequantize"] or torch.compiler.is_compiling():
        return
    _WARNED["dequantize"] = True
    warnings.warn(
        "PolarQuantCache: the model's attention is not 'polar', so the quantized cache is "
        "dequantized every step (correct but slow). Call "
        "model.set_attn_implementation('polar') (after importing "
        "polartensor.integrations.transformers) or quantize_(model, PolarQuantKVConfig(...)).",
        stacklevel=3,
    )


def _dense_layer_usage(layer: DynamicLayer) -> dict:
    n = layer.get_seq_length() if layer.is_initialized else 0
    if not n:
        return {"tokens": 0, "key_bytes": 0, "value_bytes": 0, "residual_bytes": 0,
                "total_bytes": 0, "dense_bytes": 0}
    b = layer.keys.numel() * layer.keys.element_size() + \
        layer.values.numel() * layer.values.element_size()
    return {"tokens": n, "key_bytes": 0, "value_bytes": 0, "residual_bytes": b,
            "total_bytes": b, "dense_bytes": b}


# -- the cache -------------------------------------------------------------------------------------
class PolarQuantCache(Cache):
    """A transformers ``Cache`` whose layers keep K and V as PolarQuantTensors.

    ``PolarQuantCache()`` uses the recommended default. ``config`` may be a
    :class:`PolarQuantKVConfig`, a key/value preset name ("default", "paper", ...), or a
    PolarQuantConfig used for both keys and values; keyword arguments override fields of
    PolarQuantKVConfig (``key_config=``, ``value_config=``, ``residual_length=``,
    ``quantize_generated=``, ``skip_layers=``, ``online_codebooks=``, ``max_cache_len=``...).
    ``model_config`` (the model's config) creates every layer up front and checks the model;
    otherwise layers are created as they are first updated.
    """

    def __init__(self, config: PolarQuantKVConfig | PolarQuantConfig | str | None = None, *,
                 model_config=None, num_layers: int | None = None, **overrides) -> None:
        self.kv_config = _resolve_kv_config(config, overrides)
        if model_config is not None:
            check_model_config(model_config, self.kv_config)
            text = _text_config(model_config)
            num_layers = text.num_hidden_layers
        layers = [self._make_layer(i) for i in range(num_layers)] if num_layers else []
        super().__init__(layers=layers)

    def _make_layer(self, idx: int):
        if idx in self.kv_config.skip_layers:
            return DynamicLayer()
        return PolarQuantLayer(self.kv_config, layer_idx=idx)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._make_layer(len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def end_prompt(self) -> None:
        """Mark the prompt complete (``PolarQuantLayer.end_prompt``): for callers that feed
        the prompt and then multi-token continuations themselves (scoring), which would
        otherwise count as more prompt until the first one-token step."""
        for layer in self.layers:
            if isinstance(layer, PolarQuantLayer) and layer.is_initialized:
                layer.end_prompt()

    @classmethod
    def from_cache(cls, cache: Cache, config=None, **kwargs) -> PolarQuantCache:
        """A PolarQuantCache holding ``cache``'s K/V (e.g. a DynamicCache after a full-precision
        prefill), quantized as a prefill would: the same as prefilling with this cache.

        No attention ran on it yet, so with ``attention="auto"`` decode hands attention
        dequantized K/V; pass ``attention="polar"`` when the model uses the "polar" attention.
        """
        new = cls(config, **kwargs)
        for i, layer in enumerate(cache.layers):
            if getattr(layer, "is_sliding", False):
                # it holds the last window only: quantized as a prefill, it would stand for
                # the whole prompt and its length would not match the other layers'
                raise ValueError(
                    f"layer {i} of the source cache is a sliding-window layer "
                    f"({type(layer).__name__}), which keeps only its last window of tokens; "
                    "PolarQuantCache.from_cache needs every layer's full K/V (prefill with "
                    "a PolarQuantCache instead)"
                )
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or keys.dim() != 4 or keys.shape[-2] == 0:
                raise ValueError(f"layer {i} of the source cache holds no K/V to quantize")
            new.update(keys, values, i)
        return new

    # -- memory accounting -------------------------------------------------------------------
    def memory_usage(self) -> list[dict]:
        """Per layer: tokens, key/value/residual/total bytes held, and the dense bytes a
        DynamicCache would hold for the same tokens."""
        out = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, PolarQuantLayer):
                row = layer.memory_usage()
                row["quantized"] = True
            else:
                row = _dense_layer_usage(layer)
                row["quantized"] = False
            row["layer"] = i
            out.append(row)
        return out

    def memory_bytes(self) -> int:
        """Total bytes this cache holds for its tokens (all layers)."""
        return sum(r["total_bytes"] for r in self.memory_usage())

    def dense_bytes(self) -> int:
        """Bytes a DynamicCache would hold for the same tokens (model dtype)."""
        return sum(r["dense_bytes"] for r in self.memory_usage())

    def compression_ratio(self) -> float:
        held = self.memory_bytes()
        return self.dense_bytes() / held if held else float("nan")

    def memory_report(self) -> str:
        """A short human-readable summary of the bytes held."""
        rows = self.memory_usage()
        held, dense = self.memory_bytes(), self.dense_bytes()
        n = max((r["tokens"] for r in rows), default=0)
        ratio = dense / held if held else float("nan")
        return (f"PolarQuantCache: {len(rows)} layers, {n} tokens, {_fmt_bytes(held)} held vs "
                f"{_fmt_bytes(dense)} for a DynamicCache ({ratio:.2f}x smaller)")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# -- models ----------------------------------------------------------------------------------------
def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def _head_dims(text) -> tuple[int, int]:
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return hd, getattr(text, "v_head_dim", None) or hd


def check_model_config(config, kv_config: PolarQuantKVConfig | None = None) -> None:
    """Raise a clear error if a transformers model config cannot use the PolarQuant cache."""
    kv_config = kv_config or PolarQuantKVConfig()
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"PolarQuantCache supports decoder-only models; {config.model_type!r} is an "
            "encoder-decoder model"
        )
    text = _text_config(config)
    mt = getattr(text, "model_type", "?")
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if getattr(text, attr, None) is None:
            raise ValueError(f"model type {mt!r} has no {attr} in its config: not a supported "
                             "decoder-only attention model")
    types_ = getattr(text, "layer_types", None) or ()
    bad = sorted({t for t in types_ if t not in _SUPPORTED_LAYER_TYPES})
    if bad:
        raise ValueError(
            f"model type {mt!r} has layer types {bad}; PolarQuantCache supports attention layers "
            f"only ({', '.join(_SUPPORTED_LAYER_TYPES)})"
        )
    if getattr(text, "attn_logit_softcapping", None):
        raise ValueError(
            f"model type {mt!r} uses attention logit softcapping, which the 'polar' attention "
            "does not support"
        )
    if getattr(text, "kv_lora_rank", None):
        raise ValueError(f"model type {mt!r} uses multi-head latent attention (MLA), which the "
                         "PolarQuant cache does not support")
    kd, vd = _head_dims(text)
    kv_config.check_head_dims(kd, vd)
    far = [i for i in kv_config.skip_layers if i >= text.num_hidden_layers]
    if far:
        raise ValueError(f"skip_layers {far} are past model type {mt!r}'s "
                         f"{text.num_hidden_layers} layers (indices 0 to "
                         f"{text.num_hidden_layers - 1})")


def check_model(model, kv_config: PolarQuantKVConfig | None = None) -> None:
    """Raise a clear error if ``model`` cannot use the PolarQuant cache and "polar" attention."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise TypeError(
            f"expected a transformers generative model (PreTrainedModel with generate()), got "
            f"{type(model).__name__}"
        )
    check_model_config(config, kv_config)
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' "
            "AttentionInterface, so the 'polar' attention cannot be plugged in"
        )


def _cache_kwarg() -> str:
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


CACHE_KWARG = _cache_kwarg()  # "cache" from transformers 5.2x on, "past_key_values" before


def _polar_generate(self, *args, **kwargs):
    cfg = getattr(self, "_polar_kv_config", None)
    given = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
    gen_cfg = kwargs.get("generation_config") or self.generation_config
    use_cache = kwargs.get("use_cache", getattr(gen_cfg, "use_cache", True))
    impl = kwargs.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))
    if cfg is not None and not given and use_cache is not False and impl is None:
        kwargs[CACHE_KWARG] = PolarQuantCache(cfg, model_config=self.config)
    return type(self).generate(self, *args, **kwargs)


def enable_polar_kv(model, config: PolarQuantKVConfig | str | None = None):
    """Make ``model`` use the PolarQuant cache and the "polar" attention (in place).

    After this, a plain ``model.generate(...)`` creates a fresh PolarQuantCache per call (an
    explicit cache or ``cache_implementation`` passed to generate still wins).
    """
    kv = _resolve_kv_config(config, {})
    check_model(model, kv)
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    model._polar_kv_config = kv
    model.generate = types.MethodType(_polar_generate, model)
    return model


def disable_polar_kv(model, attn_implementation: str = "sdpa"):
    """Undo :func:`enable_polar_kv`: plain caches and ``attn_implementation`` again."""
    model.__dict__.pop("generate", None)
    model.__dict__.pop("_polar_kv_config", None)
    model.set_attn_implementation(attn_implementation)
    return model


def polar_kv_filter(module: torch.nn.Module, fqn: str = "") -> bool:
    """torchao ``filter_fn`` that hands :class:`PolarQuantKVConfig` the whole model."""
    return fqn == "" and hasattr(module, "generate") and hasattr(module, "config")


def quantize_(model, config: PolarQuantKVConfig | None = None):
    """torchao-style one-liner: ``quantize_(model, PolarQuantKVConfig(...))``."""
    return enable_polar_kv(model, config if config is not None else PolarQuantKVConfig())


def _transform(module: torch.nn.Module, config: PolarQuantKVConfig) -> torch.nn.Module:
    if not (hasattr(module, "generate") and hasattr(module, "config")):
        raise TypeError(
            "PolarQuantKVConfig applies to a whole transformers model, but torchao handed it a "
            f"{type(module).__name__} (its default filter visits Linear layers only). Use "
            "torchao.quantization.quantize_(model, PolarQuantKVConfig(), "
            "filter_fn=polar_kv_filter) or polartensor.integrations.transformers.quantize_("
            "model, PolarQuantKVConfig())"
        )
    return enable_polar_kv(module, config)


if register_quantize_module_handler is not None:
    register_quantize_module_handler(PolarQuantKVConfig)(_transform)


def generate_kwargs(cache: Cache) -> dict:
    """``{name: cache}`` with the keyword this transformers version's generate/forward uses."""
    return {CACHE_KWARG: cache}


def iter_polar_layers(cache: Cache) -> Iterable[PolarQuantLayer]:
    return (layer for layer in cache.layers if isinstance(layer, PolarQuantLayer))
