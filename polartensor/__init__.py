"""polartensor: PolarQuant KV-cache quantization (Han et al., arXiv 2502.02617) as a
torchao-style quantized tensor subclass for PyTorch."""

from __future__ import annotations

import logging as _logging
import warnings as _warnings


def _quiet_torchao_import() -> None:
    # torchao logs "Failed to load <.so>" for its optional CUDA extensions on a CPU-only torch
    # and warns about an Enum registration; its Python API works regardless.
    names = ("torchao", "torch.utils._pytree")
    loggers = [_logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(_logging.ERROR)
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            import torchao  # noqa: F401
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_quiet_torchao_import()

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
