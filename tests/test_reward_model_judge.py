"""RewardModelJudge and train_reward_model on tiny real models (no mocks, no network)."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch

from helpers import TINY_LLAMA
from oaif.annotators.base import PairRequest
from oaif.annotators.reward_model_judge import RewardModelJudge, sequence_rewards
from oaif.data.records import PreferenceRecord
from oaif.errors import AnnotatorError, ModelError


def _tiny_classifier(tokenizer, num_labels: int = 1, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(**TINY_LLAMA, vocab_size=len(tokenizer), num_labels=num_labels,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).to(torch.float32).eval()
    with torch.no_grad():  # a larger head than the default init, so rewards differ clearly
        model.score.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from oaif.models.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("tiny_rm")
    _tiny_classifier(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def judge(rm_dir) -> RewardModelJudge:
    return RewardModelJudge.from_pretrained(rm_dir, batch_size=3)


def _direct_reward(model, tokenizer, prompt: str, response: str, template: bool = True) -> float:
    """An unpadded forward of one conversation, built independently of the judge's code."""
    if template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt + "\n\n" + response)["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


REQUESTS = [
    PairRequest("What is 2+2?", "4", "It is four, as everyone who has studied arithmetic knows.", "p0"),
    PairRequest("Name a colour.", "Blue is a colour of the sky on a clear day.", "Red.", "p1"),
    PairRequest("Say hi.", "Hello there!", "hi", "p2"),
    PairRequest("Write a haiku about rain.", "Rain taps on the roof / a soft drum in the grey dusk / puddles keep the time",
                "No.", "p3"),
]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_probabilities_match_unpadded_forward(judge, padding_side):
    judge.padding_side = padding_side
    try:
        out = judge.annotate(REQUESTS)
    finally:
        judge.padding_side = "right"
    assert len(out) == len(REQUESTS)
    for r, j in zip(REQUESTS, out):
        ra = _direct_reward(judge.model, judge.tokenizer, r.prompt, r.a)
        rb = _direct_reward(judge.model, judge.tokenizer, r.prompt, r.b)
        assert j.ok, j.failure
        assert j.prob == pytest.approx(_sigmoid(ra - rb), abs=1e-5)
        assert j.extra["reward_a"] == pytest.approx(ra, abs=1e-4)
        assert j.extra["reward_b"] == pytest.approx(rb, abs=1e-4)
        assert j.prob_ab == j.prob_ba == j.prob and j.consistent
        assert j.judge == judge.name
    assert len({round(j.prob, 6) for j in out}) > 1  # not a degenerate constant scorer


def test_without_chat_template(judge):
    plain = RewardModelJudge(judge.model, judge.tokenizer, use_chat_template=False)
    r = REQUESTS[0]
    [j] = plain.annotate([r])
    ra = _direct_reward(judge.model, judge.tokenizer, r.prompt, r.a, template=False)
    rb = _direct_reward(judge.model, judge.tokenizer, r.prompt, r.b, template=False)
    assert j.prob == pytest.approx(_sigmoid(ra - rb), abs=1e-5)


def test_duplicates_scored_once(judge):
    rows = []
    handle = judge.model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]),
                                                   with_kwargs=True)
    try:
        before = judge.scored
        p, q = "Pick one.", "Another prompt."
        out = judge.annotate([PairRequest(p, "x", "y"), PairRequest(p, "y", "x"), PairRequest(p, "x", "z"),
                              PairRequest(q, "x", "y")])
    finally:
        handle.remove()
    assert sum(rows) == 5 and judge.scored - before == 5  # (p,x) (p,y) (p,z) (q,x) (q,y)
    assert out[1].prob == pytest.approx(1.0 - out[0].prob, abs=1e-6)
    assert out[0].extra["reward_a"] == out[2].extra["reward_a"]


def test_too_long_fails_pair_without_scoring_it(judge):
    short = RewardModelJudge(judge.model, judge.tokenizer, max_length=60)
    long_text = "word " * 80
    out = short.annotate([PairRequest("Hi", "Hello", long_text, "long"), PairRequest("Hi", "Hello", "Hey", "ok")])
    assert out[0].failure == "too_long" and out[0].prob is None and out[0].extra["tokens_b"] > 60
    assert out[1].ok
    assert short.scored == 2  # "Hello" and "Hey" only


def test_nan_reward_fails_pair(judge):
    broken = copy.deepcopy(judge.model)
    with torch.no_grad():
        broken.score.weight.fill_(float("nan"))
    [j] = RewardModelJudge(broken, judge.tokenizer).annotate([REQUESTS[0]])
    assert j.failure == "nan" and j.prob is None and not j.ok


def test_pooling_reads_last_token_even_when_it_is_the_pad_id(judge):
    model, pad = judge.model, judge.model.config.pad_token_id
    seqs = [[5, 6, 7, pad], [8, 9, 10, 11, 12, 13], [14, pad]]
    expected = []
    model.config.pad_token_id = None  # batch of one, no pad id: HF pools the last position
    try:
        with torch.no_grad():
            for s in seqs:
                expected.append(model(input_ids=torch.tensor([s])).logits[0, 0].item())
    finally:
        model.config.pad_token_id = pad
    for side in ("left", "right"):
        with torch.no_grad():
            got = sequence_rewards(model, seqs, side).tolist()
        assert got == pytest.approx(expected, abs=1e-4)
    assert model.config.pad_token_id == pad


def test_loader_errors(tmp_path, tokenizer, tiny_model_dir):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelError, match="no_such_model"):
        RewardModelJudge.from_pretrained(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty"):
        RewardModelJudge.from_pretrained(str(tmp_path / "empty"))
    two = tmp_path / "two_labels"
    _tiny_classifier(tokenizer, num_labels=2).save_pretrained(two)
    tokenizer.save_pretrained(two)
    with pytest.raises(AnnotatorError, match="num_labels=2"):
        RewardModelJudge.from_pretrained(str(two))
    with pytest.raises(AnnotatorError, match="num_labels=2"):
        RewardModelJudge(_tiny_classifier(tokenizer, num_labels=2), tokenizer)
    with pytest.raises(AnnotatorError, match="not a reward model"):
        RewardModelJudge.from_pretrained(tiny_model_dir)  # a causal LM


# --------------------------------------------------------------------------- training


def _synthetic_pairs(n: int = 12, seed: int = 0) -> list[PreferenceRecord]:
    """Chosen: 1-3 words. Rejected: 15-25 words. Same vocabulary, so length is the signal."""
    words = "the a cat dog runs quickly over under house tree blue green small large river mountain".split()
    rng = random.Random(seed)
    return [PreferenceRecord(id=str(i), prompt=f"Question {i}: describe something.",
                             chosen=" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))),
                             rejected=" ".join(rng.choice(words) for _ in range(rng.randint(15, 25))))
            for i in range(n)]


def _agreement(judge: RewardModelJudge, pairs) -> float:
    out = judge.annotate([PairRequest(p.text, p.chosen, p.rejected, p.id) for p in pairs])
    assert all(j.ok for j in out)
    return sum(1.0 if j.prob > 0.5 else 0.5 if j.prob == 0.5 else 0.0 for j in out) / len(out)


def test_train_reward_model_learns_and_loads(tmp_path, tiny_model_dir):
    from oaif.annotators.reward_model_training import load_reward_model_for_training, train_reward_model
    from oaif.annotators.reward_scoring import STATS_FILE

    pairs = _synthetic_pairs()
    untrained, tok = load_reward_model_for_training(tiny_model_dir)
    assert untrained.config.num_labels == 1 and untrained.config.pad_token_id is not None
    assert _agreement(RewardModelJudge(untrained, tok), pairs) == 0.5  # zero head: every pair a tie

    out = train_reward_model(tiny_model_dir, pairs, tmp_path / "rm", epochs=3, lr=1e-3, batch_size=4,
                             max_length=256, seed=0, progress=False)
    assert out == str(tmp_path / "rm")
    files = {p.name for p in Path(out).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["pad_token_id"] is not None and config["architectures"] == ["LlamaForSequenceClassification"]
    stats = json.loads((Path(out) / STATS_FILE).read_text())
    assert len(stats["history"]) == 3 and stats["history"][-1]["accuracy"] > 0.8
    assert stats["history"][-1]["loss"] < stats["history"][0]["loss"] < math.log(2) + 1e-6

    judge = RewardModelJudge.from_pretrained(out)
    assert judge.model.config.num_labels == 1
    assert _agreement(judge, pairs) > 0.8


def test_reward_model_judge_from_config_drives_training(rm_dir, tiny_model_dir, tmp_path):
    """annotator.type=reward_model: the RM judge labels the online pairs of a real (tiny) run."""
    from pathlib import Path

    from oaif.config import load_config
    from oaif.run.metrics import read_metrics
    from oaif.trainer import train

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    train(load_config(root / "configs/demo.yaml", [
        f"model.name_or_path={tiny_model_dir}", "annotator.type=reward_model", f"annotator.model={rm_dir}",
        f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=2", "sampling.max_new_tokens=6",
        "logging.progress_bar=false", f"data.path={root / 'data/prompts/demo_prompts.jsonl'}"]))
    record = read_metrics(out / "metrics.jsonl")[0]
    assert record["pairs_judged"] + record["masked/identical"] == 2 and record["pairs_failed"] == 0
