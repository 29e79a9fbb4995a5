"""`oaif plot RUN_DIR` on a real run's metrics, and the trackers of `logging.report_to` run for real:
TensorBoard's event file read back with TensorBoard's own reader, W&B in offline mode."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import doc_oaif_args
from oaif.cli import main
from oaif.config import load_config
from oaif.run.metrics import read_metrics
from oaif.trainer import train

ROOT = Path(__file__).resolve().parent.parent
SHORTER = "oaif.annotators.rules:prefer_shorter"


def run_args(model_dir, out, *extra) -> list[str]:
    return [f"model.name_or_path={model_dir}", "annotator.type=callable", f"annotator.callable={SHORTER}",
            f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=2", "sampling.max_new_tokens=8",
            "optim.warmup_steps=0", "logging.progress_bar=false", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}",
            *extra]


@pytest.fixture(scope="module")
def tb_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A 3-step online run on the tiny model with the rule judge, reporting to TensorBoard."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'oaif[dev]')")
    out = tmp_path_factory.mktemp("plot") / "run"
    train(load_config(ROOT / "configs/demo.yaml", run_args(tiny_model_dir, out, "logging.report_to=[tensorboard]")))
    return out


def test_plot_writes_every_png_and_a_page(tb_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = doc_oaif_args("oaif plot runs/demo")  # the README's command, on this run
    assert main([str(tb_run) if a == "runs/demo" else a for a in argv]) == 0
    plots = tb_run / "plots"
    names = {"training.png", "judge.png", "pairs.png", "time.png"}
    assert {p.name for p in plots.glob("*.png")} == names
    for name in names:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (plots / "index.md").read_text()
    assert all(f"]({name})" in page for name in names)
    assert "3 steps recorded (step 1 to 3)" in page and "| `loss` |" in page
    assert "**Judge**: both-order consistency 1.000" in page and "better than coin flips." in page
    assert f"page: {plots / 'index.md'}" in capsys.readouterr().out
    other = tmp_path / "elsewhere"
    assert main(["plot", str(tb_run), "--out", str(other)]) == 0
    assert {p.name for p in other.iterdir()} == names | {"index.md"}


def test_plot_of_an_offline_run_leaves_out_the_judge(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    train(load_config(ROOT / "configs/offline_demo.yaml", [f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}",
                                                           "train.max_steps=2", "logging.progress_bar=false",
                                                           f"data.preference_path={ROOT / 'data/prompts/hh_harmless_preferences.jsonl'}"]))
    assert main(["plot", str(out)]) == 0
    assert {p.name for p in (out / "plots").glob("*.png")} == {"training.png", "pairs.png", "time.png"}
    assert "Judge" not in (out / "plots" / "index.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("missing", "not a directory"), ("empty_dir", "metrics.jsonl: not found"), ("no_steps", "no step recorded yet"),
])
def test_plot_of_no_run_is_one_line(tmp_path, capsys, case, message):
    run_dir = tmp_path / "run"
    if case != "missing":
        run_dir.mkdir()
    if case == "no_steps":
        (run_dir / "metrics.jsonl").write_text("")
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oaif: error: ") and message in err and len(err.splitlines()) == 1


def test_plot_out_that_is_a_file_is_refused(tb_run, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["plot", str(tb_run), "--out", str(target)]) == 2
    assert "oaif: error: --out:" in capsys.readouterr().err


def test_tensorboard_event_file_holds_the_metrics(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((tb_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    records = read_metrics(tb_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "kl", "response_length", "judge_consistency", "pairs_used", "time_sample_s"):
        events = acc.Scalars(key)  # a step without a value (no pair used: no loss) has no event
        assert [e.step for e in events] == [r["step"] for r in records if key in r], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in records if key in r], rel=1e-6), key
    assert len(acc.Scalars("kl")) == 3


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install 'oaif[dev]')")
def test_wandb_offline_run_writes_its_files(tiny_model_dir, tmp_path):
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb_home"
    wandb_dir.mkdir()
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(wandb_dir / "config"), WANDB_CACHE_DIR=str(wandb_dir / "cache"))
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run([sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/demo.yaml"),
                             *run_args(tiny_model_dir, out, "logging.report_to=[wandb]", "logging.run_name=plot-test")],
                            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(wandb_dir.rglob("*"))[:20]
    data = list(runs[0].glob("run-*.wandb"))
    assert len(data) == 1 and data[0].stat().st_size > 0
    records = data[0].read_bytes()  # W&B's record log (protobuf): the run's name and every logged key are in it
    assert b"plot-test" in records
    assert all(key.encode() in records for key in ("loss", "kl", "judge_consistency", "pairs_used", "time_sample_s"))
    assert (runs[0] / "files" / "output.log").is_file()
