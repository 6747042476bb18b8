"""The lm-eval ``polarquant`` model on a tiny random Llama and a tiny local task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

# One xdist worker builds the tiny model and the tasks (module fixtures) for all of them; on
# the CPU the reference runs the attention (see tests/conftest.py).
pytestmark = [pytest.mark.xdist_group("lm_eval"), pytest.mark.usefixtures("reference_on_cpu")]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from polartensor.eval.common import save_tiny_model  # noqa: E402
from polartensor.integrations import lm_eval as plm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("The committee met on a cold morning and agreed that the bridge would be repaired "
        "before the spring floods. Everyone in the valley had an opinion about it. ")

MC_YAML = """task: tiny_polar_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
GEN_YAML = """task: tiny_polar_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{context}}}} The code is"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """The scripts set torch's thread count; give the rest of the suite its own back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = save_tiny_model(root / "model", max_positions=2048)
    tasks = root / "tasks"
    tasks.mkdir()
    mc = tasks / "mc.jsonl"
    gen = tasks / "gen.jsonl"
    with open(mc, "w") as fh:
        for i in range(2):
            fh.write(json.dumps({"context": TEXT * 2, "gold": i % 3,
                                 "choices": ["It rained.", "The bridge held.", "Nobody came."]})
                     + "\n")
    with open(gen, "w") as fh:
        fh.write(json.dumps({"context": TEXT, "answer": "1234"}) + "\n")
    (tasks / "tiny_polar_mc.yaml").write_text(MC_YAML.format(data=mc))
    (tasks / "tiny_polar_gen.yaml").write_text(GEN_YAML.format(data=gen))
    return model_dir, tasks


@pytest.fixture(scope="module")
def lm(setup):
    model_dir, _ = setup
    return plm.PolarQuantLM(pretrained=str(model_dir), method="full", threads=1, batch_size=2)


def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("polarquant") is plm.PolarQuantLM


def _requests(lm):
    reqs = []
    for ctx, cont in ((TEXT * 2, " The bridge held."), (TEXT, " It rained all day.")):
        reqs.append(((ctx, cont), lm.tok_encode(ctx), lm.tok_encode(cont)))
    return reqs


def test_loglikelihood_against_quantized_context(lm):
    reqs = _requests(lm)

    def run(method, chunked):
        lm.method = plm.build_method(method=method)
        lm.method.prepare(lm.model)
        lm.quantize_context = chunked
        return [ll for ll, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]

    full_chunked, full_plain = run("full", True), run("full", False)
    polar_chunked, polar_plain = run("polar:paper", True), run("polar:paper", False)
    # chunked prefill through a full-precision cache == one pass
    assert full_chunked == pytest.approx(full_plain, abs=1e-3)
    # one pass never reads the cache; the chunked scoring reads the quantized context
    assert polar_plain == pytest.approx(full_plain, abs=1e-3)
    assert polar_chunked != pytest.approx(full_plain, abs=1e-4)
    # a longer continuation in chunks of 4 tokens: still the full-cache result with "full"
    lm.score_chunk = 4
    try:
        assert run("full", True) == pytest.approx(full_plain, abs=1e-3)
    finally:
        lm.score_chunk = 0


def test_requests_without_context_are_said_or_chunked(lm):
    """A request with no context (loglikelihood_rolling's windows) has nothing to quantize in
    one pass: that is warned once; with score_chunk its later chunks are scored against the
    quantized cache of the earlier ones."""
    cont = lm.tok_encode(TEXT * 2)
    reqs = [(("", TEXT * 2), [lm.eot_token_id], cont)]

    def run(method, chunk):
        lm.method = plm.build_method(method=method)
        lm.method.prepare(lm.model)
        lm.quantize_context, lm.score_chunk, lm._warned_rolling = True, chunk, False
        try:
            return [ll for ll, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
        finally:
            lm.score_chunk = 0

    full = run("full", 0)
    with pytest.warns(UserWarning, match="score_chunk"):
        assert run("polar:paper", 0) == pytest.approx(full, abs=1e-3)
    assert run("full", 8) == pytest.approx(full, abs=1e-3)
    assert run("polar:paper", 8) != pytest.approx(full, abs=1e-4)


def test_tasks_end_to_end_with_quantized_cache(setup, monkeypatch):
    """A multiple-choice and a generation task through simple_evaluate; generation gets a
    fresh PolarQuantCache per batch."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from polartensor.integrations.transformers import PolarQuantCache

    model_dir, tasks = setup
    made = []
    orig = plm.PolarQuantLM.new_cache

    def spy(self):
        cache = orig(self)
        made.append(cache)
        return cache

    monkeypatch.setattr(plm.PolarQuantLM, "new_cache", spy)
    res = simple_evaluate(
        model="polarquant", device="cpu", batch_size=2, limit=1,
        model_args={"pretrained": str(model_dir), "preset": "paper", "residual_window": 4,
                    "threads": 1},
        tasks=["tiny_polar_mc", "tiny_polar_gen"],
        task_manager=TaskManager(include_path=str(tasks)))
    assert 0 <= res["results"]["tiny_polar_mc"]["acc,none"] <= 1
    assert "exact_match,none" in res["results"]["tiny_polar_gen"]
    assert made and all(isinstance(c, PolarQuantCache) for c in made)
    assert all(c.get_seq_length() > 0 for c in made)


def test_model_args_build_methods():
    m = plm.build_method(levels=2, bits="3-2", residual_window=8)
    assert m.family == "polarquant" and "bits=3-2" in m.name
    assert plm.build_method(preset="paper", codebook="online").name == "polar:paper+online"
    assert plm.build_method(key_preset="polar-4", value_preset="paper").name == \
        "polar:polar-4/paper"
    assert plm.build_method(method="kivi-2").family == "kivi"
    assert plm.build_method(preset="paper", quantize_generated="True").name == "polar:paper+qgen"
    with pytest.raises(ValueError, match="codebook"):
        plm.build_method(codebook="lloyd")
    # one side alone: the other from the pairing ("default": polar-4 keys, polar-3 values)
    assert plm.build_method(key_preset="polar-3").name == "polar:polar-3/polar-3"
    assert plm.build_method(value_preset="paper").name == "polar:polar-4/paper"
    assert plm.build_method(preset="kv-3", key_preset="polar-4").name == \
        "polar:polar-4/polar-2.5"
    # checked when the method is built, not at the first request
    for bad in (dict(preset="nope"), dict(key_preset="nope"), dict(method="polar:nope")):
        with pytest.raises(ValueError, match="unknown"):
            plm.build_method(**bad)
    with pytest.raises(ValueError, match="levels"):
        plm.build_method(levels=0)
    with pytest.raises(ValueError, match="bits='abc'"):
        plm.build_method(levels=2, bits="abc")
    with pytest.raises(ValueError, match="true or false"):
        plm.build_method(preset="paper", quantize_generated="maybe")


def test_cli_entry_point(setup, tmp_path):
    """python -m polartensor.integrations.lm_eval hands all flags to lm-eval's CLI."""
    model_dir, tasks = setup
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "polartensor.integrations.lm_eval", "--model", "polarquant",
         "--model_args", f"pretrained={model_dir},preset=paper,threads=1", "--device", "cpu",
         "--batch_size", "1", "--include_path", str(tasks), "--tasks", "tiny_polar_mc",
         "--limit", "1", "--output_path", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_polar_mc" in proc.stdout
    assert list(out.rglob("results_*.json"))
