"""Config loading: every shipped config loads; bad input is a one-line error naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import doc_oaif_args
from oaif.cli import main
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
    ("loss.type=kto", "loss.type: must be one of dpo, ipo, rdpo, rpo, simpo, slic, got 'kto'"),
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


def test_the_docs_config_commands_list_every_key_and_print_the_resolved_config(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name configs/ relative to the repository
    assert main(doc_oaif_args("oaif config keys")) == 0
    assert capsys.readouterr().out == describe() + "\n"
    assert main(doc_oaif_args("oaif config show configs/demo.yaml model.lora.enabled=true")) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["lora"]["enabled"] is True and shown["annotator"]["rubric"] == "helpful"


def oaif(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oaif.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (["train", "configs/demo.yaml", "train.max_stepz=3"], "train.max_stepz"),
    (["train", "configs/missing.yaml"], "config file not found: configs/missing.yaml"),
    (["train", "configs/demo.yaml", "data.path=no/such/prompts.jsonl"], "no/such/prompts.jsonl"),
    (["train", "configs/demo.yaml", "model.name_or_path=/no/such/model"], "/no/such/model"),
    (["train", "configs/demo.yaml", "annotator.rubric=no_such_rubric"], "no_such_rubric"),
    (["train", "configs/demo.yaml", "sampling.pairing=best_worst"], "sampling.num_samples: must be >= 3 with "
                                                                    "sampling.pairing=best_worst"),
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
    ("loss.missing_eos_penalty=.nan", "loss.missing_eos_penalty: must be a number or .inf, got nan (.inf: an unfinished response loses)"),
    ("loss.missing_eos_penalty=-.inf", "loss.missing_eos_penalty: must be a number or .inf, got -inf (.inf: an unfinished response loses)"),
    ("train.resume=", "train.resume: must be true, false or a checkpoint directory"),
    ("vllm.mode=remote", "vllm.mode: expected colocated or server, got 'remote'"),
    ("vllm.weight_sync=nccl", "vllm.weight_sync: expected disk or collective, got 'nccl'"),
    ("vllm.weight_sync=collective", "vllm.weight_sync=collective: applies to vllm.mode=server only (a colocated engine "
                                    "is given the weights in place); set vllm.mode=server or vllm.weight_sync=disk"),
    ("vllm.sync_backend=mpi", "vllm.sync_backend: expected auto, gloo or nccl, got 'mpi'"),
    ("vllm.sync_port=70000", "vllm.sync_port: expected 0 (a free port) to 65535, got 70000"),
    ("vllm.sync_timeout_s=0", "vllm.sync_timeout_s: must be a finite number > 0, got 0.0"),
    ("vllm.sync_bucket_mib=0", "vllm.sync_bucket_mib: must be >= 1, got 0"),
    ("train.logprob_gap_warn=-0.1", "train.logprob_gap_warn: must be >= 0 (0: no warning; null: by precision)"),
])
def test_new_keys_are_validated(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert str(e.value) == message
    with pytest.raises(ConfigError, match="model.lora.dropout: has no effect with model.disable_dropout=true"):
        load_config(ROOT / "configs/lora_demo.yaml", ["model.lora.dropout=0.1"])


def test_best_worst_pairing_needs_three_samples_and_online_mode():
    cfg = load_config(ROOT / "configs/demo.yaml", ["sampling.pairing=best_worst", "sampling.num_samples=3"])
    assert (cfg.sampling.pairing, cfg.sampling.num_samples) == ("best_worst", 3)
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", ["sampling.pairing=best_worst", "sampling.num_samples=2"])
    assert str(e.value) == ("sampling.num_samples: must be >= 3 with sampling.pairing=best_worst (with 2 responses "
                            "the best and the worst are the judged pair: use disjoint)")
    with pytest.raises(ConfigError, match="^sampling.pairing: best_worst ranks sampled responses: it needs "
                                          "train.mode=online"):
        load_config(ROOT / "configs/offline_demo.yaml", ["sampling.pairing=best_worst", "sampling.num_samples=4"])
    with pytest.raises(ConfigError, match="sampling.pairing: must be one of all, best_worst, disjoint, got 'best'"):
        load_config(ROOT / "configs/demo.yaml", ["sampling.pairing=best"])


def test_resume_takes_a_flag_or_a_checkpoint_path():
    # the docs' resume commands (docs/training.md), parsed; test_checkpoint.py runs resumes
    _, config, *overrides = doc_oaif_args("oaif train configs/demo.yaml train.resume=true")
    assert load_config(ROOT / config, overrides).train.resume is True
    assert load_config(ROOT / "configs/demo.yaml", ["train.resume=false"]).train.resume is False
    _, config, *overrides = doc_oaif_args("oaif train configs/demo.yaml train.resume=runs/demo/checkpoint-10")
    assert load_config(ROOT / config, overrides).train.resume == "runs/demo/checkpoint-10"
    cfg = load_config(ROOT / "configs/lora_demo.yaml", ["model.lora.dropout=0.1", "model.disable_dropout=false",
                                                       "loss.missing_eos_penalty=.inf"])
    assert cfg.model.lora.dropout == 0.1 and cfg.loss.missing_eos_penalty == float("inf")


# Every key with a range: a value outside it, or a non-finite number, is one line naming the key.
BAD_VALUES = [
    ("loss.beta=.inf", "loss.beta: must be a finite number, got inf"),
    ("loss.beta=nan", "loss.beta: must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("optim.lr=-1e-5", "optim.lr: must be in [0, 1e30]"),
    ("optim.lr=1e39", "optim.lr: must be in [0, 1e30]"),
    ("optim.eps=0", "optim.eps: must be > 0"),
    ("optim.eps=-1e-8", "optim.eps: must be > 0"),
    ("optim.eps=.nan", "optim.eps: must be a finite number, got nan"),
    ("optim.betas=[0.9]", "optim.betas: must be two numbers in [0, 1), got [0.9]"),
    ("optim.betas=[0.9, 1.0]", "optim.betas: must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("optim.betas=[0.9, -0.1]", "optim.betas: must be two numbers in [0, 1)"),
    ("optim.betas=[a, b]", "optim.betas: must be two numbers in [0, 1)"),
    ("optim.betas=[0.9, .inf]", "optim.betas: must hold finite numbers"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0"),
    ("optim.weight_decay=.inf", "optim.weight_decay: must be a finite number"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm: must be >= 0"),
    ("optim.max_grad_norm=.inf", "optim.max_grad_norm: must be a finite number"),
    ("sampling.temperature=.inf", "sampling.temperature: must be a finite number"),
    ("sampling.top_p=nan", "sampling.top_p: must be a finite number"),
    ("sampling.batch_size=-2", "sampling.batch_size: must be >= 0"),
    ("train.save_every=-1", "train.save_every: must be >= 0"),
    ("train.keep_last=-1", "train.keep_last: must be >= 0"),
    ("train.output_dir=", "train.output_dir: must name a directory"),
    ("train.output_dir='  '", "train.output_dir: must name a directory"),
    ("train.seed=-1", "train.seed: must be in [0, 2**32 - 1]"),
    ("train.seed=4294967296", "train.seed: must be in [0, 2**32 - 1]"),
    ("annotator.failure_window=0", "annotator.failure_window: must be >= 1"),
    ("annotator.request_timeout=.inf", "annotator.request_timeout: must be a finite number"),
    ("annotator.request_timeout=0", "annotator.request_timeout: must be > 0"),
    ("annotator.max_failure_rate=nan", "annotator.max_failure_rate: must be a finite number"),
    ("annotator.batch_size=0", "annotator.batch_size: must be >= 1"),
    ("annotator.max_length=0", "annotator.max_length: must be >= 1"),
    ("annotator.model=", "annotator.model: must name a model"),
    ("annotator.rubric=", "annotator.rubric: must name a rubric"),
    ("model.name_or_path=", "model.name_or_path: must name a model"),
    ("model.lora.r=0", "model.lora.r: must be >= 1"),
    ("model.lora.alpha=0", "model.lora.alpha: must be > 0"),
    ("model.lora.dropout=1.0", "model.lora.dropout: must be in [0, 1)"),
    ("model.lora.target_modules=[]", "model.lora.target_modules: must be a non-empty list of module names"),
    ("model.lora.target_modules=[1, 2]", "model.lora.target_modules: must be a non-empty list of module names"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens: must be >= 1"),
    ("data.eval_fraction=.inf", "data.eval_fraction: must be a finite number"),
    ("data.eval_path=", "data.eval_path: is empty (use null for none)"),
    ("data.field=", "data.field: must name a column"),
    ("loss.min_confidence=nan", "loss.min_confidence: must be a finite number"),
    ("logging.run_name=", "logging.run_name: is empty"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_out_of_range_and_non_finite_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert str(e.value).startswith(message), str(e.value)


def test_float16_full_fine_tuning_is_refused_with_the_reason_and_the_alternatives():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", ["model.dtype=float16"])
    text = str(e.value)
    assert text.startswith("model.dtype: float16 with full fine-tuning is refused") and "AdamW" in text
    assert "model.dtype=bfloat16" in text and "train.mixed_precision=fp16" in text and "\n" not in text
    # LoRA keeps its adapter in float32 (peft upcasts it), so float16 base weights are allowed there
    assert load_config(ROOT / "configs/demo.yaml", ["model.dtype=float16", "model.lora.enabled=true"]).model.dtype == "float16"


def test_ensemble_members_are_checked_like_the_annotator():
    members = "annotator.members=[{type: callable, callable: 'oaif.annotators.rules:prefer_shorter'}, {type: llm, batch_size: 0}]"
    with pytest.raises(ConfigError, match=r"^annotator.members\[1\].batch_size: must be >= 1$"):
        load_config(ROOT / "configs/demo.yaml", ["annotator.type=ensemble", members])
    with pytest.raises(ConfigError, match=r"^unknown config key 'annotator.members\[0\].typo'"):
        load_config(ROOT / "configs/demo.yaml", ["annotator.type=ensemble", "annotator.members=[{typo: 1}]"])
    with pytest.raises(ConfigError, match=r"^annotator.members\[0\].request_timeout: must be a finite number"):
        load_config(ROOT / "configs/demo.yaml", ["annotator.type=ensemble", "annotator.members=[{request_timeout: .inf}]"])
    with pytest.raises(ConfigError, match=r"^annotator.members\[0\].type: must be one of"):
        load_config(ROOT / "configs/demo.yaml", ["annotator.type=ensemble", "annotator.members=[{type: gpt}]"])


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data, not YAML text"),
    (b"train:\n  max_steps: 3\n  output_dir: caf\xe9\n", "not UTF-8 text (byte 39)"),
    (b"- model\n- train\n", "expected a mapping of config groups (model:, train:, ...), got list"),
    (b"42\n", "expected a mapping of config groups (model:, train:, ...), got int"),
    (b"just some words\n", "expected a mapping of config groups (model:, train:, ...), got str"),
])
def test_unreadable_config_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        load_config(tmp_path)


def test_openai_base_url_must_be_a_url():
    with pytest.raises(ConfigError, match="^annotator.base_url: must be an http:// or https:// URL, got 'not a url'$"):
        load_config(ROOT / "configs/demo.yaml", ["annotator.type=openai", "annotator.base_url=not a url"])
    assert load_config(ROOT / "configs/demo.yaml", ["annotator.type=openai",
                                                    "annotator.base_url=http://127.0.0.1:8000/v1"]).annotator.base_url


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  max_steps: 3\n  output_dir: runs/a\n  max_steps: 300\n")
    with pytest.raises(ConfigError, match=f"^{path}: key 'max_steps' appears twice \\(line 4\\)"):
        load_config(path)


def test_no_stays_a_string_where_a_key_takes_one_and_a_bool_where_it_takes_one(tmp_path):
    # YAML 1.1 reads no/off/yes/on as booleans: the documented train.mixed_precision=no would be False
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.mixed_precision=no", "model.disable_dropout=off",
                                                       "data.shuffle=yes"])
    assert cfg.train.mixed_precision == "no" and cfg.model.disable_dropout is False and cfg.data.shuffle is True
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nmodel:\n  disable_dropout: No\n")
    cfg = load_config(path, [])
    assert cfg.train.mixed_precision == "no" and cfg.model.disable_dropout is False


def test_a_lone_surrogate_in_a_config_string_is_one_line_not_a_tokenizer_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('model:\n  system_prompt: "Be brief \\ud800."\n')
    with pytest.raises(ConfigError, match=r"^model.system_prompt: not text \(a lone UTF-16 surrogate"):
        load_config(path)
    # bytes that are not UTF-8 on the command line reach Python as lone surrogates (surrogateescape)
    result = subprocess.run([sys.executable, "-m", "oaif.cli", "config", "show", "configs/demo.yaml",
                             b"model.system_prompt=caf\xe9"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr == ("oaif: error: model.system_prompt: not text (a lone UTF-16 "
                                                        "surrogate, or bytes that are not UTF-8)\n"), result.stderr
    path.write_text('model:\n  system_prompt: "Be brief \\U0001F600."\n')  # YAML's escape for a code point over U+FFFF
    assert load_config(path).model.system_prompt == "Be brief \U0001F600."


# -- the losses' own keys ---------------------------------------------------------------------------
def test_loss_keys_have_their_papers_defaults_and_are_documented():
    cfg = load_config(ROOT / "configs/demo.yaml", ["loss.type=simpo"])
    assert (cfg.loss.simpo_beta, cfg.loss.simpo_gamma_beta_ratio) == (2.0, 0.5)  # Meng et al. 2024
    assert cfg.loss.rpo_alpha == 1.0 and cfg.loss.rdpo_alpha == 0.01 and cfg.loss.label_smoothing == 0.0
    keys = describe()
    for key in ("loss.simpo_beta", "loss.simpo_gamma_beta_ratio", "loss.rpo_alpha", "loss.rdpo_alpha",
                "loss.label_smoothing"):
        assert f"  {key} = " in keys, key
    for loss_type in ("simpo", "rpo", "rdpo"):
        assert loss_type in keys.split("loss.type = ")[1].splitlines()[0]
    # demo.yaml sets loss.beta: 0.1 explicitly; it is the default, so simpo (which does not read it) accepts it
    for overrides in (["loss.type=rpo", "loss.rpo_alpha=0.5", "loss.soft_labels=true"],
                      ["loss.type=rdpo", "loss.rdpo_alpha=0.02", "loss.beta=0.2"],
                      ["loss.type=ipo", "loss.label_smoothing=0.2", "loss.soft_labels=true"],
                      ["loss.type=simpo", "loss.simpo_beta=2.5", "loss.simpo_gamma_beta_ratio=0", "loss.soft_labels=true"]):
        load_config(ROOT / "configs/demo.yaml", overrides)


@pytest.mark.parametrize("overrides, message", [
    (["loss.type=simpo", "loss.simpo_beta=0"], "loss.simpo_beta: must be > 0"),
    (["loss.type=simpo", "loss.simpo_gamma_beta_ratio=-0.5"], "loss.simpo_gamma_beta_ratio: must be >= 0"),
    (["loss.type=rpo", "loss.rpo_alpha=-1"], "loss.rpo_alpha: must be >= 0"),
    (["loss.type=rdpo", "loss.rdpo_alpha=-0.01"], "loss.rdpo_alpha: must be >= 0 (a negative alpha would reward length)"),
    (["loss.rdpo_alpha=.inf"], "loss.rdpo_alpha: must be a finite number, got inf"),
    (["loss.label_smoothing=0.5"], "loss.label_smoothing: must be in [0, 0.5)"),
    (["loss.type=slic", "loss.label_smoothing=0.1"],
     "loss.label_smoothing: applies to loss.type dpo and ipo (cDPO and its IPO form), not slic; loss.soft_labels "
     "trains on the judge's own probabilities with any loss"),
    (["loss.type=simpo", "loss.label_smoothing=0.1"], "loss.label_smoothing: applies to loss.type dpo and ipo"),
    (["loss.type=simpo", "loss.beta=2.0"],
     "loss.beta: has no effect with loss.type=simpo (its scale is loss.simpo_beta); it is read by loss.type "
     "dpo or ipo or slic or rpo or rdpo"),
    (["loss.simpo_beta=2.5"], "loss.simpo_beta: has no effect with loss.type=dpo; it is read by loss.type simpo"),
    (["loss.type=rdpo", "loss.rpo_alpha=0.5"], "loss.rpo_alpha: has no effect with loss.type=rdpo"),
    (["loss.type=rpo", "loss.rdpo_alpha=0.5"], "loss.rdpo_alpha: has no effect with loss.type=rpo"),
])
def test_loss_keys_are_checked_and_a_key_the_loss_ignores_is_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", overrides)
    assert str(e.value).startswith(message)
