"""Models: resolve a model name, convert GGUF files, load the policy, its reference and tokenizer.

- :mod:`oaif.models.resolve`: what a model name means (embedded name, ``.gguf`` file, directory, hub id)
- :mod:`oaif.models.gguf`: a ``.gguf`` file converted once into a safetensors directory in the cache
- :mod:`oaif.models.load`: the config, tokenizer, causal LM, and the policy with its reference
- :mod:`oaif.models.modules`: the model inside DDP/peft wrappers, dropout off, gradient checkpointing,
  the KV-cache argument name, the reference context
- :mod:`oaif.models.chat`: chat messages, prompt encoding (template or plain text), the end-of-turn id
"""
