"""Gluon names that moved between Triton releases: the GPU stack runs Triton 3.6, the CPU
stack (which traces the Gluon kernels in the tests) a later one."""

from __future__ import annotations

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import tma

__all__ = ["cta_barrier", "cp_async", "tma_load"]

# a CTA barrier: thread_barrier in Triton 3.6, barrier later
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# cp.async into shared memory: async_copy_global_to_shared in Triton 3.6, async_load later
cp_async = (getattr(async_copy, "async_load", None)
            or async_copy.async_copy_global_to_shared)
# the TMA load: async_copy_global_to_shared in Triton 3.6, async_load later
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
