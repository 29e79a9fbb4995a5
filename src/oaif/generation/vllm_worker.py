"""A vLLM worker extension that reloads weights correctly on CPU: ``--worker-extension-cls`` names it.

vLLM's own ``reload_weights`` copies new values into the model, but on the CPU backend every
linear layer computes from a *packed copy* of its weight (oneDNN/SGL prepacking, made when the
weights are processed after loading). Layers that receive weights are re-packed; a language-
model head *tied* to the input embeddings receives none (its weight is the embedding's), so it
keeps multiplying by the old embedding matrix. With SmolLM2 (tied) every reload after the first
change of the embeddings would sample from a model that exists nowhere.

:meth:`WeightSyncExtension.oaif_reload_weights` reloads, then re-packs the head from its current
weight (and keeps vLLM from warning, at every reload, that the rotary embeddings and a tied head
"failed to load" the weights they never take). It is this module's only job; it must stay
importable without importing vLLM at module level, because vLLM imports it by name inside its
worker (also in a server process).

Server::

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model DIR \\
        --worker-extension-cls oaif.generation.vllm_worker.WeightSyncExtension ...

then ``POST /collective_rpc {"method": "oaif_reload_weights", "kwargs": {"weights_path": DIR}}``.

``vllm.weight_sync=collective`` (:mod:`oaif.generation.vllm_collective`, the trainer's side) calls
``oaif_sync_info`` (one answer per worker: the group's size), ``oaif_join_group`` (the worker joins
the trainer's group, :mod:`oaif.generation.weight_group`) and, at every push, ``oaif_receive_weights``,
which loads the tensors bucket by bucket as they arrive, through the same reload as a directory.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

#: The dotted name to pass as ``worker_extension_cls`` (``--worker-extension-cls``).
EXTENSION = "oaif.generation.vllm_worker.WeightSyncExtension"
#: vLLM's logger for in-place reloads, and its warning about a layer that received no weights.
_RELOAD_LOGGER, _NO_WEIGHTS = "vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights"


class _LayersWithoutWeights(logging.Filter):
    """Drops vLLM's "Failed to load weights" for layers that get none by design: rotary embeddings (computed,
    not loaded) and a tied output head (its weight is the embeddings'; :func:`repack_lm_head` re-packs it).
    Any other layer that gets no weights is still reported."""

    def __init__(self, tied_head: bool):
        super().__init__()
        self.tied_head = tied_head

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _NO_WEIGHTS or not record.args:
            return True
        layer = str(record.args[0])
        return not (layer.endswith("RotaryEmbedding") or (self.tied_head and layer == "ParallelLMHead"))


@contextmanager
def _expected_warnings_dropped(model: torch.nn.Module) -> Iterator[None]:
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    log, quiet = logging.getLogger(_RELOAD_LOGGER), _LayersWithoutWeights(tied)
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def repack_lm_head(model: torch.nn.Module) -> bool:
    """Redo the head's post-load processing (its packed weight) from its current weight; True if done."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    method = getattr(head, "quant_method", None)
    if weight is None or weight.numel() == 0 or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(head)
    return True


class WeightSyncExtension:
    """Methods added to vLLM's worker class; called through ``collective_rpc`` by name."""

    def oaif_reload_weights(self, weights_path: str | None = None,
                            weights_iterator: Iterable[tuple[str, torch.Tensor]] | None = None) -> bool:
        """Load new weights in place (from a directory or (name, tensor) pairs), then re-pack the head."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with _expected_warnings_dropped(model):
            self.reload_weights(weights_iterator=weights_iterator, weights_path=weights_path)  # type: ignore[attr-defined]
        return repack_lm_head(model)

    # -- vllm.weight_sync=collective ------------------------------------------------------------
    def oaif_sync_info(self) -> dict:
        """This worker's rank among the server's workers (the trainer sizes the group by the answers) and its
        GPU's UUID, if any (NCCL cannot put the trainer and a worker on one GPU)."""
        from oaif.generation.weight_group import gpu_id

        return {"rank": int(getattr(self, "rank", 0)), "gpu": gpu_id()}

    def oaif_join_group(self, host: str, port: int, size: int, backend: str, timeout_s: float) -> int:
        """Join the trainer's weight-sync group as rank 1 + this worker's rank; returns that rank."""
        from oaif.generation import weight_group as wg

        old = getattr(self, "_oaif_group", None)
        if old is not None:  # a group of an earlier run (a trainer that restarted)
            old.close()
            self._oaif_group = None
        rank, port, size, timeout_s = 1 + int(getattr(self, "rank", 0)), int(port), int(size), float(timeout_s)
        store = wg.connect_store(host, port, size, timeout_s)
        self._oaif_group = wg.join_group(store, rank=rank, size=size, backend=backend, timeout_s=timeout_s,
                                         address=wg.local_address_towards(host, port))
        self._oaif_group.store = store
        return rank

    def oaif_receive_weights(self) -> bool:
        """Receive one push from the trainer and load it in place (then re-pack a tied head)."""
        from oaif.generation import weight_group as wg

        group = getattr(self, "_oaif_group", None)
        if group is None:
            raise RuntimeError("oaif_receive_weights: no weight-sync group; call oaif_join_group first")
        incoming = wg.receive_weights(group)
        try:
            return self.oaif_reload_weights(weights_iterator=incoming)
        finally:
            for _ in incoming:  # a load that stopped early: take the rest, so the trainer is not left waiting
                pass
