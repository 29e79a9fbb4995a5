"""Checkpoints: a transformers-loadable model directory plus the trainer state, written atomically.

Layout of ``<output_dir>/checkpoint-<step>/``::

    config.json, model.safetensors, generation_config.json, tokenizer files
        -> ``AutoModelForCausalLM.from_pretrained`` loads it (LoRA runs save merged weights)
    adapter/            LoRA runs only: the adapter, which resume loads
    trainer_state.pt    optimizer, scheduler, RNG states, data position, step, counters: tensors
                        and plain containers only, so ``torch.load(weights_only=True)`` reads it
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

log = logging.getLogger("oaif")

LATEST = "latest"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain containers (no numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
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
        from oaif.generation.weights import policy_weights

        # the weights a vLLM engine samples from: the adapter merged out of place
        model.get_base_model().save_pretrained(tmp, state_dict=dict(policy_weights(model)), safe_serialization=True)
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
    """A checkpoint's trainer state, read with ``weights_only=True`` (no arbitrary unpickling)."""
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)


def trainer_state(step: int, stream_state: dict, optimizer, scheduler, failures, config: dict) -> dict[str, Any]:
    """What ``trainer_state.pt`` holds besides the weights: enough to continue exactly."""
    return {"step": step, "stream": stream_state, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "failures": failures.state_dict(),
            "config": config}


def restore_trainer_state(checkpoint: Path, model, optimizer, scheduler, stream, failures) -> int:
    """Load a checkpoint's weights and trainer state into the run's objects; return its step."""
    load_model_weights(model, checkpoint)
    state = load_trainer_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["stream"])
    set_rng_state(state["rng"])
    failures.load_state_dict(state["failures"])
    return int(state["step"])


class RunCheckpoints:
    """One run's checkpoints across its processes: only the main process writes them.

    :meth:`save` waits for every process before and after writing. :meth:`save_after_error` keeps
    the progress since the last checkpoint when a step raised; with several processes it writes
    from the main process without barriers, since the others may be stuck in (or gone from) a
    collective call, and a barrier there would deadlock.
    """

    def __init__(self, accelerator, output_dir: str | Path, keep_last: int):
        self.accelerator, self.out, self.keep_last = accelerator, Path(output_dir), keep_last
        self.last_saved = -1

    def save(self, step: int, model, tokenizer, state, *, collective: bool = True) -> Path:
        """Write ``checkpoint-<step>``; ``state()`` gives the trainer state (called on the main process only)."""
        if collective:
            self.accelerator.wait_for_everyone()
        path = self.out / f"checkpoint-{step}"
        if self.accelerator.is_main_process:
            path = save_checkpoint(self.out, step, model, tokenizer, state(), keep_last=self.keep_last)
        self.last_saved = step
        if collective:
            self.accelerator.wait_for_everyone()
        return path

    def save_after_error(self, step: int, model, tokenizer, state, error: BaseException) -> None:
        alone = self.accelerator.num_processes == 1
        if step <= max(0, self.last_saved) or not (alone or self.accelerator.is_main_process):
            return
        try:
            path = self.save(step, model, tokenizer, state, collective=alone)
            log.error("stopped at step %d (%s); progress saved in %s, rerun with train.resume=true",
                      step, type(error).__name__, path)
        except Exception:  # pragma: no cover - the original error matters more
            log.exception("could not save a checkpoint after the error")

    def restore(self, resume: bool | str, model, optimizer, scheduler, stream, failures) -> int:
        """Load the checkpoint ``train.resume`` names (a path, or ``True``: the latest in the run directory)
        into the run's objects; return its step (0 when ``True`` finds none)."""
        ckpt = Path(resume) if isinstance(resume, str) else latest_checkpoint(self.out)
        if ckpt is None:
            log.warning("train.resume=true but %s has no checkpoint: starting from step 0", self.out)
            return 0
        step = self.last_saved = restore_trainer_state(ckpt, model, optimizer, scheduler, stream, failures)
        log.info("resumed from %s at step %d", ckpt, step)
        return step
