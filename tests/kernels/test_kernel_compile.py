"""torch.compile(fullgraph=True) of quantize -> append -> attention equals eager.

On CPU the kernels run under the Triton interpreter inside ``torch.library.custom_op``s
(design.md section 3); on CUDA the same ops run compiled kernels and a decode step is
captured and replayed in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polartensor import PolarQuantConfig
from polartensor.kernels import ops
from polartensor.kv_buffer import PolarKVBuffer
from polartensor.polar_quant_tensor import codebook_for
from polartensor.rotation import rotation_matrix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
D = 128 if ON_GPU else 32
B, HK, G, CAP, PRE = (2, 4, 4, 4096, 3000) if ON_GPU else (1, 2, 2, 40, 10)


def _storage(cfg):
    return (
        torch.zeros(B, HK, CAP, cfg.record_bytes(D), dtype=torch.uint8, device=DEVICE),
        torch.zeros(B, HK, CAP, cfg.num_blocks(D), dtype=cfg.torch_radius_dtype, device=DEVICE),
        torch.zeros(B, HK, CAP, cfg.record_bytes(D), dtype=torch.uint8, device=DEVICE),
        torch.zeros(B, HK, CAP, cfg.num_blocks(D), dtype=cfg.torch_radius_dtype, device=DEVICE),
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _setup(cfg, t):
    g = torch.Generator().manual_seed(t)
    cent = codebook_for(cfg, device=DEVICE)
    rot = rotation_matrix(D, cfg.rotation, cfg.seed, DEVICE, torch.float32).contiguous()
    mids, trig = ops.tables_for(cent, cfg)
    pre_k = torch.randn(B, HK, PRE, D, generator=g).to(DEVICE)
    pre_v = torch.randn(B, HK, PRE, D, generator=g).to(DEVICE)
    q = torch.randn(B, HK * G, t, D, generator=g).to(DEVICE)
    kn = torch.randn(B, HK, t, D, generator=g).to(DEVICE)
    vn = torch.randn(B, HK, t, D, generator=g).to(DEVICE)
    stores = []
    for _ in range(2):
        s = _storage(cfg)
        for x, c, r in ((pre_k, s[0], s[1]), (pre_v, s[2], s[3])):
            torch.ops.polartensor.encode_into(x, rot, mids, c[:, :, :PRE], r[:, :, :PRE],
                                              list(cfg.bits))
        stores.append(s)
    return cent, rot, (mids, trig), q, kn, vn, stores


@pytest.mark.parametrize("t", [1, 5])
def test_compiled_decode_step_equals_eager(t):
    cfg = PolarQuantConfig.paper()
    cent, rot, tabs, q, kn, vn, (s1, s2) = _setup(cfg, t)

    def step(q, kn, vn, kc, kr, vc, vr, cent, rot, mids, trig):
        return ops.decode_step(q, kn, vn, kc, kr, vc, vr, PRE, cent, rot, cfg,
                               tables=(mids, trig))

    eager = step(q, kn, vn, *s1, cent, rot, *tabs)
    compiled = torch.compile(step, fullgraph=True)(q, kn, vn, *s2, cent, rot, *tabs)
    for a, b in zip(s1, s2):
        assert torch.equal(a, b)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_compiled_buffer_append_and_sdpa_equals_eager():
    cfg = PolarQuantConfig.paper()
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(B, HK, PRE, D, generator=g).to(DEVICE)
    q = torch.randn(B, HK * G, 1, D, generator=g).to(DEVICE)
    kn = torch.randn(B, HK, 1, D, generator=g).to(DEVICE)
    outs = []
    for compiled in (False, True):
        kb = PolarKVBuffer(cfg, capacity=CAP, static=True)
        vb = PolarKVBuffer(cfg, capacity=CAP, static=True)
        kb.append(pre)
        vb.append(pre * 0.5)

        def f(q, kn, kb=kb, vb=vb):
            k = kb.append(kn, check_finite=False)
            v = vb.append(kn * 2, check_finite=False)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        fn = torch.compile(f, fullgraph=True) if compiled else f
        outs.append(fn(q, kn))
    # Compiled code computes the cos/sin tables with Inductor's own cos/sin: last-ulp changes.
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_step_cuda_graph_replay():
    cfg = PolarQuantConfig.paper()
    cent, rot, tabs, q, kn, vn, (s1, s2) = _setup(cfg, 1)
    eager = ops.decode_step(q, kn, vn, *s1, PRE, cent, rot, cfg, tables=tabs)
    static_q, static_k, static_v = q.clone(), kn.clone(), vn.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) off the capture
        ops.decode_step(static_q, static_k, static_v, *s2, PRE, cent, rot, cfg, tables=tabs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_step(static_q, static_k, static_v, *s2, PRE, cent, rot, cfg,
                              tables=tabs)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    static_q.copy_(q * 2)
    graph.replay()
    again = ops.decode_step(q * 2, kn, vn, *s1, PRE, cent, rot, cfg, tables=tabs)
    torch.testing.assert_close(out, again, rtol=0, atol=0)
