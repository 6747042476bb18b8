"""Loaders for our local lm-eval tasks: jsonl files next to this folder, read with the
``datasets`` json builder (``load_dataset("json", data_files=...)``, no hub access), with the
path resolved relative to this file so the tasks work from any working directory."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str, **kwargs):
    import datasets

    files = kwargs.get("data_files") or {"test": str(DATA / f"{name}.jsonl")}
    return datasets.load_dataset("json", data_files=files)


def load_essay_next(**kwargs):
    return _load("essay_next", **kwargs)


def load_essay_recall(**kwargs):
    return _load("essay_recall", **kwargs)
