"""The main job (``python -m polartensor``) end to end on a short haystack."""

from __future__ import annotations

import re

import pytest
import torch


@pytest.mark.slow
def test_main_job_prints_answers_bytes_ratio_and_speed(capsys, monkeypatch):
    from polartensor import assets, demo

    # The quick path on CPU: PyTorch reference attention, not the Triton interpreter.
    monkeypatch.setenv("POLARTENSOR_REFERENCE", "1")
    try:
        assets.smollm2_dir()
    except assets.AssetUnavailableError as exc:
        pytest.skip(f"SmolLM2 asset unavailable: {exc}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert demo.main(["--tokens", "300", "--max-new-tokens", "6", "--device", device]) == 0
    out = capsys.readouterr().out
    for text in ("[full cache]", "[PolarQuant]", "KV cache bytes", "compression vs",
                 "decode tokens/s", "needle found", demo.ANSWER_PREFIX, "smaller"):
        assert text in out, text
    found = [line for line in out.splitlines() if line.startswith("needle found")]
    assert found and "yes" in found[0]


@pytest.mark.parametrize("argv, match", [
    (["--key", "polar-9"], "unknown preset 'polar-9'"),
    (["--residual", "-5"], "residual_length must be an int >= 0"),
    (["--device", "foo"], "--device 'foo'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--tokens", "-3"], "--tokens must be >= 1"),
    (["--depth", "2"], r"--depth must be in \[0, 1\]"),
])
def test_bad_arguments_are_refused_before_the_model_loads(argv, match, capsys, monkeypatch):
    from polartensor import assets, demo

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(assets, "load_smollm2", no_model)
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)
