"""Shared helpers for the script tests: import a script as a module, and give the rest of the
suite back the torch thread count that the scripts set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    """Import scripts/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def load_script():
    return _load


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    """The evaluation scripts run real SmolLM2 contexts: on the CPU they take the PyTorch
    reference, as they do outside the test suite. (The suite sets TRITON_INTERPRET=1 for the
    kernel tests, and the interpreter is far too slow at these sizes; the kernels' equality
    with the reference is tested in tests/kernels.)"""
    monkeypatch.setenv("POLARTENSOR_REFERENCE", "1")
