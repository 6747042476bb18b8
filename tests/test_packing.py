import torch
from hypothesis import given
from hypothesis import strategies as st

from polartensor.config import PolarQuantConfig
from polartensor.packing import pack_codes, unpack_codes


@st.composite
def configs_and_dims(draw):
    levels = draw(st.integers(1, 6))
    bits = tuple([draw(st.integers(1, 8))] + [draw(st.integers(0, 8)) for _ in range(levels - 1)])
    head_dim = (1 << levels) * draw(st.integers(1, 4))
    return PolarQuantConfig(levels=levels, bits=bits), head_dim


@given(configs_and_dims(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(cfg_dim, rows, seed):
    cfg, d = cfg_dim
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, 1 << b, (rows, n), generator=g) for n, b in
             zip(cfg.angles_per_level(d), cfg.bits)]
    packed = pack_codes(codes, cfg, d)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, cfg.record_bytes(d))
    for a, b in zip(codes, unpack_codes(packed, cfg, d)):
        assert torch.equal(a, b)


def test_bit_layout_is_lsb_first_stream():
    cfg = PolarQuantConfig(levels=1, bits=3)
    codes = [torch.tensor([[5, 6, 7]])]  # bits: 101 011 111 -> stream 1,0,1, 0,1,1, 1,1,1
    packed = pack_codes(codes, cfg, 6)
    stream = [1, 0, 1, 0, 1, 1, 1, 1, 1] + [0] * 7
    expect = [sum(b << i for i, b in enumerate(stream[k * 8:(k + 1) * 8])) for k in range(2)]
    assert packed.tolist() == [expect]


def _naive_pack(codes, cfg, d):
    """The record layout spelled out bit by bit: bit k of the stream is bit k % 8 of byte
    k // 8, code j of level l at bit offset_l + j * bits_l, LSB first."""
    out = [0] * (codes[0].shape[0] * cfg.record_bytes(d))
    rows = codes[0].shape[0]
    nb = cfg.record_bytes(d)
    for c, b, off in zip(codes, cfg.bits, cfg.level_bit_offsets(d)):
        for r in range(rows):
            for j, v in enumerate(c[r].tolist()):
                for i in range(b):
                    if (v >> i) & 1:
                        k = off + j * b + i
                        out[r * nb + k // 8] |= 1 << (k % 8)
    return torch.tensor(out, dtype=torch.uint8).reshape(rows, nb)


@given(configs_and_dims(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_pack_matches_the_bit_by_bit_layout(cfg_dim, rows, seed):
    cfg, d = cfg_dim
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, 1 << b, (rows, n), generator=g) for n, b in
             zip(cfg.angles_per_level(d), cfg.bits)]
    assert torch.equal(pack_codes(codes, cfg, d), _naive_pack(codes, cfg, d))
