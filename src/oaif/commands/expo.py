"""ExPO (Zheng et al. 2024, "Weak-to-strong extrapolation expedites alignment"): extrapolate an aligned
model away from its starting model.

  oaif expo --base SFT_DIR --aligned RUN_OR_CHECKPOINT --alpha A --out DIR

writes theta_aligned + A * (theta_aligned - theta_base), tensor by tensor, as a model directory that
``AutoModelForCausalLM.from_pretrained`` loads (safetensors, the aligned model's config, generation
config and tokenizer, and expo.json naming the inputs). A = 0 gives the aligned model and A < 0
interpolates back towards the base (A = -1 gives it). The paper chooses A > 0 on held-out prompts;
here compare the result with the aligned model under any judge with
`oaif eval DIR RUN_OR_CHECKPOINT --prompts ...`.

--base takes what model.name_or_path takes (a directory, a .gguf file, an embedded name, a hub id
already in the local cache); --aligned a model directory, a checkpoint, or a run directory (its
`latest` checkpoint). Both need safetensors weights with the same architecture, the same tensor
names and the same shapes (anything else is refused with one line naming the first difference).
Each tensor is computed in float32 (float64 stays float64) and stored in the aligned model's dtype;
integer tensors (buffers) are the aligned model's. The aligned model's shards are written one at
a time into a temporary directory beside --out, which is renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

from oaif.errors import CheckpointError, ConfigError, ModelError, one_line

# torch and safetensors are imported inside the functions that use them: the CLI imports this module.

INDEX = "model.safetensors.index.json"
#: Files copied from the aligned model besides the weights (those that exist).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "chat_template.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="MODEL",
                        help="the starting (SFT) model: a directory, .gguf file, embedded name or cached hub id")
    parser.add_argument("--aligned", required=True, metavar="RUN_OR_CHECKPOINT",
                        help="the aligned model: a model or checkpoint directory, or a run directory (its latest "
                             "checkpoint)")
    parser.add_argument("--alpha", required=True, type=float, metavar="A",
                        help="extrapolation strength: writes aligned + A * (aligned - base); 0 copies the aligned model")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")


# -- inputs -----------------------------------------------------------------------------------------
def resolve_base(name: str) -> Path:
    """--base as a local model directory (converting a .gguf or embedded model once, as training does)."""
    from oaif.models.resolve import resolve_model_path

    path = resolve_model_path(name)
    if os.path.isdir(path):
        return Path(path)
    try:  # a hub id: its snapshot in the local cache, never downloaded
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception as e:
        raise ModelError(f"--base: {name} is not in the local Hugging Face cache ({one_line(e, 120)}); "
                         f"fetch it first with `huggingface-cli download {name}`") from None


def resolve_aligned(text: str) -> Path:
    """--aligned as a model directory: itself when it holds config.json, else a run's latest checkpoint."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ModelError(f"--aligned: {text} is not a directory (a model, checkpoint or run directory)")
    if (path / "config.json").is_file():
        return path
    from oaif.run.checkpoint import latest_checkpoint

    found = latest_checkpoint(path)
    if found is None:
        raise ModelError(f"--aligned: {text} holds neither a model (config.json) nor a complete checkpoint-N")
    return found


def read_config(model_dir: Path, flag: str) -> dict:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{flag}: {model_dir / 'config.json'} is unreadable ({one_line(e, 120)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{flag}: {model_dir / 'config.json'} is not a JSON object")
    return config


def weight_files(model_dir: Path, flag: str) -> dict[str, str]:
    """Tensor name -> the safetensors file (in ``model_dir``) that holds it."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{flag}: {index} is unreadable ({one_line(e, 120)})") from None
        return {str(k): str(v) for k, v in weight_map.items()}
    if not (model_dir / "model.safetensors").is_file():
        raise ModelError(f"{flag}: {model_dir} has no safetensors weights (model.safetensors or {INDEX}); "
                         f"oaif expo reads safetensors only")
    return {name: "model.safetensors" for name in _tensor_shapes(model_dir / "model.safetensors", flag)}


def _tensor_shapes(path: Path, flag: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # SafetensorError (corrupt, truncated) or OSError
        raise CheckpointError(f"{flag}: {path} is a corrupt or truncated safetensors file ({one_line(e, 120)})") from None


def shapes(model_dir: Path, files: dict[str, str], flag: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name in sorted(set(files.values())):
        out.update(_tensor_shapes(model_dir / name, flag))
    missing = sorted(set(files) - set(out))
    if missing:
        raise CheckpointError(f"{flag}: {model_dir / INDEX} names {missing[0]}, which its files do not hold")
    return out


def _first(names) -> str:
    names = sorted(names)
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def check_match(base: Path, aligned: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The two models' weight files, once their architectures, tensor names and shapes match."""
    cb, ca = read_config(base, "--base"), read_config(aligned, "--aligned")
    for key in ("model_type", "architectures"):
        if cb.get(key) != ca.get(key):
            raise CheckpointError(f"--base and --aligned are different architectures: {key} {cb.get(key)} in "
                                  f"{base}, {ca.get(key)} in {aligned}")
    fb, fa = weight_files(base, "--base"), weight_files(aligned, "--aligned")
    sb, sa = shapes(base, fb, "--base"), shapes(aligned, fa, "--aligned")
    if set(sa) - set(sb):
        raise CheckpointError(f"--base {base} lacks the aligned model's tensor {_first(set(sa) - set(sb))}")
    if set(sb) - set(sa):
        raise CheckpointError(f"--aligned {aligned} lacks the base model's tensor {_first(set(sb) - set(sa))}")
    for name in sorted(sa):
        if sa[name] != sb[name]:
            raise CheckpointError(f"tensor {name} has shape {list(sb[name])} in --base and {list(sa[name])} in "
                                  f"--aligned (a resized vocabulary, or another model size)")
    return fb, fa


def check_out(out_text: str, base: Path, aligned: Path, overwrite: bool) -> Path:
    from oaif.run.run_dir import check_output_dir

    out = check_output_dir(out_text, "--out")
    for flag, source in (("--base", base), ("--aligned", aligned)):
        source = source.resolve()
        if out == source or out in source.parents:
            raise ConfigError(f"--out {out_text} would replace {flag} {source}; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out_text} already holds files; choose another directory or pass --overwrite")
    return out


# -- the extrapolation --------------------------------------------------------------------------------
def extrapolate(aligned, base, alpha: float):
    """aligned + alpha * (aligned - base), computed in float32 (float64 stays) and stored in aligned's dtype;
    integer tensors are aligned's."""
    import torch

    if not aligned.is_floating_point():
        return aligned
    compute = torch.float64 if aligned.dtype == torch.float64 else torch.float32
    a, b = aligned.to(compute), base.to(compute)
    return (a + alpha * (a - b)).to(aligned.dtype)


def write_weights(tmp: Path, base: Path, aligned: Path, files: tuple[dict[str, str], dict[str, str]], alpha: float):
    """Each of the aligned model's weight files, extrapolated, into ``tmp`` under its own name."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from safetensors.torch import save_file

    base_files, aligned_files = files
    with ExitStack() as stack:
        opened = {}

        def handle(directory: Path, name: str):
            key = (directory, name)
            if key not in opened:
                opened[key] = stack.enter_context(safe_open(str(directory / name), framework="pt"))
            return opened[key]

        for shard in sorted(set(aligned_files.values())):
            src = handle(aligned, shard)
            out = {name: extrapolate(src.get_tensor(name), handle(base, base_files[name]).get_tensor(name), alpha)
                   for name in src.keys()}
            save_file(out, str(tmp / shard), metadata={**(src.metadata() or {}), "format": "pt"})
            del out


def copy_model_files(tmp: Path, aligned: Path) -> None:
    for name in MODEL_FILES:
        if (aligned / name).is_file():
            shutil.copy2(aligned / name, tmp / name)
    if (aligned / INDEX).is_file():
        shutil.copy2(aligned / INDEX, tmp / INDEX)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = out.with_name(f".old-{out.name}-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_expo(base: Path, aligned: Path, alpha: float, out: Path) -> None:
    from safetensors import SafetensorError

    files = check_match(base, aligned)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_weights(tmp, base, aligned, files, alpha)
        copy_model_files(tmp, aligned)
        (tmp / "expo.json").write_text(json.dumps({
            "method": "ExPO (Zheng et al. 2024)", "formula": "aligned + alpha * (aligned - base)", "alpha": alpha,
            "base": str(base.resolve()), "aligned": str(aligned.resolve())}, indent=2) + "\n")
        move_into_place(tmp, out)
    except (OSError, SafetensorError) as e:  # a full disk, a file size limit
        raise CheckpointError(f"cannot write {out} ({one_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.alpha):
        raise ConfigError(f"--alpha: must be a finite number, got {args.alpha}")
    base, aligned = resolve_base(args.base), resolve_aligned(args.aligned)
    out = check_out(args.out, base, aligned, args.overwrite)
    write_expo(base, aligned, args.alpha, out)
    print(f"wrote {out}: aligned + {args.alpha:g} * (aligned - base), aligned {aligned}, base {base}")
    print(f"compare it with the aligned model: oaif eval {out} {aligned} --prompts PROMPTS.jsonl")
    return 0
