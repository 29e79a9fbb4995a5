"""Everything a training run needs, built from its config, before the loop starts.

:func:`build_run` checks the inputs it can check cheaply (:func:`preflight`), then builds the
accelerator, the policy and its reference, the records (:func:`oaif.data.split.training_prompts`), the
prompt stream, the optimizer, the schedule, the annotator and the sampler
(:func:`oaif.generation.build.build_sampler`). :func:`open_run_dir` is the one
place the run directory is written before training: ``config.yaml``, ``metrics.jsonl`` and the
audit log ``annotations.jsonl`` (both cut after the resumed step).

Precision: ``accelerator.prepare`` wraps the policy's forward in the run's autocast context
(``train.mixed_precision``). The reference goes through ``accelerator.prepare_model(...,
evaluation_mode=True)`` (as TRL does), which wraps its forward in the same context without DDP,
so the two forward identical batches identically. (A LoRA reference is the policy itself.) With
``train.fsdp`` on several processes (:mod:`oaif.models.sharding`) neither model goes through
``prepare`` (which would wrap the policy in DDP): both are sharded before the optimizer is built,
the accelerator runs without autocast, and ``bf16`` is FSDP2's mixed precision on both. Under
``loss.reference=behavior`` no copy is made; a reference that moves (:mod:`oaif.models.reference`) is
never given to a judge, which stays the starting model.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oaif.config import Config, dump_yaml
from oaif.errors import ConfigError, DataError
from oaif.redaction import redact, redact_text
from oaif.run.rounding_watch import watch_first_update

log = logging.getLogger("oaif")


def preflight(cfg: Config, plan_judge: bool = True):
    """Fail fast, before any model loads, on inputs that can be checked cheaply.

    Online, returns the annotator's plan (:func:`oaif.annotators.build.plan_annotator`: rubrics read,
    callables imported and checked, ensemble members planned), which :func:`build_run` builds; offline,
    or with ``plan_judge=False`` (an annotator given to :func:`build_run`), None.
    """
    from oaif.run.run_dir import (check_fresh_run, check_output_dir, check_resumable, check_run_entries,
                                  continues_run_dir)

    check_output_dir(cfg.train.output_dir, "train.output_dir")
    if isinstance(cfg.train.resume, str) and not (Path(cfg.train.resume) / "trainer_state.pt").is_file():
        raise ConfigError(f"train.resume: {cfg.train.resume} is not a checkpoint directory (no trainer_state.pt)")
    if not continues_run_dir(cfg.train.resume, cfg.train.output_dir):
        check_fresh_run(cfg.train.output_dir, cfg.train.overwrite_output_dir)
    elif cfg.train.overwrite_output_dir:
        raise ConfigError("train.overwrite_output_dir: true would delete the run that train.resume continues; "
                          "set one of them to false")
    check_run_entries(cfg.train.output_dir, cfg.train.overwrite_output_dir)
    if cfg.train.resume is True:
        check_resumable(cfg.train.output_dir)
    if cfg.train.fsdp:
        from oaif.models.sharding import refuse_settings

        refuse_settings(cfg)
    if cfg.train.mixed_precision == "fp16" and (cfg.train.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; on CPU accelerate would silently train in "
                          "float32 (use no, or bf16)")
    path = cfg.data.path if cfg.train.mode == "online" else cfg.data.preference_path
    if not Path(path).exists():
        kind = "prompt" if cfg.train.mode == "online" else "preference"
        raise DataError(f"{kind} file not found: {path} (data.{'path' if kind == 'prompt' else 'preference_path'})")
    if cfg.train.mode != "online" or not plan_judge:
        return None
    from oaif.annotators.build import plan_annotator

    return plan_annotator(cfg.annotator)


def launched_processes() -> int:
    """The number of processes a launcher (``accelerate launch``, torchrun, MPI) started; 1 without one."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def on_cpu(device: str) -> bool:
    """Whether the accelerator is built with ``cpu=True``. ``auto`` under a multi-process launch on a machine
    without CUDA is the CPU: accelerate joins several processes on the CPU (gloo) only when told ``cpu``, and
    otherwise makes each of them a lone run that takes the main process's part (and its run directory)."""
    return device == "cpu" or (device == "auto" and launched_processes() > 1 and not torch.cuda.is_available())


def check_process_group(accelerator, device: str) -> None:
    """Refuse processes that a launcher started together but that each run alone (no distributed backend)."""
    launched = launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(f"train.device={device}: the launcher started {launched} processes, but on "
                          f"{accelerator.device.type} each runs alone (accelerate found no distributed backend); "
                          "use train.device=cpu or cuda")


def make_scheduler(optimizer, name: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class RunParts:
    accelerator: Any
    policy: Any  # prepared: DDP-wrapped with several processes, autocast with mixed precision; or sharded (fsdp)
    reference: Any  # prepared the same way without DDP (or sharded); None with LoRA (the policy with its adapter off) or behavior
    tokenizer: Any
    encode: Callable[[Any], list[int]]  # prompt -> templated token ids
    prompts: Any  # oaif.data.split.TrainingPrompts
    stream: Any  # oaif.data.stream.PromptStream over prompts.train
    optimizer: Any
    scheduler: Any
    annotator: Any  # None in offline mode
    sampler: Any  # an oaif.generation.base.Generator; None in offline mode
    stop_ids: set[int]  # the ids sampling stops on
    end_of_turn: int  # the id offline responses end with
    sharded: bool = False  # train.fsdp on several processes: policy and reference sharded with FSDP2


def build_run(cfg: Config, annotator=None, sampler=None) -> RunParts:
    """Build a run's parts; ``annotator`` and ``sampler`` replace the configured ones (online mode)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from oaif.data.split import training_prompts
    from oaif.data.stream import PromptStream
    from oaif.models.chat import encode_prompt, end_of_turn_id
    from oaif.models.load import load_policy_and_reference
    from oaif.step.sampling import eos_token_ids

    judge_plan = preflight(cfg, plan_judge=annotator is None)  # a given annotator replaces the configured one
    sharding = cfg.train.fsdp and launched_processes() > 1
    accelerator = Accelerator(cpu=on_cpu(cfg.train.device),  # under FSDP its MixedPrecisionPolicy, not autocast
                              mixed_precision="no" if sharding else cfg.train.mixed_precision)
    if cfg.train.device == "cuda" and accelerator.device.type != "cuda":
        raise DataError("train.device=cuda but no CUDA device is available")
    check_process_group(accelerator, cfg.train.device)
    if cfg.train.fsdp:
        from oaif.models.sharding import ONE_PROCESS_NOTE, refuse_launcher

        refuse_launcher(accelerator)
        if not sharding:
            sys.stderr.write(f"oaif: note: {ONE_PROCESS_NOTE}\n")
    set_seed(cfg.train.seed)
    policy, reference, tokenizer = load_policy_and_reference(cfg.model, cfg.loss.reference != "behavior")
    if sharding:
        from oaif.models.sharding import shard

        for model in (policy, reference):
            if model is not None:
                shard(model.to(accelerator.device), cfg.train.mixed_precision)

    def encode(prompt) -> list[int]:
        return encode_prompt(tokenizer, prompt, cfg.model.chat_template, cfg.model.system_prompt)

    prompts = training_prompts(cfg.data, cfg.train.mode, cfg.train.seed, encode)
    if prompts.skipped:
        log.warning("skipped input rows: %s", dict(prompts.skipped))
    stream = PromptStream(prompts.train, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    stop_ids = eos_token_ids(policy, tokenizer)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim.scheduler, cfg.optim.warmup_steps, cfg.train.max_steps)
    watch_first_update(optimizer, speak=accelerator.is_main_process)
    if sharding:  # no DDP around a sharded model
        optimizer = accelerator.prepare(optimizer)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
        if reference is not None:
            reference = accelerator.prepare_model(reference, evaluation_mode=True)
    if cfg.train.mode == "offline":
        annotator = sampler = None
    else:
        if annotator is None:
            from oaif.annotators.build import JudgeContext

            from oaif.models.reference import moves

            starting = None if moves(cfg.loss) else reference  # a judge never moves with the reference
            annotator = judge_plan(JudgeContext(policy_path=cfg.model.name_or_path, reference=starting,
                                                tokenizer=tokenizer, cache_dir=cfg.model.cache_dir,
                                                device=accelerator.device, policy=policy))
        if sampler is None:
            from oaif.generation.build import build_sampler

            sampler = build_sampler(cfg, accelerator.unwrap_model(policy), tokenizer, stop_ids, accelerator)
    return RunParts(accelerator, policy, reference, tokenizer, encode, prompts, stream, optimizer, scheduler,
                    annotator, sampler, stop_ids, end_of_turn_id(tokenizer, stop_ids), sharding)


def claim_run_dir(cfg: Config, accelerator):
    """Lock the run directory (:class:`oaif.run.lock.RunLock`, main process) and, for a fresh run with
    ``train.overwrite_output_dir``, delete the earlier run there. Every process gets the lock's
    verdict, so all stop together when another run holds it. Returns the lock (release it at the end)."""
    from oaif.errors import CheckpointError
    from oaif.run.run_dir import clear_previous_run, continues_run_dir
    from oaif.run.lock import RunLock

    lock, error = RunLock(cfg.train.output_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except CheckpointError as e:
            error = e
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor([int(error is not None)], device=accelerator.device), reduction="sum")
        if int(failed.item()) and error is None and not accelerator.is_main_process:
            error = CheckpointError(f"train.output_dir: {cfg.train.output_dir} is in use by another run")
    if error is not None:
        raise error
    if (accelerator.is_main_process and cfg.train.overwrite_output_dir
            and not continues_run_dir(cfg.train.resume, cfg.train.output_dir)):
        if removed := clear_previous_run(cfg.train.output_dir):
            log.warning("train.overwrite_output_dir=true: deleted the earlier run in %s (%s)", cfg.train.output_dir,
                        ", ".join(p.name for p in removed))
    return lock


def open_run_dir(cfg: Config, is_main: bool, resume_step: int | None):
    """``(metrics writer or None off the main process, audit log)`` of the run directory ``train.output_dir``.

    ``resume_step=None`` starts both logs afresh; otherwise their lines after that step are cut.
    """
    from oaif.run.audit import AuditLog
    from oaif.run.metrics import MetricsWriter

    out = Path(cfg.train.output_dir)
    metrics = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(redact_text(dump_yaml(cfg)))  # no credentials from a URL
        metrics = MetricsWriter(out / "metrics.jsonl", cfg.logging.report_to, cfg.logging.run_name or out.name,
                                redact(cfg.to_dict()), resume_step=resume_step)
    audit = cfg.annotator.audit_log and cfg.train.mode == "online"
    return metrics, AuditLog(out / "annotations.jsonl" if audit else None, is_main=is_main, resume_step=resume_step)
