"""The KV-cache methods compared side by side: a registry of cache factories + bit accounting.

Method names (``make_method(name)``):

- ``full``: transformers' DynamicCache (full precision, the reference);
- ``quanto-2``, ``quanto-4``, ``hqq-2``, ``hqq-4``: transformers' ``QuantizedCache`` with its
  optimum-quanto / HQQ backends at its defaults (q_group_size 64, residual_length 128, axis 0);
- ``kivi-2``, ``kivi-4``: our KIVI-style reimplementation (:mod:`polartensor.eval.kivi`);
- ``polar:<preset>`` (same preset for keys and values), ``polar:<key>/<value>`` and
  ``polar:default`` (the recommended key/value pairing of the transformers integration),
  with optional suffixes ``+online`` (online codebooks), ``+r<N>`` (N most recent prompt tokens
  in full precision), ``+hadamard`` / ``+permuted_hadamard`` (that rotation instead of the
  preset's random orthogonal one; see :mod:`polartensor.rotation`), ``+s<N>`` (rotation seed N
  instead of the preset's, to tell a rotation kind from one draw of it) and ``+qgen`` (see
  below), e.g. ``polar:paper``, ``polar:polar-4/polar-3``, ``polar:polar-3+permuted_hadamard``.

PolarQuant runs in the paper's mode by default (``quantize_generated=False``): the prompt /
context is quantized, tokens appended after it (a scored chunk, a question, generated tokens)
stay in full precision, so a scored chunk attends to a quantized context and to itself in full
precision, as with the other caches here. ``+qgen`` quantizes appended tokens before they are
attended to as well (the integration's default; a harsher setting).

Bits per element: every cache is measured after it holds the context, as the bits its format
stores divided by the logical K+V elements: integer codes at their bit width, and every
floating-point part (scales, zero points, radii, full-precision windows, the full cache itself)
at 16 bits (the half-precision storage of a GPU deployment; the CPU runs here compute in fp32).
PolarQuant codebook tables (a few hundred bytes per layer) are counted too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache

from ..config import PRESETS
from .kivi import KIVICache

__all__ = [
    "BASELINES",
    "Method",
    "available_methods",
    "cache_bits",
    "describe_cache",
    "make_method",
    "polar_method_names",
    "set_attention",
]

BASELINES = ("full", "quanto-2", "quanto-4", "hqq-2", "hqq-4", "kivi-2", "kivi-4")
FP_BITS = 16


@dataclasses.dataclass
class Method:
    """A named way to hold the KV cache: ``new_cache(model)`` gives a fresh transformers Cache."""

    name: str
    family: str
    label: str
    attn_implementation: str
    factory: Callable[[torch.nn.Module], Cache]
    details: dict = dataclasses.field(default_factory=dict)

    def new_cache(self, model: torch.nn.Module) -> Cache:
        return self.factory(model)

    def prepare(self, model: torch.nn.Module) -> None:
        """Switch ``model`` to the attention implementation this method needs."""
        set_attention(model, self.attn_implementation)


def set_attention(model: torch.nn.Module, impl: str) -> None:
    if impl == "polar":
        from ..integrations import transformers as polar_tf

        polar_tf.register()
    if getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)


def polar_method_names() -> list[str]:
    """``polar:default`` and ``polar:<preset>`` for every preset in polartensor.config.PRESETS."""
    return ["polar:default"] + [f"polar:{p}" for p in PRESETS]


def available_methods() -> list[str]:
    return list(BASELINES) + polar_method_names()


def _quantized_cache(backend: str, nbits: int) -> Callable:
    def factory(model):
        return QuantizedCache(backend=backend, config=model.config, nbits=nbits)
    return factory


_POLAR_RE = re.compile(r"^polar:(?P<spec>[^+]+)(?P<opts>(\+[a-z0-9_]+)*)$")


def _polar_method(name: str) -> Method:
    m = _POLAR_RE.match(name)
    if not m:
        raise ValueError(f"bad PolarQuant method {name!r}; expected polar:<preset>[/<preset>]"
                         "[+online][+r<N>][+hadamard|+permuted_hadamard][+s<N>][+qgen]")
    from ..integrations import transformers as polar_tf

    spec = m.group("spec")
    opts = [o for o in m.group("opts").split("+") if o]
    residual, online, qgen, rotation, seed = 0, False, False, None, None
    for o in opts:
        if o == "online":
            online = True
        elif o in ("hadamard", "permuted_hadamard"):
            rotation = o
        elif o == "qgen":
            qgen = True
        elif re.fullmatch(r"r\d+", o):
            residual = int(o[1:])
        elif re.fullmatch(r"s\d+", o):
            seed = int(o[1:])
        else:
            raise ValueError(f"unknown option +{o} in {name!r} (known: +online, +r<N>, "
                             "+hadamard, +permuted_hadamard, +s<N>, +qgen)")
    if spec == "default":
        key, value = polar_tf.DEFAULT_KEY_PRESET, polar_tf.DEFAULT_VALUE_PRESET
    elif "/" in spec:
        key, value = spec.split("/", 1)
    elif spec in getattr(polar_tf, "KV_PRESETS", {}) and spec not in PRESETS:
        key, value = polar_tf.KV_PRESETS[spec]
    else:
        key = value = spec
    for p in (key, value):
        # checked here, not at the first request after the model has loaded
        if isinstance(p, str) and p not in PRESETS:
            raise ValueError(f"unknown preset {p!r} in {name!r}; known presets: "
                             f"{sorted(PRESETS)}, pairings: "
                             f"{sorted(['default', *getattr(polar_tf, 'KV_PRESETS', {})])}")

    def resolve(p, head_dim):
        from ..config import get_preset

        cfg = get_preset(p, head_dim) if isinstance(p, str) else p
        if rotation:
            cfg = dataclasses.replace(cfg, rotation=rotation)
        return dataclasses.replace(cfg, seed=seed) if seed is not None else cfg

    def factory(model):
        text = model.config.get_text_config(decoder=True)
        hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return polar_tf.PolarQuantCache(
            key_config=resolve(key, hd), value_config=resolve(value, hd),
            residual_length=residual, online_codebooks=online, attention="polar",
            quantize_generated=qgen,
        )

    def _name(p):
        return p if isinstance(p, str) else "custom"

    label = f"PolarQuant {_name(key)}" if key == value else \
        f"PolarQuant K {_name(key)} / V {_name(value)}"
    if spec == "default":
        label = f"PolarQuant default (K {_name(key)} / V {_name(value)})"
    if online:
        label += " online"
    if rotation:
        label += " " + rotation.replace("_", " ").replace("hadamard", "Hadamard")
    if seed is not None:
        label += f" seed {seed}"
    if residual:
        label += f" +{residual} fp"
    if qgen:
        label += " (appended tokens quantized)"
    return Method(name, "polarquant", label, "polar", factory,
                  {"key": _name(key), "value": _name(value), "residual_length": residual,
                   "online_codebooks": online, "quantize_generated": qgen,
                   "rotation": rotation or "preset's",
                   "seed": "preset's" if seed is None else seed})


def make_method(name: str) -> Method:
    """A :class:`Method` by name (see the module docstring for the names)."""
    if name == "full":
        return Method(name, "full", "full precision (DynamicCache)", "sdpa",
                      lambda model: DynamicCache(config=model.config))
    m = re.fullmatch(r"(quanto|hqq)-(\d)", name)
    if m:
        backend, nbits = m.group(1), int(m.group(2))
        label = f"QuantizedCache {'quanto' if backend == 'quanto' else 'HQQ'} int{nbits}"
        return Method(name, backend, label, "sdpa", _quantized_cache(backend, nbits),
                      {"backend": backend, "nbits": nbits, "q_group_size": 64,
                       "residual_length": 128, "axis": 0})
    m = re.fullmatch(r"kivi-(\d)", name)
    if m:
        nbits = int(m.group(1))
        return Method(name, "kivi", f"KIVI-{nbits} (our reimpl.)", "sdpa",
                      lambda model: KIVICache(nbits=nbits),
                      {"nbits": nbits, "key_group_tokens": 32, "value_group_channels": 32,
                       "residual_length": 128})
    if name.startswith("polar:"):
        return _polar_method(name)
    raise ValueError(f"unknown method {name!r}; known: {available_methods()} "
                     "(and polar:<key>/<value>[+online][+r<N>])")


# -- bits per element -------------------------------------------------------------------------
def _tensor_bits(t, fp_bits: int = FP_BITS) -> int:
    """Bits held by a (possibly subclassed) tensor: floats at ``fp_bits``, ints as stored."""
    if t is None:
        return 0
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bits(getattr(t, n), fp_bits) for n in names)
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return 0
    per = fp_bits if t.is_floating_point() else t.element_size() * 8
    return t.numel() * per


def _layer_bits(layer, fp_bits: int) -> tuple[int, int]:
    from transformers.cache_utils import QuantizedLayer

    from .kivi import KIVILayer

    if not getattr(layer, "is_initialized", False):
        return 0, 0
    if isinstance(layer, KIVILayer):
        return layer.memory_bits(fp_bits)
    if isinstance(layer, QuantizedLayer):
        bits = 0
        elements = 0
        for q in (layer._quantized_keys, layer._quantized_values):
            if isinstance(q, tuple):  # HQQ: (packed codes, meta)
                codes, meta = q
                bits += _tensor_bits(codes, fp_bits)
                bits += sum(_tensor_bits(v, fp_bits) for v in meta.values()
                            if isinstance(v, torch.Tensor))
                elements += int(torch.Size(meta["shape"]).numel())
            else:
                bits += _tensor_bits(q, fp_bits)
                elements += q.numel()
        resid = [t for t in (layer.keys, layer.values) if t is not None and t.dim() == 4]
        bits += sum(t.numel() * fp_bits for t in resid)
        elements += sum(t.numel() for t in resid)
        return bits, elements
    if type(layer).__name__ == "PolarQuantLayer":
        use = layer.memory_usage()
        el = torch.empty((), dtype=layer.dtype).element_size()
        n = use["tokens"]
        elements = layer.batch_size * layer.num_heads * n * (layer.k_head_dim + layer.v_head_dim)
        bits = 8 * (use["key_bytes"] + use["value_bytes"]) + use["residual_bytes"] // el * fp_bits
        return bits, elements
    # plain full-precision layer (DynamicLayer, skipped layers)
    k, v = layer.keys, layer.values
    n = (k.numel() if k is not None else 0) + (v.numel() if v is not None else 0)
    return n * fp_bits, n


def describe_cache(cache: Cache) -> dict:
    """The resolved quantizer settings of a cache (for results files)."""
    kv = getattr(cache, "kv_config", None)
    if kv is not None:
        def cfg(c):
            return {"levels": c.levels, "bits": list(c.bits), "radius_dtype": c.radius_dtype,
                    "codebook": c.codebook, "rotation": c.rotation}

        return {"key": cfg(kv.key_config), "value": cfg(kv.value_config),
                "residual_length": kv.residual_length,
                "quantize_generated": kv.quantize_generated}
    return {}


def cache_bits(cache: Cache, fp_bits: int = FP_BITS) -> dict:
    """Bits per K/V element the cache holds now (format bits incl. metadata / elements)."""
    bits = elements = 0
    for layer in cache.layers:
        b, e = _layer_bits(layer, fp_bits)
        bits, elements = bits + b, elements + e
    return {"bits_per_element": bits / elements if elements else float("nan"),
            "bits": bits, "elements": elements}
