"""Sampling: shared-prefill decoding agrees with transformers, stops at EOS, is seeded per prompt."""

from __future__ import annotations

import warnings

import pytest
import torch

from oaif.models.chat import encode_prompt
from oaif.models.load import load_causal_lm
from oaif.step.sampling import RowSampler, filter_top_p, row_seed, sample_responses, step_uniforms

PROMPTS = ["Name a fruit.", "Write one sentence about the sea, please, and make it calm and quiet."]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    model, tok = load_causal_lm(smollm2_path)
    return model, tok, [encode_prompt(tok, p) for p in PROMPTS]


def test_greedy_shared_prefill_matches_transformers_generate(smol):
    model, tok, prompts = smol
    # a vanishing temperature makes the sampling greedy; prompts of different lengths are left-padded
    responses, ended = sample_responses(model, tok, prompts, [0, 1], k=2, seed=0, temperature=1e-7, top_p=1.0,
                                        max_new_tokens=24)
    for p, rs, es in zip(prompts, responses, ended):
        out = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)
        ref = out[0, len(p):].tolist()
        assert rs[0] == rs[1] == ref[:len(rs[0])]
        if es[0]:
            assert rs[0][-1] == tok.eos_token_id and len(rs[0]) <= 24
        else:
            assert len(rs[0]) == 24


def test_eos_is_recorded_and_nothing_follows_it(smol):
    model, tok, prompts = smol
    responses, ended = sample_responses(model, tok, prompts, [0, 1], k=4, seed=3, temperature=1.0, top_p=0.95,
                                        max_new_tokens=40)
    assert any(e for es in ended for e in es), "SmolLM2 should end some short answers within 40 tokens"
    for rs, es in zip(responses, ended):
        assert len(rs) == 4
        for r, e in zip(rs, es):
            assert tok.eos_token_id not in r[:-1]
            assert e == (r[-1] == tok.eos_token_id)
            assert e or len(r) == 40


def test_samples_depend_on_prompt_position_not_on_batch(smol):
    model, tok, prompts = smol
    together, _ = sample_responses(model, tok, prompts, [10, 11], k=2, seed=5, temperature=1.0, top_p=1.0, max_new_tokens=12)
    alone, _ = sample_responses(model, tok, prompts[1:], [11], k=2, seed=5, temperature=1.0, top_p=1.0, max_new_tokens=12)
    assert together[1] == alone[0]
    other_seed, _ = sample_responses(model, tok, prompts[1:], [11], k=2, seed=6, temperature=1.0, top_p=1.0, max_new_tokens=12)
    assert other_seed[0] != alone[0]
    chunked, _ = sample_responses(model, tok, prompts, [10, 11], k=2, seed=5, temperature=1.0, top_p=1.0,
                                  max_new_tokens=12, batch_size=1)
    assert chunked == together


def test_hf_backend_samples_depend_on_prompt_position_not_on_batch(smol):
    model, tok, prompts = smol
    kw = dict(k=2, temperature=0.9, top_p=0.95, max_new_tokens=8, backend="hf")
    together, ended = sample_responses(model, tok, prompts, [10, 11], seed=5, **kw)
    assert [len(rs) for rs in together] == [2, 2] and all(1 <= len(r) <= 8 for rs in together for r in rs)
    for rs, es in zip(together, ended):
        for r, e in zip(rs, es):
            assert e == (r[-1] == tok.eos_token_id) and tok.eos_token_id not in r[:-1] and (e or len(r) == 8)
    alone, _ = sample_responses(model, tok, prompts[1:], [11], seed=5, **kw)
    assert together[1] == alone[0]  # the noise of a row depends on (seed, position, k), not on its batch
    assert sample_responses(model, tok, prompts[1:], [11], seed=6, **kw)[0][0] != alone[0]
    assert sample_responses(model, tok, prompts[1:], [12], seed=5, **kw)[0][0] != alone[0]
    # a vanishing temperature: both backends decode greedily, so they agree
    greedy = dict(k=1, seed=0, temperature=1e-7, top_p=1.0, max_new_tokens=8)
    assert (sample_responses(model, tok, prompts, [0, 1], backend="hf", **greedy)
            == sample_responses(model, tok, prompts, [0, 1], backend="shared_prefill", **greedy))


@pytest.fixture(scope="module")
def opinionated(tiny_model_dir, tmp_path_factory):
    """The tiny model with a generation_config.json that sets what instruct models ship: a repetition
    penalty, a minimum length (which suppresses EOS), n-gram and bad-word bans, suppressed tokens.
    Half the vocabulary is listed as EOS ids, so an untouched policy ends most responses within a few tokens."""
    import shutil

    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("opinionated") / "model"
    shutil.copytree(tiny_model_dir, path)
    model, tok = load_causal_lm(str(path))
    eos = list(range(1000, 1000 + len(tok) // 2))
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                     repetition_penalty=1.8, min_new_tokens=6, no_repeat_ngram_size=1, bad_words_ids=[[1001], [1002]],
                     suppress_tokens=list(range(1003, 1500)), begin_suppress_tokens=list(range(1500, 9000))
                     ).save_pretrained(path)
    model, tok = load_causal_lm(str(path))
    assert model.generation_config.min_new_tokens == 6 and model.generation_config.repetition_penalty == 1.8
    return model, tok, [encode_prompt(tok, p) for p in PROMPTS], set(eos)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_hf_backend_ignores_the_models_generation_config(opinionated, temperature, top_p):
    model, tok, prompts, eos = opinionated
    kw = dict(k=4, seed=2, temperature=temperature, top_p=top_p, max_new_tokens=10)
    hf, hf_ended = sample_responses(model, tok, prompts, [3, 4], backend="hf", **kw)
    shared, shared_ended = sample_responses(model, tok, prompts, [3, 4], backend="shared_prefill", **kw)
    assert hf == shared and hf_ended == shared_ended  # the policy's own distribution, in both backends
    lengths = [len(r) for rs in hf for r in rs]
    assert min(lengths) < 6, f"EOS never came before min_new_tokens=6: {lengths}"  # not suppressed
    assert all(r[-1] in eos for rs, es in zip(hf, hf_ended) for r, e in zip(rs, es) if e)
    assert model.generation_config.min_new_tokens == 6  # the model's own config is left as it was


@pytest.mark.parametrize("backend", ["shared_prefill", "hf"])
def test_a_response_ends_at_the_templates_end_of_turn_even_when_it_is_not_eos(tiny_model_dir, tmp_path, backend):
    """A model whose chat template ends turns with <|im_end|> but whose tokenizer and generation_config name
    another EOS (<|endoftext|>): a response to a templated prompt ends at <|im_end|>, not at the length limit."""
    from helpers import make_tiny_llama
    from oaif.step.sampling import eos_token_ids, template_end_of_turn

    model, tok = load_causal_lm(make_tiny_llama(tmp_path / "m", tie_word_embeddings=False, tokenizer_source=tiny_model_dir))
    prompt = encode_prompt(tok, "Name a fruit.")
    kw = dict(k=1, seed=0, temperature=1e-7, top_p=1.0, max_new_tokens=12, backend=backend)
    ((first,),), _ = sample_responses(model, tok, [prompt], [0], **kw)
    head, g = first[:3], first[3]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert template_end_of_turn(tok) == end and end not in head + [g]
    with torch.no_grad():  # the untied head's rows swapped: the policy now says <|im_end|> where it said g
        model.lm_head.weight[[g, end]] = model.lm_head.weight[[end, g]]
    tok.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = tok.eos_token_id
    assert eos_token_ids(model, tok) == {tok.eos_token_id, end}
    assert sample_responses(model, tok, [prompt], [0], **kw) == ([[head + [end]]], [[True]])


def test_sampling_passes_the_kv_cache_the_installed_transformers_way(smol):
    model, tok, prompts = smol
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_responses(model, tok, prompts, [0, 1], k=2, seed=0, temperature=1.0, top_p=1.0, max_new_tokens=4)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_top_p(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.4)).tolist() == [[True, False, False, False]]


def test_inverse_cdf_sampling_matches_the_softmax_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.log().expand(4000, 4)
    sampler = RowSampler([row_seed(0, i, 0) for i in range(4000)], torch.device("cpu"), steps=2)
    for _ in range(2):  # the first and a later decoding step: fresh uniforms each time
        draws = sampler(logits, temperature=1.0, top_p=1.0)
        freq = torch.bincount(draws, minlength=4).float() / 4000
        # 4000 draws: standard error below 0.008 for each frequency; a token of probability 0 never comes
        torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
        assert freq[3] == 0
    # temperature 2 flattens the distribution to softmax(log p / 2)
    hot = RowSampler([row_seed(1, i, 0) for i in range(4000)], torch.device("cpu"))(logits[:, :3], 2.0, 1.0)
    want = probs[:3].sqrt() / probs[:3].sqrt().sum()
    torch.testing.assert_close(torch.bincount(hot, minlength=3).float() / 4000, want, atol=0.03, rtol=0)


def test_a_rows_draws_are_a_function_of_its_seed_and_step_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeds = [row_seed(7, pos, 0) for pos in range(3)]
    together = RowSampler(seeds, torch.device("cpu"), steps=5)
    alone = RowSampler(seeds[2:], torch.device("cpu"), steps=5)
    for _ in range(5):
        assert together(logits, 1.0, 1.0)[2] == alone(logits[2:], 1.0, 1.0)[0]
    assert step_uniforms(seeds, 5)[2].tolist() == step_uniforms(seeds[2:], 5)[0].tolist()
    u = step_uniforms(seeds, 64)
    assert len(set(u.flatten().tolist())) == u.numel() and 0 < u.min() and u.max() < 1


def test_row_seeds_differ():
    seeds = {row_seed(42, pos, k) for pos in range(200) for k in range(4)}
    assert len(seeds) == 800
