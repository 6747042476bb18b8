"""transformers integration: PolarQuantCache, the "polar" attention, quantize_, real model."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from polartensor import PolarQuantConfig, PolarQuantTensor, causal_mask, quantize  # noqa: E402
from polartensor.integrations import transformers as ptf  # noqa: E402
from polartensor.integrations.transformers import (  # noqa: E402
    MixedKV,
    PolarQuantCache,
    PolarQuantKVConfig,
    PolarQuantLayer,
    generate_kwargs,
    polar_attention_forward,
    quantize_,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Near-lossless: one polar level, 8-bit angles, fp32 radii (relative error ~0.4%).
LOSSLESS = PolarQuantConfig(levels=1, bits=8, radius_dtype="float32")
LOSSLESS_KV = PolarQuantKVConfig(key_config=LOSSLESS, value_config=LOSSLESS)


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch, request):
    """Model-level tests run the PyTorch reference attention/encode: under the Triton
    interpreter (CPU CI) a whole model would take minutes. Tests named ``*_kernel_path*``
    keep the dispatch as it is (Triton on GPU and under the interpreter)."""
    if "_kernel_path" not in request.node.name:
        monkeypatch.setenv("POLARTENSOR_REFERENCE", "1")


# -- tiny random models -------------------------------------------------------------------------
def _tiny(family: str, head_dim: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2,
          dtype=torch.float32):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    table = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
                   {"sliding_window": 8, "query_pre_attn_scalar": head_dim}),
    }
    cfg_cls, model_cls, extra = table[family]
    cfg = cfg_cls(**common, **extra)
    torch.manual_seed(0)
    model = model_cls(cfg).to(device=DEVICE, dtype=dtype).eval()
    # Sharper logits than the default init, so greedy decisions are not near-ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _batch(batch=2, length=11, pad=(0, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pad[:batch]):
        ids[row, :p] = 0
        mask[row, :p] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _gen(model, ids, mask, cache=None, **kw):
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("do_sample", False)
    extra = generate_kwargs(cache) if cache is not None else {}
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **extra, **kw)


def _forward(model, ids, cache, **kw):
    return model(input_ids=ids, use_cache=True, **generate_kwargs(cache), **kw)


# -- cache semantics against DynamicCache ---------------------------------------------------------
def _check_against_dynamic(pc: PolarQuantCache, dc: DynamicCache, layers: int):
    for i in range(layers):
        n = dc.get_seq_length(i)
        assert pc.get_seq_length(i) == n
        assert pc.get_mask_sizes(3, i) == dc.get_mask_sizes(3, i)
        if n == 0:
            continue
        layer = pc.layers[i]
        k, v = layer.dequantized()
        dk, dv = dc.layers[i].keys, dc.layers[i].values
        assert k.shape == dk.shape and v.shape == dv.shape
        nq = layer._kbuf.length if layer._kbuf is not None and layer._kbuf.initialized else 0
        # Quantized tokens decode exactly like quantizing the same tokens one by one;
        # tail tokens are kept bit-exact.
        if nq:
            for got, want, cfg in ((k, dk, layer.key_config), (v, dv, layer.value_config)):
                ref = quantize(want[..., :nq, :], cfg).dequantize()
                torch.testing.assert_close(got[..., :nq, :], ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(k[..., nq:, :], dk[..., nq:, :])
        assert torch.equal(v[..., nq:, :], dv[..., nq:, :])
        if layer.quantize_generated:
            assert layer._tail.length < layer.residual_length + layer.flush_chunk


_op = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 7)),
    st.tuples(st.just("crop"), st.integers(-5, 6)),
    st.tuples(st.just("reorder"), st.integers(0, 2**31 - 1)),
    st.tuples(st.just("reset"), st.just(0)),
)


@given(
    ops=st.lists(_op, min_size=1, max_size=12),
    residual=st.sampled_from([0, 3]),
    chunk=st.sampled_from([1, 2]),
    generated=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_cache_semantics_match_dynamic_cache(ops, residual, chunk, generated, seed):
    layers, b, h, d = 2, 3, 2, 32
    pc = PolarQuantCache(residual_length=residual, flush_chunk=chunk,
                         quantize_generated=generated, key_config="paper",
                         value_config=LOSSLESS, attention="polar")
    dc = DynamicCache()
    g = torch.Generator().manual_seed(seed)
    for op, arg in [("append", 4), *ops]:
        if op == "append":
            for i in range(layers):
                k = torch.randn(b, h, arg, d, generator=g)
                v = torch.randn(b, h, arg, d, generator=g)
                pc.update(k, v, i)
                dc.update(k, v, i)
        elif op == "crop":
            n = dc.get_seq_length()
            if arg > 0 or n == 0:
                continue  # positive crops are a deprecated/removed transformers API
            pc.crop(arg)
            dc.crop(max(arg, -n))
        elif op == "reorder":
            if dc.get_seq_length() == 0:
                continue
            idx = torch.randint(0, b, (b,), generator=torch.Generator().manual_seed(arg))
            pc.reorder_cache(idx)
            dc.reorder_cache(idx)
        else:
            pc.reset()
            dc = DynamicCache()
        _check_against_dynamic(pc, dc, layers)


@pytest.mark.parametrize("residual", [0, 2])
def test_batch_repeat_and_select_match_dynamic_cache(residual):
    pc = PolarQuantCache(residual_length=residual, attention="polar", value_config=LOSSLESS)
    dc = DynamicCache()
    g = torch.Generator().manual_seed(0)
    for t in (5, 1):
        k, v = torch.randn(2, 2, t, 32, generator=g), torch.randn(2, 2, t, 32, generator=g)
        pc.update(k, v, 0)
        dc.update(k, v, 0)
    pc.batch_repeat_interleave(3)
    dc.batch_repeat_interleave(3)
    _check_against_dynamic(pc, dc, 1)
    idx = torch.tensor([5, 0, 2])
    pc.batch_select_indices(idx)
    dc.batch_select_indices(idx)
    _check_against_dynamic(pc, dc, 1)
    assert pc.layers[0].batch_size == 3


def test_prefill_returns_full_precision_and_decode_returns_quantized():
    pc = PolarQuantCache(attention="polar", quantize_generated=True)
    k, v = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    rk, rv = pc.update(k, v, 0)
    assert rk is k and rv is v
    rk, rv = pc.update(k[..., :1, :], v[..., :1, :], 0)
    assert isinstance(rk, PolarQuantTensor) and rk.shape == (1, 2, 6, 64)
    pc = PolarQuantCache(attention="polar", residual_length=2, quantize_generated=True)
    pc.update(k, v, 0)
    rk, rv = pc.update(k[..., :1, :], v[..., :1, :], 0)
    assert isinstance(rk, MixedKV) and rk.shape == (1, 2, 6, 64)
    assert rk.quantized.shape[-2] == 3 and rk.tail.shape[-2] == 3


def test_default_mode_is_the_papers_except_for_static_caches():
    assert PolarQuantKVConfig().quantize_generated is False
    assert PolarQuantKVConfig(max_cache_len=64).quantize_generated is True


def test_paper_mode_keeps_generated_tokens_full_precision():
    pc = PolarQuantCache(quantize_generated=False, attention="polar")
    k, v = torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    pc.update(k, v, 0)
    for _ in range(40):
        rk, _ = pc.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), 0)
    layer = pc.layers[0]
    assert layer._kbuf.length == 8 and layer._tail.length == 40
    assert isinstance(rk, MixedKV)


def test_residual_window_flushes_in_chunks():
    pc = PolarQuantCache(residual_length=4, flush_chunk=3, attention="polar",
                         quantize_generated=True)
    pc.update(torch.randn(1, 1, 10, 32), torch.randn(1, 1, 10, 32), 0)
    layer = pc.layers[0]
    assert (layer._kbuf.length, layer._tail.length) == (6, 4)
    lengths = []
    for _ in range(7):
        pc.update(torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32), 0)
        lengths.append(layer._tail.length)
    assert lengths == [5, 6, 4, 5, 6, 4, 5]
    assert layer.get_seq_length() == 17


def test_skip_layers_and_memory_accounting():
    pc = PolarQuantCache("paper", skip_layers=[1])
    b, h, n, d = 2, 3, 20, 64
    for i in range(3):
        pc.update(torch.randn(b, h, n, d), torch.randn(b, h, n, d), i)
    rows = pc.memory_usage()
    assert [r["quantized"] for r in rows] == [True, False, True]
    dense = 2 * b * h * n * d * 4
    assert all(r["dense_bytes"] == dense for r in rows)
    cfg = PolarQuantConfig.paper()
    per_vec = cfg.record_bytes(d) + cfg.num_blocks(d) * 2
    codebook = pc.layers[0]._kbuf.centroids.numel() * 4
    assert rows[0]["key_bytes"] == b * h * n * per_vec + codebook
    assert rows[1]["total_bytes"] == dense
    assert pc.memory_bytes() == sum(r["total_bytes"] for r in rows)
    assert pc.dense_bytes() == 3 * dense
    assert 1.5 < pc.compression_ratio() < 3.0  # one of three layers is full precision
    assert "smaller" in pc.memory_report()


def test_kv_presets_and_defaults():
    c = PolarQuantCache()
    kc, vc = ptf.kv_preset("default")
    assert c.kv_config.key_config == kc and c.kv_config.value_config == vc
    assert PolarQuantCache("paper").kv_config.key_config_for(64) == PolarQuantConfig.paper()
    online = PolarQuantKVConfig(online_codebooks=True)
    assert online.key_config_for(64).codebook == "online" == online.value_config_for(64).codebook
    for name in ptf.KV_PRESETS:  # every named pairing resolves for the head dims we serve
        cfg = PolarQuantKVConfig.preset(name)
        for d in (64, 128, 256):
            cfg.check_head_dims(d)
    with pytest.raises(ValueError, match="unknown key/value preset"):
        PolarQuantCache("no-such-preset")
    with pytest.raises(ValueError, match="unknown preset"):
        PolarQuantCache(key_config="no-such-preset")
    with pytest.raises(ValueError, match="residual_length=0"):
        PolarQuantKVConfig(max_cache_len=64, residual_length=8)
    # strings are not booleans ("False" would read as true), nor layer indices
    for field in ("quantize_generated", "online_codebooks"):
        with pytest.raises(ValueError, match=f"{field} must be True or False"):
            PolarQuantKVConfig(**{field: "False"})
    for skip in ("01", (0.7,), (True,)):
        with pytest.raises(ValueError, match="skip_layers must be int layer indices"):
            PolarQuantKVConfig(skip_layers=skip)
    with pytest.raises(ValueError, match=r"skip_layers \[5\] are past"):
        PolarQuantCache(skip_layers=(5,), model_config=_tiny("llama", 64).config)


def test_online_codebooks_fitted_per_layer_at_prefill():
    pc = PolarQuantCache(online_codebooks=True, attention="polar", quantize_generated=True)
    g = torch.Generator().manual_seed(0)
    pc.update(torch.randn(1, 2, 64, 64, generator=g) * 3 + 1, torch.randn(1, 2, 64, 64), 0)
    pc.update(torch.randn(1, 2, 64, 64, generator=g), torch.randn(1, 2, 64, 64), 1)
    c0, c1 = pc.layers[0]._kbuf.centroids, pc.layers[1]._kbuf.centroids
    assert not torch.equal(c0, c1)
    rk, _ = pc.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), 0)
    assert rk.centroids is c0


# -- attention -------------------------------------------------------------------------------------
class _Mod(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("residual", [0, 3])
@pytest.mark.parametrize("q_len", [1, 4])
def test_attention_matches_sdpa_on_dequantized_cache(residual, q_len):
    g = torch.Generator().manual_seed(0)
    b, hq, hk, d = 2, 6, 2, 64
    pc = PolarQuantCache(residual_length=residual, attention="polar")
    pc.update(torch.randn(b, hk, 9, d, generator=g), torch.randn(b, hk, 9, d, generator=g), 0)
    key, value = pc.update(torch.randn(b, hk, q_len, d, generator=g),
                           torch.randn(b, hk, q_len, d, generator=g), 0)
    q = torch.randn(b, hq, q_len, d, generator=g)
    kv_len = 9 + q_len
    mask = torch.ones(b, 1, q_len, kv_len, dtype=torch.bool)
    mask[0, ..., :2] = False  # left padding in row 0
    mask &= causal_mask(q_len, kv_len)
    out, _ = polar_attention_forward(_Mod(), q, key, value, mask, scaling=0.125)
    dk, dv = pc.layers[0].dequantized()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, dk, dv, attn_mask=mask, scale=0.125, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
    # No mask: bottom-right causal.
    out, _ = polar_attention_forward(_Mod(), q, key, value, None, scaling=0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, dk, dv, attn_mask=causal_mask(q_len, kv_len), scale=0.125,
        enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)


def test_decode_on_kernel_path_matches_reference():
    """The same decode through polartensor.kernels.dispatch as it routes by default (Triton on
    GPU / under the interpreter) gives the reference's logits."""
    model = _tiny("llama", 64, 4, 2, layers=1)
    model.set_attn_implementation("polar")
    ids, mask = _batch(batch=2, length=6, pad=(0, 2))
    step = torch.tensor([[5], [7]], device=DEVICE)
    m2 = torch.cat([mask, torch.ones_like(step)], dim=1)
    logits = []
    for ref in (True, False):
        os.environ["POLARTENSOR_REFERENCE"] = "1" if ref else "0"
        try:
            cache = PolarQuantCache(residual_length=0)
            _forward(model, ids, cache, attention_mask=mask)
            logits.append(_forward(model, step, cache, attention_mask=m2).logits)
        finally:
            os.environ.pop("POLARTENSOR_REFERENCE", None)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)


def test_attention_refuses_unsupported_features():
    q = torch.randn(1, 2, 1, 32)
    with pytest.raises(NotImplementedError, match="softcapping"):
        polar_attention_forward(_Mod(), q, q, q, None, softcap=30.0)


# -- tiny models -----------------------------------------------------------------------------------
MODELS = [
    ("llama", 16, 4, 2),
    ("llama", 32, 4, 4),    # MHA
    ("llama", 64, 4, 2),    # GQA
    ("llama", 128, 4, 1),   # MQA
    ("llama", 256, 2, 1),
    ("qwen2", 64, 4, 2),
    ("qwen3", 128, 4, 2),
    ("mistral", 64, 4, 2),
    ("gemma3", 256, 2, 1),  # sliding-window layers
]


@pytest.mark.parametrize("family,head_dim,heads,kv_heads", MODELS)
def test_tiny_models_generate_like_reference(family, head_dim, heads, kv_heads):
    """Padded batch, greedy: the polar attention on the quantized cache gives the same tokens
    as the model's own SDPA on the dequantized cache, and (lossless config) as the full cache."""
    model = _tiny(family, head_dim, heads, kv_heads)
    ids, mask = _batch()
    model.set_attn_implementation("sdpa")
    full = _gen(model, ids, mask)
    reference = _gen(model, ids, mask, PolarQuantCache(attention="dequantize"))
    model.set_attn_implementation("polar")
    polar = _gen(model, ids, mask, PolarQuantCache(attention="polar"))
    assert torch.equal(polar, reference)
    lossless = _gen(model, ids, mask, PolarQuantCache(LOSSLESS_KV, attention="polar"))
    assert torch.equal(lossless, full)
    mixed = _gen(model, ids, mask, PolarQuantCache(attention="polar", residual_length=3,
                                                   flush_chunk=2))
    model.set_attn_implementation("sdpa")
    mixed_ref = _gen(model, ids, mask, PolarQuantCache(attention="dequantize",
                                                       residual_length=3, flush_chunk=2))
    assert torch.equal(mixed, mixed_ref)


def test_generate_with_past_key_values_keyword_and_static_cache():
    """The spelling users know, ``generate(..., past_key_values=PolarQuantCache())`` (renamed
    ``cache=`` in transformers 5.2x, still accepted), and a static-capacity cache."""
    import warnings

    model = _tiny("llama", 64, 4, 2)
    model.set_attn_implementation("polar")
    ids, mask = _batch()
    cache = PolarQuantCache(quantize_generated=True)  # the static cache's mode, to compare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                             max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert cache.get_seq_length() == ids.shape[1] + 4
    static = PolarQuantCache(max_cache_len=64, model_config=model.config)
    assert torch.equal(_gen(model, ids, mask, static, max_new_tokens=5), out)
    assert int(static.get_seq_length()) == ids.shape[1] + 4


def test_padded_rows_match_unpadded_runs():
    model = _tiny("llama", 64, 4, 2)
    model.set_attn_implementation("polar")
    ids, mask = _batch(batch=2, pad=(0, 4))
    batched = _gen(model, ids, mask, PolarQuantCache())
    for row in range(2):
        keep = mask[row].bool()
        alone = _gen(model, ids[row:row + 1, keep], mask[row:row + 1, keep], PolarQuantCache())
        assert torch.equal(batched[row, ids.shape[1]:], alone[0, int(keep.sum()):])


def test_padded_batch_logits_match_reference_attention():
    model = _tiny("qwen2", 64, 4, 2)
    ids, mask = _batch(batch=2, pad=(2, 5))
    outs = {}
    for impl, att in (("polar", "polar"), ("sdpa", "dequantize")):
        model.set_attn_implementation(impl)
        cache = PolarQuantCache(attention=att, residual_length=2)
        _forward(model, ids, cache, attention_mask=mask)
        step = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(5))
        step = step.to(DEVICE)
        m2 = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype, device=mask.device)], dim=1)
        outs[impl] = _forward(model, step, cache, attention_mask=m2).logits
    torch.testing.assert_close(outs["polar"], outs["sdpa"], rtol=1e-4, atol=1e-4)


def test_sampling_and_beam_search():
    model = _tiny("llama", 64, 4, 2)
    ids, mask = _batch()
    model.set_attn_implementation("sdpa")
    torch.manual_seed(3)
    ref_sample = _gen(model, ids, mask, PolarQuantCache(attention="dequantize"), do_sample=True)
    ref_beam = _gen(model, ids, mask, PolarQuantCache(attention="dequantize"), num_beams=3)
    model.set_attn_implementation("polar")
    torch.manual_seed(3)
    sample = _gen(model, ids, mask, PolarQuantCache(), do_sample=True)
    beam = _gen(model, ids, mask, PolarQuantCache(), num_beams=3)
    assert torch.equal(sample, ref_sample)
    assert torch.equal(beam, ref_beam)
    model.set_attn_implementation("sdpa")
    # (not the polar attention: the cache says it dequantizes every step; once a process, so
    # reset here: under xdist an earlier test on this worker may have warned)
    ptf._WARNED["dequantize"] = False
    with pytest.warns(UserWarning, match="attention is not 'polar'"):
        lossless_beam = _gen(model, ids, mask, PolarQuantCache(LOSSLESS_KV), num_beams=3)
    assert torch.equal(lossless_beam, _gen(model, ids, mask, num_beams=3))


def test_quantize_one_line_enable_and_disable():
    model = _tiny("llama", 64, 4, 2)
    ids, mask = _batch()
    full = _gen(model, ids, mask)
    quantize_(model, LOSSLESS_KV)
    assert model.config._attn_implementation == "polar"
    out = _gen(model, ids, mask, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert isinstance(cache, PolarQuantCache)
    assert all(layer.polar_attention for layer in cache.layers)
    assert torch.equal(out.sequences, full)
    explicit = PolarQuantCache()
    _gen(model, ids, mask, explicit)
    assert explicit.get_seq_length() == ids.shape[1] + 5
    ptf.disable_polar_kv(model)
    out = _gen(model, ids, mask, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert not isinstance(cache, PolarQuantCache)


def test_torchao_quantize_handler():
    from torchao.quantization import quantize_ as ao_quantize_

    model = _tiny("llama", 64, 4, 2)
    with pytest.raises(TypeError, match="polar_kv_filter"):
        ao_quantize_(model, PolarQuantKVConfig())
    ao_quantize_(model, PolarQuantKVConfig(), filter_fn=ptf.polar_kv_filter)
    assert model.config._attn_implementation == "polar"
    ids, mask = _batch()
    out = _gen(model, ids, mask, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert isinstance(cache, PolarQuantCache)


def test_plain_sdpa_model_with_polar_cache_warns_and_dequantizes():
    model = _tiny("llama", 64, 4, 2)
    model.set_attn_implementation("sdpa")
    ids, mask = _batch()
    ptf._WARNED["dequantize"] = False
    with pytest.warns(UserWarning, match="set_attn_implementation"):
        out = _gen(model, ids, mask, PolarQuantCache(LOSSLESS_KV))
    assert torch.equal(out, _gen(model, ids, mask))


# Inductor on GPU; on CPU the AOT graph without Inductor's C++ codegen keeps CI fast
# (POLARTENSOR_COMPILE_BACKEND=inductor runs the full CPU path).
COMPILE_BACKEND = os.environ.get("POLARTENSOR_COMPILE_BACKEND",
                                 "inductor" if DEVICE == "cuda" else "aot_eager")


# -- compile ---------------------------------------------------------------------------------------
def test_static_cache_decode_step_compiles_kernel_path():
    """torch.compile of the decode step with a static PolarQuantCache equals eager. It runs
    the kernel path (torch.library ops; the Triton interpreter on CPU)."""
    torch._dynamo.reset()
    model = _tiny("llama", 64, 4, 2, layers=1)
    model.set_attn_implementation("polar")
    ids, mask = _batch(batch=2, pad=(0, 2))
    n_new = 3

    def run(step_fn, strict_after_first=False):
        cache = PolarQuantCache(max_cache_len=32, model_config=model.config)
        out = _forward(model, ids, cache, attention_mask=mask)
        tok = out.logits[:, -1:].argmax(-1)
        # A fixed-width 2-D mask (future slots are masked causally): every decode step has
        # the same shapes, so the compiled step is reused without recompiling.
        m = torch.cat([mask, torch.ones(2, 32 - ids.shape[1], dtype=mask.dtype,
                                        device=mask.device)], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1
        logits = []
        for i in range(n_new):
            pos = pos + 1
            stance = "fail_on_recompile" if (strict_after_first and i) else "default"
            with torch.compiler.set_stance(stance):
                out = step_fn(input_ids=tok, attention_mask=m, position_ids=pos,
                              use_cache=True, **generate_kwargs(cache))
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits, 1), cache

    with torch.no_grad():
        eager, cache = run(model.forward)
        step = torch.compile(model.forward, backend=COMPILE_BACKEND)
        compiled, _ = run(step, strict_after_first=True)
    assert cache.is_compileable and cache.get_seq_length() == ids.shape[1] + n_new
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert cache.layers[0].dequantized()[0].shape == (2, 2, ids.shape[1] + n_new, 64)


def _decode_logits(model, step_fn, cache, ids, n_new, mask=None, fixed_mask_len=None,
                   strict_after_first=False):
    """Prefill ``ids`` eagerly, then ``n_new`` greedy one-token steps through ``step_fn``;
    returns the stacked step logits [B, n_new, vocab]."""
    out = _forward(model, ids, cache, attention_mask=mask)
    tok = out.logits[:, -1:].argmax(-1)
    b, t = ids.shape
    if mask is None:
        mask = torch.ones_like(ids)
    pos = mask.sum(-1, keepdim=True) - 1
    logits = []
    for i in range(n_new):
        pos = pos + 1
        if fixed_mask_len is not None:  # a static cache: one mask width for every step
            m = torch.cat([mask, mask.new_ones(b, fixed_mask_len - t)], dim=1)
        else:
            m = torch.cat([mask, mask.new_ones(b, i + 1)], dim=1)
        stance = "fail_on_recompile" if (strict_after_first and i) else "default"
        with torch.compiler.set_stance(stance):
            out = step_fn(input_ids=tok, attention_mask=m, position_ids=pos, use_cache=True,
                          **generate_kwargs(cache))
        logits.append(out.logits[:, -1])
        tok = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("kv", [
    pytest.param({}, id="paper-mode"),  # generated tokens in a full-precision tail (MixedKV)
    pytest.param({"quantize_generated": True}, id="quantize-generated"),
    pytest.param({"residual_length": 2, "flush_chunk": 1, "quantize_generated": True},
                 id="residual-window"),
])
def test_decode_step_compiles_fullgraph_reference_path(kv):
    """torch.compile(fullgraph=True) of the one-token decode step with a (dynamic)
    PolarQuantCache on the PyTorch reference path equals eager, step after step, while the
    cache grows. (A dynamic cache's Python-int lengths recompile as it grows; a static cache
    does not, see the next test.)"""
    from polartensor.kernels import dispatch

    torch._dynamo.reset()
    assert not dispatch.use_triton(torch.device(DEVICE))
    model = _tiny("llama", 32, 4, 2, layers=1)
    model.set_attn_implementation("polar")
    ids, mask = _batch(batch=2, length=9, pad=(0, 2))
    n_new = 3
    with torch.no_grad():
        eager = _decode_logits(model, model.forward, PolarQuantCache(**kv), ids, n_new, mask)
        cache = PolarQuantCache(**kv)
        step = torch.compile(model.forward, backend=COMPILE_BACKEND, fullgraph=True)
        compiled = _decode_logits(model, step, cache, ids, n_new, mask)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == ids.shape[1] + n_new
    k, v = cache.layers[0].dequantized()
    assert k.shape == v.shape == (2, 2, ids.shape[1] + n_new, 32)


# the updates are called directly, not from the model's attention: the once-a-process warning
# about a dequantizing cache is expected here (another test checks it)
@pytest.mark.filterwarnings("ignore:PolarQuantCache. the model's attention is not:UserWarning")
def test_static_cache_refuses_a_token_past_max_cache_len():
    """max_cache_len 13 is not a multiple of 8, so the buffers' storage has spare rows (for
    the Gluon decode's staged ring); a token past the 13th must still be refused, not written
    into a spare row out of the view, and the refused update must leave the length alone."""
    model = _tiny("llama", 64, 4, 2, layers=1)
    model.set_attn_implementation("polar")
    cache = PolarQuantCache(max_cache_len=13, model_config=model.config)
    k = torch.randn(1, 2, 11, 64)
    cache.update(k, k.clone(), 0)
    for _ in range(2):
        x = torch.randn(1, 2, 1, 64)
        cache.update(x, x.clone(), 0)
    layer = cache.layers[0]
    assert int(cache.get_seq_length()) == 13 and layer._kbuf.codes.shape[-2] == 16
    before = layer.dequantized()[0].clone()
    x = torch.randn(1, 2, 1, 64)
    with pytest.raises(ValueError, match="is full: max_cache_len=13, 13 tokens held and 1 new"):
        cache.update(x, x.clone(), 0)
    assert int(cache.get_seq_length()) == 13
    assert torch.equal(layer.dequantized()[0], before)
    assert not layer._kbuf.codes[..., 13:, :].any()
    # after a crop the length is known again without reading the device tensor
    layer.crop(-2)
    cache.update(x, x.clone(), 0)
    assert int(cache.get_seq_length()) == 12
    # a prompt longer than max_cache_len is refused up front, naming it
    fresh = PolarQuantCache(max_cache_len=13, model_config=model.config)
    with pytest.raises(ValueError, match="max_cache_len=13, 0 tokens held and 14 new"):
        fresh.update(torch.randn(1, 2, 14, 64), torch.randn(1, 2, 14, 64), 0)


def test_updates_must_match_the_cache_shape():
    """K and V of an update agree with each other and with the tokens held: a batch-1 decode
    into a batch-2 cache, wrong head counts or K and V of different lengths are refused, not
    broadcast into the buffers (dynamic and static)."""
    model = _tiny("llama", 64, 4, 2, layers=1)
    for kw in ({}, dict(residual_length=0), dict(max_cache_len=16)):
        cache = PolarQuantCache(model_config=model.config, **kw)
        with pytest.raises(ValueError, match="expected \\[1, 2, 5, 64\\]"):
            cache.update(torch.randn(1, 2, 5, 64), torch.randn(1, 2, 4, 64), 0)
        cache = PolarQuantCache(model_config=model.config, **kw)
        k = torch.randn(2, 2, 6, 64)
        cache.update(k, k.clone(), 0)
        before = cache.layers[0].dequantized()[0].clone()
        for kx, vx in ((torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)),
                       (torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64)),
                       (torch.randn(2, 2, 1, 64), torch.randn(2, 2, 2, 64))):
            with pytest.raises(ValueError, match="batch 2, 2 heads"):
                cache.update(kx, vx, 0)
        assert torch.equal(cache.layers[0].dequantized()[0], before)


def test_static_cache_decode_step_compiles_fullgraph_reference_path():
    """The static cache on the reference path: fullgraph, one compile for every step."""
    from polartensor.kernels import dispatch

    torch._dynamo.reset()
    assert not dispatch.use_triton(torch.device(DEVICE))
    model = _tiny("llama", 64, 4, 2, layers=1)
    model.set_attn_implementation("polar")
    ids, mask = _batch(batch=2, pad=(0, 2))
    n_new = 3

    def new_cache():
        return PolarQuantCache(max_cache_len=24, model_config=model.config)

    with torch.no_grad():
        eager = _decode_logits(model, model.forward, new_cache(), ids, n_new, mask, 24)
        cache = new_cache()
        step = torch.compile(model.forward, backend=COMPILE_BACKEND, fullgraph=True)
        compiled = _decode_logits(model, step, cache, ids, n_new, mask, 24,
                                  strict_after_first=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert int(cache.get_seq_length()) == ids.shape[1] + n_new
    assert cache.layers[0].dequantized()[0].shape == (2, 2, ids.shape[1] + n_new, 64)


# -- bad input -------------------------------------------------------------------------------------
def test_unsupported_head_dim_is_a_clear_error():
    """A fixed-depth config (paper: blocks of 16) cannot serve head_dim 24: a clear error at
    enable time and at the first update. Frontier presets adapt their depth to head_dim."""
    model = _tiny("llama", 24, 4, 2)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="head_dim 24"):
        quantize_(model, PolarQuantKVConfig("paper", "paper"))
    model.set_attn_implementation("polar")
    with pytest.raises(ValueError, match="head_dim 24"):
        _gen(model, ids, mask, PolarQuantCache("paper"))
    quantize_(model, PolarQuantKVConfig())  # the default presets resolve to 3 levels here
    assert _gen(model, ids, mask).shape[1] == ids.shape[1] + 6


def test_unsupported_dtype_is_a_clear_error():
    model = _tiny("llama", 64, 4, 2, dtype=torch.float64)
    model.set_attn_implementation("polar")
    ids, mask = _batch()
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        _gen(model, ids, mask, PolarQuantCache())


def test_unsupported_models_are_clear_errors():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32,
                                             num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="encoder-decoder"):
        quantize_(t5, PolarQuantKVConfig())
    with pytest.raises(TypeError, match="generative model"):
        quantize_(torch.nn.Linear(4, 4), PolarQuantKVConfig())


# -- the real model (SmolLM2-135M-Instruct, design.md section 6) -----------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from polartensor import assets

    try:
        model, tok = assets.load_smollm2(torch.float32, DEVICE)
    except assets.AssetUnavailableError as exc:
        pytest.skip(f"SmolLM2 asset unavailable: {exc}")
    return model, tok


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")  # one worker loads the model for both
def test_smollm2_lossless_greedy_reproduces_full_cache(smollm2):
    model, tok = smollm2
    model.set_attn_implementation("polar")
    msgs = [{"role": "user", "content": "Name three primary colors and explain why."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True).to(DEVICE)
    full = model.generate(**enc, max_new_tokens=24, do_sample=False)
    cache = PolarQuantCache(LOSSLESS_KV)
    polar = model.generate(**enc, max_new_tokens=24, do_sample=False, **generate_kwargs(cache))
    assert torch.equal(polar, full)
    assert isinstance(cache.layers[0], PolarQuantLayer) and cache.layers[0].polar_attention


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")  # one worker loads the model for both
def test_smollm2_needles_default_preset(smollm2):
    """Every needle the full cache retrieves in a small grid of essay haystacks (up to 2K
    tokens), the default PolarQuant cache retrieves too."""
    from polartensor.demo import ANSWER, answers_with_shared_prefill, build_needle_prompt

    model, tok = smollm2
    full_hits, polar_hits = [], []
    for n_tokens, depth in ((512, 0.5), (1024, 0.2), (2000, 0.8)):
        enc, _ = build_needle_prompt(tok, n_tokens, depth)
        full, polar = answers_with_shared_prefill(model, tok, enc, max_new_tokens=6)
        full_hits.append(ANSWER in full)
        polar_hits.append(ANSWER in polar)
    assert any(full_hits), "the full cache retrieved no needle: the grid is too hard"
    assert all(p for f, p in zip(full_hits, polar_hits) if f), (full_hits, polar_hits)


def test_chunked_prefill_quantizes_the_whole_prompt():
    """A prefill in chunks (generate's prefill_chunk_size) quantizes every prompt token, as one
    prefill does, each chunk attending to its own tokens at full precision; generated tokens
    stay in the 16-bit tail."""
    model = _tiny("llama", 64, 4, 2)
    model.set_attn_implementation("polar")
    ids, _ = _batch(batch=1, length=40, pad=())
    held = []
    for residual, chunk in ((0, None), (0, 16), (0, 7), (4, None), (4, 16)):
        cache = PolarQuantCache(attention="polar", residual_length=residual)
        kw = {} if chunk is None else dict(prefill_chunk_size=chunk)
        model.generate(ids, max_new_tokens=4, do_sample=False, **generate_kwargs(cache), **kw)
        rows = cache.memory_usage()
        assert all(r["tokens"] == 43 for r in rows)
        layer = cache.layers[0]
        assert layer._kbuf.length == 40 - residual and layer._tail.length == 3 + residual
        held.append((residual, layer.dequantized()[0][..., :40, :]))
    for residual, k in held[1:]:
        first = next(k0 for r0, k0 in held if r0 == residual)
        assert torch.equal(k, first)
    # a caller that feeds the prompt and then multi-token continuations says where the prompt
    # ends (end_prompt: the scorers do); the continuation then stays 16-bit, as generated
    # tokens do
    cache = PolarQuantCache("paper", attention="polar")
    x = torch.randn(1, 2, 28, 64)
    cache.update(x[..., :16, :], x[..., :16, :], 0)
    cache.update(x[..., 16:24, :], x[..., 16:24, :], 0)
    layer = cache.layers[0]
    assert layer._kbuf.length == 16 and layer._tail.length == 8  # the chunk being attended
    cache.end_prompt()
    assert layer._kbuf.length == 24 and layer._tail.length == 0
    cache.update(x[..., 24:, :], x[..., 24:, :], 0)
    assert layer._kbuf.length == 24 and layer._tail.length == 4
    # quantize_generated: every chunk after the first is quantized as generated tokens are
    cache = PolarQuantCache("paper", attention="polar", quantize_generated=True)
    for a, b in ((0, 16), (16, 24)):
        cache.update(x[..., a:b, :], x[..., a:b, :], 0)
    assert cache.layers[0]._kbuf.length == 24


def test_from_cache_refuses_sliding_window_layers():
    model = _tiny("gemma3", 16, 4, 2)
    ids, _ = _batch(batch=1, length=20, pad=())
    dyn = DynamicCache(config=model.config)
    _forward(model, ids, dyn)
    assert any(getattr(layer, "is_sliding", False) for layer in dyn.layers)
    with pytest.raises(ValueError, match="sliding-window layer"):
        PolarQuantCache.from_cache(dyn)


def test_static_cache_refuses_skip_layers():
    """A static cache beside full-precision skipped layers got no mask at decode (transformers
    drops it unless every layer is static), so its static layers attended to unwritten rows:
    the combination is refused up front."""
    with pytest.raises(ValueError, match="cannot skip layers"):
        PolarQuantCache(max_cache_len=40, skip_layers=(1,))


def test_from_cache_equals_prefill_with_polar_cache():
    model = _tiny("llama", 64, 4, 2)
    model.set_attn_implementation("polar")
    ids, mask = _batch()
    direct = PolarQuantCache(residual_length=2)
    _forward(model, ids, direct, attention_mask=mask)
    dyn = DynamicCache()
    _forward(model, ids, dyn, attention_mask=mask)
    converted = PolarQuantCache.from_cache(dyn, residual_length=2)
    for a, b in zip(direct.layers, converted.layers):
        for x, y in zip(a.dequantized(), b.dequantized()):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
