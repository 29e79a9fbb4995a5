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

from oaif.errors import CheckpointError, CheckpointWriteError, OaifError, one_line

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
    """Write ``checkpoint-<step>`` atomically and point ``latest`` at it. Returns its path.

    A write that fails (a full disk: torch's writer reports it as a RuntimeError) removes the
    partial copy and raises :class:`CheckpointWriteError`; ``latest`` still names the last complete one.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}-{os.getpid()}"
    try:
        return _write_checkpoint(out, final, tmp, model, tokenizer, state, keep_last)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(out).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        try:
            kept = latest_checkpoint(out)
        except CheckpointError:
            kept = None
        raise CheckpointWriteError(
            f"cannot write {final} ({one_line(e)}; {free}); "
            + (f"{kept.name} is kept as the last complete checkpoint" if kept else "no checkpoint of this run was saved")
        ) from None


def _write_checkpoint(out: Path, final: Path, tmp: Path, model, tokenizer, state: dict[str, Any], keep_last: int) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if _is_peft(model):
        _save_merged(model, tmp)
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


def _save_merged(model, directory: Path) -> None:
    """A LoRA model's weights with the adapter merged out of place (what a vLLM engine samples), as a model
    directory; untied when the adapter sits on tied embeddings (:func:`oaif.generation.weights.untied_lora`)."""
    import copy

    from oaif.generation.weights import merged_state_dict, untied_lora

    base = model.get_base_model()
    base.save_pretrained(directory, state_dict=dict(merged_state_dict(model)), safe_serialization=True)
    if untied_lora(model):
        config = copy.deepcopy(base.config)
        config.tie_word_embeddings = False
        config.save_pretrained(directory)


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


def trainer_state(step: int, stream_state: dict, optimizer, scheduler, failures, config: dict) -> dict[str, Any]:
    """What ``trainer_state.pt`` holds besides the weights: enough to continue exactly."""
    return {"step": step, "stream": stream_state, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "failures": failures.state_dict(),
            "config": config}


def restore_trainer_state(checkpoint: Path, model, optimizer, scheduler, stream, failures,
                          config: dict | None = None) -> int:
    """Load a checkpoint's weights and trainer state into the run's objects; return its step.

    With ``config`` (the new run's), first refuse a config that differs from the saved one in a
    key a resume may not change (:func:`oaif.run.resume_check.check_resume_config`).
    """
    from oaif.run.resume_check import check_resume_config, reschedule

    state = load_trainer_state(checkpoint)
    load_model_weights(model, checkpoint)  # first: its errors name an architecture or LoRA mismatch precisely
    if config is not None:
        check_resume_config(state["config"], config, checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    reschedule(optimizer, scheduler)  # the lr of this step under the new run's schedule length
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
        """Write ``checkpoint-<step>``; ``state()`` gives the trainer state (called on the main process only).

        Non-finite weights are never written: every process checks its copy first and all raise
        :class:`~oaif.run.finite_guard.NonFiniteError` together.
        """
        from oaif.run.finite_guard import check_weights

        check_weights(model, step, self.last_saved)
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
        except OaifError as e:  # non-finite weights: not saved
            log.error("progress since step %d not saved: %s", self.last_saved, e)
        except Exception:  # pragma: no cover - the original error matters more
            log.exception("could not save a checkpoint after the error")

    def restore(self, resume: bool | str, model, optimizer, scheduler, stream, failures, config: dict | None = None) -> int:
        """Load the checkpoint ``train.resume`` names (a path, or ``True``: the latest in the run directory)
        into the run's objects; return its step (0 when ``True`` finds none)."""
        ckpt = Path(resume) if isinstance(resume, str) else latest_checkpoint(self.out)
        if ckpt is None:
            log.warning("train.resume=true but %s has no checkpoint: starting from step 0", self.out)
            return 0
        step = self.last_saved = restore_trainer_state(ckpt, model, optimizer, scheduler, stream, failures, config)
        log.info("resumed from %s at step %d", ckpt, step)
        return step
