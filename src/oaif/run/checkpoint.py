"""Checkpoints: a transformers-loadable model directory plus the trainer state, written atomically.

Layout of ``<output_dir>/checkpoint-<step>/``::

    config.json, model.safetensors, generation_config.json, tokenizer files
        -> ``AutoModelForCausalLM.from_pretrained`` loads it (LoRA runs save merged weights)
    adapter/            LoRA runs only: the adapter, which resume loads
    reference/          a TR-DPO run's moved reference (``loss.reference_sync_every``, ``loss.reference_mix``):
                        its weights, or under LoRA its adapter, by the policy's parameter names
    trainer_state.pt    optimizer, scheduler, RNG states, data position, step, counters: tensors
                        and plain containers only, so ``torch.load(weights_only=True)`` reads it
    trainer_state.json  the same minus tensors, for people

A checkpoint is written into a temporary directory and renamed into place, then the
``<output_dir>/latest`` file is replaced atomically to name it. A kill at any moment leaves
``latest`` pointing at a complete checkpoint. Rotation (``train.keep_last``) removes older ones,
except one that a reader such as ``oaif eval --run`` holds (:func:`reading_checkpoint`).
:mod:`oaif.run.restore` reads a checkpoint back.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oaif.errors import CheckpointError, CheckpointWriteError, OaifError, one_line
from oaif.models.modules import is_peft
from oaif.models.sharding import is_sharded
from oaif.run.restore import REFERENCE_FILE, load_reference, restore_trainer_state

log = logging.getLogger("oaif")

LATEST = "latest"
_CKPT = re.compile(r"^checkpoint-(\d+)$")



def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain containers (no numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any],
                    keep_last: int = 2, reference: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically and point ``latest`` at it. Returns its path.

    ``reference``: a moving reference's tensors (:class:`oaif.models.reference.MovingReference`), kept in
    ``reference/``.

    A write that fails (a full disk or a file size limit: torch's writer reports it as a
    RuntimeError, safetensors' as a SafetensorError) removes the partial copy and raises
    :class:`CheckpointWriteError`; ``latest`` still names the last complete one. So does a file
    in the checkpoint's place. A checkpoint of the same step is replaced (a rewound run saving again).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CheckpointWriteError(f"cannot write {final}: it exists and is not a checkpoint directory (move it "
                                   f"away); {_kept(out)}")
    tmp = out / f".tmp-checkpoint-{step}-{os.getpid()}"
    try:
        _write_files(tmp, model, tokenizer, state, reference)
        _put_in_place(tmp, final)
    except BaseException as e:  # also a second signal or Ctrl-C: no partial copy stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_failure(e):
            raise
        raise CheckpointWriteError(f"cannot write {final} ({one_line(e)}; {_free(out)}); {_kept(out)}") from None
    try:
        _atomic_write_text(out / LATEST, final.name + "\n")
    except OSError as e:
        raise CheckpointWriteError(f"wrote {final}, but cannot point {out / LATEST} at it ({one_line(e)}; "
                                   f"{_free(out)}); resume from it with train.resume={final}") from None
    _rotate(out, keep_last, protect=final.name)
    return final


def _is_write_failure(e: BaseException) -> bool:
    """An error writing the files (the OS's, torch's writer's RuntimeError, safetensors' SafetensorError)."""
    return isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError"


def _free(out: Path) -> str:
    try:
        return f"{shutil.disk_usage(out).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def _kept(out: Path) -> str:
    """What a failed write leaves: the name of the last complete checkpoint, in words."""
    try:
        kept = latest_checkpoint(out)
    except CheckpointError:
        kept = None
    return f"{kept.name} is kept as the last complete checkpoint" if kept else "no checkpoint of this run was saved"


def _write_files(tmp: Path, model, tokenizer, state: dict[str, Any], reference: dict | None = None) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if reference is not None:
        from safetensors.torch import save_file

        (tmp / REFERENCE_FILE).parent.mkdir()
        save_file(reference, str(tmp / REFERENCE_FILE))
    if is_peft(model):
        _save_merged(model, tmp)
        model.save_pretrained(tmp / "adapter")
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    human = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, list, dict)) and k not in ("optimizer", "scheduler", "rng", "async")}
    (tmp / "trainer_state.json").write_text(json.dumps(human, indent=2, default=str))


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the written ``tmp`` to ``final``; a checkpoint already there (the same step saved again) is replaced."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)  # the one there stays
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    """Remove all but the newest ``keep_last`` checkpoints (never ``protect``); one that a reader holds
    (:func:`reading_checkpoint`, ``oaif eval --run`` during training) is left for a later rotation."""
    if keep_last <= 0:
        return
    ckpts = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir())
    for _, p in ckpts[:-keep_last]:
        if p.name != protect:
            _remove_unless_read(p)


def _remove_unless_read(path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no readers' locks
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # gone already
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.info("%s is being read (oaif eval?): left for a later rotation", path)
    else:
        shutil.rmtree(path, ignore_errors=True)  # readers that wait for it see it gone
    finally:
        os.close(fd)


@contextmanager
def reading_checkpoint(path: str | Path) -> Iterator[bool]:
    """Hold the checkpoint directory ``path`` against rotation while reading it (a shared ``flock`` on
    the directory); yields whether it is still there (False: rotation removed it first)."""
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield path.is_dir()
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a rotation removes it
        yield (path / "config.json").is_file()
    finally:
        os.close(fd)


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


def trainer_state(step: int, stream_state: dict, optimizer, scheduler, failures, config: dict) -> dict[str, Any]:
    """What ``trainer_state.pt`` holds besides the weights: enough to continue exactly. ``optimizer``: the
    optimizer, or its state dict already gathered (sharded models)."""
    optimizer = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    return {"step": step, "stream": stream_state, "optimizer": optimizer,
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "failures": failures.state_dict(),
            "config": config}


class RunCheckpoints:
    """One run's checkpoints across its processes: only the main process writes them.

    :meth:`save` waits for every process before and after writing. :meth:`save_after_error` keeps
    the progress since the last checkpoint when a step raised; with several processes it writes
    from the main process without barriers, since the others may be stuck in (or gone from) a
    collective call, and a barrier there would deadlock.
    """

    def __init__(self, accelerator, output_dir: str | Path, keep_last: int, reference=None):
        self.accelerator, self.out, self.keep_last = accelerator, Path(output_dir), keep_last
        self.reference = reference  # a MovingReference (TR-DPO), saved and restored with the rest
        self.last_saved = -1
        self.restored: dict = {}  # optional parts of the resumed checkpoint's trainer state (``async``)

    def save(self, step: int, model, tokenizer, state, *, collective: bool = True) -> Path:
        """Write ``checkpoint-<step>``; ``state()`` gives the trainer state (called on the main process only).

        Non-finite weights are never written: every process checks its copy first and all raise
        :class:`~oaif.run.finite_guard.NonFiniteError` together.
        """
        from oaif.run.finite_guard import check_weights

        check_weights(model, step, self.last_saved)
        path = self.out / f"checkpoint-{step}"
        if step == self.last_saved and self._is_latest(path):  # resumed at its last step: nothing new to write
            return path
        if collective:
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            reference = self.reference.state_dict() if self.reference is not None else None
            path = save_checkpoint(self.out, step, model, tokenizer, state(), keep_last=self.keep_last,
                                   reference=reference)
        self.last_saved = step
        if collective:
            self.accelerator.wait_for_everyone()
        return path

    def _is_latest(self, path: Path) -> bool:
        try:
            return latest_checkpoint(self.out) == path
        except CheckpointError:
            return False

    def save_after_error(self, step: int, model, tokenizer, state, error: BaseException) -> None:
        alone = self.accelerator.num_processes == 1
        if step <= max(0, self.last_saved) or not (alone or self.accelerator.is_main_process):
            return
        if not alone and is_sharded(model):  # gathering the shards needs every process, which may be stuck
            log.error("stopped at step %d (%s); a sharded model (train.fsdp) cannot be saved by one process: "
                      "progress since step %d is lost, rerun with train.resume=true", step, type(error).__name__,
                      max(0, self.last_saved))
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
        step = self.last_saved = restore_trainer_state(ckpt, model, optimizer, scheduler, stream, failures, config,
                                                       keep=self.restored)
        if self.reference is not None:
            load_reference(ckpt, self.reference)
        log.info("resumed from %s at step %d", ckpt, step)
        return step
