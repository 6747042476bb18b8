"""Silence known-harmless import noise from torchao under a CPU-only torch."""

from __future__ import annotations

import contextlib
import logging
import warnings

__all__ = ["quiet_imports"]

# torchao logs "Failed to load <.so>" for its optional CUDA extensions on a CPU-only torch, and
# its modules (also imported by transformers) register an Enum with torch's pytree, which
# logs a deprecation warning; the Python APIs work regardless.
_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports():
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
