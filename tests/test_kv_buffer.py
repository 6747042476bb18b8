"""Buffer logic (offsets, growth, crop, reorder) on the reference encoder, where codes are
exactly reproducible; tests/kernels checks that the fused encoder writes the same records."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polartensor.config import PolarQuantConfig
from polartensor.kernels.dispatch import force_reference
from polartensor.kv_buffer import PolarKVBuffer
from polartensor.polar_quant_tensor import quantize


@pytest.fixture(autouse=True)
def _reference_encoder():
    with force_reference():
        yield


@given(st.lists(st.integers(1, 9), min_size=1, max_size=8), st.integers(0, 10**6),
       st.sampled_from(["paper", "polar-3"]))
def test_chunked_append_equals_whole_quantize(chunks, seed, preset):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, sum(chunks), 64, generator=g)
    buf = PolarKVBuffer(preset)
    pos = 0
    for c in chunks:
        view = buf.append(x[:, :, pos:pos + c])
        pos += c
        assert view.shape == (2, 3, pos, 64)
    whole = quantize(x, PolarQuantConfig.preset(preset, 64) if preset != "paper" else preset)
    assert torch.equal(buf.view().codes, whole.codes)
    assert torch.equal(buf.view().radii, whole.radii)


def test_growth_is_geometric_and_old_tokens_not_rewritten():
    buf = PolarKVBuffer("paper")
    x = torch.randn(1, 1, 1000, 64)
    reallocs, last_ptr = 0, None
    first_token_codes = None
    for t in range(1000):
        buf.append(x[:, :, t:t + 1])
        ptr = buf.codes.data_ptr()
        if ptr != last_ptr:
            reallocs += 1
            last_ptr = ptr
        if t == 0:
            first_token_codes = buf.codes[..., 0, :].clone()
    assert reallocs <= 8  # 16 -> 32 -> ... -> 1024: amortized O(1) copies per token
    assert buf.capacity >= 1000 and buf.length == 1000
    assert torch.equal(buf.codes[..., 0, :], first_token_codes)


@settings(max_examples=15, deadline=None)
@given(prompt=st.integers(1, 70), steps=st.integers(0, 40))
def test_growable_capacity_keeps_heads_16_byte_aligned(prompt, steps):
    """A growable buffer's capacity is a multiple of 8 tokens after the first append and
    after every growth, so each head's records start 16-byte aligned and the Gluon decode's
    staged ring serves its view."""
    from polartensor.kernels.decode_attention_gluon import staged_fits

    buf = PolarKVBuffer("paper")
    buf.append(torch.randn(2, 3, prompt, 128))
    caps = {buf.capacity}
    for _ in range(steps):
        buf.append(torch.randn(2, 3, 1, 128))
        caps.add(buf.capacity)
    assert all(c % 8 == 0 for c in caps) and buf.capacity >= prompt + steps
    view = buf.view()
    assert staged_fits(view.codes, view.radii)


@settings(max_examples=10, deadline=None)
@given(capacity=st.integers(1, 40), fill=st.integers(0, 40))
def test_static_capacity_is_exact_and_its_storage_fits_the_ring(capacity, fill):
    """A static buffer holds exactly the capacity asked for (one token more raises), while
    its storage rounds up to 8 tokens so the staged ring serves it; the spare rows stay
    zero and out of the view."""
    from polartensor.kernels.decode_attention_gluon import staged_fits

    fill = min(fill, capacity)
    buf = PolarKVBuffer("paper", capacity=capacity, static=True)
    buf.append(torch.randn(2, 3, max(fill, 1), 128))
    while buf.length < fill:
        buf.append(torch.randn(2, 3, 1, 128))
    assert buf.capacity == capacity and buf.codes.shape[-2] == -(-capacity // 8) * 8
    view = buf.view()
    assert view.codes.shape[-2] == buf.length and staged_fits(view.codes, view.radii)
    assert not buf.codes[..., capacity:, :].any() and not buf.radii[..., capacity:, :].any()
    if buf.length < capacity:
        buf.append(torch.randn(2, 3, capacity - buf.length, 128))
    with pytest.raises(RuntimeError, match="static PolarKVBuffer is full: capacity "
                       f"{capacity}, need {capacity + 1}"):
        buf.append(torch.randn(2, 3, 1, 128))


def test_static_buffer_never_reallocates_and_raises_when_full():
    buf = PolarKVBuffer("paper", capacity=8, static=True)
    buf.append(torch.randn(1, 2, 5, 64))
    ptr = buf.codes.data_ptr()
    buf.append(torch.randn(1, 2, 3, 64))
    assert buf.codes.data_ptr() == ptr
    with pytest.raises(RuntimeError, match="static PolarKVBuffer is full"):
        buf.append(torch.randn(1, 2, 1, 64))
    # the first append too: a static buffer holds the capacity asked for
    with pytest.raises(RuntimeError, match="capacity 4 cannot take 6 tokens"):
        PolarKVBuffer("paper", capacity=4, static=True).append(torch.randn(1, 1, 6, 64))


def test_crop_reorder_reset():
    x = torch.randn(3, 2, 10, 64)
    buf = PolarKVBuffer("paper")
    buf.append(x)
    full = buf.view().dequantize()
    buf.crop(6)
    assert buf.view().shape[-2] == 6 and torch.equal(buf.view().dequantize(), full[:, :, :6])
    buf.crop(-2)
    assert buf.length == 4
    with pytest.raises(ValueError, match="cannot crop"):
        buf.crop(7)
    idx = torch.tensor([2, 2, 0])
    buf.reorder(idx)
    assert torch.equal(buf.view().dequantize(), full[idx, :, :4])
    # only the leading (batch, head) dims reorder; the index is 1-D
    for dim in (2, 3, 4, -1, -2, -5):
        with pytest.raises(IndexError, match="leading dims are \\[3, 2\\]"):
            buf.reorder(torch.tensor([1, 0]), dim=dim)
    with pytest.raises(ValueError, match="1-D"):
        buf.reorder(torch.tensor([[0, 1, 2]]))
    buf.reorder(torch.tensor([1, 0]), dim=-3)  # the heads of [batch, heads, seq, head_dim]
    assert torch.equal(buf.view().dequantize(), full[idx][:, [1, 0], :4])
    # views up to the capacity (a static cache writes past the appended length itself)
    assert buf.view(0).shape[-2] == 0 and buf.view(buf.capacity).shape[-2] == buf.capacity
    for bad in (-1, buf.capacity + 1):
        with pytest.raises(ValueError, match="view of"):
            buf.view(bad)
    buf.reset()
    assert buf.length == 0
    buf.append(x[:, :, :1])
    assert buf.view().shape == (3, 2, 1, 64)


def test_append_validation():
    buf = PolarKVBuffer("paper")
    buf.append(torch.randn(1, 2, 3, 64))
    with pytest.raises(ValueError, match="does not match"):
        buf.append(torch.randn(1, 3, 1, 64))
    with pytest.raises(ValueError, match="static buffer needs capacity"):
        PolarKVBuffer("paper", static=True)
    with pytest.raises(RuntimeError, match="empty"):
        PolarKVBuffer("paper").view()
    for growth in (1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="growth"):
            PolarKVBuffer("paper", growth=growth)
    for cap in (-1, 2.5):
        with pytest.raises(ValueError, match="capacity"):
            PolarKVBuffer("paper", capacity=cap)


def test_online_codebook_fitted_once_and_reused():
    cfg = PolarQuantConfig(levels=4, bits=(3, 2, 2, 2), codebook="online")
    buf = PolarKVBuffer(cfg)
    x = torch.randn(1, 2, 40, 64) * torch.linspace(0.1, 2, 64) + 0.5
    buf.append(x[:, :, :30])
    table = buf.centroids.clone()
    buf.append(x[:, :, 30:])
    assert torch.equal(buf.centroids, table)
    assert buf.memory_bytes() > 0 and buf.allocated_bytes() >= buf.memory_bytes()
