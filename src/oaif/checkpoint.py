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
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or the highest complete one; None if there is none."""
    out = Path(output_dir)
    pointer = out / LATEST
    if pointer.is_file():
        candidate = out / pointer.read_text().strip()
        if (candidate / "trainer_state.pt").is_file():
            return candidate
    ckpts = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _CKPT.match(p.name))
                   and (p / "trainer_state.pt").is_file())
    return ckpts[-1][1] if ckpts else None


def load_model_weights(model, checkpoint: Path) -> None:
    """Load a checkpoint's weights into ``model`` (its adapter for a LoRA model)."""
    if _is_peft(model):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(checkpoint / "adapter")))
        return
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
