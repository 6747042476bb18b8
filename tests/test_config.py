import pytest
import torch

from polartensor.config import PRESETS, PolarQuantConfig, as_config, get_preset


def test_paper_preset_bits():
    cfg = PolarQuantConfig.paper()
    assert cfg.levels == 4 and cfg.bits == (4, 2, 2, 2) and cfg.radius_dtype == "float16"
    assert cfg.bits_per_coordinate() == pytest.approx(3.875)
    assert cfg.bits_per_coordinate(128) == pytest.approx(3.875)
    assert cfg.compression_ratio(128) == pytest.approx(16 / 3.875)


def test_bits_per_coordinate_counts_padding():
    cfg = PolarQuantConfig(levels=1, bits=3, radius_dtype="float32")
    # 32 level-1 angles * 3 bits = 96 bits = 12 bytes, 32 fp32 radii, over 64 coordinates
    assert cfg.record_bytes(64) == 12
    assert cfg.bits_per_coordinate(64) == pytest.approx((96 + 32 * 32) / 64)
    # 3 angles * 3 bits = 9 bits -> 2 bytes when head_dim = 6... (block 2): padding counted
    assert PolarQuantConfig(levels=1, bits=3).record_bytes(6) == 2


def test_int_bits_broadcast_and_dtype_aliases():
    cfg = PolarQuantConfig(levels=3, bits=2, radius_dtype=torch.bfloat16)
    assert cfg.bits == (2, 2, 2) and cfg.radius_dtype == "bfloat16"
    assert PolarQuantConfig(radius_dtype="fp32").torch_radius_dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(levels=0), "levels"),
        (dict(levels=2, bits=(4, 2, 2)), "bits has 3 entries"),
        (dict(levels=2, bits=(0, 2)), "level-1 bits"),
        (dict(levels=2, bits=(4, 9)), "level-2 bits"),
        (dict(radius_dtype="int8"), "radius_dtype"),
        (dict(codebook="learned"), "codebook"),
        (dict(rotation="random"), "rotation"),
        (dict(seed=-1), "seed"),
        (dict(levels=2.0), "levels"),
        # a fractional bit width is refused, not truncated to (2, 2)
        (dict(levels=2, bits=(2.5, 2)), "sequence of ints"),
        (dict(levels=2, bits=(True, 2)), "sequence of ints"),
        (dict(seed=2**70), "seed"),
    ],
)
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolarQuantConfig(**kwargs)


def test_head_dim_checks():
    with pytest.raises(ValueError, match="not divisible by the block size"):
        PolarQuantConfig(levels=4).check_head_dim(72 + 4)
    for kind in ("hadamard", "permuted_hadamard"):
        with pytest.raises(ValueError, match=f"rotation='{kind}' needs a power-of-two"):
            PolarQuantConfig(levels=1, rotation=kind).check_head_dim(96)
    # an odd head_dim fits no depth: the message says so rather than naming a depth
    for levels in (1, 3):
        with pytest.raises(ValueError, match="head_dim 3 is odd"):
            PolarQuantConfig(levels=levels).check_head_dim(3)


def test_presets_resolve_per_head_dim():
    for name in PRESETS:
        for d in (64, 128, 256):
            cfg = get_preset(name, d)
            cfg.check_head_dim(d)
    assert get_preset("polar-3.25", 128).bits_per_coordinate(128) <= 3.25
    assert get_preset("polar-3.25", 64).levels == 6
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    assert as_config("paper") == PolarQuantConfig.paper()
    assert as_config(None) == PolarQuantConfig.paper()


def test_config_is_hashable_and_frozen():
    cfg = PolarQuantConfig.paper()
    assert hash(cfg) == hash(PolarQuantConfig.paper())
    with pytest.raises(AttributeError):
        cfg.levels = 3  # type: ignore[misc]
