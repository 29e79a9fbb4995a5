"""``vllm.weight_sync=collective``: the trainer's side of pushing weights to a vLLM server without the disk.

The first push forms the group (:mod:`oaif.generation.weight_group`): ``oaif_sync_info`` (through
``POST /collective_rpc``) counts the server's workers, the trainer hosts a TCP store on
``vllm.sync_host:vllm.sync_port``, and ``oaif_join_group`` has every worker join it while the trainer
joins as rank 0. Every push then asks the workers to receive (``oaif_receive_weights``, an HTTP
call that returns once the weights are loaded, made from a thread) while this process sends the
buckets. The server needs what the disk path needs (``VLLM_SERVER_DEV_MODE=1``, oaif's worker
extension) and must reach the trainer at ``vllm.sync_host`` (gloo then also connects from the trainer
to each worker, at the worker's address on that route).

Every failure is one line (:class:`GenerationError`): a server without the extension, a group that does
not form within ``vllm.sync_timeout_s``, a transfer cut by a server that stopped. A failed push drops
the group; the next push forms a new one.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable, Iterable

import torch

from oaif.config import VllmConfig
from oaif.generation import weight_group as wg
from oaif.generation.base import GenerationError


class _Call(threading.Thread):
    """One HTTP call in a thread (a collective_rpc that returns only when the other side of the group is done)."""

    def __init__(self, fn: Callable[[], object]):
        super().__init__(daemon=True)  # a call left hanging by a dead server must not keep the trainer alive
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller by outcome()
            self.error = e

    def outcome(self, timeout: float):
        self.join(timeout)
        if self.is_alive():
            raise GenerationError(f"no answer within {timeout:g}s (vllm.sync_timeout_s)")
        if self.error is not None:
            raise self.error
        return self.result


class CollectiveSync:
    """Pushes weights to one server through a process group it forms on the first push."""

    def __init__(self, request: Callable[..., dict | None], settings: VllmConfig, url: str):
        self.request, self.settings, self.url = request, settings, url
        self.group: wg.WeightGroup | None = None

    def _rpc(self, method: str, **kwargs) -> list:
        reply = self.request("POST", "/collective_rpc", {"method": method, "kwargs": kwargs}) or {}
        results = reply.get("results") if isinstance(reply, dict) else None
        if not isinstance(results, list) or not results:
            raise GenerationError(f"the vLLM server at {self.url} answered {method} without results: {str(reply)[:200]}")
        return results

    def _join(self, device: torch.device) -> wg.WeightGroup:
        s = self.settings
        workers = self._rpc("oaif_sync_info")
        backend = wg.resolve_backend(s.sync_backend, device, [w.get("gpu") for w in workers if isinstance(w, dict)])
        size = 1 + len(workers)
        store = wg.host_store(s.sync_host, s.sync_port, size, s.sync_timeout_s)
        call = _Call(lambda: self._rpc("oaif_join_group", host=s.sync_host, port=store.port, size=size,
                                       backend=backend, timeout_s=s.sync_timeout_s))
        try:
            group = wg.join_group(store, rank=0, size=size, backend=backend, timeout_s=s.sync_timeout_s,
                                  address=s.sync_host)
        except GenerationError as e:
            reason = self._call_error(call)  # the server's answer says more than the timeout, when it has one
            raise GenerationError(f"the vLLM server at {self.url} did not join the weight-sync group at "
                                  f"{s.sync_host}:{store.port}: {reason or e} (can it reach vllm.sync_host?)") from e
        group.store = store
        call.outcome(s.sync_timeout_s)
        return group

    @staticmethod
    def _call_error(call: _Call, wait: float = 5.0) -> str | None:
        call.join(wait)
        return None if call.is_alive() or call.error is None else str(call.error)

    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send every weight to the server, which loads them in place; the bytes sent."""
        weights = iter(weights)
        first = next(weights, None)
        if first is None:
            raise GenerationError("no weights to send")
        device = first[1].device
        # no reference kept here: a gathered tensor (a sharded policy) is dropped once it is packed
        weights, first = itertools.chain([first], weights), None
        if self.group is None:
            self.group = self._join(device)
        call = _Call(lambda: self._rpc("oaif_receive_weights"))
        try:
            sent = wg.send_weights(self.group, weights, self.settings.sync_bucket_mib * 2**20)
        except RuntimeError as e:  # the group broke: a server that stopped, or a transfer past the timeout
            self.close()
            reason = self._call_error(call)
            detail = " ".join(str(e).split())[:200]
            raise GenerationError(f"sending the weights to the vLLM server at {self.url} failed: "
                                  f"{reason or detail}; did the server stop?") from e
        try:
            call.outcome(self.settings.sync_timeout_s)
        except GenerationError:
            self.close()
            raise
        return sent

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
