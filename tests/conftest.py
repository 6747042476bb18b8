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


@pytest.fixture
def reference_on_cpu(monkeypatch):
    """Without a GPU, route attention and encode to the pure-PyTorch reference
    (POLARTENSOR_REFERENCE=1, read at every call and passed on to subprocesses). For tests of
    what sits around the kernels (lm-eval, the cache methods): under the interpreter the
    kernels cost minutes there, and the kernel tests already hold them equal to the
    reference. On a GPU nothing changes: the same tests run the kernels."""
    if not ON_GPU:
        monkeypatch.setenv("POLARTENSOR_REFERENCE", "1")


# -- logs written as tests finish (a run cut off by a time limit still says what failed) --------
# POLARTENSOR_FAILLOG=<file>: each failure's test id and traceback, appended when it happens.
# POLARTENSOR_TESTLOG=<file>: one line per finished test: outcome, seconds, test id.
# Under pytest-xdist the controller receives every report; workers do not write.
def pytest_runtest_logreport(report):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    fail_log = os.environ.get("POLARTENSOR_FAILLOG")
    test_log = os.environ.get("POLARTENSOR_TESTLOG")
    if fail_log and report.failed:
        with open(fail_log, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
    if test_log and (report.when == "call" or (report.when == "setup" and not report.passed)):
        with open(test_log, "a") as f:
            f.write(f"{report.outcome:8s} {report.duration:8.2f}s {report.nodeid}\n")
