"""The colocated vLLM engine samples what the transformers backend samples, before and after weight pushes.

Needs vLLM importable in this interpreter: it runs in the vLLM virtual environment
(``test_vllm_venv.py`` starts it there from the main suite; or run it there directly). The engine
(``vllm_engine`` in conftest.py) is shared by the session; each test here starts it from the
first policy.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from oaif.generation.base import GenerationError  # noqa: E402
from oaif.generation.weights import policy_weights  # noqa: E402
from oaif.models.chat import encode_prompt  # noqa: E402
from oaif.models.load import load_causal_lm  # noqa: E402
from oaif.step.sampling import eos_token_ids, filter_top_p  # noqa: E402
from vllm_helpers import ENGINE_MAX_LEN, PROMPTS, copy_weights_, greedy_both  # noqa: E402


@pytest.fixture(scope="module")
def policy(vllm_tiny):
    model, tok = load_causal_lm(vllm_tiny.first)
    return model, tok, [encode_prompt(tok, p) for p in PROMPTS]


@pytest.fixture
def engine(vllm_tiny, vllm_engine):
    """The shared engine, holding the first policy."""
    vllm_engine.load_weights(policy_weights(load_causal_lm(vllm_tiny.first)[0]))
    return vllm_engine


def test_greedy_matches_transformers_before_and_after_a_push(vllm_tiny, policy, engine):
    model, tok, prompts = policy
    assert eos_token_ids(model, tok) == vllm_tiny.eos_ids
    hf, vl = greedy_both(model, tok, engine, prompts)
    assert vl == hf
    responses, ended = vl
    # both stop rules ran: some responses end at the end-of-turn id (kept), others at the length limit
    assert any(e for es in ended for e in es) and not all(e for es in ended for e in es)
    for rs, es in zip(responses, ended):
        for r, e in zip(rs, es):
            assert (r[-1] in vllm_tiny.eos_ids) == e and not any(t in vllm_tiny.eos_ids for t in r[:-1])
            assert e or len(r) == 16

    second, _ = load_causal_lm(vllm_tiny.second)
    copy_weights_(model, second)  # the "optimizer step": every weight changes, tied embeddings included
    try:
        engine.load_weights(policy_weights(model))
        hf_after, vl_after = greedy_both(model, tok, engine, prompts)
    finally:
        copy_weights_(model, load_causal_lm(vllm_tiny.first)[0])
    assert vl_after == hf_after
    assert vl_after[0] != responses


def test_seeded_samples_depend_only_on_their_row(policy, engine):
    model, tok, prompts = policy
    # five distinct long prompts exceed one engine step's token budget (2048): with chunked prefill
    # a seeded request would be prefilled in pieces, which crashes on CPU
    longs = [encode_prompt(tok, " ".join(f"{w}{i}" for i in range(150))) for w in ("word", "item", "step", "unit", "note")]
    assert all(500 < len(p) < ENGINE_MAX_LEN - 32 for p in longs)
    args = dict(temperature=1.0, top_p=0.9, max_new_tokens=12)
    together = engine.sample([prompts[0], *longs], list(range(10, 16)), k=1, seed=5, **args)
    assert engine.sample([longs[1]], [12], k=1, seed=5, **args)[0][0] == together[0][2]

    pair = engine.sample(prompts, [20, 21, 22], k=2, seed=5, **args)
    assert engine.sample(prompts, [20, 21, 22], k=2, seed=5, **args) == pair
    assert engine.sample(prompts[1:2], [21], k=2, seed=5, **args)[0][0] == pair[0][1]
    assert engine.sample(prompts[:1], [20], k=2, seed=6, **args)[0][0] != pair[0][0]  # another run seed
    assert engine.sample(prompts[:1], [23], k=2, seed=5, **args)[0][0] != pair[0][0]  # another stream position
    assert pair[0][0][0] != pair[0][0][1]  # the K samples of a prompt are drawn independently


def test_sampled_tokens_follow_the_tempered_top_p_distribution(policy, engine):
    # the distribution oaif's own backends sample (test_sampling checks theirs): softmax(logits / T) over the
    # smallest set of tokens whose mass reaches top_p; here 800 seeded draws of the first response token
    model, _, prompts = policy
    temperature, top_p, n = 0.4, 0.7, 800
    with torch.no_grad():
        exact = filter_top_p(model(torch.tensor(prompts[:1])).logits[0, -1] / temperature, top_p).softmax(-1)
    kept = exact.nonzero().flatten()
    assert 5 <= len(kept) <= 30
    responses, _ = engine.sample(prompts[:1], [0], k=n, seed=1, temperature=temperature, top_p=top_p, max_new_tokens=1)
    counts = torch.bincount(torch.tensor([r[0] for r in responses[0]]), minlength=len(exact)).double()
    assert counts[exact == 0].sum() == 0  # nothing outside the top-p set
    expected = n * exact[kept].double()
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = len(kept) - 1  # the chi-square quantile at p = 0.001 (Wilson-Hilferty: z = 3.09)
    assert chi2 < df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3, (chi2, df)


def test_lora_policy_is_pushed_as_merged_weights(vllm_tiny, policy, engine):
    peft = pytest.importorskip("peft")
    model, tok, prompts = policy
    base, _ = load_causal_lm(vllm_tiny.first)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    before = {k: v.clone() for k, v in lora.get_base_model().state_dict().items()}
    engine.load_weights(policy_weights(lora))
    after = lora.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # merged out of place
    hf, vl = greedy_both(lora.eval(), tok, engine, prompts)
    assert vl == hf
    assert vl != greedy_both(model, tok, engine, prompts)[0]


def test_too_long_prompt_is_a_one_line_error(policy, engine):
    _, _, prompts = policy
    with pytest.raises(GenerationError, match=r"exceeds vllm.max_model_len=1024"):
        engine.sample([[1] * 1020], [0], k=1, seed=0, temperature=1.0, top_p=1.0, max_new_tokens=8)
