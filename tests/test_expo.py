"""``oaif expo`` (ExPO, Zheng et al. 2024): aligned + alpha * (aligned - base) on tiny real models and a
tiny real training run; the result loads, generates, and ``oaif eval`` compares it with the aligned model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import doc_oaif_args, make_tiny_llama, one_line_error
from oaif.cli import main

ROOT = Path(__file__).resolve().parent.parent
SHORTER = "oaif.annotators.rules:prefer_shorter"


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expo(base, aligned, alpha, out, *extra) -> int:
    return main(["expo", "--base", str(base), "--aligned", str(aligned), "--alpha", str(alpha), "--out", str(out),
                 *extra])




@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Two steps of online DPO from the tiny model (lr 1e-3): the aligned model, as a run directory."""
    from oaif.config import load_config
    from oaif.trainer import train

    out = tmp_path_factory.mktemp("expo_run") / "run"
    train(load_config(ROOT / "configs" / "demo.yaml", [
        f"model.name_or_path={tiny_model_dir}", "annotator.type=callable", f"annotator.callable={SHORTER}",
        "train.max_steps=2", "train.batch_size=2", "sampling.max_new_tokens=8", f"train.output_dir={out}",
        "logging.progress_bar=false", "optim.lr=1.0e-3", "optim.warmup_steps=0",
        f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}"]))
    return out


def test_written_weights_equal_the_formula_exactly(tiny_model_dir, tiny_run, tmp_path, capsys):
    out = tmp_path / "expo"
    assert expo(tiny_model_dir, tiny_run, 0.5, out) == 0  # a run directory: its latest checkpoint
    assert f"wrote {out}" in capsys.readouterr().out
    aligned_dir = tiny_run / "checkpoint-2"
    base, aligned, written = weights(tiny_model_dir), weights(aligned_dir), weights(out)
    assert written.keys() == aligned.keys() == base.keys()
    changed = 0
    for name, a in aligned.items():
        assert written[name].dtype == a.dtype == torch.float32
        assert torch.equal(written[name], a + 0.5 * (a - base[name])), name
        changed += not torch.equal(written[name], a)
    assert changed > 0  # training moved the weights, so the extrapolation moves them further
    record = json.loads((out / "expo.json").read_text())
    assert record["alpha"] == 0.5 and record["aligned"] == str(aligned_dir.resolve())
    assert record["base"] == str(Path(tiny_model_dir).resolve())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (aligned_dir / name).read_bytes(), name
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary directory was renamed into place

    # alpha = 0 is the aligned model, bit for bit; --overwrite replaces the earlier output
    assert expo(tiny_model_dir, aligned_dir, 0, out, "--overwrite") == 0
    assert all(torch.equal(t, aligned[name]) for name, t in weights(out).items())
    # alpha = -1 is the base model (up to float32 rounding of a - (a - b))
    assert expo(tiny_model_dir, aligned_dir, -1, tmp_path / "back") == 0
    for name, t in weights(tmp_path / "back").items():
        torch.testing.assert_close(t, base[name], rtol=0, atol=1e-6)


def test_the_output_loads_generates_and_evaluates_against_the_aligned_model(tiny_model_dir, tiny_run, tmp_path,
                                                                             capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "expo"
    paths = {"SFT_DIR": tiny_model_dir, "runs/demo": str(tiny_run), "runs/demo-expo": str(out)}
    argv = doc_oaif_args("oaif expo --base SFT_DIR --aligned runs/demo --alpha 0.3 --out runs/demo-expo")
    assert main([paths.get(a, a) for a in argv]) == 0  # docs/methods.md's command on the tiny run
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Name a fruit.", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5 or tok.eos_token_id in generated[0].tolist()
    written = weights(out)
    assert all(torch.equal(t, written.get(name, t)) for name, t in model.state_dict().items())  # tied head: absent

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(["Name a fruit.", "Say hello.", "Give me a color."])))
    capsys.readouterr()
    assert main(["eval", str(out), str(tiny_run / "checkpoint-2"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "eval"), "--max-new-tokens", "6", "--bootstrap", "50", "--no-progress",
                 "--set", "type=callable", "--set", f"callable={SHORTER}"]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    c = result["comparisons"][0]
    assert (c["a"], c["b"], c["pairs"]) == ("A", "B", 3) and 0 <= c["win_rate"] <= 1
    assert result["judge"]["name"] == "callable:prefer_shorter"


def test_sharded_models_give_the_same_result(tiny_model_dir, tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    aligned_dir = tiny_run / "checkpoint-2"
    sharded = {}
    for name, source in (("base", tiny_model_dir), ("aligned", aligned_dir)):
        sharded[name] = tmp_path / f"{name}-sharded"
        AutoModelForCausalLM.from_pretrained(source).save_pretrained(sharded[name], max_shard_size="2MB")
        AutoTokenizer.from_pretrained(source).save_pretrained(sharded[name])
        assert (sharded[name] / "model.safetensors.index.json").is_file()
    assert expo(tiny_model_dir, aligned_dir, 0.5, tmp_path / "plain") == 0
    assert expo(sharded["base"], sharded["aligned"], 0.5, tmp_path / "sharded") == 0
    assert expo(sharded["base"], aligned_dir, 0.5, tmp_path / "mixed") == 0
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    plain = weights(tmp_path / "plain")
    for other in ("sharded", "mixed"):
        got = weights(tmp_path / other)
        assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)
    AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")


@pytest.fixture(scope="module")
def other_models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Models that do not match the tiny Llama: another architecture, fewer layers, another MLP width."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("expo_others")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    qwen = root / "qwen2"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(qwen)
    tok.save_pretrained(qwen)
    return {"qwen2": qwen,
            "one_layer": Path(make_tiny_llama(root / "one_layer", tokenizer_source=tiny_model_dir, num_hidden_layers=1)),
            "wide": Path(make_tiny_llama(root / "wide", tokenizer_source=tiny_model_dir, intermediate_size=96))}


def test_mismatched_models_are_refused_with_one_line_from_the_cli(tiny_model_dir, other_models, tmp_path):
    def cli(base, aligned) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "oaif.cli", "expo", "--base", str(base), "--aligned",
                               str(aligned), "--alpha", "0.3", "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)

    for other, fragment in (("qwen2", "different architectures: model_type llama in"),
                            ("wide", "tensor model.layers.0.mlp.down_proj.weight has shape [64, 128] in --base "
                                     "and [64, 96] in --aligned")):
        result = cli(tiny_model_dir, other_models[other])
        errors = [line for line in result.stderr.splitlines() if line.startswith("oaif: error:")]
        assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line(tiny_model_dir, tiny_run, other_models, tmp_path, capsys):
    def error(base, aligned, alpha=0.3, out=None, *extra) -> str:
        return one_line_error(capsys, ["expo", "--base", str(base), "--aligned", str(aligned), "--alpha", str(alpha),
                                       "--out", str(out or tmp_path / "out"), *extra])

    line = error(tiny_model_dir, other_models["one_layer"])
    assert "--aligned" in line and "lacks the base model's tensor model.layers.1." in line and "more)" in line
    line = error(other_models["one_layer"], tiny_model_dir)
    assert "--base" in line and "lacks the aligned model's tensor model.layers.1." in line
    assert "--alpha: must be a finite number, got nan" in error(tiny_model_dir, tiny_run, "nan")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert "holds neither a model (config.json) nor a complete checkpoint-N" in error(tiny_model_dir, empty)
    assert "is not a directory" in error(tiny_model_dir, tmp_path / "missing")
    no_weights = tmp_path / "bin_only"
    shutil.copytree(tiny_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert "has no safetensors weights" in error(no_weights, tiny_run)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    (truncated / "model.safetensors").write_bytes((Path(tiny_model_dir) / "model.safetensors").read_bytes()[:1000])
    assert "corrupt or truncated safetensors file" in error(truncated, tiny_run)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    assert "already holds files; choose another directory or pass --overwrite" in error(tiny_model_dir, tiny_run,
                                                                                          0.3, taken)
    assert (taken / "notes.txt").read_text() == "keep me"
    assert "would replace --aligned" in error(tiny_model_dir, tiny_run, 0.3, tiny_run / "checkpoint-2", "--overwrite")
    assert "would replace --aligned" in error(tiny_model_dir, tiny_run, 0.3, tiny_run, "--overwrite")
