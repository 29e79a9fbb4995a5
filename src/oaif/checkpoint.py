"""Checkpoints: a transformers-loadable model directory plus the trainer state, written atomically.

Layout of ``<output_dir>/checkpoint-<step>/``::

    config.json, model.safetensors, generation_config.json, tokenizer files
        -> ``AutoModelForCausalLM.from_pretrained`` loads it (LoRA runs save merged weights)
    adapter/            LoRA runs only: the adapter, which resume loads
    trainer_state.pt    optimizer, scheduler, RNG states, data position, step, counters
    trainer_state.json  the same minus tensors, for people

A checkpoint is written into a temporary directory and renamed into place, then the
``<output_dir>/latest`` file is replaced atomically to name it. A kill at any moment leaves
``latest`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oaif.errors import CheckpointError, one_line

log = logging.getLogger("oaif.checkpoint")

LATEST = "latest"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """A LoRA model's full weights with the adapter merged in, under the base model's key names.

    Tied output embeddings are left out, as ``save_pretrained`` does for a plain model.
    """
    base = model.get_base_model()
    tied = getattr(base.config, "tie_word_embeddings", False)
    model.merge_adapter()
    try:
        sd = {}
        for key, value in base.state_dict().items():
            if "lora_" in key or (tied and key.endswith("lm_head.weight")):
                continue
            sd[key.replace(".base_layer.", ".")] = value.detach().clone()
    finally:
        model.unmerge_adapter()
    return sd


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Write ``checkpoint-<step>`` atomically and point ``latest`` at it. Returns its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if _is_peft(model):
        model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model), safe_serialization=True)
        model.save_pretrained(tmp / "adapter")
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    human = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, list, dict)) and k not in ("optimizer", "scheduler", "rng")}
    (tmp / "trainer_state.json").write_text(json.dumps(human, indent=2, default=str))
    if final.exists():  # re-saving a step (e.g. the final save after a periodic one)
        old = out / f".old-checkpoint-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _atomic_write_text(out / LATEST, final.name + "\n")
    _rotate(out, keep_last, protect=final.name)
    return final


def _rotate(out: Path, keep_last: int, protect: str) -> None:
    if keep_last <= 0:
        return
    ckpts = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir())
    for _, p in ckpts[:-keep_last]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def _pointer_target(pointer: Path) -> str:
    """The checkpoint name in a ``latest`` file; anything else is a one-line CheckpointError."""
    try:
        raw = pointer.read_bytes()[:4096]
    except OSError as e:
        raise CheckpointError(f"{pointer}: cannot read it ({e.strerror or e})") from None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _CKPT.match(name):
        shown = repr(raw[:40]) if name is None else repr(name[:40])
        raise CheckpointError(f"{pointer}: expected the name of a checkpoint (checkpoint-N), got {shown}; delete "
                              f"the file to resume from the newest complete checkpoint")
    return name


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or the highest complete one; None if there is none.

    A ``latest`` file that does not hold a checkpoint name is a :class:`CheckpointError`; one that
    names an incomplete checkpoint falls back to the highest complete one, with a warning.
    """
    out = Path(output_dir)
    pointer = out / LATEST
    if pointer.is_file():
        name = _pointer_target(pointer)
        candidate = out / name
        if (candidate / "trainer_state.pt").is_file():
            return candidate
        log.warning("%s names %s, which is not a complete checkpoint: using the newest complete one", pointer, name)
    ckpts = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _CKPT.match(p.name))
                   and (p / "trainer_state.pt").is_file())
    return ckpts[-1][1] if ckpts else None


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
    if _is_peft(model):
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


#: Keys every ``trainer_state.pt`` holds.
STATE_KEYS = ("step", "optimizer", "scheduler", "stream", "rng")


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint; a corrupt, truncated or foreign file is a :class:`CheckpointError`."""
    path = Path(checkpoint) / "trainer_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, empty file, ...: the file is unusable whatever the type
        raise CheckpointError(f"{path}: corrupt or truncated trainer state ({type(e).__name__}: {one_line(e, 160)}); "
                              f"resume from an earlier checkpoint by naming it in {Path(checkpoint).parent / LATEST}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not an oaif trainer state (missing {', '.join(missing)})")
    return state
