"""PolarQuantTensor: a K or V cache tensor held as packed polar angle codes and block radii.

Logical shape ``[..., head_dim]`` (for a cache ``[batch, kv_heads, seq, head_dim]``). Inner
tensors: ``codes`` uint8 ``[..., record_bytes]`` (all levels of one head vector, one record per
token, so appending tokens is a contiguous write), ``radii`` ``[..., head_dim / 2**levels]`` in
``config.radius_dtype``, and ``centroids`` float32 ``[levels, 2**max(bits)]`` (the codebook,
shared by every vector of the tensor). Values are stored in the rotated domain y = S x.
"""

from __future__ import annotations

import functools

import torch
from torchao.utils import TorchAOBaseTensor

from .codebook import fit_online_codebook, offline_codebook
from .config import PolarQuantConfig, as_config
from .packing import pack_codes, unpack_codes
from .polar import decode_rotated, encode_rotated, polar_angles
from .rotation import rotate, unrotate

__all__ = ["PolarQuantTensor", "quantize", "fit_codebook", "codebook_for"]

aten = torch.ops.aten
_FP16_MAX = torch.finfo(torch.float16).max
_BF16_MAX = torch.finfo(torch.bfloat16).max
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PolarQuantTensor(TorchAOBaseTensor):
    tensor_data_names = ["codes", "radii", "centroids"]
    tensor_attribute_names = ["config", "shape", "dtype"]

    def __new__(cls, codes, radii, centroids, config, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=codes.device, requires_grad=False
        )

    def __init__(self, codes, radii, centroids, config, shape, dtype):
        super().__init__()
        self.codes = codes
        self.radii = radii
        self.centroids = centroids
        self.config = config

    # A short repr: the default one prints every inner tensor, and a data-dependent repr
    # breaks AOT compile.
    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"PolarQuantTensor(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, levels={cfg.levels}, bits={cfg.bits}, "
            f"radius_dtype={cfg.radius_dtype}, codebook={cfg.codebook}, "
            f"rotation={cfg.rotation}, bits_per_coordinate="
            f"{cfg.bits_per_coordinate(self.shape[-1]):.4g})"
        )

    @property
    def head_dim(self) -> int:
        return self.shape[-1]

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_hp(
        cls,
        x: torch.Tensor,
        config: PolarQuantConfig | str | None = None,
        centroids: torch.Tensor | None = None,
        check_finite: bool = True,
    ) -> PolarQuantTensor:
        """Quantize a high-precision tensor whose last dim is the head dim."""
        config = _config_for(x, config)
        _check_input(x, config, check_finite)
        # not differentiable: the codes and radii hold no autograd graph
        x = x.detach()
        d = x.shape[-1]
        # Encode in float64: codes then depend on x alone, not on how a matmul was blocked,
        # so quantize(cat(a, b)) == cat(quantize(a), quantize(b)) exactly.
        y = rotate(x.to(torch.float64), config.rotation, config.seed)
        if centroids is None:
            centroids = codebook_for(config, y_rotated=y)
        centroids = _check_centroids(centroids, config, x.device)
        codes, radii = encode_rotated(y, config, centroids)
        if check_finite and not torch.compiler.is_compiling():
            _check_radius_range(radii, config)
        packed = pack_codes(codes, config, d)
        return cls(packed, radii.to(config.torch_radius_dtype), centroids, config,
                   x.shape, x.dtype)

    def unpack(self) -> list[torch.Tensor]:
        """Integer angle codes per level, [..., head_dim >> l] each."""
        return unpack_codes(self.codes, self.config, self.head_dim)

    def dequantize_rotated(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """y_hat = S x_hat: the reconstruction still in the rotated domain."""
        return decode_rotated(self.unpack(), self.radii, self.config, self.centroids, dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A plain tensor in the original domain, in ``dtype`` (default: the logical dtype)."""
        dtype = dtype or self.dtype
        if dtype not in _INPUT_DTYPES:
            raise TypeError(f"dequantize gives float16/bfloat16/float32/float64, not {dtype}; "
                            "convert the result instead, e.g. q.dequantize().to(dtype)")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        y = self.dequantize_rotated(work)
        return unrotate(y, self.config.rotation, self.config.seed).to(dtype)

    # -- accounting ------------------------------------------------------------------------
    def memory_bytes(self, include_codebook: bool = True) -> int:
        """Bytes of the codes and radii this tensor covers (+ its codebook table)."""
        n = self.codes.numel() * self.codes.element_size()
        n += self.radii.numel() * self.radii.element_size()
        if include_codebook:
            n += self.centroids.numel() * self.centroids.element_size()
        return n

    def storage_bytes(self) -> int:
        """Bytes actually allocated under this tensor (a view of a larger buffer counts all)."""
        return sum(
            t.untyped_storage().nbytes() for t in (self.codes, self.radii, self.centroids)
        )

    def _with(self, codes: torch.Tensor, radii: torch.Tensor) -> PolarQuantTensor:
        shape = torch.Size((*codes.shape[:-1], self.head_dim))
        return PolarQuantTensor(codes, radii, self.centroids, self.config, shape, self.dtype)

    # Any op without an implementation below fails here with a message that names the fix.
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        table = cls._ATEN_OP_TABLE.get(cls, {})
        if func in table:
            return table[func](func, types, args, kwargs)
        raise NotImplementedError(
            f"PolarQuantTensor does not support {func}: call .dequantize() to get a plain "
            "tensor first. Supported natively: detach, clone, to(device), slice/select/narrow "
            "on non-last dims, cat along non-last dims, index_select (beam reorder), copy_, "
            "contiguous, and F.scaled_dot_product_attention."
        )


implements = PolarQuantTensor.implements
implements_torch_function = PolarQuantTensor.implements_torch_function


# -- input checks ------------------------------------------------------------------------------
def _check_input(x: torch.Tensor, config: PolarQuantConfig, check_finite: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if isinstance(x, PolarQuantTensor):
        raise TypeError("tensor is already a PolarQuantTensor; dequantize() it first to requantize")
    if not x.is_floating_point() or x.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"quantize expects a floating-point tensor (float16/bfloat16/float32/float64), got "
            f"{x.dtype}; convert with x.float()"
        )
    if x.dim() == 0:
        raise ValueError("quantize expects at least one dim: the last dim is the head dim")
    config.check_head_dim(x.shape[-1])
    if check_finite and x.numel() and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                "input has NaN or Inf values; PolarQuant cannot represent them. Fix the source "
                "or pass check_finite=False (non-finite vectors then decode to NaN)."
            )


def _check_radius_range(radii: torch.Tensor, config: PolarQuantConfig) -> None:
    limit = {"float16": _FP16_MAX, "bfloat16": _BF16_MAX}.get(config.radius_dtype)
    if limit is None or radii.numel() == 0:
        return
    peak = float(radii.max())
    if peak > limit:
        raise ValueError(
            f"a block radius of {peak:.4g} overflows radius_dtype={config.radius_dtype} (max "
            f"{limit:.4g}); use radius_dtype='float32' (or 'bfloat16') or rescale the input"
        )


def _check_centroids(c: torch.Tensor, config: PolarQuantConfig, device) -> torch.Tensor:
    from .codebook import codebook_size

    want = (config.levels, codebook_size(config))
    if tuple(c.shape) != want or c.dtype != torch.float32:
        raise ValueError(
            f"centroids must be float32 of shape {want} for this config, got {c.dtype} "
            f"{tuple(c.shape)}"
        )
    return c.to(device)


# -- codebooks ---------------------------------------------------------------------------------
_OFFLINE_CACHE: dict = {}


def codebook_for(config: PolarQuantConfig, y_rotated: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The centroid table for ``config``: the cached analytic one, or one fitted on
    ``y_rotated`` (already-rotated vectors) for ``codebook='online'``."""
    dev = torch.device(
        device if device is not None else (y_rotated.device if y_rotated is not None else "cpu")
    )
    if config.codebook == "online":
        if y_rotated is None or y_rotated.numel() == 0:
            raise ValueError(
                "codebook='online' fits its codebook on data: pass the vectors to quantize or "
                "a fitted table (fit_codebook(x, config))"
            )
        angles, weights, _ = polar_angles(y_rotated.to(torch.float64), config.levels)
        return fit_online_codebook(angles, weights, config).to(dev)
    # Cached per device too, so quantize() on CUDA does not copy the table host-to-device on
    # every call.
    key = (config.levels, config.bits, dev)
    if key not in _OFFLINE_CACHE:
        _OFFLINE_CACHE[key] = offline_codebook(config).to(dev)
    return _OFFLINE_CACHE[key]


def _config_for(x, config: PolarQuantConfig | str | None) -> PolarQuantConfig:
    """``config`` as a PolarQuantConfig; a preset name resolves its levels for x's head dim."""
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return as_config(config, x.shape[-1])
    return as_config(config)


def fit_codebook(x: torch.Tensor, config: PolarQuantConfig | str | None = None
                 ) -> torch.Tensor:
    """Fit an online codebook on sample vectors ``x`` (e.g. a layer's keys at prefill);
    ``config`` as for :func:`quantize`."""
    config = _config_for(x, config)
    _check_input(x, config, check_finite=True)
    y = rotate(x, config.rotation, config.seed)
    return codebook_for(config.replace(codebook="online"), y_rotated=y, device=x.device)


def quantize(
    x: torch.Tensor,
    config: PolarQuantConfig | str | None = None,
    centroids: torch.Tensor | None = None,
    check_finite: bool = True,
) -> PolarQuantTensor:
    """Quantize ``x`` (last dim = head dim) to a :class:`PolarQuantTensor`.

    ``centroids``: a codebook table to reuse (e.g. the one of the cache being appended to).
    ``check_finite``: raise on NaN/Inf inputs and on radii that overflow ``radius_dtype``
    (skipped under torch.compile, where a data-dependent check would break the graph).
    """
    return PolarQuantTensor.from_hp(x, config, centroids, check_finite)


# -- layout ops --------------------------------------------------------------------------------
def _data_dim(t: PolarQuantTensor, dim: int, op: str) -> int:
    nd = t.dim()
    d = dim + nd if dim < 0 else dim
    if not 0 <= d < nd:
        raise IndexError(f"{op}: dim {dim} out of range for a {nd}-d PolarQuantTensor")
    if d == nd - 1:
        raise NotImplementedError(
            f"{op} along the head dim is not supported: a head vector is quantized as a whole. "
            "Call .dequantize() first."
        )
    return d


@implements(aten.slice.Tensor)
def _slice(func, types, args, kwargs):
    self, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
    dim = kwargs.get("dim", dim)
    start, end, step = kwargs.get("start", start), kwargs.get("end", end), kwargs.get("step", step)
    d = _data_dim(self, dim, "slice")
    return self._with(
        aten.slice.Tensor(self.codes, d, start, end, step),
        aten.slice.Tensor(self.radii, d, start, end, step),
    )


@implements(aten.select.int)
def _select(func, types, args, kwargs):
    self, dim, index = args
    d = _data_dim(self, dim, "select")
    return self._with(self.codes.select(d, index), self.radii.select(d, index))


@implements(aten.index_select.default)
def _index_select(func, types, args, kwargs):
    self, dim, index = args
    d = _data_dim(self, dim, "index_select")
    index = index.to(self.codes.device)
    return self._with(self.codes.index_select(d, index), self.radii.index_select(d, index))


def _same_codebook(a: PolarQuantTensor, b: PolarQuantTensor) -> bool:
    # Values, not the config's codebook kind: quantize(centroids=...) takes any table for an
    # offline config too. Tensors from one table share it, so the usual check is identity.
    if a.config != b.config or a.head_dim != b.head_dim:
        return False
    if a.centroids is b.centroids:
        return True
    return bool(torch.equal(a.centroids, b.centroids.to(a.centroids.device)))


@implements(aten.cat.default)
def _cat(func, types, args, kwargs):
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not all(isinstance(t, PolarQuantTensor) for t in tensors):
        raise TypeError(
            "cat mixes PolarQuantTensor with plain tensors: quantize() them with the same "
            "config (and centroids) first, or dequantize() the quantized ones"
        )
    first = tensors[0]
    d = _data_dim(first, dim, "cat")
    for t in tensors[1:]:
        if t.dim() != first.dim():
            raise ValueError("cat: PolarQuantTensors must have the same number of dims")
        if not _same_codebook(first, t):
            raise ValueError(
                "cat: PolarQuantTensors have different configs or codebooks; quantize both with "
                "the same config and pass centroids=first.centroids (any table but the "
                "config's offline one: fitted, online or given)"
            )
    out = first._with(
        torch.cat([t.codes for t in tensors], d), torch.cat([t.radii for t in tensors], d)
    )
    # the logical dtype promotes as torch.cat's would
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    if dtype == first.dtype:
        return out
    return PolarQuantTensor(out.codes, out.radii, out.centroids, out.config, out.shape, dtype)


@implements(aten.copy_.default)
def _copy_(func, types, args, kwargs):
    self, src = args[0], args[1]
    if not isinstance(self, PolarQuantTensor):
        raise TypeError(
            "copy_ from a PolarQuantTensor into a plain tensor: copy its dequantize() instead, "
            "dst.copy_(src.dequantize())"
        )
    if not isinstance(src, PolarQuantTensor):
        raise TypeError(
            "copy_ of a plain tensor into a PolarQuantTensor: quantize it with the destination's "
            "codebook first, dst.copy_(quantize(src, dst.config, centroids=dst.centroids))"
        )
    if src.shape != self.shape:
        raise ValueError(
            f"copy_: shapes differ ({tuple(src.shape)} into {tuple(self.shape)}); a "
            "PolarQuantTensor is copied whole, without broadcasting"
        )
    if not _same_codebook(self, src):
        # The table is shared by every view of the destination (and an offline one by every
        # tensor of its config), so it is never overwritten: codes of another table would
        # decode wrongly here, and a new table would change tensors this copy never named.
        raise ValueError(
            "copy_: the PolarQuantTensors have different configs or codebooks; requantize the "
            "source with the destination's, quantize(src.dequantize(), dst.config, "
            "centroids=dst.centroids)"
        )
    self.codes.copy_(src.codes)
    self.radii.copy_(src.radii)
    return self


@implements(aten._to_copy.default)
def _to_copy(func, types, args, kwargs):
    self = args[0]
    device = kwargs.get("device", self.device)
    dtype = kwargs.get("dtype", None) or self.dtype
    if dtype not in _INPUT_DTYPES:
        raise TypeError(f"a PolarQuantTensor's logical dtype must be float16, bfloat16, float32 "
                        f"or float64, got {dtype}")
    nb = kwargs.get("non_blocking", False)
    return PolarQuantTensor(
        self.codes.to(device, non_blocking=nb), self.radii.to(device, non_blocking=nb),
        self.centroids.to(device, non_blocking=nb), self.config, self.shape, dtype,
    )


torch.serialization.add_safe_globals([PolarQuantTensor, PolarQuantConfig])
