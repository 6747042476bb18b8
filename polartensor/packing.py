"""Bit packing of per-level angle codes into one little-endian bit stream per head vector.

Record layout (what the kernels read): level 1's codes first, then level 2's, ...; code ``j``
of level ``l`` occupies bits ``offset_l + j * bits_l`` .. ``+ bits_l - 1``, bit ``k`` of the
stream being bit ``k % 8`` of byte ``k // 8``. A code may straddle two bytes; a reader takes
the 16-bit window starting at its byte. Unused tail bits are zero.
"""

from __future__ import annotations

import math

import torch

from ._tracing import tracing
from .config import PolarQuantConfig

__all__ = ["pack_codes", "unpack_codes"]


def pack_codes(
    codes: list[torch.Tensor], config: PolarQuantConfig, head_dim: int
) -> torch.Tensor:
    """Pack ``codes[l]`` (shape [..., head_dim >> (l+1)], ints < 2**bits[l]) into uint8 records."""
    nbytes = config.record_bytes(head_dim)
    lead = codes[0].shape[:-1]
    streams = []
    for c, b in zip(codes, config.bits):
        if b == 0:
            continue
        shifts = torch.arange(b, device=c.device, dtype=torch.int32)
        bits = (c.to(torch.int32).unsqueeze(-1) >> shifts) & 1
        streams.append(bits.reshape(*lead, c.shape[-1] * b).to(torch.uint8))
    stream = torch.cat(streams, dim=-1) if streams else codes[0].new_zeros(*lead, 0)
    pad = nbytes * 8 - stream.shape[-1]
    if pad:
        stream = torch.cat([stream, stream.new_zeros(*lead, pad)], dim=-1)
    weights = (1 << torch.arange(8, device=stream.device, dtype=torch.int32))
    packed = (stream.reshape(*lead, nbytes, 8).to(torch.int32) * weights).sum(-1)
    return packed.to(torch.uint8)


_PLANS: dict = {}


def _unpack_plan(config: PolarQuantConfig, head_dim: int, device: torch.device):
    """Per level: (angles, bits, bit offset, byte index and shift of every code) -- the last two
    for 16-bit window reads.

    Cached per device in eager mode; under torch.compile (or fake tensors) it is built in the
    graph (a few aranges that Inductor folds), since a cached real tensor is not a fake tensor.
    """
    compiling = tracing()
    key = (config, head_dim, device)
    plan = None if compiling else _PLANS.get(key)
    if plan is None:
        plan = []
        for n, b, off in zip(config.angles_per_level(head_dim), config.bits,
                             config.level_bit_offsets(head_dim)):
            pos = off + torch.arange(n, dtype=torch.int64, device=device) * b
            plan.append((n, b, off, pos >> 3, (pos & 7).to(torch.int32)))
        if not compiling:
            if len(_PLANS) >= 128:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def unpack_codes(
    packed: torch.Tensor, config: PolarQuantConfig, head_dim: int
) -> list[torch.Tensor]:
    """Inverse of :func:`pack_codes`: int64 codes per level, shape [..., head_dim >> l].

    Byte-aligned levels are read as words of whole bytes (no gathers); the others from the
    16-bit little-endian window at each code's first byte, as the kernels do.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    lead = packed.shape[:-1]
    wide = None
    out = []
    for n, b, off, byte, shift in _unpack_plan(config, head_dim, packed.device):
        if b == 0:
            out.append(torch.zeros(*lead, n, dtype=torch.int64, device=packed.device))
            continue
        g = 8 // math.gcd(8, b)  # codes per word of whole bytes
        wb = g * b // 8
        if off % 8 == 0 and n % g == 0 and wb <= 7:
            # Byte-aligned level (every level with >= 8 angles at power-of-two head_dims):
            # whole words of g codes, no gathers -- the same reads as the kernels' words.
            words = packed[..., off // 8: off // 8 + n * b // 8].reshape(*lead, n // g, wb)
            words = words.to(torch.int64)
            if wb > 1:
                sh = 8 * torch.arange(wb, device=packed.device, dtype=torch.int64)
                words = (words << sh).sum(-1)
            else:
                words = words[..., 0]
            sh = b * torch.arange(g, device=packed.device, dtype=torch.int64)
            codes = (words.unsqueeze(-1) >> sh) & ((1 << b) - 1)
            out.append(codes.reshape(*lead, n))
            continue
        if wide is None:
            # One zero byte of padding so the window of a code in the last byte stays in bounds.
            wide = torch.cat([packed, packed.new_zeros(*lead, 1)], dim=-1).to(torch.int32)
        window = wide.index_select(-1, byte) | (wide.index_select(-1, byte + 1) << 8)
        out.append(((window >> shift) & ((1 << b) - 1)).to(torch.int64))
    return out
