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
    dev = codes[0].device
    # int32 bytes plus spill room for the window writes of unaligned codes; bit ranges of the
    # codes are disjoint, so adding a code's bits equals or-ing them in.
    rec = torch.zeros(*lead, nbytes + 2, dtype=torch.int32, device=dev)
    for c, n, b, off in zip(codes, config.angles_per_level(head_dim), config.bits,
                            config.level_bit_offsets(head_dim)):
        if b == 0 or n == 0:
            continue
        c = c.to(torch.int64)
        g = 8 // math.gcd(8, b)  # codes per word of whole bytes
        wb = g * b // 8
        if off % 8 == 0 and n % g == 0 and wb <= 7:
            # Byte-aligned level: whole words of g codes, written as wb bytes each.
            sh = b * torch.arange(g, device=dev, dtype=torch.int64)
            words = (c.reshape(*lead, n // g, g) << sh).sum(-1)
            by = (words.unsqueeze(-1) >> (8 * torch.arange(wb, device=dev, dtype=torch.int64)))
            rec[..., off // 8: off // 8 + n * b // 8] = (by & 255).reshape(
                *lead, n * b // 8).to(torch.int32)
            continue
        pos = off + torch.arange(n, device=dev, dtype=torch.int64) * b
        v = c << (pos & 7)  # the code in its window of up to three bytes
        for k in range((b + 7 + 7) // 8):
            rec.index_add_(-1, (pos >> 3) + k, ((v >> (8 * k)) & 255).to(torch.int32))
    return rec[..., :nbytes].to(torch.uint8)


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
