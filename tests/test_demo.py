"""The main job (``python -m polartensor``) end to end on a short haystack."""

from __future__ import annotations

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
