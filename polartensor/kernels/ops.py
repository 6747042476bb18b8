"""torch.library ops around the Triton kernels, so torch.compile(fullgraph=True) traces them.

``torch.library.custom_op`` + ``register_fake`` is used on every device: it is the form that
compiles under the CPU interpreter (design.md section 3), and on CUDA it keeps the kernels
opaque to Inductor (they are already fused) and capturable in CUDA graphs.

Ops:
- ``polartensor::encode_into(x, rot, mids, codes_out!, radii_out!, bits)``: fused encode of
  ``x`` [..., T, D] written into the given views of the cache storage.
- ``polartensor::attention(q, k_codes, k_radii, k_trig, v_codes, v_radii, v_trig, rot_k, rot_v,
  k_tail, v_tail, mask, is_causal, scale, k_bits, v_bits) -> out``: attention over the
  quantized cache (decode split-K for q_len <= 16, else chunked prefill).

``decode_step`` is a compile-friendly functional step: quantize the new K/V tokens into
static-capacity storage at ``pos`` and attend to everything up to ``pos + T``.
"""

from __future__ import annotations

import functools
import math

import torch

from ..config import PolarQuantConfig
from .common import boundary_table, trig_table

__all__ = ["encode_into", "attention", "decode_step", "tables_for", "config_from_bits"]


@functools.lru_cache(maxsize=256)
def config_from_bits(bits: tuple[int, ...]) -> PolarQuantConfig:
    # Only the layout matters to the kernels (levels, bits); radius dtype comes from the tensor.
    return PolarQuantConfig(levels=len(bits), bits=tuple(bits))


_ROT: dict = {}


def cached_rotation(kind: str, seed: int, d: int, device: torch.device) -> torch.Tensor | None:
    """The fp32 rotation matrix S (contiguous), cached per device; None for 'none'."""
    if kind == "none":
        return None
    key = (d, kind, seed, device)
    r = _ROT.get(key)
    if r is None:
        from ..rotation import rotation_matrix

        r = _ROT[key] = rotation_matrix(d, kind, seed, device, torch.float32).contiguous()
    return r


@torch.library.custom_op("polartensor::encode_into", mutates_args=("codes_out", "radii_out"))
def encode_into(
    x: torch.Tensor, rot: torch.Tensor | None, mids: torch.Tensor, codes_out: torch.Tensor,
    radii_out: torch.Tensor, bits: list[int], rotation: str = "", seed: int = 0,
) -> None:
    """``rot`` None: the matrix of (``rotation``, ``seed``) is looked up at run time (so a
    compiled graph holds no constant tensor); rotation '' or 'none' with rot None: no rotation."""
    from .common import interpreting
    from .encode import encode_into_triton

    if rot is None and rotation and rotation != "none":
        if interpreting():
            # The exact (float64) path: rotate exactly as the reference does.
            from ..rotation import rotate

            x = rotate(x.to(torch.float64), rotation, seed)
        else:
            rot = cached_rotation(rotation, seed, x.shape[-1], x.device)
    cfg = config_from_bits(tuple(bits))
    if not encode_into_triton(x, rot, mids, codes_out, radii_out, cfg):
        # Output views that cannot be addressed directly: encode into temporaries, copy in.
        codes = torch.empty(codes_out.shape, dtype=codes_out.dtype, device=codes_out.device)
        radii = torch.empty(radii_out.shape, dtype=radii_out.dtype, device=radii_out.device)
        ok = encode_into_triton(x, rot, mids, codes, radii, cfg)
        assert ok
        codes_out.copy_(codes)
        radii_out.copy_(radii)


@encode_into.register_fake
def _(x, rot, mids, codes_out, radii_out, bits, rotation="", seed=0):
    return None


@torch.library.custom_op("polartensor::attention", mutates_args=())
def attention(
    q: torch.Tensor, k_codes: torch.Tensor, k_radii: torch.Tensor, k_trig: torch.Tensor,
    v_codes: torch.Tensor, v_radii: torch.Tensor, v_trig: torch.Tensor,
    rot_k: torch.Tensor | None, rot_v: torch.Tensor | None,
    k_tail: torch.Tensor | None, v_tail: torch.Tensor | None, mask: torch.Tensor | None,
    is_causal: bool, scale: float, k_bits: list[int], v_bits: list[int],
    k_rotation: str = "", k_seed: int = 0, v_rotation: str = "", v_seed: int = 0,
) -> torch.Tensor:
    from .decode_attention import launch_attention

    d = q.shape[-1]
    if rot_k is None and k_rotation:
        rot_k = cached_rotation(k_rotation, k_seed, d, q.device)
    if rot_v is None and v_rotation:
        rot_v = cached_rotation(v_rotation, v_seed, d, q.device)
    return launch_attention(
        q, k_codes, k_radii, k_trig, config_from_bits(tuple(k_bits)),
        v_codes, v_radii, v_trig, config_from_bits(tuple(v_bits)),
        rot_k, rot_v, k_tail, v_tail, mask, is_causal, scale,
    )


@attention.register_fake
def _(q, k_codes, k_radii, k_trig, v_codes, v_radii, v_trig, rot_k, rot_v, k_tail, v_tail,
      mask, is_causal, scale, k_bits, v_bits, k_rotation="", k_seed=0, v_rotation="",
      v_seed=0):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def tables_for(centroids: torch.Tensor, config: PolarQuantConfig):
    """(cell boundaries for encode, cos/sin tables for decode) of a codebook."""
    return (boundary_table(centroids, config, torch.float64),
            trig_table(centroids, config.bits))


def decode_step(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    k_codes: torch.Tensor, k_radii: torch.Tensor, v_codes: torch.Tensor,
    v_radii: torch.Tensor, pos: int, centroids: torch.Tensor, rot: torch.Tensor | None,
    config: PolarQuantConfig, scale: float | None = None, is_causal: bool = True,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One quantize -> append -> attend step on static storage (compile/CUDA-graph friendly).

    q [B, Hq, T, D]; k_new/v_new [B, Hk, T, D]; storage [B, Hk, capacity, R] and
    [B, Hk, capacity, NB]; ``pos`` tokens are already stored. ``rot`` is the rotation matrix
    (fp32 [D, D], passed as a tensor so no cached Python state is traced) or None for
    rotation 'none'. K and V share ``config`` and ``centroids``. ``tables``: the
    (boundary, cos/sin) tables of ``centroids`` if already computed (see :func:`tables_for`).
    """
    t = k_new.shape[-2]
    d = q.shape[-1]
    end = pos + t
    bits = list(config.bits)
    mids, trig = tables if tables is not None else tables_for(centroids, config)
    torch.ops.polartensor.encode_into(k_new, rot, mids, k_codes[:, :, pos:end],
                                      k_radii[:, :, pos:end], bits)
    torch.ops.polartensor.encode_into(v_new, rot, mids, v_codes[:, :, pos:end],
                                      v_radii[:, :, pos:end], bits)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    return torch.ops.polartensor.attention(
        q, k_codes[:, :, :end], k_radii[:, :, :end], trig, v_codes[:, :, :end],
        v_radii[:, :, :end], trig, rot, rot, None, None, None, is_causal, scale, bits, bits,
    )
