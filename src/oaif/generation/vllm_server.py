"""Sampling from a vLLM OpenAI-compatible server, which reloads the policy's weights after each step.

Each sampled response is one ``POST /v1/completions`` with the prompt's token ids, its own seed
and oaif's stop rule; the requests of a step are sent together, and the server batches them.
``return_token_ids`` gives the response tokens back without a detokenize/retokenize round trip.

After an optimizer step :meth:`VllmServer.load_weights` writes the weights to
``vllm.weights_dir`` and asks the server to reload them in place, ``POST /collective_rpc``
(``oaif_reload_weights`` with ``weights_path``, from :mod:`oaif.generation.vllm_worker`), then
``POST /reset_prefix_cache``. Both endpoints exist only when the server runs with
``VLLM_SERVER_DEV_MODE=1``; the method only with oaif's worker extension; and the server must
see the directory (same machine or a shared file system). Start it, for example, with::

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model DIR \\
        --worker-extension-cls oaif.generation.vllm_worker.WeightSyncExtension \\
        --no-enable-chunked-prefill --max-num-batched-tokens 2048 --max-model-len 2048 \\
        --logprobs-mode raw_logprobs

Chunked prefill must be off on CPU: a seeded request whose prompt is prefilled in chunks fails
there ("CPU Generator does not use offset"). This client talks HTTP only (standard library); it
does not import vLLM.

``vllm.weight_sync=collective`` skips the directory: the trainer and the server's workers join one
process group (gloo on CPU, NCCL on GPUs) on the first push, and every push sends the tensors in
buckets through it (:mod:`oaif.generation.vllm_collective`, :mod:`oaif.generation.weight_group`); the
prefix cache is reset as after a reload. The NCCL backend has not run here (no GPU); gloo is tested
against a real server. vLLM 0.32 also serves its own NCCL weight-transfer routes
(``/init_weight_transfer_engine`` ...), which oaif does not use: its worker extension works the same
on CPU and GPUs.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch

from oaif.config import VllmConfig
from oaif.errors import ConfigError
from oaif.generation.base import GenerationError, StopRules, regroup, request_params, sample_rows
from oaif.generation.vllm_worker import EXTENSION
from oaif.generation.weights import save_weights, take_part

_CHUNKED_HINT = ("; the server prefilled a seeded prompt in chunks, which fails on CPU: restart it with "
                 "--no-enable-chunked-prefill and --max-num-batched-tokens >= --max-model-len")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _http_url(url: str) -> str:
    """``vllm.server_url`` if it is an http(s) URL with a host (and a numeric port, if any)."""
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number
        ok = False
    if not ok:
        raise ConfigError(f"vllm.server_url={url}: not an http(s) URL (e.g. http://127.0.0.1:8000)")
    return url


class VllmServer:
    """A client of one vLLM server: samples K responses per prompt and pushes new weights to it."""

    def __init__(self, stop: StopRules, settings: VllmConfig | None = None, *, weights_dir: str | Path,
                 vocab_size: int | None = None):
        settings = settings or VllmConfig(mode="server")
        settings.validate()
        self.stop, self.vocab_size = stop, vocab_size
        self.url = _http_url(settings.server_url).rstrip("/")
        self.timeout = settings.request_timeout_s
        self.max_concurrency = settings.max_concurrency
        self.weights_dir = Path(weights_dir).resolve()
        self.model = settings.server_model or self._first_model()
        self.collective = None
        if settings.weight_sync == "collective":
            from oaif.generation.vllm_collective import CollectiveSync

            self.collective = CollectiveSync(self._request, settings, self.url)

    # -- HTTP ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict | None:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = _one_line(e.read().decode(errors="replace"))
            if e.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache"):
                raise GenerationError(f"the vLLM server at {self.url} does not accept weight reloads ({path} not "
                                      "found): start it with VLLM_SERVER_DEV_MODE=1") from e
            hint = _CHUNKED_HINT if "does not use offset" in detail else ""
            if path == "/collective_rpc":
                hint = f"; was the server started with --worker-extension-cls {EXTENSION}?"
            raise GenerationError(f"the vLLM server at {self.url} answered {method} {path} with HTTP {e.code}: "
                                  f"{detail}{hint}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise GenerationError(f"cannot reach the vLLM server at {self.url} ({method} {path}): {reason}") from e
        except http.client.HTTPException as e:  # IncompleteRead: the server died while it answered
            raise GenerationError(f"the vLLM server at {self.url}: the connection broke in the middle of the answer "
                                  f"to {method} {path} ({type(e).__name__}); did the server stop?") from e
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise GenerationError(f"the vLLM server at {self.url} sent non-JSON for {path}: {_one_line(raw[:200])}") from e

    def _first_model(self) -> str:
        listing = self._request("GET", "/v1/models") or {}
        models = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if not models or not models[0]:
            raise GenerationError(f"the vLLM server at {self.url} lists no model")
        return models[0]

    # -- sampling -----------------------------------------------------------------------------
    def _complete(self, body: dict) -> tuple[list[int], list[float] | None]:
        """The completion's token ids, and (``body`` asks for ``logprobs``) their log-probs."""
        reply = self._request("POST", "/v1/completions", body) or {}
        try:
            tokens = reply["choices"][0]["token_ids"]
        except (KeyError, IndexError, TypeError) as e:
            raise GenerationError(f"the vLLM server at {self.url} returned no token_ids (a vLLM server that "
                                  f"supports return_token_ids is needed): {_one_line(str(reply)[:200])}") from e
        tokens = self._checked(tokens, body["max_tokens"])
        if body.get("logprobs") is None:
            return tokens, None
        try:
            logprobs = reply["choices"][0]["logprobs"]["token_logprobs"]
        except (KeyError, IndexError, TypeError) as e:
            raise GenerationError(f"the vLLM server at {self.url} returned no logprobs.token_logprobs: "
                                  f"{_one_line(str(reply)[:200])}") from e
        if (not isinstance(logprobs, list) or len(logprobs) != len(tokens)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in logprobs)):
            raise GenerationError(f"the vLLM server at {self.url} returned token_logprobs that are not one number "
                                  f"per token: {_one_line(repr(logprobs), 200)}")
        return tokens, [float(v) for v in logprobs]

    def _checked(self, tokens, max_tokens: int) -> list[int]:
        """The completion's token ids, if they can be a response of this policy to this request."""
        where = f"the vLLM server at {self.url} returned"
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise GenerationError(f"{where} token_ids that are not token ids: {_one_line(repr(tokens), 200)}")
        if self.vocab_size is not None and (bad := [t for t in tokens if not 0 <= t < self.vocab_size]):
            raise GenerationError(f"{where} token id {bad[0]} outside the model's vocabulary (0-{self.vocab_size - 1}): "
                                  f"does it serve another model than model.name_or_path?")
        if not tokens:  # vLLM samples at least one token for max_tokens >= 1 (the stop token is kept)
            raise GenerationError(f"{where} an empty completion (no token), which vLLM never sends")
        if len(tokens) > max_tokens:
            raise GenerationError(f"{where} {len(tokens)} tokens, more than the max_tokens={max_tokens} it was asked for")
        return tokens

    def sample(self, prompt_tokens: list[list[int]], positions: list[int], *, k: int, seed: int,
               temperature: float, top_p: float, max_new_tokens: int, logprobs: bool = False):
        """``(responses[b][k], ended_eos[b][k])``; one completion request per response, seeded per row.

        ``logprobs``: also each sampled token's log-prob (``logprobs=0``: the sampled token's only). They
        are raw (before temperature and top-p) when the server runs with ``--logprobs-mode raw_logprobs``,
        vLLM's default; a server started with a ``processed_*`` mode sends others, which this client
        cannot tell apart (``logprob_gap`` then also measures the sampling settings)."""
        rows = sample_rows(prompt_tokens, positions, k, seed)
        bodies = []
        for row in rows:
            params = request_params(row.seed, temperature, top_p, max_new_tokens, self.stop)
            params.pop("n")
            extra = dict(logprobs=0, return_tokens_as_token_ids=True) if logprobs else {}
            bodies.append(dict(params, model=self.model, prompt=row.prompt, return_token_ids=True,
                               skip_special_tokens=False, stream=False, **extra))
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(1, len(bodies)))) as pool:
            outputs = list(pool.map(self._complete, bodies))
        tokens = [t for t, _ in outputs]
        return regroup(rows, tokens, self.stop, len(prompt_tokens), k, [lp for _, lp in outputs] if logprobs else None)

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send the weights (``vllm.weight_sync=collective``), or save them to ``weights_dir`` and have the
        server reload them; then reset its prefix cache."""
        if self.collective is not None:
            self.collective.push(weights)
        else:
            save_weights(weights, self.weights_dir)
            self._request("POST", "/collective_rpc", {"method": "oaif_reload_weights",
                                                      "kwargs": {"weights_path": str(self.weights_dir)}})
        self._request("POST", "/reset_prefix_cache")

    def close(self) -> None:
        """Leave the weight-sync group, if any; the server belongs to whoever started it."""
        if self.collective is not None:
            self.collective.close()


class SharedServer:
    """One server shared by several training processes: each samples its own prompts through ``client``;
    the main process pushes the weights (the processes hold the same ones after a step), and every
    process waits until the server has them, so no process samples the old weights after a step. A sharded
    policy's weights are gathered one at a time on every process: the others iterate them without sending,
    and the main process runs the rest of the gathers when its push stops part way."""

    def __init__(self, client: VllmServer, accelerator):
        self.client, self.accelerator = client, accelerator

    def sample(self, prompt_tokens: list[list[int]], positions: list[int], **kwargs):
        return self.client.sample(prompt_tokens, positions, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        try:
            if self.accelerator.is_main_process:
                self.client.load_weights(weights)
        finally:
            take_part(weights)  # sharded: every process takes part in every gather
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        self.client.close()
