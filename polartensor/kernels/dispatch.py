"""Routes attention on PolarQuantTensors to a Triton kernel or the PyTorch reference."""

from __future__ import annotations

import torch

from ..attention import polar_sdpa

__all__ = ["scaled_dot_product_attention"]


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
    return polar_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


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
    from ..polar_quant_tensor import quantize

    q = quantize(x, config, centroids=centroids, check_finite=check_finite)
    codes_out.copy_(q.codes)
    radii_out.copy_(q.radii)
