"""The Python API (``oaif.train``, ``oaif.load_config``): the README's example as printed, prompts in
memory through the file split, function judges, one-line errors, and an ``import oaif`` without torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import oaif
from oaif.errors import AnnotatorError, ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


def fast(tmp_path, **groups) -> dict:
    """Group mappings for a short run on the tiny model (2 steps of 2 prompts, 8-token responses)."""
    settings = {"train": {"max_steps": 2, "batch_size": 2, "output_dir": str(tmp_path / "run")},
                "sampling": {"max_new_tokens": 8}, "optim": {"lr": 1e-3, "warmup_steps": 0},
                "logging": {"progress_bar": False}}
    for name, mapping in groups.items():
        settings[name] = settings.get(name, {}) | mapping
    return settings


def audit(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "annotations.jsonl").read_text().splitlines()]


def python_example() -> str:
    match = re.search(r"^## From Python\n.*?^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert match, "README.md has no '## From Python' section with a python block"
    return match.group(1)


# -- import ------------------------------------------------------------------------------------
def test_import_oaif_and_its_api_names_load_no_torch():
    code = ("import sys, oaif\n"
            "names = [oaif.train, oaif.load_config, oaif.TrainResult, oaif.Config, oaif.OaifError, oaif.DataError]\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert {"train", "load_config", "TrainResult", "OaifError"} <= set(dir(oaif))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        oaif.nope  # noqa: B018


# -- the README ----------------------------------------------------------------------------------
def test_the_readme_python_example_runs_as_printed(tiny_model_dir, tmp_path):
    code = python_example()
    assert len(code.splitlines()) <= 15  # a TRL user reads it at a glance
    (tmp_path / "configs").mkdir()
    shutil.copy(DEMO, tmp_path / "configs" / "demo.yaml")
    env = dict(os.environ, OAIF_EXAMPLE_MODEL=tiny_model_dir)  # the override the example documents
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    loss, checkpoint = out.stdout.split()
    assert float(loss) > 0 and checkpoint == "runs/python-demo/checkpoint-3"
    run = tmp_path / "runs" / "python-demo"
    assert (tmp_path / checkpoint / "model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    saved = oaif.load_config(run / "config.yaml")  # the run's config records every argument
    assert saved.model.name_or_path == tiny_model_dir
    assert (saved.annotator.type, saved.annotator.callable) == ("callable", "__main__:shorter")
    assert re.fullmatch(r"runs/python-demo/prompts-[0-9a-f]{12}\.jsonl", saved.data.path)
    assert [json.loads(line)["prompt"] for line in (tmp_path / saved.data.path).read_text().splitlines()][0] == \
        "Name three fruits."
    assert {a["judge"] for a in audit(run)} == {"callable:shorter"}


# -- prompts in memory, function judges ---------------------------------------------------------
def shorter_pair(prompt, a, b):
    """Pairwise: P(a better) is 1 when a has fewer characters."""
    return 1.0 if len(a) < len(b) else 0.0 if len(a) > len(b) else 0.5


def test_a_list_of_prompts_goes_through_the_file_filter_and_split(tiny_model_dir, tmp_path):
    from oaif.evaluation.responses import held_out_prompts

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompts = ["Name a fruit.", chat, "   ", "Say hi.", "Count to three.", "word " * 300, "Name a tree.",
               "Name a city.", "Name a river.", "Name a bird."]
    cfg = oaif.load_config(DEMO)
    result = oaif.train(cfg, model=tiny_model_dir, prompts=prompts, judge=shorter_pair, **fast(tmp_path))
    assert cfg.data.path == "data/prompts/demo_prompts.jsonl"  # the caller's config is not changed
    assert result.summary["skipped_inputs"] == {"empty": 1, "too_long": 1}  # the loader's and the filter's counts
    assert result.run_dir == tmp_path / "run" and result.checkpoint == tmp_path / "run" / "checkpoint-2"
    rows = [json.loads(line) for line in Path(result.config.data.path).read_text().splitlines()]
    assert rows[1] == {"id": "1", "prompt": chat}
    held, _ = held_out_prompts(result.config)  # what `oaif eval --run` evaluates on
    usable = {str(i) for i in range(len(prompts))} - {"2", "5"}
    trained = {a["prompt_id"] for a in audit(result.run_dir)}
    assert len(held) == 1 and {r.id for r in held} <= usable and trained <= usable - {r.id for r in held}
    assert {a["judge"] for a in audit(result.run_dir)} == {"callable:shorter_pair"}
    assert result.config.annotator.callable.endswith(":shorter_pair")
    assert result.summary["last"]["judge_consistency"] == 1.0


def test_a_dataset_with_a_pointwise_lambda_judge(tiny_model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    questions = [f"What is {i} plus {i}?" for i in range(6)]
    ds = datasets.Dataset.from_dict({"id": [f"q{i}" for i in range(6)], "question": questions})
    result = oaif.train(DEMO, ["data.eval_fraction=0"], model=tiny_model_dir, prompts=ds,
                        judge=lambda prompt, response: -len(response), **fast(tmp_path, data={"field": "question"}))
    assert result.summary["steps"] == 2 and result.checkpoint.is_dir()
    records = audit(result.run_dir)
    assert {a["prompt_id"] for a in records} <= {f"q{i}" for i in range(6)}
    assert all(a["prob_ab"] == a["prob_ba"] for a in records)  # pointwise: order-free by itself
    saved = oaif.load_config(result.run_dir / "config.yaml")
    assert saved.data.field == "question" and saved.annotator.callable.endswith(".<lambda>")


# -- bad input ------------------------------------------------------------------------------------
def _dataset_without_the_column():
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict({"text": ["a"]})


BAD = [
    (dict(prompts=42), DataError, "prompts: expected a prompt file, a list of prompts or a datasets.Dataset, got int"),
    (dict(prompts=[]), DataError, "prompts: the list is empty"),
    (dict(prompts=["fine", 3]), DataError, r"prompts\[1\]: expected text or a list of chat messages, got int"),
    (dict(prompts=[{"role": "user", "content": "hi"}]), DataError, r"prompts\[0\] is a chat message; pass a list of"),
    (dict(prompts=[{"text": "hi"}]), DataError, r"prompts\[0\]: no field 'prompt' \(keys: text\)"),
    (dict(prompts=[{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}]), DataError, r"prompts\[1\]: duplicate id '1'"),
    (dict(prompts=_dataset_without_the_column), DataError, "the Dataset has no column 'prompt' \\(columns: text\\)"),
    (dict(prompts="no/such/prompts.jsonl"), DataError, "prompt file not found: no/such/prompts.jsonl"),
    (dict(judge=lambda prompt: 1.0), AnnotatorError, "must take \\(prompt, a, b\\) or \\(prompt, response\\), it takes 1"),
    (dict(judge="helpful"), AnnotatorError, "judge: expected a function of \\(prompt, a, b\\) or \\(prompt, response\\)"),
    (dict(judge={"rubric": "no-such-rubric"}), AnnotatorError, "no-such-rubric"),
    (dict(max_steps=3), ConfigError, "unknown keyword 'max_steps'.*e.g. train=\\{'max_steps': ...\\}"),
    (dict(train=3), ConfigError, "train=: expected a mapping of the group's keys"),
    (dict(overrides=["train.max_steps"]), ConfigError, "override 'train.max_steps' is not of the form key.sub=value"),
    (dict(overrides=["train.nope=1"]), ConfigError, "unknown config key 'train.nope'"),
    (dict(model=3), ConfigError, "model: expected a model name or path"),
    (dict(config=42), ConfigError, "config: expected a YAML file, an oaif.Config or None, got int"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[f"{i}-{next(iter(k))}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_input_is_a_one_line_error(tmp_path, kwargs, error, message):
    kwargs = {k: v() if callable(v) and k == "prompts" else v for k, v in kwargs.items()}
    kwargs.setdefault("config", DEMO)
    kwargs.setdefault("prompts", ["Name a fruit."])
    groups = {"train": {"output_dir": str(tmp_path / "run")}} if "train" not in kwargs else {}
    with pytest.raises(error) as e:
        oaif.train(**kwargs, **groups)
    assert re.search(message, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
