"""Run by tests under ``accelerate launch``: train like ``oaif train CONFIG [key=value ...]``, then every
process saves its own copy of the policy's parameters to ``<output_dir>/rank-<i>.pt``, so a test
can check that the processes hold identical parameters (only the main process writes checkpoints)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from oaif.config import load_config
from oaif.trainer import Trainer

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg).setup()
    trainer.train()
    params = {name: p.detach().cpu().clone() for name, p in trainer.unwrapped.named_parameters()}
    torch.save(params, Path(cfg.train.output_dir) / f"rank-{trainer.accelerator.process_index}.pt")
