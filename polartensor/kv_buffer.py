"""A growable (or static) quantized K or V buffer: append tokens without copying old ones.

Storage is preallocated with capacity along the sequence dim; an append encodes only the new
tokens and writes them at the current length. When capacity runs out it grows geometrically,
so each token is copied O(1) times amortized, to a capacity that is a multiple of 8 tokens
(each head's run of records then starts 16-byte aligned, which the Gluon decode's staged
ring needs to copy them). ``static=True`` never reallocates (what torch.compile and CUDA
graphs want), holds the capacity asked for and raises past it (its storage is rounded up to
8 tokens all the same, for the ring; the spare rows are never written). ``view()`` is a
PolarQuantTensor of the filled part that shares the storage (no copy).
"""

from __future__ import annotations

import math

import torch

from .config import PolarQuantConfig, as_config
from .kernels import dispatch
from .polar_quant_tensor import PolarQuantTensor, codebook_for, fit_codebook

__all__ = ["PolarKVBuffer"]

# a growable buffer's capacity is a multiple of this many tokens (the module docstring)
CAPACITY_MULTIPLE = 8


def _round_capacity(n: int) -> int:
    return -(-n // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


class PolarKVBuffer:
    def __init__(
        self,
        config: PolarQuantConfig | str | None = None,
        capacity: int = 0,
        static: bool = False,
        growth: float = 2.0,
        centroids: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth > 1.0):
            raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0 (tokens), got {capacity!r}")
        if static and capacity <= 0:
            raise ValueError("a static buffer needs capacity > 0 (the maximum sequence length)")
        # A preset name resolves its levels for the head dim at the first append.
        self._config_spec = config
        self.config = as_config(config) if not isinstance(config, str) else None
        self.capacity = capacity
        self.static = static
        self.growth = growth
        self.centroids = centroids
        self.dtype = dtype
        self.length = 0
        self.codes: torch.Tensor | None = None
        self.radii: torch.Tensor | None = None
        self._lead: tuple[int, ...] | None = None
        self._head_dim: int | None = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.codes is not None

    def _allocate(self, lead: tuple[int, ...], head_dim: int, capacity: int, device) -> None:
        # storage rows a multiple of 8 tokens whatever the capacity (the module docstring)
        cfg, rows = self.config, _round_capacity(capacity)
        self.codes = torch.zeros(*lead, rows, cfg.record_bytes(head_dim), dtype=torch.uint8,
                                 device=device)
        self.radii = torch.zeros(*lead, rows, cfg.num_blocks(head_dim),
                                 dtype=cfg.torch_radius_dtype, device=device)
        self.capacity = capacity

    def _grow(self, needed: int) -> None:
        if self.static:
            raise RuntimeError(
                f"static PolarKVBuffer is full: capacity {self.capacity}, need {needed}; "
                "create it with a larger capacity (the maximum sequence length)"
            )
        new_cap = _round_capacity(max(needed, math.ceil(self.capacity * self.growth), 16))
        old_codes, old_radii = self.codes, self.radii
        self._allocate(self._lead, self._head_dim, new_cap, old_codes.device)
        n = self.length
        self.codes[..., :n, :].copy_(old_codes[..., :n, :])
        self.radii[..., :n, :].copy_(old_radii[..., :n, :])

    # -- append / read -------------------------------------------------------------------------
    def append(self, x: torch.Tensor, check_finite: bool = True) -> PolarQuantTensor:
        """Quantize ``x`` [..., T, head_dim] and append it; return the view of all tokens."""
        if x.dim() < 2:
            raise ValueError(f"append expects [..., seq, head_dim], got shape {tuple(x.shape)}")
        lead, t, d = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
        if not self.initialized:
            if self.config is None:
                self.config = as_config(self._config_spec, d)
            self.config.check_head_dim(d)
            if self.centroids is None:
                if self.config.codebook == "online":
                    self.centroids = fit_codebook(x, self.config)
                else:
                    self.centroids = codebook_for(self.config, device=x.device)
            self.centroids = self.centroids.to(x.device)
            self._lead, self._head_dim = lead, d
            self.dtype = self.dtype or x.dtype
            if self.static and t > self.capacity:
                raise RuntimeError(
                    f"static PolarKVBuffer of capacity {self.capacity} cannot take {t} tokens; "
                    "create it with a larger capacity (the maximum sequence length)"
                )
            cap = max(self.capacity, t)
            self._allocate(lead, d, cap if self.static else _round_capacity(cap), x.device)
        elif lead != self._lead or d != self._head_dim:
            raise ValueError(
                f"append shape {tuple(x.shape)} does not match the buffer's "
                f"[{', '.join(map(str, self._lead))}, seq, {self._head_dim}]"
            )
        elif x.device != self.codes.device:
            raise ValueError(f"append on {x.device} but the buffer lives on {self.codes.device}")
        end = self.length + t
        if end > self.capacity:
            self._grow(end)
        dispatch.encode_into(
            x, self.config, self.centroids,
            self.codes[..., self.length:end, :], self.radii[..., self.length:end, :],
            check_finite=check_finite,
        )
        self.length = end
        return self.view()

    def view(self, length: int | None = None) -> PolarQuantTensor:
        """The first ``length`` tokens (default: those appended) as a PolarQuantTensor that
        shares the storage."""
        if not self.initialized:
            raise RuntimeError("the buffer is empty: append() tokens first")
        n = self.length if length is None else length
        # up to the capacity: a static cache writes decode tokens past ``length`` itself (at
        # tensor positions); rows never written hold zeros (zero vectors)
        if not 0 <= n <= self.capacity:
            raise ValueError(f"view of {length} tokens: the buffer has {self.length} appended and "
                             f"a capacity of {self.capacity} (ask for 0 to {self.capacity})")
        codes, radii = self.codes[..., :n, :], self.radii[..., :n, :]
        shape = torch.Size((*codes.shape[:-1], self._head_dim))
        return PolarQuantTensor(codes, radii, self.centroids, self.config, shape, self.dtype)

    # -- cache management ----------------------------------------------------------------------
    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (negative: drop that many from the end)."""
        n = self.length + length if length < 0 else length
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a buffer of {self.length} tokens to {length}")
        self.length = n

    def reorder(self, index: torch.Tensor, dim: int = 0) -> None:
        """Reorder along a leading dim in place (beam search): ``dim`` a dim of the view's
        [*leading, seq, head_dim] shape (negative from its end), one of the leading dims (the
        batch and head dims of a [batch, heads, seq, head_dim] cache); ``index`` is 1-D."""
        if not self.initialized:
            return
        nd = len(self._lead)
        d = dim + nd + 2 if dim < 0 else dim
        if not 0 <= d < nd:
            raise IndexError(
                f"reorder dim {dim}: the buffer's leading dims are {list(self._lead)} (dims 0 to "
                f"{nd - 1}); the sequence and head dims cannot be reordered (use crop)"
            )
        if index.dim() != 1:
            raise ValueError(f"reorder index must be 1-D, got shape {tuple(index.shape)}")
        index = index.to(self.codes.device)
        dim = d
        self.codes = self.codes.index_select(dim, index)
        self.radii = self.radii.index_select(dim, index)
        self._lead = tuple(self.codes.shape[:-2])

    def reset(self) -> None:
        """Forget all tokens but keep the allocation (and the codebook) for reuse."""
        self.length = 0

    def memory_bytes(self) -> int:
        """Bytes of codes and radii for the tokens held (plus the codebook table)."""
        return self.view().memory_bytes() if self.initialized else 0

    def allocated_bytes(self) -> int:
        """Bytes allocated, spare capacity included."""
        if not self.initialized:
            return 0
        return (self.codes.numel() + self.radii.numel() * self.radii.element_size()
                + self.centroids.numel() * 4)
