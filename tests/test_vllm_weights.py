"""The weights pushed to a generation engine: every tensor under transformers names, LoRA merged out of place.

Runs without vLLM (main environment)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

from oaif.generation.base import GenerationError
from oaif.generation.weights import WEIGHTS_FILE, policy_weights, save_weights
from oaif.models.load import load_causal_lm


@pytest.fixture
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)[0]


def test_full_model_gives_its_own_tensors_without_the_tied_head(model):
    weights = dict(policy_weights(model))
    state = model.state_dict()
    assert model.config.tie_word_embeddings
    assert set(weights) == set(state) - {"lm_head.weight"}
    for name, t in weights.items():
        assert t.data_ptr() == state[name].data_ptr()  # no copy


def lora_model(model, seed=0, targets=("q_proj", "v_proj", "up_proj")):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing; warns on tied targets
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*", category=UserWarning)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # the factors peft starts at zero
                p.normal_(0, 0.5)  # as after training: the adapter changes the model
    return lora


def test_lora_weights_equal_peft_merge_and_leave_the_policy_untouched(model):
    lora = lora_model(model)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    weights = dict(policy_weights(lora))
    # the policy itself is bitwise unchanged: no merge/unmerge round trip (which drifts by rounding)
    after = lora.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert set(weights) == set(merged) - {"lm_head.weight"}
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    for name, t in weights.items():
        torch.testing.assert_close(t, merged[name], rtol=0, atol=1e-6, msg=name)
    base = {k.replace(".base_layer.", "."): v for k, v in lora.get_base_model().state_dict().items() if "lora_" not in k}
    adapted = {k for k in weights if not torch.equal(weights[k], base[k])}
    assert adapted == {k for k in weights if k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight"))}


def test_lora_on_the_embeddings_and_the_head_of_an_untied_model_equals_peft_merge(tiny_model_dir, tmp_path):
    from helpers import make_tiny_llama

    untied = load_causal_lm(make_tiny_llama(tmp_path / "untied", tie_word_embeddings=False, tokenizer_source=tiny_model_dir))[0]
    lora = lora_model(untied, targets=["embed_tokens", "lm_head", "down_proj"])
    weights = dict(policy_weights(lora))
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert set(weights) == set(merged)
    for name, t in weights.items():
        torch.testing.assert_close(t, merged[name], rtol=0, atol=1e-6, msg=name)
    base = {k.replace(".base_layer.", "."): v for k, v in lora.get_base_model().state_dict().items() if "lora_" not in k}
    adapted = {k for k in weights if not torch.equal(weights[k], base[k])}
    assert adapted == {k for k in weights if k.endswith(("embed_tokens.weight", "lm_head.weight", "down_proj.weight"))}


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_lora_on_tied_embeddings_gives_each_side_its_own_delta(model, targets):
    from oaif.generation.weights import untied_lora

    assert model.config.tie_word_embeddings and not untied_lora(model)
    w = model.get_input_embeddings().weight.detach().clone()
    lora = lora_model(model, targets=targets)
    assert untied_lora(lora)
    weights = dict(policy_weights(lora))
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    assert torch.equal(embed, w) == ("embed_tokens" not in targets)  # the input side has the embedding's delta only
    assert torch.equal(head, w) == ("lm_head" not in targets)  # the output side the head's only
    assert not torch.equal(embed, head)


def test_disabled_adapter_gives_the_base_weights(model):
    lora = lora_model(model)
    with lora.disable_adapter():
        weights = dict(policy_weights(lora))
    base = {k.replace(".base_layer.", "."): v for k, v in lora.get_base_model().state_dict().items() if "lora_" not in k}
    for name, t in weights.items():
        assert torch.equal(t, base[name]), name


def test_save_weights_round_trips_atomically(model, tmp_path):
    path = save_weights(policy_weights(model), tmp_path / "w")
    assert path == tmp_path / "w" / WEIGHTS_FILE
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [WEIGHTS_FILE]  # no temporary left behind
    loaded = load_file(str(path))
    for name, t in policy_weights(model):
        assert torch.equal(loaded[name], t)
    with pytest.raises(GenerationError, match="no weights"):
        save_weights([], tmp_path / "empty")
