"""scripts/eval_ppl.py on tiny settings: table, JSON, frontier plot, every method family."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts set torch's thread count; give the rest of the suite its own back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def load_script(name: str):
    """Import scripts/<name>.py as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_ppl_tiny(tmp_path):
    mod = load_script("eval_ppl")
    methods = "kivi-2,polar:paper,polar:polar-4"
    try:
        import optimum.quanto  # noqa: F401

        methods += ",quanto-2"
    except ImportError:
        pass
    out = tmp_path / "ppl"
    payload = mod.main(["--model", "tiny", "--text", "pydoc", "--methods", methods,
                        "--context", "160", "--score", "32", "--windows", "2", "--threads", "1",
                        "--out", str(out)])
    rows = {r["name"]: r for r in payload["rows"]}
    assert list(rows)[0] == "full" and rows["full"]["kl"] == 0.0
    assert rows["full"]["bits_per_element"] == 16
    for name in methods.split(","):
        assert rows[name]["kl"] > 0 and rows[name]["bits_per_element"] < 16
        assert rows[name]["ppl"] > 1
    assert not payload["errors"]
    data = json.loads((out / "ppl.json").read_text())
    assert data["command"].startswith("python") and len(data["rows"]) == len(rows)
    md = (out / "ppl.md").read_text()
    assert "Command:" in md and "| polar:paper |" in md
    assert (out / "ppl_frontier.png").stat().st_size > 1000
