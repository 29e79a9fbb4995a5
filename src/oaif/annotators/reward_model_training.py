"""Train a Bradley-Terry reward model for the RLAIF-style baseline (:class:`RewardModelJudge`).

:func:`train_reward_model` turns a causal LM checkpoint (any form :func:`oaif.models.resolve.resolve_model_path`
accepts: the embedded ``smollm2-135m-instruct``, a ``.gguf`` file, a model directory, a cached hub
id) into an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the transformer is the
LM's, the one-logit score head is new), and trains it on ``(prompt, chosen, rejected)`` records
with the loss ``-log sigmoid(r_chosen - r_rejected)``. The new head starts at zero, so the
untrained model scores every response 0 (P = 0.5 for every pair). Plain PyTorch: AdamW, constant learning
rate, gradient clipping, a tqdm bar. A checkpoint that already is a one-logit sequence classifier
is trained further.

Each response is scored exactly as the judge scores it (:mod:`oaif.annotators.reward_scoring`): the prompt flattened to text as the judge receives it, as the user
turn, the response as the assistant turn. Pairs over ``max_length`` tokens are skipped and
counted (the judge fails them as ``too_long``).

The output directory holds safetensors weights, the tokenizer, a config with ``pad_token_id``
and ``oaif_reward_model.json`` (the settings and per-epoch loss / accuracy); it loads with
``RewardModelJudge.from_pretrained(output_dir)``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

from oaif.errors import DataError, ModelError

log = logging.getLogger("oaif.reward_model")


def _device(device) -> Any:
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_reward_model_for_training(base_model_path: str, dtype: Any = "float32", cache_dir: str | None = None,
                                   trust_remote_code: bool = False):
    """``(model, tokenizer)``: the checkpoint as a one-logit sequence classifier with ``pad_token_id`` set."""
    from transformers import AutoModelForSequenceClassification

    from oaif.errors import one_line as _one_line
    from oaif.models.load import _torch_dtype, load_model_config, load_tokenizer

    path, config = load_model_config(base_model_path, cache_dir, trust_remote_code)
    tokenizer = load_tokenizer(path, cache_dir, trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        raise ModelError(f"{base_model_path} is a sequence classifier with num_labels={config.num_labels}; "
                         f"a reward model needs num_labels=1 (start from a causal LM instead)")
    config.num_labels = 1
    if config.get_text_config().pad_token_id is None:
        config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=_torch_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code,
            output_loading_info=True)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
        raise ModelError(f"cannot load {base_model_path} as a sequence classifier: {_one_line(e)}") from e
    # The new one-logit head starts at zero: the untrained reward model is exactly indifferent (P = 0.5).
    import torch

    params = dict(model.named_parameters())
    new_head = [k for k in info.get("missing_keys", ()) if k in params and params[k].shape[:1] == (1,)]
    with torch.no_grad():
        for k in new_head:
            params[k].zero_()
    if new_head:
        log.info("reward model: new score head %s initialised to zero", ", ".join(sorted(new_head)))
    return model, tokenizer


def train_reward_model(base_model_path: str, pairs: Sequence, output_dir: str | Path, epochs: int = 1,
                       lr: float = 1e-5, batch_size: int = 8, max_length: int = 1024, seed: int = 0, *,
                       weight_decay: float = 0.0, max_grad_norm: float = 1.0, use_chat_template: bool = True,
                       dtype: Any = "float32", device=None, cache_dir: str | None = None,
                       progress: bool = True) -> str:
    """Train a reward model on ``pairs`` (:class:`oaif.data.records.PreferenceRecord`) and save it to ``output_dir``.

    ``batch_size`` counts pairs (each step scores ``2 * batch_size`` sequences). ``epochs=0`` only
    converts and saves (a fresh score head). Seeded (head initialisation and pair order) by
    ``seed``. Returns ``output_dir`` as a string.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from oaif.data.records import messages_to_text
    from oaif.annotators.reward_scoring import STATS_FILE, conversation_ids, sequence_rewards

    if epochs < 0 or batch_size < 1 or max_length < 1 or not lr > 0:
        raise ValueError("train_reward_model: epochs >= 0, batch_size >= 1, max_length >= 1 and lr > 0 are required")
    pairs = list(pairs)
    if not pairs:
        raise DataError("train_reward_model: no preference pairs to train on")

    torch.manual_seed(seed)
    model, tokenizer = load_reward_model_for_training(base_model_path, dtype, cache_dir)
    dev = _device(device)
    model.to(dev)

    encoded: list[tuple[list[int], list[int]]] = []
    skipped = 0
    for rec in pairs:
        prompt = messages_to_text(rec.prompt)
        c = conversation_ids(tokenizer, prompt, rec.chosen, use_chat_template)
        r = conversation_ids(tokenizer, prompt, rec.rejected, use_chat_template)
        if len(c) > max_length or len(r) > max_length:
            skipped += 1
            continue
        encoded.append((c, r))
    if skipped:
        log.warning("reward model training: %d of %d pairs over max_length=%d tokens skipped", skipped, len(pairs), max_length)
    if not encoded:
        raise DataError(f"train_reward_model: all {len(pairs)} pairs are over max_length={max_length} tokens")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    history: list[dict] = []
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="reward model", unit="step", disable=not progress)
    try:
        for epoch in range(epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            loss_sum, correct, seen = 0.0, 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = [encoded[i] for i in order[start:start + batch_size]]
                n = len(batch)
                rewards = sequence_rewards(model, [c for c, _ in batch] + [r for _, r in batch])
                margin = rewards[:n] - rewards[n:]
                loss = -F.logsigmoid(margin).mean()
                if not torch.isfinite(loss):
                    raise ModelError(f"reward model training diverged (loss {loss.item()}) at epoch {epoch + 1}; "
                                     f"lower the learning rate (lr={lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm and max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                m = margin.detach()
                loss_sum += loss.item() * n
                correct += float((m > 0).sum().item()) + 0.5 * float((m == 0).sum().item())
                seen += n
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen})
            log.info("reward model epoch %d: loss %.4f, accuracy %.3f", epoch + 1, loss_sum / seen, correct / seen)
    finally:
        bar.close()
    model.eval()

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.pad_token_id = model.config.get_text_config().pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stats = {"base_model": str(base_model_path), "pairs": len(pairs), "trained_pairs": len(encoded),
             "skipped_too_long": skipped, "epochs": epochs, "lr": lr, "batch_size": batch_size,
             "max_length": max_length, "seed": seed, "use_chat_template": use_chat_template,
             "seconds": round(time.perf_counter() - t0, 3), "history": history}
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return str(out)
