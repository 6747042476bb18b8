"""Shared test settings: hypothesis profiles and device selection.

Tests run unchanged on the CPU (Triton kernels under TRITON_INTERPRET=1, small shapes) and on
a CUDA GPU (large shapes). ``DEVICE`` is "cuda" when a GPU is visible, else "cpu".
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. It must be set before triton is
# imported, which happens when polartensor.kernels loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

# Same settings on both; the GPU takes larger shapes and more examples by default.
for _name, _examples in (("ci", "25"), ("gpu", "60")):
    settings.register_profile(
        _name,
        max_examples=int(os.environ.get("POLARTENSOR_EXAMPLES", _examples)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=True,
        print_blob=True,
    )
settings.load_profile("gpu" if torch.cuda.is_available() else "ci")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


@pytest.fixture
def device() -> str:
    return DEVICE
