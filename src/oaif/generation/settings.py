"""The ``vllm`` config group: how the vLLM sampling backend (``sampling.backend=vllm``) runs.

A plain dataclass with help on every key, in the form of :mod:`oaif.config`'s groups, so it
can be added to :class:`oaif.config.Config` as ``vllm: VllmConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class VllmConfig:
    mode: str = _f("colocated", "colocated (a vLLM engine inside the training process; weights copied in place "
                                "after every optimizer step) or server (an OpenAI-compatible `vllm serve` at "
                                "vllm.server_url; it reloads the weights from vllm.weights_dir).")
    server_url: str = _f("http://127.0.0.1:8000", "Server mode: base URL of the vLLM server (started with "
                                                  "VLLM_SERVER_DEV_MODE=1 so it accepts weight reloads).")
    server_model: str | None = _f(None, "Server mode: the served model name to request (default: the first the server lists).")
    weights_dir: str | None = _f(None, "Server mode: directory the new weights are written to for the server to reload "
                                       "(it must see the same file system; default: <train.output_dir>/vllm_weights).")
    request_timeout_s: float = _f(600.0, "Server mode: seconds to wait for one completion or weight reload.")
    max_concurrency: int = _f(64, "Server mode: completion requests in flight at once (one per sampled response).")
    kv_cache_gib: float = _f(1.0, "Colocated: memory for the engine's KV cache, in GiB (CPU RAM on CPU; preempted "
                                  "requests are recomputed if it is too small).")
    max_model_len: int = _f(0, "Colocated: longest prompt + response the engine accepts "
                               "(0: data.max_prompt_tokens + sampling.max_new_tokens).")
    max_num_seqs: int = _f(64, "Colocated: most sequences decoded together.")
    dtype: str = _f("auto", "Colocated: engine weights dtype (auto: the policy's dtype; float32, bfloat16, float16).")
    enforce_eager: bool = _f(True, "Colocated: run the model eagerly (no torch.compile; starts in seconds, the "
                                   "compile cache is not reused between runs).")

    def validate(self) -> None:
        from oaif.errors import ConfigError

        if self.mode not in ("colocated", "server"):
            raise ConfigError(f"vllm.mode: expected colocated or server, got {self.mode!r}")
        if self.kv_cache_gib <= 0:
            raise ConfigError(f"vllm.kv_cache_gib: must be > 0, got {self.kv_cache_gib}")
        if self.max_model_len < 0:
            raise ConfigError(f"vllm.max_model_len: must be >= 0, got {self.max_model_len}")
        if self.max_num_seqs < 1 or self.max_concurrency < 1:
            raise ConfigError("vllm.max_num_seqs and vllm.max_concurrency: must be >= 1")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"vllm.request_timeout_s: must be > 0, got {self.request_timeout_s}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"vllm.dtype: expected auto, float32, bfloat16 or float16, got {self.dtype!r}")
