"""Self-judging (``annotator.model=policy``): the policy being trained is its own LLM judge, read from its
current weights in the trainer's process, without a second copy (tiny random Llama, real trainer)."""

from __future__ import annotations

import copy
import gc
import json
from pathlib import Path

import pytest
import torch

from helpers import one_line_error
from oaif.annotators.base import PairRequest
from oaif.annotators.build import build_annotator
from oaif.annotators.llm_judge import LLMJudge
from oaif.annotators.rubrics import load_rubric
from oaif.config import describe, load_annotator_config, load_config
from oaif.errors import AnnotatorError, ConfigError
from oaif.models.modules import without_ddp
from oaif.run.metrics import read_metrics
from oaif.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [
    PairRequest("What is the capital of France?", "The capital of France is Paris.", "I like turtles.", "p0"),
    PairRequest("How do I boil an egg?", "Boil it for nine minutes, then cool it.", "Eggs come from hens.", "p1"),
    PairRequest("What is 2+2?", "4", "2+2 equals 5, as everyone knows.", "p2"),
]
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]


def self_cfg(model_dir, out, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.name_or_path={model_dir}", "annotator.type=llm", "annotator.model=policy", "annotator.rubric=helpful",
        "loss.soft_labels=true", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=4",
        "sampling.max_new_tokens=12", "optim.lr=1.0e-2", "optim.warmup_steps=0", "logging.progress_bar=false",
        f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}", *extra])


def probs(judge, pairs=PAIRS) -> list[float]:
    judgments = judge.annotate(pairs)
    assert all(j.ok for j in judgments)
    return [p for j in judgments for p in (j.prob_ab, j.prob_ba)]


def causal_lms() -> int:
    """transformers causal LMs alive in this process (not their inner ``LlamaModel``, not a peft wrapper)."""
    from transformers import PreTrainedModel

    gc.collect()
    return sum(issubclass(type(o), PreTrainedModel) and type(o).__name__.endswith("ForCausalLM")
               for o in gc.get_objects())


def modes(model) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


# -- the judge is the live policy ---------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_policy_judges_itself_with_its_current_weights_and_no_copy(tiny_model_dir, tmp_path, lora):
    models_before = causal_lms()
    t = Trainer(self_cfg(tiny_model_dir, tmp_path / "run", *(LORA if lora else []))).setup()
    # no second model: the judge calls the policy's own module, whose parameters are the ones trained
    assert causal_lms() - models_before == (1 if lora else 2)  # the policy (its base, with LoRA) and the reference
    judge = t.annotator
    assert isinstance(judge, LLMJudge) and judge.name == "llm:policy:helpful"
    assert judge.model is without_ddp(t.policy) and judge.model is not t.parts.reference
    assert {id(p) for p in judge.model.parameters()} == {id(p) for p in t.policy.parameters()}
    trainable = {id(p) for p in t.policy.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    start = probs(judge)

    summary = t.train()  # two real steps, each judged by the policy as it was at that step
    assert summary["steps"] == 2
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["pairs_used"] > 0 and "judge_confidence" in r for r in records)
    audit = [json.loads(line) for line in (tmp_path / "run" / "annotations.jsonl").read_text().splitlines()]
    assert audit and all(a["judge"] == "llm:policy:helpful" for a in audit)
    assert all(isinstance(a["prob"], float) and 0 < a["prob"] < 1 for a in audit if a["failure"] is None)

    after = probs(judge)
    assert max(abs(a - b) for a, b in zip(after, start)) > 1e-3  # it reads the updated weights
    copied = LLMJudge(copy.deepcopy(judge.model), t.tokenizer, load_rubric("helpful"))
    assert after == pytest.approx(probs(copied), abs=1e-6)  # as a judge on a copy of the updated policy
    if lora:  # the judge is the policy with its adapter: the base alone (adapter off) still judges as at the start
        with judge.model.disable_adapter():
            assert probs(judge) == pytest.approx(start, abs=1e-6)
    else:  # the frozen reference judges as the starting policy did
        assert probs(LLMJudge(t.parts.reference, t.tokenizer, load_rubric("helpful"))) == pytest.approx(start, abs=1e-6)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_judging_runs_without_grad_in_eval_mode_under_autocast_and_leaves_training_as_it_was(tiny_model_dir,
                                                                                             tmp_path):
    t = Trainer(self_cfg(tiny_model_dir, tmp_path / "run", *LORA, "train.mixed_precision=bf16",
                         "model.disable_dropout=false", "model.lora.dropout=0.5")).setup()
    judge, inner = t.annotator, t.unwrapped
    device = next(inner.parameters()).device.type  # cpu here; cuda where the default train.device=auto finds one
    layers = inner.get_base_model().model.layers
    layers[1].mlp.eval()  # a submodule held in eval mode stays so (every module's own mode is restored)
    before, grads_needed = modes(inner), [p.requires_grad for p in inner.parameters()]
    seen = []
    hook = layers[0].register_forward_hook(
        lambda module, args, out: seen.append((torch.is_grad_enabled(), module.training,
                                               torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))))
    try:
        judged = probs(judge)
    finally:
        hook.remove()
    assert seen and set(seen) == {(False, False, True, torch.bfloat16)}
    assert modes(inner) == before and inner.training and not layers[1].mlp.training
    assert [p.requires_grad for p in inner.parameters()] == grads_needed
    assert all(p.grad is None for p in inner.parameters())
    # the same as judging a copy of the policy under the run's autocast; float32 reads differently
    plain = copy.deepcopy(inner)
    del plain.forward  # accelerate's autocast wrapper (an instance attribute): the copy forwards in float32
    copied = LLMJudge(plain, t.tokenizer, load_rubric("helpful"))
    with torch.autocast(device, dtype=torch.bfloat16):
        assert judged == pytest.approx(probs(copied), abs=1e-6)
    assert judged != pytest.approx(probs(copied), abs=1e-4)
    t.close()


def test_an_ensemble_member_may_be_the_policy_judging_itself(tiny_model_dir, tmp_path):
    members = ("annotator.members=[{type: llm, model: policy}, "
               "{type: callable, callable: 'oaif.annotators.rules:prefer_shorter'}]")
    cfg = self_cfg(tiny_model_dir, tmp_path / "run", "annotator.type=ensemble", "annotator.model=smollm2-135m-instruct",
                   members)
    t = Trainer(cfg).setup()
    self_judge, rule = t.annotator.judges
    assert self_judge.model is without_ddp(t.policy) and self_judge.name == "llm:policy:helpful"
    record = t.run_step()
    assert record["pairs_judged"] == 4 and f"judge_agreement/{self_judge.name}" in record
    t.close()


# -- documented, and refused where there is no policy ------------------------------------------------
def test_config_keys_document_self_judging():
    line = next(line for line in describe().splitlines() if line.lstrip().startswith("annotator.model = "))
    assert "'policy'" in line and "oaif train only" in line and "loss.soft_labels=true" in line


@pytest.mark.parametrize("overrides,key", [
    (["annotator.type=openai", "annotator.base_url=http://127.0.0.1:9/v1"], "annotator.model"),
    (["annotator.type=reward_model"], "annotator.model"),
    (["annotator.type=callable", "annotator.callable=oaif.annotators.rules:prefer_shorter"], "annotator.model"),
    (["annotator.type=ensemble", "annotator.members=[{type: llm}]"], "annotator.model"),
])
def test_policy_with_a_judge_type_other_than_llm_is_one_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.yaml", [*overrides, "annotator.model=policy"])
    message = str(e.value)
    assert message.startswith(f"{key}: 'policy' (the policy judging itself) needs type=llm") and "\n" not in message


def test_ensemble_members_may_self_judge_but_only_as_llm_judges():
    members = ("annotator.members=[{type: llm, model: policy}, "
               "{type: callable, callable: 'oaif.annotators.rules:prefer_shorter'}]")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["annotator.type=ensemble", members])
    assert cfg.annotator.members[0]["model"] == "policy"
    with pytest.raises(ConfigError, match=r"^annotator\.members\[0\]\.model: 'policy' .* got type=reward_model$"):
        load_config(ROOT / "configs" / "demo.yaml", ["annotator.type=ensemble",
                                                     "annotator.members=[{type: reward_model, model: policy}]"])
    with pytest.raises(AnnotatorError, match="no policy being trained here"):
        build_annotator(cfg.annotator)  # the Python API without a policy: one line, before any model loads




def test_eval_and_annotate_have_no_policy_to_judge_with(tiny_model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "a": "Hello.", "b": "Go away."}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi?"}) + "\n")
    config = tmp_path / "run_config.yaml"  # a self-judged run's config.yaml handed to the commands
    config.write_text("annotator:\n  type: llm\n  model: policy\n")
    ensemble = ["--set", "type=ensemble", "--set", "members=[{type: llm, model: policy}]"]
    for argv in (["annotate", str(pairs), "--out", str(tmp_path / "out.jsonl"), "--set", "model=policy"],
                 ["annotate", str(pairs), "--out", str(tmp_path / "out.jsonl"), "--annotator-config", str(config)],
                 ["annotate", str(prompts), "--sample-from", tiny_model_dir, "--out", str(tmp_path / "out.jsonl"),
                  *ensemble],
                 ["eval", tiny_model_dir, tiny_model_dir, "--prompts", str(prompts), "--out", str(tmp_path / "eval"),
                  "--set", "model=policy"],
                 ["eval", tiny_model_dir, tiny_model_dir, "--prompts", str(prompts), "--out", str(tmp_path / "eval"),
                  *ensemble]):
        line = one_line_error(capsys, argv)
        assert line.startswith("oaif: error: annotator.model=policy: there is no policy being trained here"), line
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "eval").exists()
    assert load_annotator_config(config).model == "policy"  # the config itself is valid: only these commands refuse
