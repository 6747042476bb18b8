"""Cache methods side by side: KIVI reimplementation, registry, bit accounting, protocol."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

# On the CPU the reference runs the attention (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("reference_on_cpu")

from polartensor.eval import available_methods, cache_bits, make_method  # noqa: E402
from polartensor.eval.common import tiny_llama  # noqa: E402
from polartensor.eval.kivi import KIVICache, KIVILayer, quantize_groups  # noqa: E402
from polartensor.eval.scoring import cache_from_kv, forward, kl_and_nll, prefill  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # HQQ's quantizer and the tiny model are faster on one thread than on two busy cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=128, max_positions=1024)


def test_quantize_groups_levels_and_error():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 16)
    for bits in (2, 4):
        y = quantize_groups(x, bits, dim=1)
        # each (row, channel) slice over dim 1 takes at most 2**bits distinct values
        for i in range(4):
            for c in range(16):
                assert torch.unique(y[i, :, c]).numel() <= 2 ** bits
        err = (y - x).abs().max()
        step = (x.amax(1) - x.amin(1)).max() / (2 ** bits - 1)
        assert err <= step / 2 + 1e-2


def test_kivi_layer_window_and_groups():
    layer = KIVILayer(nbits=2, group_size=32, residual_length=128)
    k = torch.randn(1, 2, 300, 64)
    out_k, _ = layer.update(k, k.clone())
    assert torch.equal(out_k, k)  # prefill attends in full precision
    # floor((300 - 128) / 32) * 32 = 160 tokens quantized, 140 in full precision
    assert layer.quantized_length == 160 and layer.keys.shape[-2] == 140
    assert layer.get_seq_length() == 300
    assert torch.equal(layer.keys, k[..., 160:, :])
    step = torch.randn(1, 2, 1, 64)
    kk, vv = layer.update(step, step)
    assert kk.shape[-2] == 301 and torch.equal(kk[..., -1:, :], step)
    bits, elements = layer.memory_bits()
    assert elements == 2 * 2 * 301 * 64
    # 160 quantized tokens at 2 bits + fp16 scale/zero, 141 tokens at 16 bits
    want = (2 * 160 * 64 * 2 + 2 * 5 * 64 * 32) + (2 * 160 * 64 * 2 + 2 * 160 * 2 * 32) \
        + 141 * 2 * 64 * 16 * 2
    assert bits == want


@pytest.mark.parametrize("name", ["full", "kivi-2", "kivi-4", "polar:paper", "polar:polar-3",
                                  "polar:paper/polar-4+r32", "quanto-2", "hqq-4"])
def test_fill_from_prefill_equals_real_prefill(model, name):
    """Writing full-precision prefill K/V into a cache == prefilling through that cache."""
    if name.startswith("quanto"):
        pytest.importorskip("optimum.quanto")
    if name.startswith("hqq"):
        pytest.importorskip("hqq")
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 220))
    ctx, chunk = ids[:, :200], ids[:, 200:]
    meth = make_method(name)
    meth.prepare(model)
    _, kv = prefill(model, ctx)
    a = forward(model, chunk, cache_from_kv(meth, model, kv)).logits
    c = meth.new_cache(model)
    forward(model, ctx, c)
    b = forward(model, chunk, c).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bits_accounting(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 512))
    _, kv = prefill(model, ids)
    got = {}
    for name in ["full", "kivi-2", "polar:paper", "polar:polar-4"]:
        meth = make_method(name)
        meth.prepare(model)
        got[name] = cache_bits(cache_from_kv(meth, model, kv))["bits_per_element"]
    assert got["full"] == 16
    # paper preset: 3.875 bits at head_dim 64 + the codebook table (< 0.05 bit here)
    assert 3.875 <= got["polar:paper"] < 3.93
    # KIVI-2: 2 + 1 (key scale/zero per 32 tokens) on the quantized part, value 2 + 1 bit;
    # floor((512-128)/32)*32 = 384 quantized tokens, 128 full precision
    assert got["kivi-2"] == pytest.approx((384 * 3 + 128 * 16) / 512)
    assert got["polar:polar-4"] > got["polar:paper"]


def test_registry_names_and_errors():
    names = available_methods()
    assert names[0] == "full" and "polar:default" in names and "kivi-2" in names
    m = make_method("polar:polar-4/polar-3+online+r64")
    assert m.family == "polarquant" and m.details["residual_length"] == 64
    assert m.details["online_codebooks"] and m.details["key"] == "polar-4"
    with pytest.raises(ValueError, match="unknown method"):
        make_method("int3")
    with pytest.raises(ValueError, match="unknown option"):
        make_method("polar:paper+fast")


@pytest.mark.parametrize("kind", ["hadamard", "permuted_hadamard"])
def test_rotation_option_swaps_the_rotation(model, kind):
    """``+hadamard`` / ``+permuted_hadamard`` keep the preset's bits and radii and swap only
    its rotation."""
    cache = make_method(f"polar:paper+{kind}").factory(model)
    plain = make_method("polar:paper").factory(model)
    kv, kv0 = cache.kv_config, plain.kv_config
    for got, want in ((kv.key_config, kv0.key_config), (kv.value_config, kv0.value_config)):
        assert got.rotation == kind and want.rotation == "orthogonal"
        assert (got.bits, got.levels, got.radius_dtype) == (want.bits, want.levels,
                                                            want.radius_dtype)
    assert make_method(f"polar:paper+{kind}").details["rotation"] == kind


def test_seed_option_swaps_only_the_seed(model):
    """``+s<N>`` draws the preset's rotation with seed N, beside a rotation option too."""
    plain = make_method("polar:paper").factory(model).kv_config
    for name, kind in (("polar:paper+s7", "orthogonal"),
                       ("polar:paper+permuted_hadamard+s7", "permuted_hadamard")):
        kv = make_method(name).factory(model).kv_config
        for got, want in ((kv.key_config, plain.key_config),
                          (kv.value_config, plain.value_config)):
            assert got.seed == 7 != want.seed and got.rotation == kind
            assert (got.bits, got.levels) == (want.bits, want.levels)
    m = make_method("polar:paper+s7")
    assert m.details["seed"] == 7 and "seed 7" in m.label
    assert make_method("polar:paper").details["seed"] == "preset's"


def test_kl_and_nll():
    a = torch.randn(1, 5, 11)
    r = kl_and_nll(a, a, torch.zeros(1, 5, dtype=torch.long))
    assert torch.allclose(r["kl"], torch.zeros(1, 5, dtype=torch.float64), atol=1e-12)
    assert r["top1_agree"].mean() == 1
    b = a + torch.randn_like(a)
    assert (kl_and_nll(a, b)["kl"] > 0).all()


def test_kivi_cache_generates(model):
    ids = torch.randint(0, 128, (1, 40))
    model.set_attn_implementation("sdpa")
    from polartensor.eval.scoring import CACHE_KWARG

    out = model.generate(ids, max_new_tokens=5, do_sample=False,
                         **{CACHE_KWARG: KIVICache(nbits=4, residual_length=8)})
    assert out.shape == (1, 45)


def test_polar_paper_mode_keeps_appended_tokens_full_precision(model):
    """polar:<preset> quantizes the context only; +qgen also quantizes appended tokens."""
    from polartensor.eval.methods import describe_cache

    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 140))
    ctx, chunk = ids[:, :120], ids[:, 120:]
    _, kv = prefill(model, ctx)
    full = make_method("full")
    full.prepare(model)
    ref = forward(model, chunk, cache_from_kv(full, model, kv)).logits
    out = {}
    for name in ("polar:paper", "polar:paper+qgen"):
        meth = make_method(name)
        meth.prepare(model)
        cache = cache_from_kv(meth, model, kv)
        assert describe_cache(cache)["quantize_generated"] == name.endswith("+qgen")
        out[name] = kl_and_nll(ref, forward(model, chunk, cache).logits)["kl"].mean()
    assert 0 < out["polar:paper"] < out["polar:paper+qgen"]
