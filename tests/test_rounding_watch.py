"""bfloat16 weights: the first optimizer step reports the share of weights it changed, and warns when
small updates round away (real AdamW steps on real tensors; a tiny random model through the trainer)."""

from __future__ import annotations

import logging

import pytest
import torch

from oaif.run.rounding_watch import watch_first_update
from oaif.trainer import Trainer

from test_trainer import tiny_cfg


def _step(opt, layer, lr=None):
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    layer(torch.randn(4, 64, dtype=layer.weight.dtype)).float().pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("lr, warns", [(1e-7, True), (1e-2, False)])
def test_the_first_step_on_bf16_weights_warns_when_its_updates_round_away(caplog, lr, warns):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64).to(torch.bfloat16)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr)
    watch_first_update(opt, speak=True)
    with caplog.at_level(logging.INFO, logger="oaif"):
        _step(opt, layer, lr=0.0)  # warm-up at lr 0: nothing can change, nothing is judged
        opt.step()  # a step without gradients: not judged either
        assert not caplog.records
        _step(opt, layer, lr=lr)
        _step(opt, layer, lr=1e-7)  # the watch is gone after its one report
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert (record.levelno == logging.WARNING) == warns
    assert ("changed only" in record.getMessage()) == warns
    assert "model.dtype=bfloat16" in record.getMessage() and f"lr {lr:g}" in record.getMessage()


def test_float32_weights_are_not_watched(caplog):
    layer = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-12)
    watch_first_update(opt, speak=True)
    assert not opt._optimizer_step_pre_hooks
    with caplog.at_level(logging.INFO, logger="oaif"):
        layer(torch.randn(2, 8)).sum().backward()
        opt.step()
    assert not caplog.records


def test_a_bf16_run_at_a_tiny_lr_says_its_updates_round_away(tiny_model_dir, tmp_path, caplog):
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", "model.dtype=bfloat16", "optim.lr=1e-9", "train.max_steps=1")
    with caplog.at_level(logging.WARNING, logger="oaif"):
        t = Trainer(cfg).setup()
        t.run_step()
    assert [r for r in caplog.records if "changed only" in r.getMessage() and "lr 1e-09" in r.getMessage()]
