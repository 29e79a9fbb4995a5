"""A callable judge whose import (while ``oaif train`` sets up, before any step) sends SIGTERM to
its own process: a stop that arrives during setup (model loading, say)."""

import os
import signal

os.kill(os.getpid(), signal.SIGTERM)


def judge(prompt: str, a: str, b: str) -> float:
    return 0.5
