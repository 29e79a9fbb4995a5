"""An exclusive lock on a run directory, so that two runs never write into one.

The lock is ``fcntl.flock`` on ``<output_dir>/.oaif-lock``, taken by the main process before the
run writes anything there. The file holds who holds it (pid, host, start time) for the error a
second run gets. The kernel drops a flock when its process dies (even by SIGKILL), so a lock
file left by a dead run never blocks the next one; the file itself stays.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from oaif.errors import CheckpointError

LOCK_FILE = ".oaif-lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown: it is just starting"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


class RunLock:
    """``with RunLock(dir):`` or :meth:`acquire` / :meth:`release`. Not re-entrant."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock (creating the directory), or raise :class:`CheckpointError` naming its holder."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
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
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:  # a trainer set up but never run still lets go of the directory
        self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
