"""Checkpoints are atomic, loadable by transformers, and resumable (also with LoRA)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oaif.run.saving import save
from transformers import AutoModelForCausalLM

from oaif.run.checkpoint import latest_checkpoint
from oaif.run.restore import load_trainer_state
from oaif.config import load_config
from oaif.run.metrics import read_metrics
from oaif.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def args(model_dir, out, *extra):
    return [f"model.name_or_path={model_dir}", "annotator.type=callable",
            "annotator.callable=oaif.annotators.rules:prefer_shorter", f"train.output_dir={out}",
            "train.batch_size=2", "sampling.max_new_tokens=8", "optim.lr=1.0e-3", "optim.warmup_steps=0",
            "logging.progress_bar=false", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}", *extra]


def test_latest_skips_incomplete_checkpoints(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoint-5").mkdir()  # a crash before its state was written: never renamed like this, but be safe
    (tmp_path / ".tmp-checkpoint-6-123").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    (tmp_path / "latest").write_text("checkpoint-5\n")  # names an incomplete one: fall back
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert latest_checkpoint(tmp_path / "empty") is None


@pytest.mark.slow
def test_kill_at_any_moment_leaves_a_complete_latest(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/demo.yaml"),
           *args(tiny_model_dir, out, "train.max_steps=1000", "train.save_every=1", "train.keep_last=2")]
    seen = set()
    # kill at a few offsets into the training loop, measured from the run's first new metrics line (not from
    # the start, which takes 5-15 s depending on the machine's load)
    for delay in (0.0, 0.4, 0.9, 1.7):
        lines = len(read_metrics(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else 0
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) > lines:
                break
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            continue
        assert (out / "latest").read_text().strip() == ckpt.name
        state = load_trainer_state(ckpt)
        assert state["step"] == int(ckpt.name.split("-")[1])
        AutoModelForCausalLM.from_pretrained(ckpt)  # loads: config, weights and all
        seen.add(ckpt.name)
        if "train.resume=true" not in cmd:
            cmd.append("train.resume=true")
    assert seen, "no checkpoint was written within the kill delays"
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == sorted(steps)


def test_lora_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    cfg = ROOT / "configs/lora_demo.yaml"
    full = tmp_path / "full"
    train(load_config(cfg, args(tiny_model_dir, full, "train.max_steps=3")))
    part = tmp_path / "part"
    train(load_config(cfg, args(tiny_model_dir, part, "train.max_steps=3", "train.save_every=1")))
    # drop the last checkpoint, as if the run had died after step 2
    import shutil

    shutil.rmtree(part / "checkpoint-3")
    (part / "latest").write_text("checkpoint-2\n")
    train(load_config(cfg, args(tiny_model_dir, part, "train.max_steps=3", "train.resume=true")))
    a = load_file(str(full / "checkpoint-3" / "model.safetensors"))
    b = load_file(str(part / "checkpoint-3" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in base)


def test_lora_bf16_saves_leave_the_frozen_base_bit_identical(tiny_model_dir, tmp_path):
    from oaif.run.checkpoint import save_checkpoint
    from oaif.config import LoraConfig, ModelConfig
    from oaif.models.load import load_policy_and_reference

    policy, _, tok = load_policy_and_reference(ModelConfig(name_or_path=tiny_model_dir, dtype="bfloat16",
                                                           lora=LoraConfig(enabled=True, r=4, alpha=8)))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: a non-zero delta
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, policy, tok, {"step": step}, keep_last=2)
    after = dict(policy.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"{len(changed)} base tensors changed, e.g. {changed[:3]}"

    # the saved weights are W + scale * B @ A, rounded once to bfloat16
    saved = load_file(str(tmp_path / "checkpoint-10" / "model.safetensors"))
    q = policy.base_model.model.model.layers[0].self_attn.q_proj
    delta = (q.lora_B["default"].weight.float() @ q.lora_A["default"].weight.float()) * q.scaling["default"]
    expected = (q.base_layer.weight.float() + delta).to(torch.bfloat16)
    w = saved["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.bfloat16 and torch.equal(w, expected) and not torch.equal(w, q.base_layer.weight)
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], before["base_model.model.model.layers.0.mlp.up_proj.weight"])


# peft warns that an adapter on a tied layer complicates merging: oaif merges each side apart and saves
# the model untied (what these tests check), and peft saves the embedding layers with the adapter.
PEFT_TIED_WARNINGS = [pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
                      pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")]


@pytest.mark.parametrize("targets, tied", [
    (["embed_tokens"], True), (["lm_head"], True), (["embed_tokens", "lm_head", "q_proj", "down_proj"], True),
    (["embed_tokens", "lm_head", "gate_proj"], False),
], ids=["tied_embed", "tied_head", "tied_all", "untied"])
@PEFT_TIED_WARNINGS[0]
@PEFT_TIED_WARNINGS[1]
def test_a_lora_checkpoint_is_the_live_policy_on_any_module(tiny_model_dir, tmp_path, targets, tied):
    """After a real update, AutoModelForCausalLM on the checkpoint computes the logits of the live peft policy:
    on a tied model an adapter on the embedding or the head unties them (the live model adds each delta on one side)."""
    from helpers import make_tiny_llama
    from oaif.trainer import Trainer

    model_dir = tiny_model_dir if tied else make_tiny_llama(tmp_path / "untied", tie_word_embeddings=False,
                                                            tokenizer_source=tiny_model_dir)
    cfg = load_config(ROOT / "configs/lora_demo.yaml", args(model_dir, tmp_path / "run", "optim.lr=1.0e-2",
                                                            f"model.lora.target_modules=[{', '.join(targets)}]"))
    t = Trainer(cfg).setup()
    try:
        assert t.run_step()["pairs_used"] > 0
        ckpt = save(t)
    finally:
        t.close()
    live = t.unwrapped.eval()
    ids = torch.tensor([t.tokenizer.encode("The sea is calm tonight, and the boats are home.")])
    saved = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        want, got = live(input_ids=ids).logits, saved(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the update moved the policy
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert saved.config.tie_word_embeddings is False


@PEFT_TIED_WARNINGS[0]
def test_vllm_refuses_a_lora_adapter_on_tied_embeddings(tiny_model_dir):
    from oaif.config import LoraConfig, ModelConfig
    from oaif.errors import ConfigError
    from oaif.generation.build import build_sampler
    from oaif.models.load import load_policy_and_reference

    cfg = load_config(ROOT / "configs/vllm_demo.yaml", [f"model.name_or_path={tiny_model_dir}", "model.lora.enabled=true",
                                                        "model.lora.target_modules=[q_proj, lm_head]"])
    policy, _, tok = load_policy_and_reference(ModelConfig(name_or_path=tiny_model_dir, lora=LoraConfig(
        enabled=True, target_modules=["q_proj", "lm_head"])))
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules=\['q_proj', 'lm_head'\] puts an adapter on the "
                                          r"tied embeddings of .*sampling\.backend=shared_prefill"):
        build_sampler(cfg, policy, tok, {tok.eos_token_id}, None)


def test_a_mixture_of_experts_resumes_as_uninterrupted_and_pushes_its_checkpoint_names(tiny_model_dir, tmp_path):
    """transformers 5 holds a Mixtral's experts fused (``mlp.experts.gate_up_proj``) but saves them per expert
    (``block_sparse_moe.experts.0.w1.weight``): resume converts the checkpoint's names to the model's, and
    the weights pushed to vLLM carry the checkpoint's names, which vLLM's loader reads."""
    from helpers import make_tiny_mixtral
    from oaif.generation.weights import policy_weights
    from oaif.trainer import Trainer

    moe = make_tiny_mixtral(tmp_path / "mixtral", tokenizer_source=tiny_model_dir)
    cfg = ROOT / "configs/demo.yaml"
    full = tmp_path / "full"
    train(load_config(cfg, args(moe, full, "train.max_steps=2")))
    part = tmp_path / "part"
    train(load_config(cfg, args(moe, part, "train.max_steps=1")))
    t = Trainer(load_config(cfg, args(moe, part, "train.max_steps=2", "train.resume=true"))).setup()
    saved = load_file(str(part / "checkpoint-1" / "model.safetensors"))
    assert any(".block_sparse_moe.experts.3.w2." in k for k in saved)
    pushed = dict(policy_weights(t.unwrapped))
    assert sorted(pushed) == sorted(saved)  # the names vLLM's Mixtral loader reads, not the fused runtime names
    for k in saved:
        assert torch.equal(pushed[k], saved[k]), k
    t.run_step()
    save(t)
    a = load_file(str(full / "checkpoint-2" / "model.safetensors"))
    b = load_file(str(part / "checkpoint-2" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert any(not torch.equal(a[k], saved[k]) for k in a)


def test_resume_from_a_named_checkpoint_and_state_loads_weights_only(tiny_model_dir, tmp_path):
    cfg = ROOT / "configs/demo.yaml"
    full = tmp_path / "full"
    train(load_config(cfg, args(tiny_model_dir, full, "train.max_steps=3", "train.save_every=1", "train.keep_last=3")))
    state = torch.load(full / "checkpoint-1" / "trainer_state.pt", weights_only=True)  # tensors and plain data only
    assert state["step"] == 1 and state["stream"]["position"] == 2

    branch = tmp_path / "branch"  # continue from checkpoint-1 into another directory
    train(load_config(cfg, args(tiny_model_dir, branch, "train.max_steps=3", f"train.resume={full / 'checkpoint-1'}")))
    a = load_file(str(full / "checkpoint-3" / "model.safetensors"))
    b = load_file(str(branch / "checkpoint-3" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_metrics(branch / "metrics.jsonl")] == [2, 3]
    from oaif.errors import ConfigError

    with pytest.raises(ConfigError, match="train.resume: .* is not a checkpoint directory"):
        train(load_config(cfg, args(tiny_model_dir, branch, f"train.resume={full}")))


def _file_size_limit(limit: int):
    """Writes beyond ``limit`` bytes per file fail with EFBIG (a real OS write failure, as on a full disk):
    RLIMIT_FSIZE with SIGXFSZ ignored, for a subprocess's preexec_fn."""
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last_complete_one(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/demo.yaml"),
            f"model.name_or_path={tiny_model_dir}", "annotator.type=callable",
            "annotator.callable=oaif.annotators.rules:prefer_shorter", f"train.output_dir={out}", "train.batch_size=2",
            "sampling.max_new_tokens=6", "optim.warmup_steps=0", "logging.progress_bar=false", "train.save_every=1"]
    done = subprocess.run(base + ["train.max_steps=1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    weights_size = (out / "checkpoint-1/model.safetensors").stat().st_size
    state_size = (out / "checkpoint-1/trainer_state.pt").stat().st_size
    assert state_size // 2 > weights_size  # AdamW's two moments: the state is the largest file
    # the resumed run's next checkpoint fails at its weights (safetensors' writer), then at its trainer state (torch's)
    for limit in (weights_size // 2, state_size // 2):
        proc = subprocess.run(base + ["train.max_steps=2", "train.resume=true"], capture_output=True, text=True,
                              cwd=ROOT, timeout=300, preexec_fn=_file_size_limit(limit))
        errors = [line for line in proc.stderr.splitlines() if line.startswith("oaif: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"cannot write {out / 'checkpoint-2'}" in errors[0] and "MiB free there" in errors[0]
        assert "checkpoint-1 is kept as the last complete checkpoint" in errors[0]
        assert (out / "latest").read_text().strip() == "checkpoint-1"
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # no partial copy


def test_saving_a_step_again_replaces_its_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from oaif.errors import CheckpointWriteError
    from oaif.run.checkpoint import save_checkpoint

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    save_checkpoint(tmp_path, 1, model, tok, {"step": 1, "mark": "first"})
    save_checkpoint(tmp_path, 1, model, tok, {"step": 1, "mark": "again"})
    assert torch.load(tmp_path / "checkpoint-1/trainer_state.pt", weights_only=True)["mark"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]  # no .tmp- or .old- copy left
    (tmp_path / "checkpoint-2").write_text("not a checkpoint")  # appeared while the run went on
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*checkpoint-2: it exists and is not a checkpoint "
                                                   r"directory.*checkpoint-1 is kept as the last complete checkpoint"):
        save_checkpoint(tmp_path, 2, model, tok, {"step": 2})
    assert (tmp_path / "checkpoint-2").read_text() == "not a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2", "latest"]


def test_runs_that_meet_a_checkpoint_of_their_own_step(tiny_model_dir, tmp_path):
    """A requeued finished run, a lower max_steps, a rewind to an older checkpoint, a file in the way."""
    from oaif.errors import ConfigError

    cfg, out = ROOT / "configs/demo.yaml", tmp_path / "run"

    def leftovers() -> list[str]:
        return sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-")))

    train(load_config(cfg, args(tiny_model_dir, out, "train.max_steps=3", "train.save_every=1", "train.keep_last=0")))
    final = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    written = (out / "checkpoint-3" / "model.safetensors").stat().st_mtime_ns
    # resumed after its final save (a requeue): nothing to train, done, the checkpoint left as it is
    summary = train(load_config(cfg, args(tiny_model_dir, out, "train.max_steps=3", "train.resume=true")))
    assert summary["steps"] == 3 and summary["final_checkpoint"] == str(out / "checkpoint-3") and leftovers() == []
    assert (out / "checkpoint-3" / "model.safetensors").stat().st_mtime_ns == written
    with pytest.raises(ConfigError, match=r"train.max_steps=2 is below the step of .*checkpoint-3 \(3\)"):
        train(load_config(cfg, args(tiny_model_dir, out, "train.max_steps=2", "train.resume=true")))
    # back to checkpoint-1, saving every step: checkpoint-2 and -3 are written again, as they were
    train(load_config(cfg, args(tiny_model_dir, out, "train.max_steps=3", "train.save_every=1", "train.keep_last=0",
                                f"train.resume={out / 'checkpoint-1'}")))
    assert leftovers() == [] and (out / "latest").read_text().strip() == "checkpoint-3"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    again = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    for k in final:
        torch.testing.assert_close(again[k], final[k], atol=1e-6, rtol=0)
    # a file where the run would write a checkpoint: refused before any work
    import shutil

    shutil.rmtree(out / "checkpoint-3")
    (out / "checkpoint-3").write_text("mine")
    (out / "latest").write_text("checkpoint-2\n")
    with pytest.raises(ConfigError, match=r"checkpoint-3 exists and is not a checkpoint directory"):
        train(load_config(cfg, args(tiny_model_dir, out, "train.max_steps=3", "train.resume=true")))
    assert (out / "checkpoint-3").read_text() == "mine" and leftovers() == []


def test_rotation_spares_a_checkpoint_being_evaluated_and_eval_skips_one_it_removed(tiny_model_dir, tmp_path, caplog):
    from oaif.annotators.callable_judge import CallableJudge
    from oaif.evaluation.evaluate import evaluate_run
    from oaif.evaluation.responses import EvalSettings
    from oaif.run.checkpoint import _rotate, reading_checkpoint

    out = tmp_path / "run"
    train(load_config(ROOT / "configs/demo.yaml", args(tiny_model_dir, out, "train.max_steps=4", "train.save_every=1",
                                                       "train.keep_last=0")))
    with reading_checkpoint(out / "checkpoint-1") as present:
        assert present
        _rotate(out, 3, protect="checkpoint-4")  # as the trainer's save of checkpoint-4 with train.keep_last=3
        assert (out / "checkpoint-1" / "model.safetensors").is_file()  # being read: left for a later rotation
    _rotate(out, 3, protect="checkpoint-4")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    with reading_checkpoint(out / "checkpoint-1") as present:
        assert not present

    def judge_while_training(prompt, a, b):  # the run saves on meanwhile: rotation removes checkpoint-3 before its turn
        _rotate(out, 1, protect="checkpoint-4")
        return float(len(a) < len(b))

    result = evaluate_run(out, annotator=CallableJudge(judge_while_training), limit=2, progress=False,
                          settings=EvalSettings(bootstrap=50))
    assert [c["step"] for c in result["comparisons"]] == [2, 4]
    assert "checkpoint-3 was removed (train.keep_last) before it could be evaluated: skipped" in caplog.text
