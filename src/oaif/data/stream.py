"""The resumable prompt stream.

:class:`PromptStream` is an endless, deterministic stream over the records: the record at a
given stream position is a pure function of ``(seed, position)``, so a checkpoint only needs the
position to continue exactly where a run stopped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Generic

from oaif.data.records import R
from oaif.errors import DataError


class PromptStream(Generic[R]):
    """An endless, deterministic stream over ``records``, epoch after epoch.

    With ``shuffle`` each epoch is a fresh permutation drawn from ``(seed, epoch)``; without it,
    the records repeat in their given order. :attr:`position` counts records consumed so far;
    the record at any position is a pure function of ``(seed, position)``, so
    :meth:`state_dict` only needs the position to resume exactly.
    """

    def __init__(self, records: Sequence[R], seed: int = 0, shuffle: bool = True) -> None:
        if len(records) == 0:
            raise DataError("no records to stream (every row was empty, too long or skipped)")
        self.records: list[R] = list(records)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._position = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def position(self) -> int:
        """Number of records consumed so far (over all epochs)."""
        return self._position

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            perm = list(range(len(self.records)))
            if self.shuffle:
                random.Random(f"oaif-stream:{self.seed}:{epoch}").shuffle(perm)
            self._perm, self._perm_epoch = perm, epoch
        return self._perm

    def record_at(self, position: int) -> R:
        """The record served at stream ``position`` (does not move the stream)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        epoch, offset = divmod(position, len(self.records))
        return self.records[self._order(epoch)[offset]]

    def take(self, n: int) -> list[tuple[int, R]]:
        """The next ``n`` records, each with its stream position; advances :attr:`position` by ``n``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        start = self._position
        out = [(pos, self.record_at(pos)) for pos in range(start, start + n)]
        self._position = start + n
        return out

    def take_for_rank(self, n_global: int, rank: int, world_size: int) -> list[tuple[int, R]]:
        """Take the next ``n_global`` records for all processes and return ``rank``'s contiguous slice.

        Every rank advances :attr:`position` by ``n_global``; the slices of ranks ``0..world_size-1``
        concatenated equal ``take(n_global)`` on a single process. When ``n_global`` is not a
        multiple of ``world_size`` the first ``n_global % world_size`` ranks get one extra record.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if n_global < 0:
            raise ValueError(f"n_global must be >= 0, got {n_global}")
        base, extra = divmod(n_global, world_size)
        lo = rank * base + min(rank, extra)
        hi = lo + base + (1 if rank < extra else 0)
        start = self._position
        out = [(pos, self.record_at(pos)) for pos in range(start + lo, start + hi)]
        self._position = start + n_global
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self._position, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. The saved seed, shuffle flag and record count, when present, must
        match this stream: otherwise the same position would serve different records."""
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise DataError(f"prompt stream state has no valid position (got {position!r})")
        mine = self.state_dict()
        for key in ("num_records", "seed", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"cannot resume the prompt stream: the checkpoint has {key}={state[key]!r}, "
                                f"this run has {key}={mine[key]!r} (same data and train.seed needed)")
        self._position = position
