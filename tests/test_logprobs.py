"""Response log-probs from the packed layout equal a plain per-sequence computation."""

from __future__ import annotations

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
    batch = pack_sequences([[1, 2, 3]], [[4, 5]], tok.pad_token_id)
    total, _ = sequence_logprobs(model, batch)
    total.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
