"""PolarQuant configuration: levels, per-level bits, radius storage, codebooks, rotation."""

from __future__ import annotations

import dataclasses
import operator

import torch

try:  # torchao is a hard dependency on CPU; on a bare GPU image it may travel as a wheel.
    from torchao.core.config import AOBaseConfig
except ImportError:  # pragma: no cover - exercised only where torchao is absent

    class AOBaseConfig:  # type: ignore[no-redef]
        """Stand-in so the config stays importable without torchao."""


__all__ = ["PolarQuantConfig", "PRESETS", "RADIUS_DTYPES", "get_preset"]

RADIUS_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_CODEBOOKS = ("offline", "online")
_ROTATIONS = ("orthogonal", "hadamard", "permuted_hadamard", "none")
MAX_BITS = 8


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, dt in RADIUS_DTYPES.items():
            if dt == dtype:
                return name
        raise ValueError(
            f"radius_dtype {dtype} is not supported; use one of {sorted(RADIUS_DTYPES)}"
        )
    name = str(dtype).removeprefix("torch.")
    name = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
            "float": "float32"}.get(name, name)
    if name not in RADIUS_DTYPES:
        raise ValueError(
            f"radius_dtype {dtype!r} is not supported; use one of {sorted(RADIUS_DTYPES)}"
        )
    return name


@dataclasses.dataclass(frozen=True)
class PolarQuantConfig(AOBaseConfig):
    """How one K or V head vector of ``head_dim`` coordinates is quantized.

    ``levels`` polar levels over blocks of ``2**levels`` coordinates; ``bits[l-1]`` bits per
    angle at level ``l`` (level 1 angles live on [0, 2pi), deeper ones on [0, pi/2]); one
    radius per block stored in ``radius_dtype``. ``bits`` may be a single int (all levels);
    by default 4 bits at level 1 and 2 at deeper levels, as in the paper.
    Level-1 angles need at least 1 bit; deeper levels may use 0 bits (the angle is then
    reconstructed as its mean, pi/4).
    """

    levels: int = 4
    bits: tuple[int, ...] | int | None = None
    radius_dtype: str | torch.dtype = "float16"
    codebook: str = "offline"
    rotation: str = "orthogonal"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int):
            raise ValueError(f"levels must be an int >= 1, got {self.levels!r}")
        if self.levels < 1 or self.levels > 12:
            raise ValueError(f"levels must be between 1 and 12 (log2(head_dim)), got {self.levels}")
        bits = self.bits
        if bits is None:  # the paper's allocation, extended to any depth
            bits = (4,) + (2,) * (self.levels - 1)
        if isinstance(bits, int) and not isinstance(bits, bool):
            bits = (bits,) * self.levels
        try:
            # operator.index: a float (2.5, or even 2.0) is refused rather than truncated
            bits = tuple(bits)  # type: ignore[arg-type]
            if any(isinstance(b, bool) for b in bits):
                raise TypeError
            bits = tuple(operator.index(b) for b in bits)
        except TypeError as exc:
            raise ValueError(
                f"bits must be an int or a sequence of ints, got {self.bits!r}"
            ) from exc
        if len(bits) != self.levels:
            raise ValueError(
                f"bits has {len(bits)} entries but levels={self.levels}: give one bit width per "
                "level, e.g. PolarQuantConfig(levels=4, bits=(4, 2, 2, 2))"
            )
        if not 1 <= bits[0] <= MAX_BITS:
            raise ValueError(f"level-1 bits must be in 1..{MAX_BITS}, got {bits[0]}")
        for lvl, b in enumerate(bits[1:], start=2):
            if not 0 <= b <= MAX_BITS:
                raise ValueError(f"level-{lvl} bits must be in 0..{MAX_BITS}, got {b}")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "radius_dtype", _dtype_name(self.radius_dtype))
        if self.codebook not in _CODEBOOKS:
            raise ValueError(f"codebook must be one of {_CODEBOOKS}, got {self.codebook!r}")
        if self.rotation not in _ROTATIONS:
            raise ValueError(f"rotation must be one of {_ROTATIONS}, got {self.rotation!r}")
        if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")

    # -- derived quantities -------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return 1 << self.levels

    @property
    def torch_radius_dtype(self) -> torch.dtype:
        return RADIUS_DTYPES[self.radius_dtype]  # type: ignore[index]

    @property
    def radius_bits(self) -> int:
        return torch.finfo(self.torch_radius_dtype).bits

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a ValueError naming the fix when ``head_dim`` does not fit this config."""
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if head_dim % 2:
            raise ValueError(
                f"head_dim {head_dim} is odd; PolarQuant pairs coordinates, so head_dim must be "
                "even (pad the head vectors with a zero coordinate)"
            )
        if head_dim % self.block_size:
            raise ValueError(
                f"head_dim {head_dim} is not divisible by the block size 2**levels = "
                f"{self.block_size}; choose levels <= {_max_levels(head_dim)}"
            )
        if self.rotation.endswith("hadamard") and head_dim & (head_dim - 1):
            raise ValueError(
                f"rotation={self.rotation!r} needs a power-of-two head_dim, got {head_dim}; "
                "use rotation='orthogonal'"
            )

    def angles_per_level(self, head_dim: int) -> tuple[int, ...]:
        self.check_head_dim(head_dim)
        return tuple(head_dim >> lvl for lvl in range(1, self.levels + 1))

    def level_bit_offsets(self, head_dim: int) -> tuple[int, ...]:
        """Bit offset of each level's codes in a token record (one LSB-first bit stream)."""
        offs, pos = [], 0
        for n, b in zip(self.angles_per_level(head_dim), self.bits):
            offs.append(pos)
            pos += n * b
        return tuple(offs)

    def code_bits(self, head_dim: int) -> int:
        return sum(n * b for n, b in zip(self.angles_per_level(head_dim), self.bits))

    def record_bytes(self, head_dim: int) -> int:
        """Bytes of packed angle codes per head vector (all levels in one bit stream)."""
        return max(1, (self.code_bits(head_dim) + 7) // 8)

    def num_blocks(self, head_dim: int) -> int:
        self.check_head_dim(head_dim)
        return head_dim // self.block_size

    def bits_per_coordinate(self, head_dim: int | None = None) -> float:
        """Stored bits per coordinate: angle bits + radius bits, per block of 2**levels.

        With ``head_dim`` the byte padding of each level section is counted too.
        """
        if head_dim is None:
            b = self.block_size
            angle_bits = sum(bits * b / (1 << lvl) for lvl, bits in enumerate(self.bits, 1))
            return (angle_bits + self.radius_bits) / b
        total = 8 * self.record_bytes(head_dim) + self.radius_bits * self.num_blocks(head_dim)
        return total / head_dim

    def compression_ratio(self, head_dim: int, baseline_bits: int = 16) -> float:
        return baseline_bits / self.bits_per_coordinate(head_dim)

    def replace(self, **changes) -> PolarQuantConfig:
        return dataclasses.replace(self, **changes)

    # -- named presets -------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides) -> PolarQuantConfig:
        """The paper's setting: 4 levels, bits (4, 2, 2, 2), fp16 radii (3.875 b/coord)."""
        return cls(**{"levels": 4, "bits": (4, 2, 2, 2), "radius_dtype": "float16", **overrides})

    @classmethod
    def preset(cls, name: str, head_dim: int | None = None, **overrides) -> PolarQuantConfig:
        return get_preset(name, head_dim, **overrides)


def _max_levels(head_dim: int) -> int:
    lv = 0
    while head_dim % (2 << lv) == 0 and lv < 12:
        lv += 1
    return max(lv, 1)


# Presets on the quality frontier (scripts/distortion.py measures them). The number in the name
# is the stored bits per coordinate at head_dim 128, radii and byte padding included. Full-depth
# recursion (levels=7: one fp16 radius per 128 coordinates) spends few bits on radii, and deep
# angles, concentrated near pi/4, need few bits. For a head_dim that 2**levels does not divide
# (e.g. 64), get_preset(name, head_dim) drops the deepest levels of these full-depth presets:
# one radius per 2**levels. Fixed-depth presets ("paper") are never changed: a head_dim they do
# not fit is an error.
PRESETS: dict[str, dict] = {
    "paper": dict(levels=4, bits=(4, 2, 2, 2), radius_dtype="float16"),
    "polar-2": dict(levels=7, bits=(3, 1, 1, 0, 0, 0, 0), radius_dtype="float16"),
    "polar-2.5": dict(levels=7, bits=(3, 2, 2, 1, 1, 1, 2), radius_dtype="float16"),
    "polar-3": dict(levels=7, bits=(4, 2, 2, 1, 1, 1, 2), radius_dtype="float16"),
    "polar-3.25": dict(levels=7, bits=(4, 2, 3, 2, 2, 3, 2), radius_dtype="float16"),
    "polar-3.5": dict(levels=7, bits=(4, 3, 3, 2, 2, 3, 2), radius_dtype="float16"),
    "polar-4": dict(levels=7, bits=(5, 3, 3, 2, 2, 3, 2), radius_dtype="float16"),
    "polar-4.5": dict(levels=7, bits=(5, 4, 4, 3, 3, 4, 4), radius_dtype="float16"),
    "polar-5": dict(levels=7, bits=(6, 4, 4, 3, 3, 4, 4), radius_dtype="float16"),
}


FIXED_DEPTH_PRESETS = frozenset({"paper"})


def get_preset(name: str, head_dim: int | None = None, **overrides) -> PolarQuantConfig:
    """A named preset; with ``head_dim``, levels are capped at what head_dim allows."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    params = {**PRESETS[name], **overrides}
    adaptive = name not in FIXED_DEPTH_PRESETS and "levels" not in overrides
    if head_dim is not None and adaptive:
        cap = _max_levels(head_dim)
        if params["levels"] > cap:
            params["levels"] = cap
            params["bits"] = tuple(params["bits"])[:cap]
    return PolarQuantConfig(**params)


def as_config(cfg: PolarQuantConfig | str | None, head_dim: int | None = None) -> PolarQuantConfig:
    """A config from a config, a preset name, or None (the paper preset)."""
    if cfg is None:
        return PolarQuantConfig.paper()
    if isinstance(cfg, str):
        return get_preset(cfg, head_dim)
    if isinstance(cfg, PolarQuantConfig):
        return cfg
    raise TypeError(f"expected a PolarQuantConfig or a preset name, got {type(cfg).__name__}")
