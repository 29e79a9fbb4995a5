"""Config loading: every shipped config loads; bad input is a one-line error naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oaif.config import Config, describe, load_config
from oaif.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "offline_demo.yaml", "lora_demo.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.max_steps=3", "loss.type=ipo", "model.lora.enabled=true",
                                                   "optim.lr=1e-5", "logging.report_to=[tensorboard]",
                                                   "model.system_prompt=Be brief.", "loss.beta=1"])
    assert cfg.train.max_steps == 3 and cfg.loss.type == "ipo" and cfg.model.lora.enabled is True
    assert cfg.optim.lr == 1e-5 and cfg.logging.report_to == ["tensorboard"]
    assert cfg.model.system_prompt == "Be brief." and cfg.loss.beta == 1.0 and isinstance(cfg.loss.beta, float)


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz' (did you mean 'train.max_steps'?)"),
    ("trian.max_steps=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ("train.max_steps=three", "train.max_steps: expected int, got 'three'"),
    ("train.max_steps=2.5", "train.max_steps: expected int, got 2.5"),
    ("loss.type=kto", "loss.type: must be one of dpo, ipo, slic, got 'kto'"),
    ("sampling.num_samples=1", "sampling.num_samples: must be >= 2"),
    ("sampling.num_samples=3", "sampling.num_samples: must be even with sampling.pairing=disjoint"),
    ("train.mode=offline", "train.mode: offline mode needs data.preference_path"),
    ("model.lora.enabled=maybe", "model.lora.enabled: expected bool, got 'maybe'"),
    ("train.max_steps", "override 'train.max_steps' is not of the form key.sub=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert str(e.value) == message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  batch: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.batch' \\(did you mean 'train.batch_size'\\?\\)"):
        load_config(bad)
    bad.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(bad)


def test_every_key_has_help():
    lines = [line for line in describe().splitlines() if "=" in line]
    assert len(lines) > 50
    for line in lines:
        assert line.rsplit(")", 1)[1].strip(), f"no help for {line}"


def oaif(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oaif.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (["train", "configs/demo.yaml", "train.max_stepz=3"], "train.max_stepz"),
    (["train", "configs/missing.yaml"], "config file not found: configs/missing.yaml"),
    (["train", "configs/demo.yaml", "data.path=no/such/prompts.jsonl"], "no/such/prompts.jsonl"),
    (["train", "configs/demo.yaml", "model.name_or_path=/no/such/model"], "/no/such/model"),
    (["train", "configs/demo.yaml", "annotator.rubric=no_such_rubric"], "no_such_rubric"),
])
def test_cli_errors_are_one_line(args, fragment, tmp_path):
    result = oaif(*args, f"train.output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    err = [line for line in result.stderr.splitlines() if line.startswith("oaif: error:")]
    assert len(err) == 1 and fragment in err[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_core_import_is_light():
    code = "import sys, oaif, oaif.config, oaif.cli; print(any(m in sys.modules for m in ('torch', 'transformers', 'openai')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("override, message", [
    ("annotator.failure_window=0", "annotator.failure_window: must be >= 1"),
    ("loss.missing_eos_penalty=-1", "loss.missing_eos_penalty: must be >= 0 (.inf: an unfinished response loses)"),
    ("loss.missing_eos_penalty=.nan", "loss.missing_eos_penalty: must be >= 0 (.inf: an unfinished response loses)"),
    ("train.resume=", "train.resume: must be true, false or a checkpoint directory"),
    ("vllm.mode=remote", "vllm.mode: expected colocated or server, got 'remote'"),
])
def test_new_keys_are_validated(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert str(e.value) == message
    with pytest.raises(ConfigError, match="model.lora.dropout: has no effect with model.disable_dropout=true"):
        load_config(ROOT / "configs/lora_demo.yaml", ["model.lora.dropout=0.1"])


def test_resume_takes_a_flag_or_a_checkpoint_path():
    assert load_config(ROOT / "configs/demo.yaml", ["train.resume=true"]).train.resume is True
    assert load_config(ROOT / "configs/demo.yaml", ["train.resume=false"]).train.resume is False
    assert load_config(ROOT / "configs/demo.yaml", ["train.resume=runs/demo/checkpoint-10"]).train.resume == \
        "runs/demo/checkpoint-10"
    cfg = load_config(ROOT / "configs/lora_demo.yaml", ["model.lora.dropout=0.1", "model.disable_dropout=false",
                                                       "loss.missing_eos_penalty=.inf"])
    assert cfg.model.lora.dropout == 0.1 and cfg.loss.missing_eos_penalty == float("inf")
