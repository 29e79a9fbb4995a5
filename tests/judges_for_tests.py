"""Callable judges for tests, loadable in subprocesses by file path: ``annotator.callable=<this file>:NAME``.

They are plain rules (no model), so tests control which pairs are usable: a prompt containing
``TIE`` is judged a tie (0.5, masked), one containing ``FAIL`` gets a NaN (a failed judgment,
masked as ``nan``). Prompt files for these tests put such prompts where one process or one
micro-batch will draw them (``data.shuffle=false``).
"""

from __future__ import annotations

import os
import signal

_calls = 0


def shorter_unless_marked(prompt: str, a: str, b: str) -> float:
    """P(a better): 1 if a is shorter (characters), 0 if longer; a tie for TIE prompts, NaN for FAIL prompts."""
    if "TIE" in prompt:
        return 0.5
    if "FAIL" in prompt:
        return float("nan")
    return 0.5 if len(a) == len(b) else float(len(a) < len(b))


def graded_by_length(prompt: str, a: str, b: str) -> float:
    """P(a better) that grows with how much shorter a is: 0.5 + 0.4 * tanh((len(b) - len(a)) / 20)."""
    import math

    return 0.5 + 0.4 * math.tanh((len(b) - len(a)) / 20)


def interrupt_main_process(prompt: str, a: str, b: str) -> float:
    """Like :func:`shorter_unless_marked`, but the main process (RANK 0) raises KeyboardInterrupt once it
    has been called ``$OAIF_TEST_INTERRUPT_AFTER`` times: one process fails while the others go on."""
    global _calls
    _calls += 1
    if os.environ.get("RANK", "0") == "0" and _calls > int(os.environ["OAIF_TEST_INTERRUPT_AFTER"]):
        raise KeyboardInterrupt
    return shorter_unless_marked(prompt, a, b)


def killed_after(prompt: str, response: str) -> float:
    """Pointwise: prefers shorter responses; SIGKILLs its own process after ``$OAIF_TEST_KILL_AFTER`` calls
    (a kill: no handler runs, nothing is saved on the way out)."""
    global _calls
    _calls += 1
    if _calls > int(os.environ.get("OAIF_TEST_KILL_AFTER", "1000000000")):
        os.kill(os.getpid(), signal.SIGKILL)
    return -float(len(response))


def signal_after(prompt: str, a: str, b: str) -> float:
    """Like :func:`shorter_unless_marked`; after ``$OAIF_TEST_SIGNAL_AFTER`` calls the main process (RANK 0)
    sends SIGTERM once, to itself (``$OAIF_TEST_SIGNAL_TO=self``) or to its parent (``parent``: the
    ``accelerate launch`` process, which passes it on to every process it started), as a scheduler would."""
    global _calls
    _calls += 1
    if os.environ.get("RANK", "0") == "0" and _calls == int(os.environ["OAIF_TEST_SIGNAL_AFTER"]) + 1:
        target = os.getppid() if os.environ.get("OAIF_TEST_SIGNAL_TO") == "parent" else os.getpid()
        os.kill(target, signal.SIGTERM)
    return shorter_unless_marked(prompt, a, b)


def gated(prompt: str, a: str, b: str) -> float:
    """Like :func:`shorter_unless_marked`, but after ``$OAIF_TEST_GATE_AFTER`` calls each call waits (up to
    300 s) until the file ``$OAIF_TEST_GATE`` exists: a run that is still going while a test races it."""
    import time

    global _calls
    _calls += 1
    deadline = time.time() + 300
    while _calls > int(os.environ["OAIF_TEST_GATE_AFTER"]) and not os.path.exists(os.environ["OAIF_TEST_GATE"]):
        if time.time() > deadline:
            break
        time.sleep(0.1)
    return shorter_unless_marked(prompt, a, b)


def always_fails(prompt: str, a: str, b: str) -> float:
    """Every judgment fails (NaN), as with a broken annotator."""
    return float("nan")


def fails_while_broken(prompt: str, a: str, b: str) -> float:
    """Every judgment fails (NaN) while ``$OAIF_TEST_JUDGE_BROKEN`` is 1, as a server that is down and
    later back; otherwise like :func:`shorter_unless_marked`."""
    if os.environ.get("OAIF_TEST_JUDGE_BROKEN") == "1":
        return float("nan")
    return shorter_unless_marked(prompt, a, b)


def first_shown_mostly(prompt: str, a: str, b: str) -> float:
    """A position-biased judge: P(shown first better) 0.8, nudged by 0.05 toward the shorter (characters).
    Read in both orders its readings disagree on every pair and average to 0.45 or 0.55: labels that
    follow length only by a hair, with a both-order consistency of 0 (what the embedded judge does)."""
    return 0.8 + (0.05 if len(a) < len(b) else -0.05 if len(a) > len(b) else 0.0)


def kills_a_server(prompt: str, a: str, b: str) -> float:
    """Like :func:`shorter_unless_marked`; the first call SIGKILLs the process group ``$OAIF_TEST_KILL_PGID``
    (a vLLM server and its engine): a server that dies after a step's sampling, before its weight push."""
    global _calls
    _calls += 1
    if _calls == 1:
        os.killpg(int(os.environ["OAIF_TEST_KILL_PGID"]), signal.SIGKILL)
    return shorter_unless_marked(prompt, a, b)
