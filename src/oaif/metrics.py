"""Per-step metrics: summed across processes, written to JSONL, and optionally to trackers.

``metrics.jsonl`` holds one JSON object per optimizer step. On resume, lines past the resumed
step are dropped so that the file reads as one uninterrupted run. TensorBoard and W&B load
only when ``logging.report_to`` names them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from oaif.errors import ConfigError


class Sums:
    """Named (sum, count) accumulators; ``mean(name)`` is NaN-free (None when count is 0)."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        acc = self.values.setdefault(name, [0.0, 0.0])
        acc[0] += float(total)
        acc[1] += float(count)

    def merge(self, other: "Sums") -> None:
        for k, (s, c) in other.values.items():
            self.add(k, s, c)

    def reduce(self, accelerator) -> "Sums":
        """Sum every accumulator over processes (same key order on every rank is required)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        import torch

        keys = sorted(self.values)
        t = torch.tensor([self.values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        t = accelerator.reduce(t, reduction="sum")
        out = Sums()
        out.values = {k: list(map(float, row)) for k, row in zip(keys, t.cpu().tolist())}
        return out

    def mean(self, name: str) -> float | None:
        s, c = self.values.get(name, (0.0, 0.0))
        return s / c if c else None

    def total(self, name: str) -> float:
        return self.values.get(name, (0.0, 0.0))[0]


class MetricsWriter:
    """Appends one JSON line per step; forwards to TensorBoard / W&B when asked."""

    def __init__(self, path: str | Path, report_to: list[str] = (), run_name: str = "oaif", config: dict | None = None,
                 resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", buffering=1)
        self._trackers: list[Any] = []
        for name in report_to:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ConfigError("logging.report_to=tensorboard needs `pip install oaif[tensorboard]`") from None
                self._trackers.append(("tensorboard", SummaryWriter(str(self.path.parent / "tensorboard"))))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise ConfigError("logging.report_to=wandb needs `pip install oaif[wandb]`") from None
                self._trackers.append(("wandb", wandb.init(name=run_name, config=config or {}, resume="allow")))

    def _truncate_after(self, step: int) -> None:
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for kind, tracker in self._trackers:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if kind == "tensorboard":
                for k, v in scalars.items():
                    tracker.add_scalar(k, v, step)
            else:
                tracker.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        for kind, tracker in self._trackers:
            if kind == "tensorboard":
                tracker.close()
            else:
                tracker.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line is ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
