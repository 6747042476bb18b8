"""Shared plumbing for the evaluation scripts: models, texts, results files, plots."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

__all__ = [
    "ByteTokenizer",
    "FAMILY_COLORS",
    "command_line",
    "load_model",
    "load_text",
    "markdown_table",
    "plot_frontier",
    "write_results",
]

FAMILY_COLORS = {
    "full": "black",
    "quanto": "tab:orange",
    "hqq": "tab:green",
    "kivi": "tab:purple",
    "polarquant": "tab:blue",
}


class ByteTokenizer:
    """A stand-in tokenizer for the tiny random test model: UTF-8 bytes are the tokens."""

    vocab_size = 256
    eos_token_id = 0
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def tiny_llama(vocab_size: int = 256, max_positions: int = 8192, seed: int = 0):
    """A small random Llama (2 layers, GQA, head_dim 64) for fast tests of the pipelines."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=max_positions,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def set_threads(threads: int | None = None) -> int:
    """Intra-op threads: ``threads``, or all cores unless the machine is already busy (on a
    loaded 2-core machine one thread is ~3x faster than two fighting for the cores)."""
    if threads is None:
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0] > cores
        except OSError:
            busy = False
        threads = 1 if busy else cores
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def save_tiny_model(path: str | Path, vocab_size: int = 320, max_positions: int = 4096) -> Path:
    """Save a tiny random Llama with a byte-level tokenizer as a transformers directory.

    For fast offline tests of anything that loads a model by path (e.g. lm-eval's HFLM).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    model = tiny_llama(vocab_size=vocab_size, max_positions=max_positions)
    model.config.eos_token_id = model.config.pad_token_id = vocab["<|endoftext|>"]
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = vocab["<|endoftext|>"]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_model(name: str = "smollm2", threads: int | None = None):
    """(model, tokenizer): ``smollm2`` (the real offline model) or ``tiny`` (random, tests)."""
    set_threads(threads)
    if name == "tiny":
        return tiny_llama(), ByteTokenizer()
    if name == "smollm2":
        from ..assets import load_smollm2

        return load_smollm2(torch.float32, "cpu")
    raise ValueError(f"unknown model {name!r}; use smollm2 or tiny")


def load_text(name: str) -> str:
    """Evaluation text: ``heldout`` essays (default), ``pydoc`` (stdlib topics), ``essays``."""
    from .. import assets

    if name == "heldout":
        return assets.text_split("heldout")
    if name == "pydoc":
        return assets.pydoc_text()
    if name == "essays":
        return assets.essay_haystack()
    raise ValueError(f"unknown text {name!r}; use heldout, pydoc or essays")


def command_line() -> str:
    """The command that is running, as a shell line (recorded in every results file)."""
    prog = sys.argv[0]
    if prog.endswith(".py"):
        try:
            prog = os.path.relpath(prog)
        except ValueError:
            pass
        return " ".join(["python", shlex.quote(prog), *map(shlex.quote, sys.argv[1:])])
    if prog in ("-c", ""):  # python -c (pytest-xdist workers, embedding): argv has no script
        return " ".join(["python", "-c", "...", *map(shlex.quote, sys.argv[1:])])
    return " ".join(map(shlex.quote, sys.argv))


def write_results(out_dir: Path, stem: str, payload: dict, markdown: str) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` (with the exact command) under ``out_dir``;
    methods listed in ``payload["errors"]`` get their own section in the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = payload.get("errors") or {}
    if errors:
        markdown = (markdown.rstrip() + "\n\nMethods that failed:\n\n"
                    + "\n".join(f"- `{k}`: {v}" for k, v in errors.items()))
    payload = {"command": command_line(), "finished_utc":
               time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), **payload}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = f"Command: `{payload['command']}`\n\n{markdown.rstrip()}\n"
    (out_dir / f"{stem}.md").write_text(md)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_frontier(rows: list[dict], path: Path, title: str, metrics=("kl", "ppl")) -> None:
    """Quality vs KV bits per element for every method (one panel per metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"kl": "next-token KL to the full cache (log)", "ppl": "perplexity",
             "top1_agree": "top-1 agreement with the full cache"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5))
    axes = [axes] if len(metrics) == 1 else list(axes)
    for ax, metric in zip(axes, metrics):
        for r in rows:
            y = r.get(metric)
            if y is None or y != y or r["family"] == "full":
                continue
            c = FAMILY_COLORS.get(r["family"], "gray")
            ax.scatter(r["bits_per_element"], y, color=c, s=40, zorder=3)
            ax.annotate(r["name"], (r["bits_per_element"], y), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        full = next((r for r in rows if r["family"] == "full"), None)
        if metric in ("kl", "ppl"):
            ax.set_yscale("log")
        if metric != "kl" and full is not None and full.get(metric) is not None:
            ax.axhline(full[metric], color="black", lw=0.8, ls="--",
                       label=f"full precision ({full[metric]:.3g})")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_xlabel("KV bits per element (incl. scales, zeros, radii, fp window)")
        ax.set_ylabel(names.get(metric, metric))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f)
               for f, c in FAMILY_COLORS.items() if any(r["family"] == f for r in rows)]
    axes[0].legend(handles=handles, fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
