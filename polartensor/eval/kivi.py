"""A KIVI-style KV cache: our reimplementation, for baselines (KIVI ships no installable package).

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv
2402.02750) quantizes keys per channel and values per token, with asymmetric (min/max) integer
quantization, and keeps the most recent tokens in full precision. This module follows that
recipe; it is *not* the authors' code and its numbers are labelled "KIVI (our reimpl.)".

- keys: per channel, in groups of ``group_size`` tokens (one fp16 scale and zero per channel
  per group of 32 tokens, so a group is quantized only once it is complete);
- values: per token, in groups of ``value_group_size`` channels (one fp16 scale and zero each);
- the most recent ``residual_length`` tokens (and the incomplete key group) stay in full
  precision; older tokens are quantized ``group_size`` at a time as they leave the window.

Storage is simulated: the cache keeps the dequantized values (exactly what the integer codes
with fp16 scale and zero decode to), and :meth:`KIVICache.memory_bits` counts what the packed
format would hold (codes at ``nbits`` each + fp16 scale/zero + the full-precision window).
Prefill attention runs in full precision, as in every quantized cache of transformers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["KIVICache", "KIVILayer", "quantize_groups"]


def quantize_groups(x: torch.Tensor, nbits: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max quantization of ``x`` with one (scale, zero) per slice along ``dim``.

    The statistics are reduced over ``dim`` (the group), stored in fp16 like KIVI's, and the
    dequantized tensor is returned in ``x.dtype``.
    """
    levels = (1 << nbits) - 1
    xf = x.float()
    mn = xf.amin(dim=dim, keepdim=True).half().float()
    mx = xf.amax(dim=dim, keepdim=True)
    scale = ((mx - mn) / levels).clamp(min=1e-8).half().float().clamp(min=1e-8)
    q = torch.round((xf - mn) / scale).clamp_(0, levels)
    return (q * scale + mn).to(x.dtype)


def _quantize_values(v: torch.Tensor, nbits: int, group: int) -> torch.Tensor:
    """Per-token quantization of values [B, H, T, D] in groups of ``group`` channels."""
    b, h, t, d = v.shape
    g = group if d % group == 0 else d
    return quantize_groups(v.reshape(b, h, t, d // g, g), nbits, dim=-1).reshape(b, h, t, d)


class KIVILayer(DynamicLayer):
    """One attention layer: quantized prefix (dequantized storage) + full-precision window."""

    is_croppable = False

    def __init__(self, nbits: int = 2, group_size: int = 32, residual_length: int = 128,
                 value_group_size: int = 32) -> None:
        super().__init__()
        if nbits < 1 or nbits > 8:
            raise ValueError(f"nbits must be in 1..8, got {nbits}")
        if group_size < 1 or residual_length < 0 or value_group_size < 1:
            raise ValueError("group_size and value_group_size must be >= 1, residual_length >= 0")
        self.nbits = nbits
        self.group_size = group_size
        self.residual_length = residual_length
        self.value_group_size = value_group_size
        self.qkeys: torch.Tensor | None = None
        self.qvalues: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.qkeys = key_states.new_zeros(b, h, 0, d)
        self.qvalues = value_states.new_zeros(b, h, 0, value_states.shape[-1])

    @property
    def quantized_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.shape[-2]

    def _flush(self) -> None:
        g = self.group_size
        n = ((self.keys.shape[-2] - self.residual_length) // g) * g
        if n <= 0:
            return
        k, v = self.keys[..., :n, :], self.values[..., :n, :]
        b, h, _, d = k.shape
        # keys: per channel over each group of g tokens
        kq = quantize_groups(k.reshape(b, h, n // g, g, d), self.nbits, dim=-2)
        vq = _quantize_values(v, self.nbits, self.value_group_size)
        self.qkeys = torch.cat([self.qkeys, kq.reshape(b, h, n, d)], dim=-2)
        self.qvalues = torch.cat([self.qvalues, vq], dim=-2)
        self.keys = self.keys[..., n:, :].contiguous()
        self.values = self.values[..., n:, :].contiguous()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        prefill = not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._flush()
        if prefill:  # full-precision attention over the prompt; it is stored quantized
            return key_states, value_states
        return (torch.cat([self.qkeys, self.keys], dim=-2),
                torch.cat([self.qvalues, self.values], dim=-2))

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_length + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        super().reorder_cache(beam_idx)
        idx = beam_idx.to(self.qkeys.device)
        self.qkeys = self.qkeys.index_select(0, idx)
        self.qvalues = self.qvalues.index_select(0, idx)

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None

    def memory_bits(self, fp_bits: int = 16) -> tuple[int, int]:
        """(bits the packed format holds, logical K+V elements) for this layer."""
        if not self.is_initialized:
            return 0, 0
        b, h, nq, d = self.qkeys.shape
        dv = self.qvalues.shape[-1]
        vg = self.value_group_size if dv % self.value_group_size == 0 else dv
        key_bits = b * h * nq * d * self.nbits + b * h * (nq // self.group_size) * d * 2 * 16
        val_bits = b * h * nq * dv * self.nbits + b * h * nq * (dv // vg) * 2 * 16
        resid = self.keys.numel() + self.values.numel()
        elements = b * h * nq * (d + dv) + resid
        return key_bits + val_bits + resid * fp_bits, elements


class KIVICache(Cache):
    """KIVI-style cache (our reimplementation) for every layer of a model.

    ``KIVICache(nbits=2)``: 2-bit keys per channel in groups of 32 tokens, 2-bit values per
    token (groups of 32 channels), the most recent 128 tokens in full precision.
    """

    def __init__(self, nbits: int = 2, group_size: int = 32, residual_length: int = 128,
                 value_group_size: int = 32, num_layers: int | None = None) -> None:
        self.kivi_kwargs = dict(nbits=nbits, group_size=group_size,
                                residual_length=residual_length, value_group_size=value_group_size)
        layers = [KIVILayer(**self.kivi_kwargs) for _ in range(num_layers or 0)]
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(KIVILayer(**self.kivi_kwargs))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory_bits(self, fp_bits: int = 16) -> tuple[int, int]:
        bits = elements = 0
        for layer in self.layers:
            b, e = layer.memory_bits(fp_bits)
            bits, elements = bits + b, elements + e
        return bits, elements
