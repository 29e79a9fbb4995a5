"""The update step's passes: grouped and sorted forwards give the one-pass result; the reference goes first."""

from __future__ import annotations

import math

import pytest
import torch

from oaif.config import load_config
from oaif.run.metrics import StepMetrics
from oaif.step.records import Rollouts
from oaif.trainer import Trainer
from oaif.step.update import forward_groups

from test_trainer import ROOT, tiny_cfg


def _rollouts(prompt_lengths: list[int], response_lengths: list[list[int]]) -> Rollouts:
    n = len(prompt_lengths)
    return Rollouts(positions=list(range(n)), prompt_ids=[str(i) for i in range(n)], prompt_texts=[""] * n,
                    prompt_tokens=[[1] * p for p in prompt_lengths],
                    responses=[[[2] * r for r in rs] for rs in response_lengths],
                    texts=[[""] * len(rs) for rs in response_lengths],
                    ended_eos=[[False] * len(rs) for rs in response_lengths])


def test_forward_groups_keep_a_prompts_responses_together_and_sort_by_length():
    # 4 prompts x K=2; longest sequences per prompt: 30+5=35, 10+40=50, 12+3=15, 20+20=40
    r = _rollouts([30, 10, 12, 20], [[5, 1], [40, 2], [3, 3], [20, 9]])
    assert forward_groups(r, list(range(8)), 4) == [[4, 5, 0, 1], [6, 7, 2, 3]]
    assert forward_groups(r, list(range(8)), 0) == [[4, 5, 0, 1, 6, 7, 2, 3]]
    # a prompt never splits, even when it alone exceeds the limit; a subset of responses keeps its prompts
    assert forward_groups(r, list(range(8)), 1) == [[4, 5], [0, 1], [6, 7], [2, 3]]
    # responses 1, 2, 7 alone: sequences of 30+1, 10+40, 20+9 tokens
    assert forward_groups(r, [1, 2, 7], 2) == [[7, 1], [2]]
    assert forward_groups(r, [1, 2, 7], 1) == [[7], [1], [2]]


@pytest.fixture(scope="module")
def collected(tiny_model_dir, tmp_path_factory):
    """One trainer and one collected micro-batch of 4 prompts x 2 responses (3 pairs: one prompt ties)."""
    import json

    from test_trainer import JUDGES

    tmp = tmp_path_factory.mktemp("update")
    prompts = tmp / "prompts.jsonl"  # of very different lengths, so that the passes pad differently
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": ("TIE " if i == 1 else "") + "very " * (9 * i) + "long?"})
                               + "\n" for i in range(4)))
    t = Trainer(tiny_cfg(tiny_model_dir, tmp / "run", f"data.path={prompts}", "data.shuffle=false",
                         "data.eval_fraction=0", "annotator.type=callable", "sampling.max_new_tokens=16",
                         f"annotator.callable={JUDGES}:shorter_unless_marked")).setup()
    mb = t.collect(t.next_prompts(), StepMetrics())
    assert mb.prefs.size == 3 and mb.prefs.masked.get("tie") == 1
    assert len({len(p) for p in mb.rollouts.prompt_tokens}) == 4
    return t, mb


def _update_with(t, mb, forward_batch_size: int):
    t.update.forward_batch_size = forward_batch_size
    t.optimizer.zero_grad(set_to_none=True)
    stats = t.update(mb.rollouts, mb.prefs, global_pairs=mb.prefs.size)
    grads = {n: p.grad.clone() for n, p in t.unwrapped.named_parameters() if p.grad is not None}
    t.optimizer.zero_grad(set_to_none=True)
    return stats, grads


def test_one_pass_per_prompt_equals_one_pass_for_all(collected):
    t, mb = collected
    one, one_grads = _update_with(t, mb, 0)
    many, many_grads = _update_with(t, mb, 1)  # one pass per prompt: 3 backward passes, 1 KL-only pass
    for field in ("losses", "margins", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(many.loss, field), getattr(one.loss, field), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(many.chosen_logps, one.chosen_logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(many.kl, one.kl, atol=1e-6, rtol=0)
    assert many.train_tokens == one.train_tokens
    assert one_grads.keys() == many_grads.keys() and one_grads
    for name in one_grads:
        torch.testing.assert_close(many_grads[name], one_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_shared_prompt_forwards_equal_full_rows_through_the_update(collected):
    t, mb = collected
    assert t.update.share_prompts  # the default
    shared, shared_grads = _update_with(t, mb, 2)
    t.update.share_prompts = False  # train.share_prompt_forward=false: one [prompt | response] row per response
    try:
        rows, rows_grads = _update_with(t, mb, 2)
    finally:
        t.update.share_prompts = True
    torch.testing.assert_close(shared.loss.losses, rows.loss.losses, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(shared.chosen_logps, rows.chosen_logps, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(shared.kl, rows.kl, atol=1e-5, rtol=0)
    for name in rows_grads:
        torch.testing.assert_close(shared_grads[name], rows_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_share_prompt_forward_is_a_config_key(tiny_model_dir, tmp_path):
    t = Trainer(tiny_cfg(tiny_model_dir, tmp_path / "run", "train.share_prompt_forward=false"))
    t.setup()
    assert t.update.share_prompts is False


def test_gradient_checkpointing_trains_on_full_rows(tiny_model_dir, tmp_path):
    # checkpointing turns the KV cache off in training: the update forwards [prompt | response] rows
    t = Trainer(tiny_cfg(tiny_model_dir, tmp_path / "run", "model.gradient_checkpointing=true")).setup()
    assert t.update.share_prompts is False
    before = {n: p.detach().clone() for n, p in t.unwrapped.named_parameters()}
    record = t.run_step()
    assert record["pairs_used"] > 0
    assert any(not torch.equal(before[n], p) for n, p in t.unwrapped.named_parameters())


def test_the_reference_forwards_before_the_policy_builds_its_graph(collected):
    t, mb = collected
    order = []
    hooks = [t.parts.reference.register_forward_hook(lambda *a: order.append("reference")),
             t.unwrapped.register_forward_hook(lambda *a: order.append("policy" if torch.is_grad_enabled() else "kl"))]
    try:
        _update_with(t, mb, 2)
    finally:
        for h in hooks:
            h.remove()
    graph = [i for i, who in enumerate(order) if who == "policy"]
    # 3 prompts with a pair, 2 rows a pass; each pass forwards the prompt, then the responses on its cache
    assert t.update.share_prompts and len(graph) == 3 * 2
    assert order.index("reference", order.index("kl")) < graph[0]
    assert "reference" not in order[graph[0]:]


def test_forward_batch_size_is_checked(tmp_path):
    from oaif.errors import ConfigError

    with pytest.raises(ConfigError, match="train.forward_batch_size"):
        load_config(ROOT / "configs" / "demo.yaml", ["train.forward_batch_size=-1"])


# -- the losses that read response lengths, and the reference-free one -------------------------------
def _count_reference_forwards(t, mb) -> tuple[int, object]:
    calls = []
    hook = t.parts.reference.register_forward_hook(lambda *a: calls.append(1))
    try:
        stats, _ = _update_with(t, mb, 2)
    finally:
        hook.remove()
    return len(calls), stats


def test_simpo_runs_no_reference_forward_and_logs_no_kl(tiny_model_dir, tmp_path):
    import dataclasses

    from test_trainer import first_micro_batch

    t, mb = first_micro_batch(tiny_cfg(tiny_model_dir, tmp_path / "run", "loss.type=simpo"))
    assert not t.update.uses_reference and not t.update.kl
    calls, stats = _count_reference_forwards(t, mb)
    assert calls == 0 and stats.kl is None
    assert stats.loss.losses.numel() == mb.prefs.size
    # the same trainer with DPO's loss forwards the reference (its pairs, and the KL of every response)
    t.update.loss_cfg = dataclasses.replace(t.cfg.loss, type="dpo")
    calls, stats = _count_reference_forwards(t, mb)
    assert calls > 0 and stats.kl.numel() == 8


@pytest.mark.parametrize("loss_type", ["simpo", "rpo", "rdpo"])
def test_the_update_gives_the_length_losses_each_responses_token_count(collected, loss_type):
    # at step 0 (the policy is the reference, rho = 0) each loss is a function of the policy's log-probs and the
    # responses' token counts alone, computed here from its formula (see oaif.step.losses)
    import dataclasses
    import torch.nn.functional as F

    t, mb = collected
    # the tiny random model rarely ends a response early: cut response (b, k) by b + k (2 + 3b) tokens, so that
    # the responses of a pair, and the pairs, differ in length
    rollouts = dataclasses.replace(mb.rollouts, responses=[
        [r[:max(1, len(r) - b - k * (2 + 3 * b))] for k, r in enumerate(rs)] for b, rs in enumerate(mb.rollouts.responses)],
        sample_logprobs=None)  # the sampler's log-probs were of the uncut responses
    cfg = dataclasses.replace(t.cfg.loss, type=loss_type, rdpo_alpha=0.1, rpo_alpha=0.5)
    t.update.loss_cfg, saved = cfg, t.update.loss_cfg
    try:
        stats, _ = _update_with(t, dataclasses.replace(mb, rollouts=rollouts), 2)
    finally:
        t.update.loss_cfg = saved
    k = rollouts.k
    lc = torch.tensor([float(len(rollouts.responses[f // k][f % k])) for f in mb.prefs.chosen])
    lr = torch.tensor([float(len(rollouts.responses[f // k][f % k])) for f in mb.prefs.rejected])
    assert len(set((lc - lr).abs().tolist())) == mb.prefs.size  # a miscounted or misplaced length shows
    pc, pr = stats.chosen_logps.cpu(), stats.rejected_logps.cpu()
    if loss_type == "simpo":
        expected = -F.logsigmoid(2.0 * (pc / lc - pr / lr - 0.5))
        torch.testing.assert_close(stats.loss.chosen_rewards.cpu(), 2.0 * pc / lc)
    else:
        assert torch.count_nonzero(stats.loss.margins) == 0
        expected = (math.log(2) - 0.5 * pc / lc if loss_type == "rpo"
                    else -F.logsigmoid(0.1 * (lc - lr)))
    torch.testing.assert_close(stats.loss.losses.cpu(), expected, atol=1e-6, rtol=1e-6)
