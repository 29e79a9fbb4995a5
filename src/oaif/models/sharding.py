"""FSDP2 sharding of the policy and the reference (``train.fsdp``), applied by oaif itself.

accelerate does not apply FSDP on the CPU, so oaif calls ``torch.distributed.fsdp.fully_shard`` as
torchtune's recipes do: each decoder layer, then the root (under LoRA the transformers model inside
the peft wrapper; the reference is then that sharded base with the adapter off). The same code runs
on gloo (CPU) and NCCL (GPU). Each process holds 1/N of every sharded weight, gradient and AdamW
state; a forward gathers one layer at a time and drops it again (``reshard_after_forward``), a
backward gathers again and reduce-scatters the gradients (averaged over processes, as DDP does).

Every forward and backward of a sharded module is a collective call, so every process must run
the same number of them: the update pads its passes (:mod:`oaif.step.update`), and the phases whose
number of forwards depends on a process's own data (sampling with the transformers backends, an
in-process judge) run inside :func:`gathered`, which gathers the whole module once (one full copy
of the weights while it lasts) so that its forwards run no collective. Checkpoints (with their
non-finite check) and resume read :func:`full_parameters`, the float32 weights gathered one tensor
at a time and all held while the block lasts; the weight push gathers each tensor only as it is
read and drops it once sent (:func:`oaif.generation.weights.policy_weights`); the optimizer state
is saved full (:func:`full_optimizer_state`), keyed like a plain AdamW state dict, so a checkpoint
resumes with or without FSDP on any number of processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from oaif.errors import ConfigError


ONE_PROCESS_NOTE = "train.fsdp=true on one process shards nothing"


def refuse_settings(cfg) -> None:
    """One-line :class:`ConfigError` for settings ``train.fsdp`` cannot be combined with (before any model loads)."""
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.fsdp=true: train.mixed_precision=fp16 is not supported (it needs a gradient "
                          "scaler over the shards); use bf16 or no")
    if cfg.loss.reference_sync_every > 0 or cfg.loss.reference_mix > 0:
        raise ConfigError("train.fsdp=true: a moving reference (loss.reference_sync_every, loss.reference_mix) is "
                          "not supported with sharded models; use loss.reference=initial or behavior")


def refuse_launcher(accelerator) -> None:
    """One-line :class:`ConfigError` when accelerate was configured to shard too (its FSDP or DeepSpeed):
    never two kinds of sharding at once."""
    state = str(getattr(accelerator.state, "distributed_type", "")).upper()
    env = sorted(k for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
                 if os.environ.get(k, "").lower() in ("1", "true", "yes"))
    if env or "FSDP" in state or "DEEPSPEED" in state:
        found = ", ".join(env) or f"distributed_type {state.rsplit('.', 1)[-1]}"
        raise ConfigError(f"train.fsdp=true shards the models itself and cannot run under accelerate's own FSDP "
                          f"or DeepSpeed ({found}): launch with a plain multi-process accelerate "
                          f"config (no FSDP or DeepSpeed plugin)")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformers model's repeated blocks (the classes its ``_no_split_modules`` names)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"train.fsdp=true: cannot find the decoder layers of {type(model).__name__} "
                          "(it names no _no_split_modules)")
    return layers


def shard(model, mixed_precision: str = "no") -> None:
    """Shard ``model`` (a transformers model, or the base model inside a peft wrapper) in place:
    each decoder layer, then the root. ``bf16`` computes in bfloat16 (FSDP2's ``MixedPrecisionPolicy``)
    over float32 master weights and reduces gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from oaif.models.modules import base_model

    root = base_model(model)
    kwargs = {"reshard_after_forward": True}  # every forward gathers: counts of collectives follow counts of passes
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(root):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)


def fsdp_modules(model) -> list:
    """The FSDP-sharded modules in ``model`` (empty when it is not sharded)."""
    if model is None:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def gathered(*models) -> Iterator[None]:
    """Gather each sharded module of ``models`` once (a collective: every process enters together) and keep
    it whole while the block runs, so its forwards run no collective and processes may run different numbers
    of them (sampling, judging). Costs one full copy of the weights (in the compute dtype) meanwhile."""
    mods = [m for model in models for m in fsdp_modules(model)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def _dtensor_slots(model) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    from torch.distributed.tensor import DTensor

    return [(module, name, p) for module in model.modules() for name, p in module._parameters.items()
            if isinstance(p, DTensor)]


@contextlib.contextmanager
def full_parameters(model, write_back: bool = False) -> Iterator[None]:
    """Within the block, ``model``'s sharded parameters are plain full tensors (their float32 master values),
    gathered one tensor at a time (collectives: every process enters together); a shared (tied) parameter
    stays shared. ``write_back``: each process copies its shard of the (changed) full tensors back on exit
    (no communication; every process must hold the same values). A no-op for a model that is not sharded."""
    slots = _dtensor_slots(model) if model is not None else []
    if not slots:
        yield
        return
    full: dict[int, torch.nn.Parameter] = {}
    for _, _, p in slots:
        if id(p) not in full:
            full[id(p)] = torch.nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
    # FSDP2's post-load hooks re-read each module's parameter as its shard; while the full tensors stand in (a
    # resume loads into them) they stay off, and write_back puts each shard in place instead
    hooks = {id(m): (m, m._load_state_dict_post_hooks) for m, _, _ in slots}
    for module, name, p in slots:
        module._parameters[name] = full[id(p)]
    for module, _ in hooks.values():
        module._load_state_dict_post_hooks = type(module._load_state_dict_post_hooks)()
    try:
        yield
    finally:
        for module, saved in hooks.values():
            module._load_state_dict_post_hooks = saved
        for module, name, p in slots:
            module._parameters[name] = p
        if write_back:
            from torch.distributed.tensor import distribute_tensor

            with torch.no_grad():
                for _, _, p in {id(p): (m, n, p) for m, n, p in slots}.values():
                    local = distribute_tensor(full[id(p)].detach(), p.device_mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(local.to_local())


@contextlib.contextmanager
def gradient_sync_off(model) -> Iterator[None]:
    """No gradient reduction in the backwards run inside (FSDP2's own switch, ``no_sync`` has no
    meaning there); the enclosing setting comes back on exit. Nested blocks stay off."""
    before = getattr(model, "_oaif_gradient_sync", True)
    model.set_requires_gradient_sync(False)
    model._oaif_gradient_sync = False
    try:
        yield
    finally:
        model.set_requires_gradient_sync(before)
        model._oaif_gradient_sync = before


def max_over_processes(values: list[int], device) -> list[int]:
    """Each value's maximum over every process (a collective)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def plain(value):
    """A tensor that may be a DTensor (a gradient norm, a loss) as an ordinary tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _optimizer_params(optimizer) -> list:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    return [p for group in inner.param_groups for p in group["params"]]


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (collectives: every process
    calls it): the same int-keyed layout a plain AdamW over the unsharded model saves."""
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    state["state"] = {i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def load_full_optimizer_state(optimizer, state: dict) -> None:
    """Load a full optimizer state (:func:`full_optimizer_state`, or a run without FSDP) into an optimizer over
    sharded parameters: each process keeps its shard of every state tensor (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = _optimizer_params(optimizer)
    local = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        local[i] = {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                    for k, v in s.items()}
    optimizer.load_state_dict({**state, "state": local})
