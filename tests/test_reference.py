"""A moving reference (issue 19 part 3): loss.reference=behavior (BPO) and TR-DPO's hard and soft updates,
under full fine-tuning and LoRA, through the update, the trainer, checkpoints and resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oaif.config import load_config
from oaif.errors import ConfigError
from oaif.run.metrics import read_metrics
from oaif.trainer import Trainer, train

from test_trainer import ROOT, first_micro_batch, tiny_cfg, weights

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "optim.lr=1.0e-2"]
MODES = {"initial": [], "behavior": ["loss.reference=behavior"], "sync": ["loss.reference_sync_every=2"],
         "mix": ["loss.reference_mix=0.5"]}


def saved_reference(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "reference" / "weights.safetensors"))


def policy_tensors(ckpt: Path, lora: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's policy under the names a saved reference uses (the live model's parameter names)."""
    if not lora:
        return weights(ckpt)
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))  # peft drops the adapter name
    return {k.replace(".weight", ".default.weight"): v for k, v in adapter.items()}


# -- the config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["loss.reference=latest"], "loss.reference: must be one of behavior, initial"),
    (["loss.reference_mix=1.5"], r"loss.reference_mix: must be in \[0, 1\]"),
    (["loss.reference_sync_every=-1"], "loss.reference_sync_every: must be >= 0"),
    (["loss.type=simpo", "loss.reference=behavior"], "loss.reference: has no effect with loss.type=simpo"),
    (["loss.type=simpo", "loss.reference_sync_every=4"], "loss.reference_sync_every: has no effect with loss.type=simpo"),
    (["loss.reference=behavior", "loss.reference_mix=0.6"], "loss.reference_mix: has no effect with loss.reference=behavior"),
    (["loss.reference=behavior", "train.mode=offline", "data.preference_path=p.jsonl"],
     "loss.reference: behavior is the policy that sampled the step's responses, and offline mode samples none"),
])
def test_reference_keys_are_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(ROOT / "configs" / "demo.yaml", overrides)
    assert "\n" not in str(e.value)


def test_config_keys_documents_the_reference_keys():
    from oaif.config.schema import describe

    text = describe()
    for key in ("loss.reference =", "loss.reference_sync_every =", "loss.reference_mix ="):
        assert key in text
    assert "Xu et al. 2024" in text and "Gorbatovski et al. 2024" in text


def test_a_resume_may_not_change_the_reference_also_from_a_checkpoint_older_than_its_keys():
    from oaif.run.resume_check import check_resume_config

    current = load_config(ROOT / "configs" / "demo.yaml", ["loss.reference_mix=0.6"]).to_dict()
    saved = load_config(ROOT / "configs" / "demo.yaml").to_dict()
    with pytest.raises(ConfigError, match=r"loss.reference_mix \(0.0 -> 0.6\)"):
        check_resume_config(saved, current, "ckpt")
    for key in ("reference", "reference_sync_every", "reference_mix"):
        del saved["loss"][key]  # saved before the keys existed: its run was anchored at the starting policy
    with pytest.raises(ConfigError, match=r"loss.reference_mix \(0.0 -> 0.6\)"):
        check_resume_config(saved, current, "ckpt")
    check_resume_config(saved, load_config(ROOT / "configs" / "demo.yaml").to_dict(), "ckpt")
    allowed = load_config(ROOT / "configs" / "demo.yaml", ["loss.reference_mix=0.6",
                                                           "train.resume_allow_changes=[loss.reference_mix]"])
    check_resume_config(saved, allowed.to_dict(), "ckpt")


# -- the update: BPO's reference is the policy before the step ----------------------------------------
@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_behavior_reference_is_the_policy_itself_with_the_gradient_of_the_loss_at_rho_0(tiny_model_dir, tmp_path,
                                                                                    loss_type):
    from oaif.step.logprobs import pack_sequences, sequence_logprobs

    t, mb = first_micro_batch(tiny_cfg(tiny_model_dir, tmp_path / "run", "loss.reference=behavior",
                                       f"loss.type={loss_type}", "loss.beta=0.5"))
    assert t.parts.reference is None and t.update.behavior and not t.update.kl  # no copy, no reference forward
    with torch.no_grad():  # the policy moves away from the starting model: rho stays 0 against the behaviour policy
        for p in t.unwrapped.parameters():
            p.add_(0.01 * torch.randn_like(p))
    t.optimizer.zero_grad(set_to_none=True)
    n = mb.prefs.size
    stats = t.update(mb.rollouts, mb.prefs, global_pairs=n)
    grads = {name: p.grad.clone() for name, p in t.unwrapped.named_parameters() if p.grad is not None}
    t.optimizer.zero_grad(set_to_none=True)
    assert stats.kl is None and torch.count_nonzero(stats.loss.margins) == 0
    expected = math.log(2) if loss_type == "dpo" else 1.0  # -log sigmoid(0); (0 - 1/(2*0.5))^2
    torch.testing.assert_close(stats.loss.losses.cpu(), torch.full((n,), expected), atol=1e-6, rtol=0)
    # by hand: d/drho at rho = 0 is -beta/2 (DPO) and -1/beta (IPO), so the gradient is that times d rho / d theta,
    # where rho's reference terms are constants: d (log pi(y_c) - log pi(y_r))
    k = mb.rollouts.k
    flat = mb.prefs.chosen + mb.prefs.rejected
    batch = pack_sequences([mb.rollouts.prompt_tokens[f // k] for f in flat],
                           [mb.rollouts.responses[f // k][f % k] for f in flat], t.tokenizer.pad_token_id)
    logps = sequence_logprobs(t.unwrapped, batch, share_prompts=False)[0]
    slope = -0.5 / 2 if loss_type == "dpo" else -1 / 0.5
    (slope * (logps[:n] - logps[n:]).sum() / n).backward()
    assert grads.keys() == {name for name, p in t.unwrapped.named_parameters() if p.grad is not None} and grads
    for name, p in t.unwrapped.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


# -- TR-DPO's updates, by hand ------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_tr_dpo_moves_the_reference_by_its_formula(tiny_model_dir, tmp_path, lora):
    from oaif.models.modules import ReferenceAdapter

    t = Trainer(tiny_cfg(tiny_model_dir, tmp_path / "run", "loss.reference_mix=0.25",
                         "loss.reference_sync_every=2", *(LORA if lora else []))).setup()
    moving = t.moving_reference
    policy = dict(t.unwrapped.named_parameters())
    if lora:  # a copy of the adapter (A and B of every target), not of the model
        assert isinstance(moving.reference, ReferenceAdapter) and t.parts.reference is None
        trainable = {n for n, p in policy.items() if p.requires_grad}
        assert moving.tensors().keys() == trainable and all("lora_" in n for n in trainable)
    else:
        assert moving.reference is t.parts.reference
    start = {n: v.clone() for n, v in moving.tensors().items()}
    assert all(torch.equal(start[n], policy[n]) for n in start)
    with torch.no_grad():
        for n in start:
            policy[n].add_(torch.randn_like(policy[n]))
    assert not moving.after_step(t.unwrapped, 1)  # every 2nd step
    assert all(torch.equal(moving.tensors()[n], start[n]) for n in start)
    assert moving.after_step(t.unwrapped, 2)
    for n, ref in moving.tensors().items():
        torch.testing.assert_close(ref, 0.25 * policy[n] + 0.75 * start[n], atol=1e-7, rtol=0)
    hard = Trainer(tiny_cfg(tiny_model_dir, tmp_path / "hard", "loss.reference_sync_every=3",
                            *(LORA if lora else []))).setup().moving_reference
    assert hard.every == 3 and hard.alpha == 1.0  # a hard copy
    assert hard.after_step(t.unwrapped, 3)
    assert all(torch.equal(ref, policy[n]) for n, ref in hard.tensors().items())


# -- step 0 and the trainer ---------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", list(MODES))
def test_margin_and_kl_are_exactly_zero_at_step_0_for_every_reference(tiny_model_dir, tmp_path, lora, mode):
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", "model.dtype=bfloat16", *MODES[mode], *(LORA if lora else []))
    t, mb = first_micro_batch(cfg)
    stats = t.update(mb.rollouts, mb.prefs, global_pairs=mb.prefs.size)
    assert stats.loss.margins.numel() == mb.prefs.size and torch.count_nonzero(stats.loss.margins) == 0
    if mode == "behavior":
        assert stats.kl is None
    else:
        assert stats.kl.numel() == 8 and torch.count_nonzero(stats.kl) == 0, stats.kl


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_trainer_moves_each_reference_and_checkpoints_it(tiny_model_dir, tmp_path, lora):
    extra = ["train.max_steps=3", "train.save_every=1", "train.keep_last=0", *(LORA if lora else [])]
    runs = {mode: tmp_path / mode for mode in MODES}
    for mode, out in runs.items():
        train(tiny_cfg(tiny_model_dir, out, *extra, *MODES[mode]))
    metrics = {mode: read_metrics(out / "metrics.jsonl") for mode, out in runs.items()}
    for mode, records in metrics.items():
        assert records[0]["logratio_margin"] == 0.0 and records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert ("kl" in records[0]) == (mode != "behavior") and all(r["pairs_used"] > 0 for r in records)
        assert (runs[mode] / "checkpoint-3" / "reference").is_dir() == (mode in ("sync", "mix"))
    # BPO: rho is 0 at every step; the initial reference drifts away from the policy
    assert all(r["logratio_margin"] == 0.0 for r in metrics["behavior"])
    assert metrics["initial"][1]["kl"] != 0.0 and metrics["initial"][2]["kl"] != 0.0
    # a hard copy after step 2: step 3 starts at the reference again (kl exactly 0), step 2 did not
    assert metrics["sync"][1]["kl"] != 0.0 and metrics["sync"][2]["kl"] == 0.0
    ckpt = {s: runs["sync"] / f"checkpoint-{s}" for s in (1, 2, 3)}
    start = saved_reference(ckpt[1])
    if lora:  # the starting adapter: B = 0, so the reference is the base
        assert all(not v.any() for n, v in start.items() if "lora_B" in n)
    else:
        base = weights(tiny_model_dir)
        assert start.keys() <= base.keys() and all(torch.equal(v, base[n]) for n, v in start.items())
    assert all(torch.equal(v, policy_tensors(ckpt[2], lora)[n]) for n, v in saved_reference(ckpt[3]).items())
    # soft: after every step ref <- 0.5 policy + 0.5 ref, from the starting policy
    mix = runs["mix"]
    ref = {n: v.clone() for n, v in start.items()}  # both runs start from the same model (and adapter seed)
    for s in (1, 2, 3):
        pol = policy_tensors(mix / f"checkpoint-{s}", lora)
        ref = {n: 0.5 * pol[n] + 0.5 * v for n, v in ref.items()}
        for n, v in saved_reference(mix / f"checkpoint-{s}").items():
            torch.testing.assert_close(v, ref[n], atol=1e-7, rtol=0, msg=n)
    assert metrics["mix"][1]["kl"] != 0.0 and metrics["mix"][1]["kl"] != metrics["initial"][1]["kl"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_resumed_tr_dpo_run_equals_an_uninterrupted_one_bit_for_bit(tiny_model_dir, tmp_path, lora):
    extra = ["train.max_steps=3", "train.save_every=1", "loss.reference_mix=0.5", *(LORA if lora else [])]
    train(tiny_cfg(tiny_model_dir, tmp_path / "full", *extra))
    part = tmp_path / "part"
    train(tiny_cfg(tiny_model_dir, part, *extra))
    shutil.rmtree(part / "checkpoint-3")  # as if the run had died after step 2
    (part / "latest").write_text("checkpoint-2\n")
    train(tiny_cfg(tiny_model_dir, part, *extra, "train.resume=true"))
    a, b = tmp_path / "full" / "checkpoint-3", part / "checkpoint-3"
    for name, (x, y) in {"policy": (policy_tensors(a, lora), policy_tensors(b, lora)),
                         "reference": (saved_reference(a), saved_reference(b))}.items():
        assert x.keys() == y.keys() and x
        assert all(torch.equal(x[k], y[k]) for k in x), name
    assert [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(part / "metrics.jsonl")]


def test_a_moving_reference_never_moves_the_judge(tiny_model_dir, tmp_path):
    # an in-process LLM judge that names the policy's model reuses the frozen starting model; a reference that
    # moves is another model, so the judge loads its own copy and stays the starting model
    judge = ["annotator.type=llm", f"annotator.model={tiny_model_dir}",
             "train.max_steps=1"]
    fixed = Trainer(tiny_cfg(tiny_model_dir, tmp_path / "fixed", *judge)).setup()
    assert fixed.annotator.model is fixed.parts.reference
    t = Trainer(tiny_cfg(tiny_model_dir, tmp_path / "moving", *judge, "loss.reference_sync_every=1")).setup()
    assert t.annotator.model is not t.parts.reference
    t.run_step()
    start = weights(tiny_model_dir)
    judged = dict(t.annotator.model.named_parameters())
    moved = dict(t.parts.reference.named_parameters())
    assert any(not torch.equal(moved[n], start[n]) for n in moved)  # the reference is the policy after step 1
    assert all(torch.equal(judged[n], start[n]) for n in judged)  # the judge is the starting model
    behavior = Trainer(tiny_cfg(tiny_model_dir, tmp_path / "behavior", *judge, "loss.reference=behavior")).setup()
    assert behavior.parts.reference is None and behavior.annotator.model is not None
