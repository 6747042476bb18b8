"""safetensors round-trips for dicts of plain tensors and PolarQuantTensors.

A PolarQuantTensor ``name`` is stored as three plain tensors ``name.codes``, ``name.radii``,
``name.centroids`` plus JSON metadata (config, logical shape and dtype) under the
``polartensor`` key of the file's metadata. No pickling, so loading runs no code.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file

from .config import PolarQuantConfig
from .polar_quant_tensor import _INPUT_DTYPES, PolarQuantTensor, _check_centroids

__all__ = ["save_safetensors", "load_safetensors"]

_META_KEY = "polartensor"
_PARTS = ("codes", "radii", "centroids")


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    flat: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    seen: set = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        # safetensors refuses tensors that share storage (two tensors of one offline codebook
        # share its table; views of one buffer share its storage): those after the first are
        # written as copies
        t = t.detach().contiguous()
        if t.numel():
            key = (t.device, t.untyped_storage().data_ptr())
            if key in seen:
                return t.clone()
            seen.add(key)
        return t

    for name, t in tensors.items():
        if any(name.endswith("." + p) for p in _PARTS):
            raise ValueError(f"tensor name {name!r} collides with PolarQuantTensor part names")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_safetensors stores tensors; {name!r} is of type "
                            f"{type(t).__name__}: put it in metadata (strings) instead")
        if isinstance(t, PolarQuantTensor):
            for part in _PARTS:
                flat[f"{name}.{part}"] = own(getattr(t, part))
            cfg = dataclasses.asdict(t.config)
            info[name] = {"config": cfg, "shape": list(t.shape),
                          "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            flat[name] = own(t)
    meta = dict(metadata or {})
    meta[_META_KEY] = json.dumps(info)
    save_file(flat, str(path), metadata=meta)


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """The dict ``save_safetensors`` wrote. Each PolarQuantTensor's parts are checked against
    its recorded config, shape and dtype, so a file edited or written by something else fails
    here with the entry named, not later in a decode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        info = json.loads(meta.get(_META_KEY, "{}"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: the {_META_KEY!r} metadata is not what "
                         f"save_safetensors writes ({exc}); was the file written by it?") from None
    flat = load_file(str(path), device=str(device))
    out: dict[str, torch.Tensor] = {}
    for name, d in info.items():
        parts = []
        for p in _PARTS:
            if f"{name}.{p}" not in flat:
                raise ValueError(f"{os.fspath(path)}: PolarQuantTensor {name!r} has no "
                                 f"{name}.{p} tensor in the file (truncated or edited?)")
            parts.append(flat.pop(f"{name}.{p}"))
        out[name] = _checked_tensor(name, d, *parts)
    out.update(flat)
    return out


def _checked_tensor(name: str, d, codes: torch.Tensor, radii: torch.Tensor,
                    centroids: torch.Tensor) -> PolarQuantTensor:
    def bad(what: str) -> ValueError:
        return ValueError(f"PolarQuantTensor {name!r} in the file: {what}; the file was edited "
                          "or not written by save_safetensors")

    try:
        cfg = dict(d["config"])
        cfg["bits"] = tuple(cfg["bits"])
        config = PolarQuantConfig(**cfg)
        shape = torch.Size(int(n) for n in d["shape"])
        dtype = getattr(torch, d["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise bad(f"unreadable metadata ({type(exc).__name__}: {exc})") from None
    if dtype not in _INPUT_DTYPES:
        raise bad(f"dtype {d['dtype']!r} is not float16, bfloat16, float32 or float64")
    if not shape or any(n < 0 for n in shape):
        raise bad(f"shape {list(shape)} is not a [..., head_dim] shape")
    hd = shape[-1]
    try:
        config.check_head_dim(hd)
    except ValueError as exc:
        raise bad(str(exc)) from None
    lead = tuple(shape[:-1])
    want = {"codes": (codes, torch.uint8, (*lead, config.record_bytes(hd))),
            "radii": (radii, config.torch_radius_dtype, (*lead, config.num_blocks(hd)))}
    for part, (t, dt, shp) in want.items():
        if t.dtype != dt or tuple(t.shape) != shp:
            raise bad(f"{part} are {t.dtype} {tuple(t.shape)}, its config and shape need {dt} "
                      f"{shp}")
    try:
        centroids = _check_centroids(centroids, config, centroids.device)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return PolarQuantTensor(codes, radii, centroids, config, shape, dtype)
