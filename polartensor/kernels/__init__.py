"""Fused Triton kernels for PolarQuant (encode/append, decode and chunked-prefill attention).

Lives under ``polartensor.kernels`` so installing polartensor never shadows another
distribution's top-level ``kernels`` module.
"""
