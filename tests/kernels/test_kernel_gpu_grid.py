"""A fixed grid that varies one factor at a time from a small decode case (GPU only): when a
large hypothesis case fails on the GPU, this says which factor breaks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polartensor import polar_sdpa, quantize
from polartensor.config import get_preset

ON_GPU = torch.cuda.is_available()
BASE = dict(d=64, dtype=torch.float32, b=2, hk=2, group=4, tq=1, n=300, mask="none",
            causal=False, preset="paper")
CASES = {
    "base": {}, "tq12": dict(tq=12), "group8_tq12": dict(group=8, tq=12),
    "group3": dict(group=3), "mask_bool": dict(mask="bool"), "mask_pad": dict(mask="pad"),
    "mask_float": dict(mask="float"), "causal_tq5": dict(causal=True, tq=5),
    "prefill_tq40": dict(tq=40), "prefill_pad": dict(tq=40, mask="pad"), "d128": dict(d=128),
    "d256": dict(d=256), "bf16": dict(dtype=torch.bfloat16), "polar3": dict(preset="polar-3"),
    "n17": dict(n=17), "b3_pad_d256_fp16": dict(d=256, dtype=torch.float16, b=3, group=3,
                                                mask="pad", n=2500, tq=7),
    # The largest query tiles: group 8 x 16 queries (faulted at d 256 with 64-row tiles).
    "group8_tq16_d256_fp16": dict(d=256, dtype=torch.float16, group=8, tq=16, n=776),
    "group8_tq16_d256_fp32": dict(d=256, group=8, tq=16, n=776),
    "group8_tq8_d256_bf16": dict(d=256, dtype=torch.bfloat16, group=8, tq=8, n=3000),
    "group8_tq16_d128_fp16": dict(d=128, dtype=torch.float16, group=8, tq=16, n=2000),
}


@pytest.mark.skipif(not ON_GPU, reason="GPU diagnostic grid")
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_grid(name):
    c = {**BASE, **CASES[name]}
    d, b, hk, n, tq = c["d"], c["b"], c["hk"], c["n"], c["tq"]
    hq = hk * c["group"]
    g = torch.Generator().manual_seed(0)
    cfg = get_preset(c["preset"], head_dim=d)
    q = torch.randn(b, hq, tq, d, generator=g).to(c["dtype"]).cuda()
    k = quantize(torch.randn(b, hk, n, d, generator=g).cuda(), cfg)
    v = quantize(torch.randn(b, hk, n, d, generator=g).cuda(), cfg)
    mask = None
    if c["mask"] == "bool":
        mask = (torch.rand(b, 1, tq, n, generator=g) > 0.3).cuda()
    elif c["mask"] == "float":
        mask = torch.randn(hq, 1, n, generator=g).to(c["dtype"]).cuda()
    elif c["mask"] == "pad":
        keep = torch.ones(b, 1, 1, n, dtype=torch.bool)
        keep[1, ..., : n // 3] = False
        mask = keep.cuda()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c["causal"],
                                         enable_gqa=True)
    torch.cuda.synchronize()
    ref = polar_sdpa(q, k, v, attn_mask=mask, is_causal=c["causal"], enable_gqa=True)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"GRID {name}: rel err {err:.2e}")
    assert err < (1e-3 if c["dtype"] == torch.float32 else 2e-2), f"{name}: rel err {err:.2e}"
