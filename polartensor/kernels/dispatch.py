"""Routes attention and encode on PolarQuantTensors to the Triton kernels or the reference.

Triton runs when the tensors are on CUDA, or on CPU tensors when TRITON_INTERPRET=1 (how CI
runs the kernels). Everything else, and any combination the kernels do not take (float64
queries, head dims that are not powers of two in 16..256, one of K/V not quantized, masks that
do not broadcast), goes to the pure-PyTorch reference, which stays the CPU path. Argument
validation always runs first (``attention.validate_sdpa_args``), so bad calls get the same
clear errors on every path.
"""

from __future__ import annotations

import math
import os

import torch

from ..attention import polar_sdpa, validate_sdpa_args

__all__ = ["scaled_dot_product_attention", "scaled_dot_product_attention_with_tail",
           "encode_into", "use_triton", "force_reference"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FORCE_REFERENCE = [False]


class force_reference:
    """Context manager: route everything to the reference (for tests and baselines)."""

    def __enter__(self):
        self._old = _FORCE_REFERENCE[0]
        _FORCE_REFERENCE[0] = True

    def __exit__(self, *exc):
        _FORCE_REFERENCE[0] = self._old


def use_triton(device: torch.device) -> bool:
    if _FORCE_REFERENCE[0] or os.environ.get("POLARTENSOR_REFERENCE", "0") == "1":
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        from .common import check_interpreter

        check_interpreter()
        return True
    return False


def _kernels_available() -> bool:
    try:
        from . import ops  # noqa: F401  (registers the torch.library ops)
    except ImportError:  # pragma: no cover - triton is installed with torch on CUDA
        return False
    return True


# -- small cached tables (skipped under torch.compile, where they are traced instead) ----------
_TABLES: dict = {}


def _cached(kind: str, t: torch.Tensor, extra, fn):
    # Keyed by the tensor object, and the entry holds it: a key by data_ptr() went stale when
    # the caching allocator handed a freed table's address to a new codebook (seen on CUDA as
    # wrong, run-to-run different attention outputs).
    if torch.compiler.is_compiling():
        return fn()
    key = (kind, id(t), extra)
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not t or hit[1] != t._version:
        if len(_TABLES) > 256:
            _TABLES.clear()
        hit = _TABLES[key] = (t, t._version, fn())
    return hit[2]


def _trig(centroids: torch.Tensor, bits=None) -> torch.Tensor:
    from .common import trig_table

    bits = None if bits is None else tuple(bits)
    return _cached("trig", centroids, bits, lambda: trig_table(centroids, bits))


def _mids(centroids: torch.Tensor, config) -> torch.Tensor:
    from .common import boundary_table

    return _cached("mids", centroids, config.bits, lambda: boundary_table(centroids, config,
                                                                     torch.float64))


# -- attention -------------------------------------------------------------------------------
def _kernel_mask(attn_mask, batch_shape, hq, tq, n):
    """attn_mask broadcast to [B, Hq, Tq, N] (a view where possible), or None if it can't."""
    if attn_mask is None:
        return None, True
    if not (attn_mask.dtype == torch.bool or attn_mask.dtype in _KERNEL_DTYPES):
        return None, False
    try:
        m = attn_mask.expand(*batch_shape, hq, tq, n)
    except RuntimeError:
        return None, False
    return m.reshape(-1, hq, tq, n), True


def _flat_storage(t: torch.Tensor, hk: int, n: int) -> torch.Tensor:
    t = t.reshape(-1, hk, n, t.shape[-1])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    from ..polar_quant_tensor import PolarQuantTensor
    from .common import supported_head_dim

    validate_sdpa_args(query, key, value, attn_mask, dropout_p, enable_gqa)
    ok = (
        use_triton(query.device)
        and isinstance(key, PolarQuantTensor) and isinstance(value, PolarQuantTensor)
        and query.dtype in _KERNEL_DTYPES
        and supported_head_dim(query.shape[-1])
        # the kernels take one head dim for Q, K and V (SDPA allows V's to differ)
        and value.shape[-1] == query.shape[-1]
        and key.config.levels <= 8 and value.config.levels <= 8
        and key.shape[-2] > 0 and query.numel() > 0
        and _kernels_available()
    )
    if ok:
        hq, tq = query.shape[-3:-1]
        mask, ok = _kernel_mask(attn_mask, query.shape[:-3], hq, tq, key.shape[-2])
    if not ok:
        return polar_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    return _attention_op(query, key, value, key.config, value.config, None, None, mask,
                         is_causal, scale)


def _attention_op(query, key, value, kc, vc, k_tail, v_tail, mask, is_causal, scale):
    """Run ``polartensor::attention`` for validated arguments: ``query`` [..., Hq, Tq, D],
    quantized ``key``/``value`` with configs ``kc``/``vc``, optional tails already rotated
    and flattened to [B, Hk, NT, D], ``mask`` from :func:`_kernel_mask`."""
    hq, tq, d = query.shape[-3:]
    hk, n = key.shape[-3], key.shape[-2]
    q = query.reshape(-1, hq, tq, d)
    if q.stride(-1) != 1:
        q = q.contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.ops.polartensor.attention(
        q,
        _flat_storage(key.codes, hk, n), _flat_storage(key.radii, hk, n),
        _trig(key.centroids, kc.bits),
        _flat_storage(value.codes, hk, n), _flat_storage(value.radii, hk, n),
        _trig(value.centroids, vc.bits),
        None, None, k_tail, v_tail, mask, bool(is_causal), scale, list(kc.bits),
        list(vc.bits), kc.rotation, kc.seed, vc.rotation, vc.seed,
    )
    return out.reshape(query.shape)


def scaled_dot_product_attention_with_tail(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_tail: torch.Tensor,
    value_tail: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    key_config=None,
    value_config=None,
) -> torch.Tensor | None:
    """Attention over [quantized ``key``/``value`` | full-precision ``key_tail``/``value_tail``]
    (the transformers cache's default: quantized prompt, 16-bit generated tokens) in one
    kernel pass with a joint softmax; ``attn_mask`` broadcasts to [..., Hq, Tq, N + NT].

    ``key_config`` / ``value_config``: the configs of ``key`` / ``value`` when the caller has
    them (under torch.compile a config attribute of a PolarQuantTensor made inside the compiled
    region cannot be read). Returns None when the kernels cannot take the call (CPU without
    the interpreter, float64, head_dim, shapes, mask): the caller then runs its reference."""
    from ..polar_quant_tensor import PolarQuantTensor
    from ..rotation import rotate
    from .common import supported_head_dim

    if not (use_triton(query.device)
            and isinstance(key, PolarQuantTensor) and isinstance(value, PolarQuantTensor)
            and query.dtype in _KERNEL_DTYPES and query.dim() >= 3
            and supported_head_dim(query.shape[-1])
            and key_tail.is_floating_point() and value_tail.is_floating_point()
            and key_tail.device == query.device and value_tail.device == query.device
            and key.shape[:-2] == key_tail.shape[:-2] == value_tail.shape[:-2]
            and key_tail.shape[-2] == value_tail.shape[-2]
            and key.shape[-1] == key_tail.shape[-1] == value_tail.shape[-1] == query.shape[-1]
            and key.shape[-2] > 0 and query.shape[:-3] == key.shape[:-3]
            and value.shape[-1] == query.shape[-1] and query.numel() > 0
            and _kernels_available()):
        return None
    hq, tq, d = query.shape[-3:]
    hk, n, nt = key.shape[-3], key.shape[-2], key_tail.shape[-2]
    if hq % hk or (hq != hk and not enable_gqa):
        return None
    batch_shape = query.shape[:-3]
    mask, ok = _kernel_mask(attn_mask, batch_shape, hq, tq, n + nt)
    if not ok:
        return None
    kc = key.config if key_config is None else key_config
    vc = value.config if value_config is None else value_config
    if kc.levels > 8 or vc.levels > 8:
        return None
    # The kernel takes the tail in the rotated domain of its K / V (an empty tail: none).
    kt = vt = None
    if nt:
        flat = (math.prod(batch_shape), hk, nt, d)
        kt = rotate(key_tail.to(torch.float32), kc.rotation, kc.seed).reshape(flat)
        vt = rotate(value_tail.to(torch.float32), vc.rotation, vc.seed).reshape(flat)
        kt, vt = kt.contiguous(), vt.contiguous()
    return _attention_op(query, key, value, kc, vc, kt, vt, mask, is_causal, scale)


# -- encode ----------------------------------------------------------------------------------
def encode_into(
    x: torch.Tensor,
    config,
    centroids: torch.Tensor,
    codes_out: torch.Tensor,
    radii_out: torch.Tensor,
    check_finite: bool = True,
) -> None:
    """Quantize ``x`` [..., T, D] and write codes/radii into the given (view) buffers.

    Only the new tokens are touched: old tokens in the surrounding storage are not copied.
    """
    from ..polar_quant_tensor import _check_input, quantize
    from .common import supported_head_dim

    ok = (
        use_triton(x.device)
        and isinstance(x, torch.Tensor) and x.dtype in _KERNEL_DTYPES
        and x.dim() >= 2 and x.numel() > 0
        and supported_head_dim(x.shape[-1]) and config.levels <= 8
        and codes_out.device == x.device and radii_out.device == x.device
        and _kernels_available()
    )
    if not ok:
        q = quantize(x, config, centroids=centroids, check_finite=check_finite)
        codes_out.copy_(q.codes)
        radii_out.copy_(q.radii)
        return
    _check_input(x, config, check_finite)
    centroids = centroids.to(x.device)
    torch.ops.polartensor.encode_into(
        x, None, _mids(centroids, config), codes_out, radii_out, list(config.bits),
        config.rotation, config.seed,
    )
    if (check_finite and config.radius_dtype != "float32" and radii_out.numel()
            and not torch.compiler.is_compiling()):
        if not bool(torch.isfinite(radii_out).all()):
            raise ValueError(
                f"a block radius overflows radius_dtype={config.radius_dtype}; use "
                "radius_dtype='float32' (or 'bfloat16') or rescale the input"
            )
