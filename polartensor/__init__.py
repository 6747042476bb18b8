"""polartensor: PolarQuant KV-cache quantization (Han et al., arXiv 2502.02617) as a
torchao-style quantized tensor subclass for PyTorch."""

from __future__ import annotations

from ._quiet import quiet_imports as _quiet_imports

with _quiet_imports():
    import torchao  # noqa: F401

from .attention import causal_mask, polar_sdpa  # noqa: E402
from .config import PRESETS, PolarQuantConfig, get_preset  # noqa: E402
from .kv_buffer import PolarKVBuffer  # noqa: E402
from .polar_quant_tensor import PolarQuantTensor, fit_codebook, quantize  # noqa: E402
from .serialization import load_safetensors, save_safetensors  # noqa: E402

__all__ = [
    "PolarQuantConfig",
    "PolarQuantTensor",
    "PolarKVBuffer",
    "load_safetensors",
    "save_safetensors",
    "PRESETS",
    "causal_mask",
    "fit_codebook",
    "get_preset",
    "polar_sdpa",
    "quantize",
]
__version__ = "0.1.0"
