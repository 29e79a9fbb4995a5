"""The config's typed groups: one dataclass per group, each field with its default and its help.

Every field carries its help text in ``metadata["help"]``; ``oaif config keys`` prints it
(:func:`describe`). Reading values is :mod:`oaif.config.load`, checking them :mod:`oaif.config.validate`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from oaif.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _group(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "Train a LoRA adapter (peft) instead of all weights; the reference is the base with the adapter disabled.")
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get adapters.")


@dataclass
class ModelConfig:
    name_or_path: str = _f("smollm2-135m-instruct", "Policy: a Hugging Face id, a local directory, a .gguf file, or 'smollm2-135m-instruct' (embedded).")
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16, float16 (LoRA only: full fine-tuning in float16 "
                               "underflows AdamW) or auto.")
    cache_dir: str | None = _f(None, "Where converted GGUF models are cached (default: $OAIF_CACHE or ~/.cache/oaif).")
    chat_template: bool = _f(True, "Apply the tokenizer's chat template to prompts.")
    system_prompt: str | None = _f(None, "Optional system message prepended to every prompt.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the policy's backward pass.")
    trust_remote_code: bool = _f(False, "Allow custom model code from the model directory.")
    disable_dropout: bool = _f(True, "Turn off every dropout in the policy and reference (as TRL does): a policy with dropout would disagree with the reference on identical weights, biasing the margin and KL.")
    lora: LoraConfig = _group(LoraConfig, "LoRA adapter settings.")


@dataclass
class DataConfig:
    path: str = _f("data/prompts/demo_prompts.jsonl", "Prompt file (JSONL, CSV, Parquet) or a `datasets.save_to_disk` directory.")
    format: str = _f("auto", "auto, jsonl, csv, parquet or hf_disk.")
    field: str = _f("prompt", "Column holding the prompt: plain text or a list of chat messages.")
    max_prompt_tokens: int = _f(256, "Prompts longer than this (after the chat template) are skipped and counted.")
    eval_fraction: float = _f(0.0, "Fraction of prompts held out for evaluation (0 disables the split).")
    eval_path: str | None = _f(None, "Separate held-out prompt file (overrides eval_fraction).")
    shuffle: bool = _f(True, "Shuffle prompts each epoch (deterministic from train.seed).")
    preference_path: str | None = _f(None, "Offline mode: JSONL of prompt, chosen, rejected and optional probability.")


@dataclass
class SamplingConfig:
    num_samples: int = _f(2, "Responses sampled per prompt from the current policy (K >= 2; K >= 3 with pairing=best_worst).")
    pairing: str = _f("disjoint", "How K responses form pairs: disjoint ((0,1),(2,3),...; K even), all (every pair), or best_worst (K >= 3: every pair is judged, each response scored by its mean win probability over its successful comparisons, and one pair per prompt trained on: the best against the worst, label (1 + s_best - s_worst) / 2 with loss.soft_labels, else 1; a prompt whose ranking is undetermined is masked, see masked/undetermined_*).")
    temperature: float = _f(0.9, "Sampling temperature (> 0).")
    top_p: float = _f(1.0, "Nucleus sampling threshold in (0, 1].")
    max_new_tokens: int = _f(64, "Longest response, in tokens.")
    batch_size: int = _f(0, "Prompts per generation batch (0: all prompts of a step at once).")
    backend: str = _f("shared_prefill", "shared_prefill (prompt prefilled once, KV cache shared by K samples), hf (transformers generate) or vllm (a vLLM engine or server, see the vllm group; sampling.batch_size does not apply).")


#: ``annotator.model`` naming the policy being trained as its own judge (self-judging; oaif train only).
POLICY_JUDGE = "policy"


@dataclass
class AnnotatorConfig:
    type: str = _f("llm", "llm (in-process judge model), openai (any OpenAI-compatible server), reward_model (a sequence-classification model at annotator.model), callable (a Python function) or ensemble.")
    model: str = _f("smollm2-135m-instruct", "Judge model for type=llm (same forms as model.name_or_path), or "
                                             "'policy': the policy being trained judges its own samples with its current "
                                             "weights (self-judging, Online Self-Preferring, Zhai et al. 2024), in the "
                                             "trainer's process, no second copy (a LoRA policy judges with its adapter on; "
                                             "annotator.dtype does not apply: it judges in the policy's dtype under "
                                             "train.mixed_precision). oaif train only; a type other than llm is refused. "
                                             "Recommended with loss.soft_labels=true: OSP trains on the self-judged "
                                             "preference strength. A model directory named policy: write ./policy.")
    rubric: str = _f("helpful", "A shipped rubric name (helpful, harmless, summarize, helpful_short, helpful_very_short) or a path to a rubric YAML file.")
    callable: str | None = _f(None, "type=callable: 'module:function' of (prompt, a, b) -> P(a better), or of (prompt, response) -> score.")
    both_orders: bool = _f(True, "Ask in both orders and average, cancelling position bias.")
    batch_size: int = _f(8, "Judge prompts per forward pass.")
    max_length: int = _f(1024, "Longest judge prompt in tokens; longer pairs fail with reason 'too_long'.")
    dtype: str = _f("float32", "Judge weights dtype.")
    members: list = _f([], "type=ensemble: member judges, each a mapping of annotator keys, e.g. [{type: llm, rubric: helpful}, {type: callable, callable: 'oaif.annotators.rules:prefer_shorter'}].")
    ensemble_mode: str = _f("mean", "type=ensemble: mean (average probability) or majority (share of members preferring a).")
    base_url: str | None = _f(None, "type=openai: the chat-completions endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp server, Ollama, OpenAI).")
    api_key_env: str = _f("OPENAI_API_KEY", "type=openai: environment variable holding the API key (never logged).")
    request_timeout: float = _f(30.0, "type=openai: deadline in seconds for one judge request (one order of one pair) from "
                                      "first connect to last byte, retries and their backoff included; past it the "
                                      "request fails as 'timeout'. A server that trickles bytes is cut at the deadline.")
    max_retries: int = _f(2, "type=openai: retries of a request after a connection error, HTTP 408/409/429 or 5xx, with "
                             "backoff (0.5 s doubling to 8 s, or the server's Retry-After); only while the deadline allows.")
    concurrency: int = _f(8, "type=openai: requests in flight at once.")
    top_logprobs: int = _f(20, "type=openai: alternatives per token to ask for (the preference is read from them).")
    audit_log: bool = _f(True, "Write every judgment to annotations.jsonl in the run directory.")
    max_failure_rate: float = _f(0.5, "Stop (after a checkpoint) when more than this fraction of pairs fail over the window.")
    failure_window: int = _f(64, "Number of most recent pairs over which the failure rate is measured.")
    noise_window: int = _f(32, "Judged pairs over which the judge's both-order consistency and mean |P - 0.5| are "
                               "measured; when both show labels no better than coin flips (consistency < 0.5 and "
                               "|P - 0.5| < 0.1) the run prints one warning. 0: no warning.")


@dataclass
class LossConfig:
    type: str = _f("dpo", "dpo, ipo, slic, simpo (reference-free, Meng et al. 2024), rpo (DPO + chosen NLL, Pang et al. "
                          "2024) or rdpo (length-regularised DPO, Park et al. 2024); docs/methods.md's table.")
    beta: float = _f(0.1, "Strength of the pull towards the reference model (dpo, ipo, slic, rpo, rdpo; simpo's scale "
                          "is loss.simpo_beta).")
    simpo_beta: float = _f(2.0, "simpo: the reward scale beta of beta * log pi(y)/|y| (the paper's 2.0; its README "
                                "suggests 2.0-2.5, sometimes up to 10).")
    simpo_gamma_beta_ratio: float = _f(0.5, "simpo: the target reward margin gamma as a ratio gamma/beta, in nats per "
                                            "token (the paper's recommended start, 0.5; it tunes it in [0, 1]).")
    rpo_alpha: float = _f(1.0, "rpo: weight of the chosen response's NLL per token, -log pi(y_c)/|y_c|, added to "
                               "the DPO loss (the paper's 1.0).")
    rdpo_alpha: float = _f(0.01, "rdpo: nats per token of length difference added inside DPO's sigmoid, "
                                 "-log sigmoid(beta*rho + alpha*(|y_c| - |y_r|)), so length explains part of a "
                                 "win. oaif's default 0.01: a 10-token difference counts as much as rho = 1 at "
                                 "beta 0.1; tune it per task, as the paper does.")
    label_smoothing: float = _f(0.0, "dpo, ipo: the probability eps that a judge's label is wrong (cDPO, Mitchell "
                                     "2023): the label p becomes p(1-eps) + (1-p)eps; IPO's optimum margin then "
                                     "shrinks to (1-2eps)/(2 beta). In [0, 0.5); 0 disables.")
    reference: str = _f("initial", "What rho measures the policy against: initial (the starting policy; under LoRA the "
                                   "base with the adapter off) or behavior (BPO, Xu et al. 2024: the policy that sampled "
                                   "the step's responses, i.e. the weights before its update: the policy's own log-probs, "
                                   "detached, so no reference forward runs, no copy is held, rho is 0 and no kl is logged; "
                                   "online mode). Not with loss.type=simpo. docs/methods.md's table.")
    reference_sync_every: int = _f(0, "TR-DPO (Gorbatovski et al. 2024) hard update: after every N-th step the reference "
                                      "becomes a copy of the policy (the paper's tau; TRL's default from it is 512). "
                                      "With loss.reference_mix, mix every N steps instead of copying. 0: never.")
    reference_mix: float = _f(0.0, "TR-DPO soft update: after every step (every loss.reference_sync_every steps when "
                                   "set), ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter (under LoRA "
                                   "the adapter's A and B). In (0, 1]; the paper's alpha, TRL's default from it is 0.6. "
                                   "0: no soft update.")
    soft_labels: bool = _f(False, "Train on the annotator's probability instead of a hard 0/1 label (recommended with "
                                  "annotator.model=policy: Online Self-Preferring trains on the self-judged preference strength).")
    min_confidence: float = _f(0.0, "Mask pairs whose judged probability is within this distance of 0.5 (ties).")
    missing_eos_penalty: float = _f(0.0, "TRL's missing_eos_penalty for a pairwise judge: subtracted from the Bradley-Terry score of a response that did not end within sampling.max_new_tokens when the other one did, i.e. P(it is better) = sigmoid(logit(p) - penalty); .inf makes it lose. 0 disables.")


@dataclass
class OptimConfig:
    lr: float = _f(1e-6, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    scheduler: str = _f("linear", "constant, linear or cosine (after warmup).")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0 disables).")


@dataclass
class TrainConfig:
    mode: str = _f("online", "online (sample, annotate, update) or offline (data.preference_path).")
    max_steps: int = _f(20, "Optimizer steps.")
    batch_size: int = _f(4, "Prompts per micro-batch per process (offline: pairs).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    seed: int = _f(42, "Seed for data order, sampling and initialisation.")
    output_dir: str = _f("runs/demo", "Run directory: checkpoints, metrics.jsonl, annotations.jsonl.")
    save_every: int = _f(0, "Save a checkpoint every N steps (0: only at the end).")
    keep_last: int = _f(2, "Keep this many step checkpoints (the final one is always kept; 0 keeps all).")
    resume: bool | str = _f(False, "true: continue from the latest checkpoint in output_dir; a path: continue from that checkpoint directory; false: start afresh.")
    overwrite_output_dir: bool = _f(False, "A fresh run (resume=false) in an output_dir that holds an earlier run: "
                                           "delete its checkpoints, latest, metrics, audit log and config.yaml first "
                                           "(false: refuse to start).")
    resume_allow_changes: list = _f([], "Keys a resume may change although they make another experiment (e.g. "
                                        "[optim.lr]); max_steps, save_every, keep_last, output_dir, logging.* and "
                                        "the annotator server's URL, timeout, retries and concurrency may always change.")
    device: str = _f("auto", "auto, cpu or cuda.")
    mixed_precision: str = _f("no", "Accelerate mixed precision: no, bf16 or fp16 (fp16 needs a GPU).")
    forward_batch_size: int = _f(8, "Sequences per forward pass in the update (0: a micro-batch's sequences in one pass). Passes group sequences of similar length, so each pads to its own longest; a prompt's responses always share a pass. Changes speed and memory, not the result.")
    fsdp: bool = _f(False, "Shard the policy and the reference over the launched processes with FSDP2 (each decoder "
                           "layer, then the model): each holds 1/N of the weights, gradients and optimizer states. "
                           "Launch as for several processes; on one process it shards nothing. Checkpoints stay full.")
    logprob_gap_warn: float | None = _f(None, "Warn once when a step's logprob_gap (mean |log-prob in the update - "
                                              "the sampler's| per response token, both untempered) exceeds this: the "
                                              "sampler sampled other weights than the policy's (a missed weight "
                                              "push). null: by precision, 1e-3 when policy and sampler compute in "
                                              "float32 (rounding: about 1e-6), 0.1 under bf16/fp16 or a vLLM server "
                                              "(rounding: some hundredths; DEVELOPERS.md, Metrics); 0: no warning.")
    async_steps: int = _f(0, "0: each step samples and judges its batch, then updates (synchronous). N >= 1: a "
                             "background worker samples and judges the next steps' batches while this one updates, "
                             "from weights at most N optimizer steps old (policy_lag logs how old); the transformers "
                             "backends then sample their own copy of the policy (one more copy of the weights in "
                             "memory), vLLM gets the weights as before. Refused with a judge that reads the policy "
                             "(annotator.model=policy), loss.reference=behavior, offline mode, train.fsdp and a vLLM server "
                             "shared by several processes. See docs/async.md.")
    share_prompt_forward: bool = _f(True, "Forward each prompt once for all its responses in the update (they continue its KV cache), policy and reference alike; false forwards one [prompt | response] row per response, as oaif did before. The same result up to float rounding. Off by itself where the policy takes no KV cache in training (gradient checkpointing).")


@dataclass
class LoggingConfig:
    report_to: list = _f([], "Extra trackers: tensorboard, wandb.")
    progress_bar: bool = _f(True, "Show a progress bar with live metrics.")
    run_name: str | None = _f(None, "Name for trackers (default: output_dir's name).")


@dataclass
class VllmConfig:
    mode: str = _f("colocated", "colocated (a vLLM engine inside each training process; weights copied in place after "
                                "every optimizer step) or server (an OpenAI-compatible vLLM server at vllm.server_url; it "
                                "reloads the weights from vllm.weights_dir or receives them, vllm.weight_sync).")
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
    dtype: str = _f("auto", "Colocated: engine weights dtype (auto: the dtype the policy computes in, bfloat16 under train.mixed_precision=bf16, else its weights' dtype; float32, bfloat16, float16).")
    enforce_eager: bool = _f(True, "Colocated: run the model eagerly (no torch.compile; starts in seconds, the "
                                   "compile cache is not reused between runs).")
    weight_sync: str = _f("disk", "Server mode: how new weights reach the server after each step: disk (written to "
                                  "vllm.weights_dir, which the server reloads) or collective (sent over a process group "
                                  "the trainer and the server's worker join: gloo on CPU, NCCL on GPUs; no file written).")
    sync_host: str = _f("127.0.0.1", "weight_sync=collective: the trainer's address, as the server reaches it (the "
                                     "trainer hosts the group's TCP store there).")
    sync_port: int = _f(0, "weight_sync=collective: the TCP store's port on the trainer (0: a free port).")
    sync_timeout_s: float = _f(300.0, "weight_sync=collective: seconds to wait for the server to join the group, or "
                                      "for one transfer of the weights.")
    sync_bucket_mib: int = _f(256, "weight_sync=collective: size of one bucket of packed tensors, in MiB (a larger "
                                   "tensor is sent alone).")
    sync_backend: str = _f("auto", "weight_sync=collective: auto (nccl when the policy is on a GPU, else gloo), gloo "
                                   "or nccl.")

    def validate(self) -> None:
        """Check the values (also for a group built in code, e.g. ``VllmConfig(mode="server")``)."""
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
        self._validate_sync()

    def _validate_sync(self) -> None:
        if self.weight_sync not in ("disk", "collective"):
            raise ConfigError(f"vllm.weight_sync: expected disk or collective, got {self.weight_sync!r}")
        if self.weight_sync == "collective" and self.mode != "server":
            raise ConfigError("vllm.weight_sync=collective: applies to vllm.mode=server only (a colocated engine is "
                              "given the weights in place); set vllm.mode=server or vllm.weight_sync=disk")
        if self.sync_backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"vllm.sync_backend: expected auto, gloo or nccl, got {self.sync_backend!r}")
        if not 0 <= self.sync_port <= 65535:
            raise ConfigError(f"vllm.sync_port: expected 0 (a free port) to 65535, got {self.sync_port}")
        if not self.sync_timeout_s > 0 or self.sync_timeout_s == float("inf"):
            raise ConfigError(f"vllm.sync_timeout_s: must be a finite number > 0, got {self.sync_timeout_s}")
        if self.sync_bucket_mib < 1:
            raise ConfigError(f"vllm.sync_bucket_mib: must be >= 1, got {self.sync_bucket_mib}")
        if not self.sync_host.strip():
            raise ConfigError("vllm.sync_host: empty; give the trainer's address as the server reaches it")


@dataclass
class Config:
    model: ModelConfig = _group(ModelConfig, "Policy model.")
    data: DataConfig = _group(DataConfig, "Prompts and preference data.")
    sampling: SamplingConfig = _group(SamplingConfig, "Response sampling from the policy.")
    annotator: AnnotatorConfig = _group(AnnotatorConfig, "The AI feedback annotator.")
    loss: LossConfig = _group(LossConfig, "Direct alignment loss.")
    optim: OptimConfig = _group(OptimConfig, "Optimizer and schedule.")
    train: TrainConfig = _group(TrainConfig, "Training loop.")
    logging: LoggingConfig = _group(LoggingConfig, "Metrics and trackers.")
    vllm: VllmConfig = _group(VllmConfig, "The vLLM sampling backend (sampling.backend=vllm; needs vLLM installed).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def describe() -> str:
    """Every key with its type, default and help, one per line."""
    lines = []

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{prefix}{f.name}:  # {f.metadata.get('help', '')}")
                walk(value, prefix + f.name + ".")
            else:
                tp = type_name(hints[f.name]) if not typing.get_args(hints[f.name]) else str(hints[f.name])
                lines.append(f"  {prefix}{f.name} = {value!r}  ({tp})  {f.metadata.get('help', '')}")

    walk(Config(), "")
    return "\n".join(lines)
