"""The sampling backends behind one interface, so that the trainer samples the same way with each.

Each implements :class:`~oaif.generation.base.Generator`: ``sample`` takes templated prompt token
ids and returns K responses per prompt (token ids, EOS included when a response ended there) and
whether each ended at EOS, exactly like :func:`oaif.step.sampling.sample_responses`; ``load_weights``
takes the policy's current weights after an optimizer step.

* :func:`~oaif.generation.build.build_sampler`: the backend ``sampling.backend`` names.
* :class:`~oaif.generation.live_policy.LivePolicy`: oaif's transformers backends (``shared_prefill``,
  ``hf``) on the training policy itself; nothing to load.
* :class:`~oaif.generation.vllm_colocated.ColocatedVllm`: a ``vllm.LLM`` in the trainer's
  process; weights are copied in place, no engine restart.
* :class:`~oaif.generation.vllm_server.VllmServer`: an OpenAI-compatible vLLM server process;
  weights go through a directory the server reloads from (:class:`~oaif.generation.vllm_server.SharedServer`
  when several training processes share it).
* :func:`~oaif.generation.weights.policy_weights`: the named tensors to push, with LoRA adapters
  merged out of place.

Nothing here imports vLLM until an engine is built, so ``import oaif`` stays light.
"""

from oaif.generation.base import GenerationError, Generator, StopRules

__all__ = ["GenerationError", "Generator", "StopRules"]
