"""Response log-probs from the packed layout equal a plain per-sequence computation."""

from __future__ import annotations

import pytest
import torch

from oaif.step.logprobs import _plain_output_head, pack_sequences, sequence_logprobs, takes_kv_cache, token_logprobs
from oaif.models.load import load_causal_lm


def test_packed_logprobs_equal_unpadded_forward(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir)
    prompts = [[1, 50, 60, 70, 80], [1, 90], [1, 5, 6]]
    responses = [[11, 12, 13], [21], [31, 32, 33, 34, 35]]
    batch = pack_sequences(prompts, responses, tok.pad_token_id)
    assert batch.prompt_width == 5 and batch.response_width == 5
    for share in (True, False):
        _check_against_unpadded(model, prompts, responses, *sequence_logprobs(model, batch, share_prompts=share))


def _check_against_unpadded(model, prompts, responses, total, per_token):
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
    assert batch.joined()[1].tolist() == [[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]]
    seen = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            seen[name] = output
        return hook

    model.model.embed_tokens.register_forward_hook(keep("inputs"))  # (2, 7, hidden): one vector per column
    model.model.norm.register_forward_hook(keep("outputs"))  # the final hidden states the logits come from
    # the [prompt | response] rows (models without a KV cache); the shared-prompt passes are pinned
    # against these in value and gradient below
    total, per_token = sequence_logprobs(model, batch, share_prompts=False)
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


# -- the output head a chunk at a time --------------------------------------------------------------
def _full_logits_logps(model, batch):
    """The reference computation: [prompt | response] rows, the model's own full logits, then log-softmax."""
    ids, mask, pos = batch.joined()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, batch.prompt_width - 1:-1]
    return (token_logprobs(logits, batch.response_ids) * batch.response_mask).sum(-1)


def _logps_and_grads(fn, model, batch, weights):
    model.zero_grad(set_to_none=True)
    logps = fn(model, batch)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast_bf16"])
def test_chunked_head_equals_full_logits_in_value_and_gradient(tiny_model_dir, autocast):
    model, tok = load_causal_lm(tiny_model_dir)
    model.train()
    assert _plain_output_head(model) is model.lm_head  # the chunked path is the one taken
    batch = pack_sequences([[1, 50, 60, 70, 80], [1, 90], [1, 5, 6]],
                           [[11, 12, 13, 14, 15, 16], [21], [31, 32, 33, 34, 35]], tok.pad_token_id)
    weights = torch.tensor([1.0, -2.0, 0.5])  # a gradient of another sign and size per sequence
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, want_grads = _logps_and_grads(_full_logits_logps, model, batch, weights)
        # chunks of 4 tokens: 12 response tokens in 3 chunks, one of which spans two sequences
        got, got_grads = _logps_and_grads(lambda m, b: sequence_logprobs(m, b, chunk_tokens=4)[0], model, batch, weights)
    tol = dict(atol=1e-5, rtol=1e-5) if not autocast else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tol, msg=lambda m: f"{name}: {m}")


def test_no_logits_of_every_response_token_are_kept_for_the_backward(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir)
    model.train()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    tokens = 4 * 24  # more response tokens than hidden units: their logits outsize the head's weight
    assert tokens > hidden
    batch = pack_sequences([[1, 50, 60]] * 4, [list(range(100, 124))] * 4, tok.pad_token_id)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = sequence_logprobs(model, batch, chunk_tokens=8)
    # the largest saved tensor is the head's weight (vocab x hidden), as for any linear layer
    assert max(saved) == vocab * hidden < tokens * vocab
    logps.sum().backward()  # and the graph still back-propagates


def test_models_with_transformed_logits_use_their_own_forward(tiny_model_dir):
    model, _ = load_causal_lm(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 caps its logits after the head
    assert _plain_output_head(model) is None
    model.config.final_logit_softcapping = None
    assert _plain_output_head(model) is model.lm_head


# -- each prompt forwarded once for all its responses ------------------------------------------------
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast_bf16"])
@pytest.mark.parametrize("one_token", [False, True], ids=["responses", "one_token_responses"])
def test_shared_prompt_passes_equal_full_rows_in_value_and_gradient(tiny_model_dir, autocast, one_token):
    model, tok = load_causal_lm(tiny_model_dir)
    model.train()
    assert takes_kv_cache(model)
    a, b, c = [1, 50, 60, 70, 80], [1, 90], [1, 5, 6]
    prompts = [a, c, a, b, c, a]  # prompts of three lengths, their responses interleaved
    responses = [[11, 12, 13, 14, 15, 16], [31, 32, 33, 34, 35], [41], [21, 22, 23, 24], [51, 52, 53, 54, 55],
                 [61, 62, 63]]
    if one_token:  # the prompt pass alone predicts every response token
        responses = [r[:1] for r in responses]
    batch = pack_sequences(prompts, responses, tok.pad_token_id)
    assert batch.prompt_ids.shape[0] == 3 and batch.owner.tolist() == [0, 1, 0, 2, 1, 0]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25, 1.5])
    inputs = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: inputs.append(args[0].numel()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, want_grads = _logps_and_grads(_full_logits_logps, model, batch, weights)
        inputs.clear()
        got, got_grads = _logps_and_grads(lambda m, x: sequence_logprobs(m, x, share_prompts=True)[0],
                                          model, batch, weights)
    # 3 prompts of 5 columns once, then 6 responses of R - 1 columns (the last token predicts nothing),
    # where [prompt | response] rows would forward 6 x (5 + R) columns
    width = batch.response_width
    assert inputs == ([3 * 5] if width == 1 else [3 * 5, 6 * (width - 1)])
    if not autocast:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
    else:  # bf16 matmuls of other shapes round differently: compare each gradient as a whole
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        for name in want_grads:
            err = (got_grads[name] - want_grads[name]).norm() / want_grads[name].norm()
            assert err < 1e-2, (name, float(err))


def test_models_without_a_cache_in_training_forward_full_rows(tiny_model_dir):
    model, _ = load_causal_lm(tiny_model_dir)
    assert takes_kv_cache(model) and not takes_kv_cache(_NoLogitsToKeep(model, False))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # turns the cache off in training
    assert not takes_kv_cache(model)
