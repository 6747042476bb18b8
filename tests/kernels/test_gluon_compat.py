"""kernels/gluon_compat.py: the Gluon names that moved between Triton releases resolve to this
Triton's builtins (the CPU stack's Triton here, 3.6 on the GPU)."""

from __future__ import annotations

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import tma

from polartensor.kernels import gluon_compat


def test_each_name_is_this_tritons_builtin():
    assert gluon_compat.cta_barrier in (getattr(gl, "thread_barrier", None),
                                        getattr(gl, "barrier", None))
    assert gluon_compat.cp_async in (getattr(async_copy, "async_load", None),
                                     getattr(async_copy, "async_copy_global_to_shared", None))
    assert gluon_compat.tma_load in (getattr(tma, "async_load", None),
                                     getattr(tma, "async_copy_global_to_shared", None))
    for fn in (gluon_compat.cta_barrier, gluon_compat.cp_async, gluon_compat.tma_load):
        assert fn is not None and callable(fn)
