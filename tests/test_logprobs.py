"""Response log-probs from the packed layout equal a plain per-sequence computation."""

from __future__ import annotations

import pytest
import torch

from oaif.logprobs import pack_sequences, sequence_logprobs
from oaif.models import load_causal_lm


def test_packed_logprobs_equal_unpadded_forward(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir)
    prompts = [[1, 50, 60, 70, 80], [1, 90], [1, 5, 6]]
    responses = [[11, 12, 13], [21], [31, 32, 33, 34, 35]]
    batch = pack_sequences(prompts, responses, tok.pad_token_id)
    assert batch.prompt_width == 5 and batch.response_width == 5
    total, per_token = sequence_logprobs(model, batch)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logp = model(ids).logits[0, :-1].log_softmax(-1)
            expected = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(r))
            assert abs(total[i].item() - expected) < 1e-4
            assert torch.count_nonzero(per_token[i]).item() == len(r)


def test_gradients_flow_only_through_response_tokens(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir)
    model.train()
    # P = 4, R = 3: row 1's prompt has 2 columns of left padding, row 0's response 1 column of right padding
    batch = pack_sequences([[1, 2, 3, 4], [5, 6]], [[7, 8], [9, 10, 11]], tok.pad_token_id)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]]
    seen = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            seen[name] = output
        return hook

    model.model.embed_tokens.register_forward_hook(keep("inputs"))  # (2, 7, hidden): one vector per column
    model.model.norm.register_forward_hook(keep("outputs"))  # the final hidden states the logits come from
    total, per_token = sequence_logprobs(model, batch)
    assert per_token[0, 2].item() == 0.0 and torch.count_nonzero(per_token[1]) == 3
    total.sum().backward()

    def touched(name):
        return (seen[name].grad.abs().sum(-1) > 0).int().tolist()

    # only the columns that predict a real response token (P - 1 + j) receive a gradient at the output:
    # prompt columns, the column predicting row 0's padding and the last column get exactly zero
    assert touched("outputs") == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0]]
    # at the input, padding (and the last token of each row, which predicts nothing) gets exactly zero
    assert touched("inputs") == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


class _Wrapped(torch.nn.Module):
    """A real model behind a forward of another signature (as custom models have)."""

    def __init__(self, inner, fail_with_logits_to_keep: bool):
        super().__init__()
        self.inner, self.fail = inner, fail_with_logits_to_keep

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
        if self.fail and kwargs.get("logits_to_keep"):
            raise TypeError("a bug inside the model's forward")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _NoLogitsToKeep(_Wrapped):
    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _TakesLogitsToKeep(_Wrapped):
    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        return super().forward(input_ids, attention_mask, position_ids, use_cache, logits_to_keep=logits_to_keep)


def test_models_without_logits_to_keep_work_and_type_errors_are_not_hidden(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir)
    batch = pack_sequences([[1, 50, 60], [1, 90]], [[11, 12], [21, 22, 23]], tok.pad_token_id)
    expected, _ = sequence_logprobs(model, batch)
    got, _ = sequence_logprobs(_NoLogitsToKeep(model, False), batch)  # full logits: the same numbers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="a bug inside"):  # not retried without logits_to_keep
        sequence_logprobs(_TakesLogitsToKeep(model, True), batch)
