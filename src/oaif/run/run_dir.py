"""Output locations checked before any work starts: a run directory, an output directory, an output file.

A path that cannot be written must fail at once with one line naming the key and the reason,
not after minutes of sampling, judging or training. The checks change nothing on disk: a
directory that does not exist yet is not created; its nearest existing ancestor must be a
writable directory (tested by creating and removing a temporary file there, which works for
root and read-only mounts alike, where permission bits alone would mislead).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from oaif.errors import ConfigError

#: Kernel pseudo-filesystems: directories there look writable but take no run files.
PSEUDO_FS = ("/proc", "/sys", "/dev")


def _pseudo_root(path: Path) -> str | None:
    for root in PSEUDO_FS:
        if path == Path(root) or Path(root) in path.parents:
            return root
    return None


def _resolve(text: str, key: str) -> Path:
    try:
        return Path(text).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, an unreadable component
        raise ConfigError(f"{key}: cannot resolve {text} ({e})") from None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        p = p.parent
    return p


def _probe_writable(directory: Path, key: str, shown: str) -> None:
    try:
        with tempfile.TemporaryFile(prefix=".oaif-write-check-", dir=directory):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in {directory} ({e.strerror or e}), needed for {shown}") from None


def _check_pseudo(resolved: Path, key: str, text: str) -> None:
    root = _pseudo_root(resolved)
    if root is not None:
        raise ConfigError(f"{key}: {text} is under {root}, a kernel pseudo-filesystem; choose a path on disk")


def _check_can_make_dir(directory: Path, key: str, text: str, is_target: bool) -> None:
    """``directory`` is one, or can be created as one, and its nearest existing directory takes files.

    ``text`` is the path the user gave: the directory itself (``is_target``) or a file in it.
    """
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        if is_target and existing == directory:
            raise ConfigError(f"{key}: {text} exists and is not a directory")
        raise ConfigError(f"{key}: {existing} is a file, so {text} cannot be created")
    _probe_writable(existing, key, text)


def check_output_dir(path: str | os.PathLike, key: str = "train.output_dir") -> Path:
    """Check that ``path`` is, or can become, a writable directory; return it resolved.

    Raises :class:`ConfigError` ("``key``: ...") when the path is empty, is a file, lies under
    /proc, /sys or /dev, has a file among its ancestors, or its nearest existing directory
    cannot be written.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise ConfigError(f"{key}: empty path (it would write into the current directory)")
    resolved = _resolve(text, key)
    _check_pseudo(resolved, key, text)
    _check_can_make_dir(resolved, key, text, is_target=True)
    return resolved


def check_output_file(path: str | os.PathLike, key: str) -> Path:
    """Check that the file ``path`` can be written (created, or replaced); return it resolved.

    Raises :class:`ConfigError` ("``key``: ...") when the path is empty, is a directory or
    another non-file, lies under /proc, /sys or /dev, or its directory is not (and cannot
    become) writable.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise ConfigError(f"{key}: empty path")
    resolved = _resolve(text, key)
    _check_pseudo(resolved, key, text)
    if resolved.is_dir():
        raise ConfigError(f"{key}: {text} is a directory, not a file")
    if os.path.lexists(resolved) and not resolved.is_file():
        raise ConfigError(f"{key}: {text} exists and is not a regular file")
    _check_can_make_dir(resolved.parent, key, text, is_target=False)
    return resolved


#: Files a training run writes at the top of its run directory (besides ``checkpoint-N/``).
RUN_FILES = ("latest", "metrics.jsonl", "annotations.jsonl", "config.yaml")


def previous_run(path: str | os.PathLike) -> list[Path]:
    """What an earlier training run left in ``path``: its checkpoints and ``latest``, then its
    half-written checkpoints, logs and config. Logs without any checkpoint (a run killed before its
    first save, which cannot be resumed) do not count: a fresh run simply starts them again."""
    import re

    out = Path(path)
    if not out.is_dir():
        return []
    found = sorted(p for p in out.iterdir() if re.match(r"^checkpoint-\d+$", p.name))
    if (out / "latest").is_file():
        found.append(out / "latest")
    if found:  # then also its half-written checkpoints (a kill during a save), logs and config
        found += sorted(p for p in out.iterdir() if re.match(r"^\.(tmp|old)-checkpoint-\d+-\d+$", p.name))
        found += [out / name for name in RUN_FILES if name != "latest" and (out / name).is_file()]
    return found


def continues_run_dir(resume: bool | str, output_dir: str | os.PathLike) -> bool:
    """Whether a run continues the run in ``output_dir``: ``train.resume=true``, or a checkpoint in it.
    (Resuming from a checkpoint elsewhere starts a new history in ``output_dir``, like a fresh run.)"""
    if isinstance(resume, str):
        return Path(resume).expanduser().resolve().parent == Path(output_dir).expanduser().resolve()
    return bool(resume)


def check_fresh_run(path: str | os.PathLike, overwrite: bool) -> None:
    """A fresh run (``train.resume=false``) must not mix with an earlier run in its directory.

    Raises :class:`ConfigError` when ``path`` holds one and ``overwrite`` is false; changes nothing.
    """
    old = previous_run(path)
    if old and not overwrite:
        shown = ", ".join(p.name for p in old[:4]) + (", ..." if len(old) > 4 else "")
        raise ConfigError(f"train.output_dir: {path} holds an earlier run ({shown}); continue it with "
                          f"train.resume=true, choose another train.output_dir, or delete it with "
                          f"train.overwrite_output_dir=true")


def check_run_entries(path: str | os.PathLike, overwrite: bool) -> None:
    """Names the run writes must be free for it: ``latest`` a file (or absent), each ``checkpoint-N``
    a directory (or absent; ``overwrite`` deletes other ones). Raises :class:`ConfigError`; changes nothing."""
    import re

    out = Path(path)
    latest = out / "latest"
    if latest.is_dir() or (os.path.lexists(latest) and not latest.is_file()):
        raise ConfigError(f"train.output_dir: {latest} is a {'directory' if latest.is_dir() else 'special file'}; oaif "
                          f"keeps the name of the newest checkpoint there: move it away")
    if overwrite or not out.is_dir():
        return
    for p in sorted(out.iterdir()):
        if re.match(r"^checkpoint-\d+$", p.name) and (p.is_symlink() or not p.is_dir()):
            raise ConfigError(f"train.output_dir: {p} exists and is not a checkpoint directory, where the run "
                              f"would write one: move it away")


#: The logs of a run, which hold its paid judgments even before its first checkpoint.
RUN_LOGS = ("metrics.jsonl", "annotations.jsonl")


def check_resumable(path: str | os.PathLike) -> None:
    """``train.resume=true`` where there is no checkpoint starts from step 0, unless an earlier run left
    its logs there (one stopped before its first save): starting them over would lose them, so it is
    refused as a fresh run over an earlier one is. Raises :class:`ConfigError`; changes nothing."""
    from oaif.run.checkpoint import latest_checkpoint

    out = Path(path)
    logs = [name for name in RUN_LOGS if (out / name).is_file() and (out / name).stat().st_size > 0]
    if logs and latest_checkpoint(out) is None:
        raise ConfigError(f"train.resume=true: {path} has no checkpoint, but holds an earlier run's {', '.join(logs)} "
                          f"(a run stopped before its first save), which a start from step 0 would replace; to "
                          f"start over, rerun with train.resume=false and train.overwrite_output_dir=true, or "
                          f"choose another train.output_dir")


def clear_previous_run(path: str | os.PathLike) -> list[Path]:
    """Delete what :func:`previous_run` finds (checkpoints, ``latest``, metrics, audit log, config); return it.

    Other files in the directory (the user's, ``eval/``) are left alone.
    """
    import shutil

    old = previous_run(path)
    latest = Path(path) / "latest"
    if latest in old:  # first, so that no reader follows it into a checkpoint being deleted
        latest.unlink()
    for p in old:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return old
