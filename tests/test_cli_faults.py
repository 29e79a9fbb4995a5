"""Bad files and paths through the ``oaif`` command: one line naming the file or key, exit 2, no
traceback, and nothing written or lost.

Real files are corrupted for real (truncated safetensors, a garbage trainer state, a binary
``latest``), real runs are resumed with another model or LoRA setting, and real paths that cannot
be written are given. Most cases call ``oaif.cli.main`` in this process (the same code path as
the command, minus the interpreter start-up); a few run the command as a subprocess to check the
whole stderr for a traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_tiny_llama, one_line_error
from oaif.cli import main
from oaif.config import load_config
from oaif.trainer import train

ROOT = Path(__file__).resolve().parent.parent
SHORTER = "oaif.annotators.rules:prefer_shorter"
PROMPTS = ROOT / "data/prompts/demo_prompts.jsonl"


def run_args(model_dir, out, *extra) -> list[str]:
    return [f"model.name_or_path={model_dir}", "annotator.type=callable", f"annotator.callable={SHORTER}",
            f"train.output_dir={out}", "train.batch_size=2", "sampling.max_new_tokens=6", "optim.warmup_steps=0",
            "logging.progress_bar=false", f"data.path={PROMPTS}", *extra]




def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A finished one-step run (full fine-tuning) and a finished one-step LoRA run (r=16)."""
    base = tmp_path_factory.mktemp("runs")
    full, lora = base / "full", base / "lora"
    train(load_config(ROOT / "configs/demo.yaml", run_args(tiny_model_dir, full, "train.max_steps=1")))
    train(load_config(ROOT / "configs/lora_demo.yaml", run_args(tiny_model_dir, lora, "train.max_steps=1")))
    return {"full": full, "lora": lora}


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, smollm2_path):
    """A tiny Llama of another shape (hidden 32): the same tensor names, other sizes."""
    return make_tiny_llama(tmp_path_factory.mktemp("other"), seed=1, tokenizer_source=smollm2_path,
                           hidden_size=32, intermediate_size=64)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# name: (which run, how to break a copy of it, extra overrides, expected fragment of the error)
RESUME_FAULTS = {
    "trainer_state_truncated": ("full", lambda d: truncate(d / "checkpoint-1/trainer_state.pt"), [],
                                "checkpoint-1/trainer_state.pt: corrupt or truncated trainer state"),
    "trainer_state_garbage": ("full", lambda d: (d / "checkpoint-1/trainer_state.pt").write_bytes(b"\x00garbage"), [],
                              "checkpoint-1/trainer_state.pt: corrupt or truncated trainer state"),
    "trainer_state_foreign": ("full", lambda d: __import__("torch").save([1, 2], d / "checkpoint-1/trainer_state.pt"),
                              [], "trainer_state.pt: not an oaif trainer state (missing step, optimizer"),
    "latest_binary": ("full", lambda d: (d / "latest").write_bytes(b"\xff\xfe\x00\x01junk"), [],
                      "latest: expected the name of a checkpoint (checkpoint-N), got b'\\xff\\xfe"),
    "latest_garbage_text": ("full", lambda d: (d / "latest").write_text("../../etc\n"), [],
                            "latest: expected the name of a checkpoint (checkpoint-N), got '../../etc'"),
    "weights_truncated": ("full", lambda d: truncate(d / "checkpoint-1/model.safetensors"), [],
                          "checkpoint-1/model.safetensors: corrupt or truncated safetensors file"),
    "other_architecture": ("full", None, ["model.name_or_path={other}"],
                           "does not match the model's architecture (another model.name_or_path?)"),
    "full_into_lora": ("full", None, ["model.lora.enabled=true"],
                       "holds full weights (no adapter/), but model.lora.enabled=true"),
    "lora_into_full": ("lora", None, ["model.lora.enabled=false"],
                       "was saved by a LoRA run (it has adapter/), but model.lora.enabled=false"),
    "lora_rank_changed": ("lora", None, ["model.lora.r=8"],
                          "LoRA adapter does not match the config: model.lora.r: checkpoint 16, config 8"),
    "lora_targets_changed": ("lora", None, ["model.lora.target_modules=[q_proj]"],
                             "model.lora.target_modules: checkpoint ['k_proj', 'o_proj', 'q_proj', 'v_proj'], config ['q_proj']"),
    "adapter_truncated": ("lora", lambda d: truncate(d / "checkpoint-1/adapter/adapter_model.safetensors"), [],
                          "adapter/adapter_model.safetensors: corrupt or truncated safetensors file"),
}


@pytest.mark.parametrize("fault", list(RESUME_FAULTS))
def test_resume_from_a_broken_or_mismatched_checkpoint_is_one_line_and_touches_nothing(
        fault, runs, tiny_model_dir, other_model_dir, tmp_path, capsys):
    which, breaker, extra, fragment = RESUME_FAULTS[fault]
    run = tmp_path / "run"
    shutil.copytree(runs[which], run)
    if breaker is not None:
        breaker(run)
    before = snapshot(run)
    config = "configs/lora_demo.yaml" if which == "lora" else "configs/demo.yaml"
    extra = [e.format(other=other_model_dir) for e in extra]
    line = one_line_error(capsys, ["train", str(ROOT / config),
                                   *run_args(tiny_model_dir, run, "train.max_steps=2", "train.resume=true", *extra)])
    assert fragment in line, line
    assert snapshot(run) == before  # the run directory is left exactly as it was


def test_corrupt_policy_weights_are_one_line(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    truncate(model / "model.safetensors")
    line = one_line_error(capsys, ["train", str(ROOT / "configs/demo.yaml"),
                                   *run_args(model, tmp_path / "run", "train.max_steps=1")])
    assert f"cannot load model {model}: a .safetensors weights file is corrupt or truncated" in line, line
    assert not (tmp_path / "run").exists()


def test_corrupt_judge_weights_are_one_line_before_any_output(tiny_model_dir, tmp_path, capsys):
    judge = tmp_path / "judge"
    shutil.copytree(tiny_model_dir, judge)
    (judge / "model.safetensors").write_bytes(b"garbage" * 10)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "a": "x", "b": "y"}) + "\n")
    out = tmp_path / "prefs.jsonl"
    line = one_line_error(capsys, ["annotate", str(pairs), "--out", str(out), "--set", f"model={judge}",
                                   "--no-progress"])
    assert f"cannot load model {judge}: a .safetensors weights file is corrupt or truncated" in line, line
    assert not out.exists()


def test_annotate_report_that_cannot_be_written_fails_before_the_work(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "a": "one two three", "b": "four"}) + "\n")
    out = tmp_path / "prefs.jsonl"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    for report, fragment in ((blocker / "report.json", f"--report: {blocker} is a file, so {blocker}/report.json "
                                                       f"cannot be created"),
                             (tmp_path, f"--report: {tmp_path} is a directory, not a file"),
                             ("/proc/oaif-report.json", "--report: /proc/oaif-report.json is under /proc")):
        line = one_line_error(capsys, ["annotate", str(pairs), "--out", str(out), "--report", str(report),
                                       "--set", "type=callable", "--set", f"callable={SHORTER}", "--no-progress"])
        assert fragment in line, line
        assert not out.exists()  # nothing was judged and written before the report failed


def test_eval_out_that_cannot_be_written_fails_before_the_work(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for out, fragment in ((blocker, f"--out: {blocker} exists and is not a directory"),
                          ("/proc/oaif-eval", "--out: /proc/oaif-eval is under /proc")):
        line = one_line_error(capsys, ["eval", tiny_model_dir, tiny_model_dir, "--prompts", str(PROMPTS),
                                       "--limit", "2", "--out", str(out), "--set", "type=callable",
                                       "--set", f"callable={SHORTER}", "--no-progress"])
        assert fragment in line, line
    assert blocker.read_text() == "x"


def test_output_dir_that_is_a_file_or_under_proc_fails_before_loading(tiny_model_dir, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for out, fragment in ((blocker, f"train.output_dir: {blocker} exists and is not a directory"),
                          ("/proc/oaif-run", "train.output_dir: /proc/oaif-run is under /proc")):
        proc = subprocess.run([sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/demo.yaml"),
                               *run_args(tiny_model_dir, out, "train.max_steps=1")],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("oaif: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and fragment in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "x"


def test_corrupt_trainer_state_through_the_real_command(runs, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    truncate(run / "checkpoint-1/trainer_state.pt")
    proc = subprocess.run([sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/demo.yaml"),
                           *run_args(tiny_model_dir, run, "train.max_steps=2", "train.resume=true")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("oaif: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "trainer_state.pt: corrupt or truncated trainer state" in errors[0] and "Traceback" not in proc.stderr


def test_binary_config_file_through_the_real_command(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(bytes(range(256)))
    proc = subprocess.run([sys.executable, "-m", "oaif.cli", "train", str(cfg)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"oaif: error: config file {cfg}: binary data, not YAML text"


def test_float16_weights_by_dtype_auto_are_refused_for_full_fine_tuning(tiny_model_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16).save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(half)
    line = one_line_error(capsys, ["train", str(ROOT / "configs/demo.yaml"),
                                   *run_args(half, tmp_path / "run", "train.max_steps=1", "model.dtype=auto")])
    assert f"model.dtype=auto loads {half} in float16, which full fine-tuning refuses" in line, line
    assert not (tmp_path / "run").exists()


def test_eval_whose_every_judgment_failed_is_one_line_not_a_result(tiny_model_dir, other_model_dir, tmp_path, capsys):
    from test_openai_judge import FakeServer, Reply

    with FakeServer(lambda body, headers: Reply(500, {"error": {"message": "boom"}})) as server:
        line = one_line_error(capsys, ["eval", tiny_model_dir, other_model_dir, "--prompts", str(PROMPTS),
                                       "--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "eval"),
                                       "--set", "type=openai", "--set", f"base_url={server.base_url}",
                                       "--set", "model=fake", "--set", "max_retries=0", "--no-progress"])
    assert line == "oaif: error: every judgment failed for A vs B (http_500 3): no win rate", line
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["comparisons"][0]["failed"] == {"http_500": 3}


def test_a_lone_surrogate_in_a_data_file_is_one_line_naming_the_line(tiny_model_dir, tmp_path, capsys):
    # JSON can escape half of a UTF-16 surrogate pair; such a string cannot be encoded, so no tokenizer takes it
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour."}\n{"prompt": "Name a \\ud83d fruit."}\n')
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "yes \\ud83d\\ude00", "rejected": "no \\ude00"}\n')
    judge = ["--set", "type=callable", "--set", f"callable={SHORTER}", "--no-progress"]
    for argv, where in (
            (["train", str(ROOT / "configs/demo.yaml"),
              *run_args(tiny_model_dir, tmp_path / "run", "train.max_steps=1", f"data.path={prompts}")], f"{prompts} line 2"),
            (["train", str(ROOT / "configs/demo.yaml"),
              *run_args(tiny_model_dir, tmp_path / "run", "train.max_steps=1", "train.mode=offline",
                        f"data.preference_path={pairs}")], f"{pairs} line 1"),
            (["annotate", str(pairs), "--out", str(tmp_path / "out.jsonl"), *judge], f"{pairs} line 1"),
            (["eval", tiny_model_dir, tiny_model_dir, "--prompts", str(prompts), "--out", str(tmp_path / "eval"), *judge],
             f"{prompts} line 2")):
        line = one_line_error(capsys, argv)
        assert line == f"oaif: error: {where}: a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair) " \
                       "is not text", line
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.jsonl").exists()


def test_a_directory_a_truncated_gguf_and_missing_arguments_are_named_for_what_they_are(tiny_gguf_path, tiny_model_dir,
                                                                                      tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(Path(tiny_gguf_path).read_bytes()[: Path(tiny_gguf_path).stat().st_size // 2])
    for extra, expect in ((["train.mode=offline", f"data.preference_path={folder}"],
                           f"preference file {folder} is a directory, not a file"),
                          (["annotator.type=llm", f"annotator.rubric={folder}"],
                           f"rubric file {folder} is a directory, not a file"),
                          ([f"model.name_or_path={gguf}", f"model.cache_dir={tmp_path / 'cache'}"],
                           f"cannot convert {gguf}, a truncated or corrupt file or an unsupported model? (reading it "
                           "failed: ")):
        line = one_line_error(capsys, ["train", str(ROOT / "configs/demo.yaml"),
                                       *run_args(tiny_model_dir, tmp_path / "run", "train.max_steps=1", *extra)])
        assert line.startswith(f"oaif: error: {expect}"), line
    for argv, required in ((["train"], "config"), (["config"], "action")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and err.endswith(f"error: the following arguments are required: {required}"), err
