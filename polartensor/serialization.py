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
from .polar_quant_tensor import PolarQuantTensor

__all__ = ["save_safetensors", "load_safetensors"]

_META_KEY = "polartensor"
_PARTS = ("codes", "radii", "centroids")


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    flat: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for name, t in tensors.items():
        if any(name.endswith("." + p) for p in _PARTS):
            raise ValueError(f"tensor name {name!r} collides with PolarQuantTensor part names")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_safetensors stores tensors; {name!r} is of type "
                            f"{type(t).__name__}: put it in metadata (strings) instead")
        if isinstance(t, PolarQuantTensor):
            for part in _PARTS:
                flat[f"{name}.{part}"] = getattr(t, part).contiguous()
            cfg = dataclasses.asdict(t.config)
            info[name] = {"config": cfg, "shape": list(t.shape),
                          "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            flat[name] = t.contiguous()
    meta = dict(metadata or {})
    meta[_META_KEY] = json.dumps(info)
    save_file(flat, str(path), metadata=meta)


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    info = json.loads(meta.get(_META_KEY, "{}"))
    flat = load_file(str(path), device=str(device))
    out: dict[str, torch.Tensor] = {}
    for name, d in info.items():
        cfg = d["config"]
        cfg["bits"] = tuple(cfg["bits"])
        config = PolarQuantConfig(**cfg)
        parts = [flat.pop(f"{name}.{p}") for p in _PARTS]
        out[name] = PolarQuantTensor(*parts, config, torch.Size(d["shape"]),
                                     getattr(torch, d["dtype"]))
    out.update(flat)
    return out
