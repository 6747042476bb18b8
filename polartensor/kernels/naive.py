"""The pure-PyTorch references each kernel must equal (kept in one place for the tests).

- encode / append (``encode.py``): :func:`encode_reference` = ``quantize`` (float64 rotation,
  polar transform, nearest-centroid codes, ``pack_codes``).
- decode and chunked-prefill attention (``decode_attention.py``, ``prefill_attention.py``):
  :func:`attention_reference` = ``polar_sdpa`` (rotate q, score rotated keys, un-rotate the
  output; bottom-right causal; fully masked rows give zeros).
- dequantize (``dequant.py``): :func:`dequantize_rotated_reference`.
"""

from __future__ import annotations

import torch

from ..attention import polar_sdpa as attention_reference
from ..polar_quant_tensor import PolarQuantTensor, quantize

__all__ = ["encode_reference", "attention_reference", "dequantize_rotated_reference"]


def encode_reference(x: torch.Tensor, config, centroids: torch.Tensor | None = None):
    """(codes uint8 [..., R], radii [..., NB]) exactly as the reference quantizer makes them."""
    q = quantize(x, config, centroids=centroids)
    return q.codes, q.radii


def dequantize_rotated_reference(t: PolarQuantTensor, dtype=torch.float32) -> torch.Tensor:
    return t.dequantize_rotated(dtype)
