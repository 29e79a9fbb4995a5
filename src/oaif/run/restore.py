"""Loading a checkpoint back into a run: the weights (LoRA adapters, transformers' weight-name
conversions), the trainer state (read with ``weights_only=True``), and the RNG states.

:mod:`oaif.run.checkpoint` writes what this reads; the layout is described there.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oaif.errors import CheckpointError, one_line
from oaif.models.modules import is_peft
from oaif.models.sharding import load_full_optimizer_state

log = logging.getLogger("oaif")


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (corrupt, truncated) or OSError
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({one_line(e)})") from None


def _lora_differences(model, adapter_dir: Path) -> list[str]:
    """model.lora.* settings in which the model's adapter differs from the checkpoint's adapter_config.json."""
    try:
        saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{adapter_dir / 'adapter_config.json'}: unreadable ({one_line(e)})") from None
    current = model.peft_config[getattr(model, "active_adapter", "default")]
    diffs = []
    for key, attr in (("r", "r"), ("alpha", "lora_alpha"), ("target_modules", "target_modules")):
        ours, theirs = getattr(current, attr), saved.get(attr)
        if key == "target_modules":
            ours, theirs = sorted(ours or []), sorted(theirs or [])
        if theirs is not None and ours != theirs:
            diffs.append(f"model.lora.{key}: checkpoint {theirs}, config {ours}")
    return diffs


def load_model_weights(model, checkpoint: Path) -> None:
    """Load a checkpoint's weights into ``model`` (its adapter for a LoRA model).

    A checkpoint from a LoRA run into a full model or the reverse, another architecture or
    adapter shape, and corrupt or truncated files are :class:`CheckpointError` s naming the
    checkpoint and what does not match.
    """
    checkpoint = Path(checkpoint)
    adapter = checkpoint / "adapter"
    if is_peft(model):
        if not adapter.is_dir():
            raise CheckpointError(f"checkpoint {checkpoint} holds full weights (no adapter/), but model.lora.enabled="
                                  f"true: resume with model.lora.enabled=false, or use a new train.output_dir")
        diffs = _lora_differences(model, adapter)
        if diffs:
            raise CheckpointError(f"checkpoint {checkpoint}'s LoRA adapter does not match the config: {'; '.join(diffs)}")
        from peft import set_peft_model_state_dict

        files = sorted(adapter.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint {checkpoint}: adapter/ has no .safetensors weights")
        sd = {}
        for f in files:
            sd.update(_read_safetensors(f))
        try:
            set_peft_model_state_dict(model, sd)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {checkpoint}'s LoRA adapter does not fit the model: {one_line(e)}") from None
        return
    if adapter.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} was saved by a LoRA run (it has adapter/), but "
                              f"model.lora.enabled=false: resume with model.lora.enabled=true and the same "
                              f"model.lora settings, or use a new train.output_dir")
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {checkpoint} has no .safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_read_safetensors(f))
    sd = _runtime_names(model, sd, checkpoint)
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {list(v.shape)}, model {list(own[k].shape)}" for k, v in sd.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise CheckpointError(f"checkpoint {checkpoint} does not match the model's architecture (another "
                              f"model.name_or_path?): {len(shapes)} tensors differ in shape, e.g. {shapes[0]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint {checkpoint} does not match the model's architecture (another "
                              f"model.name_or_path?): missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")


def _runtime_names(model, sd: dict[str, torch.Tensor], checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the model's own names: transformers 5 loads some models (mixtures of
    experts) under other names than it saves, e.g. each layer's experts fused into one tensor."""
    from oaif.generation.weights import runtime_names

    try:
        return runtime_names(model, sd)
    except Exception as e:  # a conversion that does not fit: another model's checkpoint
        raise CheckpointError(f"checkpoint {checkpoint} does not match the model's architecture (another "
                              f"model.name_or_path?): its weights do not convert to the model's ({one_line(e)})") from None


#: Where a checkpoint keeps a moving reference's tensors (TR-DPO; :mod:`oaif.models.reference`).
REFERENCE_FILE = "reference/weights.safetensors"


def load_reference(checkpoint: Path, reference) -> None:
    """Put a checkpoint's moved reference back into ``reference`` (a MovingReference). A checkpoint without one
    (its run had a fixed reference; a resume that may change loss.reference*) leaves the starting model."""
    path = Path(checkpoint) / REFERENCE_FILE
    if not path.is_file():
        log.warning("%s holds no moved reference: the reference starts from the starting model", checkpoint)
        return
    reference.load_state_dict(_read_safetensors(path), path)


#: Keys every ``trainer_state.pt`` holds.
STATE_KEYS = ("step", "optimizer", "scheduler", "stream", "rng", "failures", "config")


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, read with ``weights_only=True`` (no arbitrary unpickling).

    A corrupt, truncated or foreign file is a :class:`CheckpointError` naming it.
    """
    path = Path(checkpoint) / "trainer_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad or unsafe pickle, empty file, ...: unusable whatever the type
        raise CheckpointError(f"{path}: corrupt or truncated trainer state ({type(e).__name__}: {one_line(e, 160)}); "
                              f"resume from an earlier checkpoint by naming it in train.resume") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not an oaif trainer state (missing {', '.join(missing)})")
    return state


def restore_trainer_state(checkpoint: Path, model, optimizer, scheduler, stream, failures,
                          config: dict | None = None, keep: dict | None = None) -> int:
    """Load a checkpoint's weights and trainer state into the run's objects; return its step. ``keep``
    receives the state's optional parts (``async``: the steps a ``train.async_steps`` run had queued).

    With ``config`` (the new run's), first refuse a config that differs from the saved one in a
    key a resume may not change (:func:`oaif.run.resume_check.check_resume_config`).
    """
    from oaif.run.resume_check import check_resume_config, check_resume_step, optimizer_settings, reapply

    state = load_trainer_state(checkpoint)
    load_model_weights(model, checkpoint)  # first: its errors name an architecture or LoRA mismatch precisely
    if config is not None:
        check_resume_config(state["config"], config, checkpoint)
        check_resume_step(int(state["step"]), config["train"]["max_steps"], checkpoint)
    built = optimizer_settings(optimizer, scheduler)  # the new config's (an allowed change differs from the saved)
    load_full_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    reapply(optimizer, scheduler, built)  # and the lr of this step under the new run's schedule
    stream.load_state_dict(state["stream"])
    set_rng_state(state["rng"])
    failures.load_state_dict(state["failures"])
    if keep is not None:
        keep.update({k: state[k] for k in ("async",) if k in state})
    return int(state["step"])
