"""polartensor/kernels/common.py: the interpreter check that dispatch runs before the first
kernel under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from polartensor.kernels import common  # noqa: E402
from polartensor.kernels.dispatch import use_triton  # noqa: E402


def test_interpreter_check_runs_a_loop_once(monkeypatch):
    """Where the interpreter runs loops, the check passes and is remembered; use_triton on
    the CPU under TRITON_INTERPRET=1 runs it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(common, "_INTERPRETER_CHECKED", [])
    try:
        common.check_interpreter()
    except RuntimeError as exc:
        pytest.skip(f"this machine's interpreter cannot run loops: {exc}")
    assert common._INTERPRETER_CHECKED == [True]
    monkeypatch.setattr(common, "_INTERPRETER_CHECKED", [])
    assert use_triton(torch.device("cpu"))
    assert common._INTERPRETER_CHECKED == [True]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(common, "_INTERPRETER_CHECKED", [])
    assert not use_triton(torch.device("cpu"))
    assert common._INTERPRETER_CHECKED == []  # (not checked where it is not used)


def test_interpreter_that_cannot_loop_gets_a_clear_error(monkeypatch):
    """The failure Triton 3.6's interpreter hits with numpy >= 2.4 (a loop bound converted by
    int() on a one-element array) becomes one error naming the versions and the fixes."""

    class _Failing:
        def __init__(self, fn):
            pass

        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(common, "_INTERPRETER_CHECKED", [])
    monkeypatch.setattr(common.triton, "jit", _Failing)
    with pytest.raises(RuntimeError, match=r"cannot run a loop with numpy .*numpy<2\.4.*unset "
                                           r"TRITON_INTERPRET"):
        common.check_interpreter()
    assert common._INTERPRETER_CHECKED == []
