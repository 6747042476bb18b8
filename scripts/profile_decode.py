#!/usr/bin/env python3
"""One launch each of the decode attention kernel, the dequant kernel and the encode kernel at
batch 8, 32K keys, 8 KV heads (32 query heads), d 128, for Nsight Compute (numbers:
results/bench/ncu_decode.md):

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \\
        --section InstructionStats --section LaunchStats --section Occupancy \\
        -k regex:"polar_(decode_attn_fwd|dequant)" -c 2 python3 scripts/profile_decode.py

(the encode launches first: profile it with ``-k regex:polar_encode --launch-skip 2 -c 1``;
``scripts/gpu_validate.sh profile`` runs both)

Environment: N (keys, default 32768), PRESET (default paper), POLARTENSOR_DECODE; GLUON=1
launches the Gluon decode (``decode_attention_gluon``, kernel
``polar_decode_attn_gluon_fwd_kernel``, its default launch, or SPLITS splits per head) instead.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from polartensor.config import get_preset  # noqa: E402
from polartensor.kernels.decode_attention import launch_attention  # noqa: E402
from polartensor.kernels.dequant import dequantize_rotated_triton  # noqa: E402
from polartensor.kernels.encode import encode_into_triton  # noqa: E402
from polartensor.kernels.ops import cached_rotation, tables_for  # noqa: E402
from polartensor.polar_quant_tensor import codebook_for  # noqa: E402


def quantized(x, cfg):
    d, dev = x.shape[-1], x.device
    mids, trig = tables_for(codebook_for(cfg, device=dev), cfg)
    codes = torch.empty(*x.shape[:-1], cfg.record_bytes(d), dtype=torch.uint8, device=dev)
    radii = torch.empty(*x.shape[:-1], cfg.num_blocks(d), dtype=cfg.torch_radius_dtype,
                        device=dev)
    rot = cached_rotation(cfg.rotation, cfg.seed, d, dev)
    assert encode_into_triton(x, rot, mids, codes, radii, cfg, exact=False)
    return codes, radii, trig, rot


def main():
    dev = torch.device("cuda")
    b, hq, hk, d = 8, 32, 8, 128
    n = int(os.environ.get("N", 32768))
    cfg = get_preset(os.environ.get("PRESET", "paper"), head_dim=d)
    kq = quantized(torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16), cfg)
    vq = quantized(torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16), cfg)
    q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
    x = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16)
    for _ in range(2):  # the first launch compiles
        quantized(x, cfg)
        if os.environ.get("GLUON") == "1":
            from polartensor.kernels.decode_attention_gluon import launch_attention_gluon

            launch_attention_gluon(q, kq[0], kq[1], kq[2], cfg, vq[0], vq[1], vq[2], cfg,
                                   kq[3], kq[3], d ** -0.5,
                                   int(os.environ["SPLITS"]) if "SPLITS" in os.environ
                                   else None)
        else:
            launch_attention(q, kq[0], kq[1], kq[2], cfg, vq[0], vq[1], vq[2], cfg, kq[3],
                             kq[3], scale=d ** -0.5)
        dequantize_rotated_triton(kq[0], kq[1], kq[2], cfg, d, torch.bfloat16)
    torch.cuda.synchronize()
    print("ok")


if __name__ == "__main__":
    main()
