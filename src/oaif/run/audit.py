"""The annotation audit log, ``annotations.jsonl``: every judgment of every process, once.

Each process keeps its micro-batches' judgment lines during a step; at the end of the step the
lines are gathered to every process and the main process writes them, micro-batch by
micro-batch and, within one, in process order, which is the order of the prompts in the step's
global batch. A run on N processes therefore writes the same lines, in the same order, as one
process with the same global batch. Lines carry the step they belong to; on resume the lines
of steps after the checkpoint are cut, as in ``metrics.jsonl``, so an interrupted and resumed
run's log reads like an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from oaif.annotators.base import Judgment
from oaif.run.metrics import open_step_log
from oaif.step.records import PairPlan, Rollouts


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def judgment_lines(step: int, rollouts: Rollouts, plan: PairPlan, judgments: list[Judgment],
                   policy_version: int) -> list[str]:
    """One JSON line per judged pair: the prompt id, short hashes of both responses, the probabilities, and
    the policy version that sampled the responses (optimizer steps; ``step - 1`` unless ``train.async_steps``)."""
    lines = []
    for (b, ka, kb), j in zip(plan.pairs, judgments):
        lines.append(json.dumps({
            "step": step, "prompt_id": rollouts.prompt_ids[b], "a": _digest(rollouts.texts[b][ka]),
            "b": _digest(rollouts.texts[b][kb]), "prob_ab": j.prob_ab, "prob_ba": j.prob_ba, "prob": j.prob,
            "latency_s": round(j.latency_s, 6), "judge": j.judge, "failure": j.failure,
            "policy_version": policy_version}))
    return lines


class AuditLog:
    """Collects a step's judgment lines on every process; :meth:`flush` writes them from the main one.

    ``path=None`` (``annotator.audit_log=false``, offline mode) keeps nothing; every process of a
    run must agree on it, since :meth:`flush` is a collective call otherwise.
    """

    def __init__(self, path: Path | None, *, is_main: bool, resume_step: int | None):
        self.enabled = path is not None
        self._file = open_step_log(path, resume_step) if self.enabled and is_main else None
        self._micro_batches: list[list[str]] = []

    def add(self, step: int, rollouts: Rollouts, plan: PairPlan, judgments: list[Judgment], policy_version: int) -> None:
        if self.enabled:
            self._micro_batches.append(judgment_lines(step, rollouts, plan, judgments, policy_version))

    def flush(self, accelerator) -> None:
        """Write the step's lines of every process (a collective call with several processes)."""
        if not self.enabled:
            return
        mine, self._micro_batches = self._micro_batches, []
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            per_process = gather_object([mine])  # [process][micro-batch][line]
            mine = [[line for proc in per_process for line in proc[m]] for m in range(len(mine))]
        if self._file is not None:
            self._file.write("".join(line + "\n" for lines in mine for line in lines))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
