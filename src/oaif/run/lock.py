"""An exclusive lock on a run directory, so that two runs never write into one.

The lock is ``fcntl.flock`` on ``<output_dir>/.oaif-lock``, taken by the main process before the
run writes anything there. The file holds who holds it (pid, host, start time) for the error a
second run gets. The kernel drops a flock when its process dies (even by SIGKILL), so a lock
file left by a dead run never blocks the next one; the file itself stays. The lock keeps other
processes out; within one process it is shared (counted), so a trainer that was set up and not run
does not block the next one there.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from oaif.errors import CheckpointError

LOCK_FILE = ".oaif-lock"

#: Locks this process holds: resolved lock path -> [descriptor, holders].
_HELD: dict[Path, list[int]] = {}


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown: it is just starting"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


class RunLock:
    """``with RunLock(dir):`` or :meth:`acquire` / :meth:`release`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._key: Path | None = None

    def acquire(self) -> "RunLock":
        """Take the lock (creating the directory), or raise :class:`CheckpointError` naming its holder."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return self
        if self._key is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:  # this process holds it already
            _HELD[key][1] += 1
            self._key = key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointError(f"train.output_dir: {self.directory} is in use by another run ({_holder(self.path)}); "
                                  f"wait for it to end, or choose another train.output_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        held = _HELD.get(key) if key is not None else None
        if held is not None:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # closing the descriptor drops the flock

    def __del__(self) -> None:  # a trainer set up but never run still lets go of the directory
        self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
