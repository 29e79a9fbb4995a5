"""Build the sampler a run's config names: the trainer's one entry point into this package.

:func:`build_sampler` picks the backend (``sampling.backend``); :func:`build_generator` the vLLM
mode (``vllm.mode``).
"""

from __future__ import annotations

import os

import torch

from oaif.config import Config, VllmConfig
from oaif.errors import ConfigError
from oaif.generation.base import Generator, StopRules


def build_generator(settings: VllmConfig, *, model_path: str, eos_ids: set[int], max_model_len: int,
                    policy_dtype: torch.dtype | None, seed: int, output_dir: str, vocab_size: int | None = None,
                    placement=None) -> Generator:
    """A :class:`ColocatedVllm` over ``model_path`` or a :class:`VllmServer` client, per ``settings.mode``.

    ``model_path`` is the resolved policy (base model for LoRA) directory; ``eos_ids`` the ids that
    end a response (:func:`oaif.step.sampling.eos_token_ids`). The caller pushes the policy's weights
    with ``load_weights`` after every optimizer step, and once before the first sample. A server's
    token ids are checked against ``vocab_size`` (the policy's), when given. ``placement``
    (:func:`oaif.generation.vllm_colocated.engine_placement`) puts a colocated engine on this
    process's device; by default the current one.
    """
    settings.validate()
    stop = StopRules(frozenset(int(i) for i in eos_ids))
    if settings.mode == "server":
        from oaif.generation.vllm_server import VllmServer

        return VllmServer(stop, settings, weights_dir=settings.weights_dir or os.path.join(output_dir, "vllm_weights"),
                          vocab_size=vocab_size)
    from oaif.generation.vllm_colocated import ColocatedVllm

    return ColocatedVllm(model_path, stop, settings, max_model_len=max_model_len, policy_dtype=policy_dtype, seed=seed,
                         placement=placement)


def policy_compute_dtype(cfg: Config, policy) -> torch.dtype:
    """The dtype the policy computes in: bfloat16/float16 under ``train.mixed_precision`` (autocast),
    else its weights' dtype. A colocated engine with ``vllm.dtype=auto`` samples in it."""
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    return autocast or next(policy.parameters()).dtype


def build_sampler(cfg: Config, policy, tokenizer, eos_ids: set[int], accelerator) -> Generator:
    """The sampler of ``sampling.backend`` for the unwrapped ``policy``.

    ``shared_prefill`` and ``hf`` sample the policy itself (:class:`LivePolicy`), or under ``train.async_steps``
    a copy of it that takes the pushed weights (:class:`PolicyCopy`); ``vllm`` starts an
    engine in this process or connects to a server. With several processes each has its own
    engine (colocated: on its own GPU, ``cuda:<local rank>``) or they share the server, whose
    weights the main process pushes.
    """
    if cfg.sampling.backend != "vllm":
        from oaif.generation.live_policy import LivePolicy, PolicyCopy

        backend = PolicyCopy if cfg.train.async_steps else LivePolicy  # async: the worker samples while the policy trains
        return backend(policy, tokenizer, cfg.sampling.backend, cfg.sampling.batch_size, autocast=accelerator.autocast)
    if cfg.vllm.mode == "server" and accelerator.num_processes > 1 and cfg.train.async_steps:
        raise ConfigError("train.async_steps: a vLLM server shared by several processes needs every process to wait "
                          "for the weight push, a collective call the background worker may not make (use 0, or "
                          "vllm.mode=colocated)")
    from oaif.generation.weights import untied_lora
    from oaif.models.resolve import resolve_model_path

    if untied_lora(policy):
        raise ConfigError(f"model.lora.target_modules={list(cfg.model.lora.target_modules)} puts an adapter on the tied "
                          f"embeddings of {cfg.model.name_or_path}, which makes them differ, but a vLLM engine holds them "
                          f"tied: leave embed_tokens and lm_head out of model.lora.target_modules, or use "
                          f"sampling.backend=shared_prefill")
    placement = None
    if cfg.vllm.mode == "colocated":
        from oaif.generation.vllm_colocated import engine_placement

        placement = engine_placement(accelerator.device, process_index=accelerator.process_index,
                                     local_process_index=accelerator.local_process_index,
                                     num_processes=accelerator.num_processes)
    generator = build_generator(cfg.vllm, model_path=resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir),
                                eos_ids=eos_ids, max_model_len=cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens,
                                policy_dtype=policy_compute_dtype(cfg, policy), seed=cfg.train.seed,
                                output_dir=cfg.train.output_dir, vocab_size=policy.get_output_embeddings().weight.shape[0],
                                placement=placement)
    if cfg.vllm.mode == "server" and accelerator.num_processes > 1:
        from oaif.generation.vllm_server import SharedServer

        generator = SharedServer(generator, accelerator)
    return generator
