"""Evaluation helpers: cache methods side by side, bit accounting, KL / perplexity, needles,
LongBench-format runs. Needs the ``eval`` extra (transformers; matplotlib for plots)."""

from .methods import (  # noqa: F401
    BASELINES,
    Method,
    available_methods,
    cache_bits,
    make_method,
    polar_method_names,
)
