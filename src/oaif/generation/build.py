"""Build the generator that ``vllm.mode`` names (the trainer's one entry point into this package)."""

from __future__ import annotations

import os

import torch

from oaif.config import VllmConfig
from oaif.generation.base import Generator, StopRules


def build_generator(settings: VllmConfig, *, model_path: str, eos_ids: set[int], max_model_len: int,
                    policy_dtype: torch.dtype | None, seed: int, output_dir: str) -> Generator:
    """A :class:`ColocatedVllm` over ``model_path`` or a :class:`VllmServer` client, per ``settings.mode``.

    ``model_path`` is the resolved policy (base model for LoRA) directory; ``eos_ids`` the ids that
    end a response (:func:`oaif.sampling.eos_token_ids`). The caller pushes the policy's weights
    with ``load_weights`` after every optimizer step, and once after resuming from a checkpoint.
    """
    settings.validate()
    stop = StopRules(frozenset(int(i) for i in eos_ids))
    if settings.mode == "server":
        from oaif.generation.vllm_server import VllmServer

        return VllmServer(stop, settings, weights_dir=settings.weights_dir or os.path.join(output_dir, "vllm_weights"))
    from oaif.generation.vllm_colocated import ColocatedVllm

    return ColocatedVllm(model_path, stop, settings, max_model_len=max_model_len, policy_dtype=policy_dtype, seed=seed)
