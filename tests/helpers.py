"""Builders for tiny real models used across the test suite (no mocks, no network).

``make_tiny_llama`` saves a small random LlamaForCausalLM with the real SmolLM2 tokenizer (chat
template and 49152-token vocabulary), so prompts tokenize exactly as with the embedded model.
``make_tiny_gguf`` writes a small random llama GGUF file with the same tokenizer, to exercise
the GGUF conversion path in seconds instead of the full model's ~20 s.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

EMBEDDED = "smollm2-135m-instruct"

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def smollm2_tokenizer_dir() -> str:
    """The converted embedded model's directory (converted once into the cache), for its tokenizer."""
    from oaif.models.resolve import resolve_model_path

    return resolve_model_path(EMBEDDED)


def make_tiny_llama(path, seed: int = 0, tokenizer_source: str | None = None, **overrides) -> str:
    """Save a tiny random LlamaForCausalLM and the SmolLM2 tokenizer to ``path``; return the path.

    ``overrides`` replace entries of the LlamaConfig (e.g. ``num_hidden_layers=1``).
    ``tokenizer_source`` is any model directory whose tokenizer to use (default: the embedded SmolLM2).
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or smollm2_tokenizer_dir(), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    settings = dict(TINY_LLAMA, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings.update(overrides)
    config = LlamaConfig(**settings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def make_tiny_mixtral(path, seed: int = 0, tokenizer_source: str | None = None, **overrides) -> str:
    """Save a tiny random MixtralForCausalLM (4 experts, 2 per token) with the SmolLM2 tokenizer; return the path.

    transformers 5 fuses each layer's experts into one tensor when it loads the model
    (``mlp.experts.gate_up_proj``) and splits them again when it saves it
    (``block_sparse_moe.experts.<i>.w1.weight``): the model's names differ from its checkpoint's.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, MixtralConfig, MixtralForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or smollm2_tokenizer_dir(), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    settings = dict(TINY_LLAMA, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tokenizer),
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    settings.update(overrides)
    config = MixtralConfig(**settings)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def make_tiny_gguf(path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   intermediate: int = 128, vocab_size: int | None = 1024, source_gguf: str | None = None) -> str:
    """Write a tiny random llama GGUF at ``path`` with the tokenizer of ``source_gguf``.

    The tokenizer metadata (tokens, merges, special ids, chat template) is copied from
    ``source_gguf`` (default: the embedded SmolLM2 GGUF). With ``vocab_size``, the vocabulary is
    cut to its first ``vocab_size`` tokens and the merges that build them (still a valid BPE
    tokenizer, with the same special tokens and chat template), which makes loading the file
    several times faster; ``None`` keeps the full vocabulary. Some weights are Q8_0-quantized so
    the dequantization path is exercised. Returns the path.
    """
    import gguf
    import numpy as np

    from oaif.models.resolve import embedded_gguf_path

    source = gguf.GGUFReader(source_gguf or embedded_gguf_path(EMBEDDED))
    fields = source.fields

    def value(key):
        return fields[key].contents() if key in fields else None

    tokens = value("tokenizer.ggml.tokens")
    token_types = value("tokenizer.ggml.token_type")
    merges = value("tokenizer.ggml.merges")
    if vocab_size is not None and vocab_size < len(tokens):
        # BPE merges are in vocabulary order: keep those whose parts and result are kept tokens.
        tokens, token_types = tokens[:vocab_size], token_types[:vocab_size]
        kept = set(tokens)
        merges = [m for m in merges or [] if m.replace(" ", "") in kept and all(p in kept for p in m.split(" "))]
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model(value("tokenizer.ggml.model"))
    if value("tokenizer.ggml.pre") is not None:
        writer.add_tokenizer_pre(value("tokenizer.ggml.pre"))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges:
        writer.add_token_merges(merges)
    for key, add in (("tokenizer.ggml.bos_token_id", writer.add_bos_token_id),
                     ("tokenizer.ggml.eos_token_id", writer.add_eos_token_id),
                     ("tokenizer.ggml.unknown_token_id", writer.add_unk_token_id),
                     ("tokenizer.ggml.padding_token_id", writer.add_pad_token_id),
                     ("tokenizer.ggml.add_bos_token", writer.add_add_bos_token),
                     ("tokenizer.ggml.add_space_prefix", writer.add_add_space_prefix),
                     ("tokenizer.chat_template", writer.add_chat_template)):
        if value(key) is not None:
            add(value(key))

    def rand(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def q8(name, arr):
        writer.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    q8("token_embd.weight", rand(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        q8(f"blk.{i}.attn_q.weight", rand(heads * head_dim, hidden))
        q8(f"blk.{i}.attn_k.weight", rand(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, heads * head_dim))
        q8(f"blk.{i}.ffn_gate.weight", rand(intermediate, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(intermediate, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, intermediate))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``oaif ARGV`` in this process; it must exit 2 with exactly one ``oaif: error:`` line and no traceback."""
    from oaif.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("oaif: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


# -- the commands printed in README.md and docs/*.md ---------------------------------------------
# Every command in a ```bash block of the docs is claimed by exactly one test, which gets it through
# one of the four helpers below with the command (or, for doc_commands, a part of it) as a literal
# string; tests/test_docs.py finds those calls in the test sources and checks the claims.
DOC_ROOT = Path(__file__).resolve().parent.parent
CLAIM_HELPERS = ("doc_command", "doc_commands", "doc_argv", "doc_oaif_args")


def doc_files() -> list[Path]:
    return [DOC_ROOT / "README.md", *sorted((DOC_ROOT / "docs").glob("*.md"))]


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` at its start or after a space, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def bash_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks in ``text``: continued lines (a trailing backslash, an open quote)
    joined, comments dropped, whitespace runs made one space."""
    commands = []
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            inside_quotes = pending.count('"') % 2 == 1  # a quoted string that spans lines
            pending += " " + (raw if inside_quotes else _strip_comment(raw))
            if pending.rstrip().endswith("\\"):
                pending = pending.rstrip()[:-1]
                continue
            if pending.count('"') % 2:
                continue
            command = " ".join(pending.split())
            if command:
                commands.append(command)
            pending = ""
        assert not pending.strip(), f"unfinished command at the end of a bash block: {pending!r}"
    return commands


def documented_commands() -> dict[str, list[str]]:
    """Every command of README.md and docs/*.md, with the files that print it."""
    found: dict[str, list[str]] = {}
    for path in doc_files():
        for command in bash_commands(path.read_text()):
            found.setdefault(command, []).append(str(path.relative_to(DOC_ROOT)))
    return found


def doc_command(text: str) -> str:
    """``text``, after asserting the docs print exactly this command (this claims it for the calling test)."""
    assert text in documented_commands(), f"README.md and docs/ print no command {text!r}"
    return text


def doc_commands(part: str) -> list[str]:
    """Every documented command that contains ``part`` (at least one); claims them all."""
    commands = [c for c in documented_commands() if part in c]
    assert commands, f"README.md and docs/ print no command containing {part!r}"
    return commands


def doc_argv(text: str) -> list[str]:
    """The documented command ``text`` split as the shell splits it."""
    return shlex.split(doc_command(text))


def doc_oaif_args(text: str) -> list[str]:
    """The arguments after ``oaif`` of the documented command ``text`` (its last ``&&`` part, run by
    ``oaif``, ``.venv/bin/oaif`` or ``.venv-vllm/bin/oaif``)."""
    argv = shlex.split(doc_command(text).split("&&")[-1])
    assert argv and Path(argv[0]).name == "oaif", f"not an oaif command: {text!r}"
    return argv[1:]
