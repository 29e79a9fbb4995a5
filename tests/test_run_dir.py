"""Output locations are checked before any work: one line naming the key, and nothing created on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oaif.errors import ConfigError
from oaif.run.run_dir import check_output_dir, check_output_file


def test_a_new_or_existing_directory_passes_and_nothing_is_created(tmp_path):
    new = tmp_path / "a" / "b" / "run"
    assert check_output_dir(new) == new.resolve()
    assert not (tmp_path / "a").exists()  # checking changes nothing on disk
    (tmp_path / "old").mkdir()
    assert check_output_dir(tmp_path / "old") == (tmp_path / "old").resolve()
    assert os.listdir(tmp_path / "old") == []  # the write probe leaves nothing behind


@pytest.mark.parametrize("path, message", [
    ("", "train.output_dir: empty path"),
    ("   ", "train.output_dir: empty path"),
    ("/proc/oaif-run", "train.output_dir: /proc/oaif-run is under /proc, a kernel pseudo-filesystem"),
    ("/proc/self", "is under /proc"),
    ("/sys/kernel/oaif", "is under /sys"),
    ("/dev/null", "is under /dev"),
])
def test_empty_and_pseudo_filesystem_paths(path, message):
    with pytest.raises(ConfigError) as e:
        check_output_dir(path)
    assert str(e.value).startswith("train.output_dir: ") and message in str(e.value), str(e.value)


def test_a_file_or_a_file_among_the_ancestors(tmp_path):
    f = tmp_path / "taken"
    f.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"^train.output_dir: {f} exists and is not a directory$"):
        check_output_dir(f)
    with pytest.raises(ConfigError, match=f"^train.output_dir: {f} is a file, so {f}/run cannot be created$"):
        check_output_dir(f / "run")
    assert f.read_text() == "not a directory"


def test_unwritable_directory_is_found_by_trying_to_write():
    # Permission bits would not stop root (who runs this project's CI); the check tries to create a
    # file instead. /proc refuses a file even to root, so the probe alone (without the path rule
    # above) must report it.
    from oaif.run.run_dir import _probe_writable

    with pytest.raises(ConfigError, match="^train.output_dir: cannot write in /proc .*needed for /proc/run$"):
        _probe_writable(Path("/proc"), "train.output_dir", "/proc/run")


def test_output_files(tmp_path):
    assert check_output_file(tmp_path / "sub" / "report.json", "--report") == (tmp_path / "sub" / "report.json").resolve()
    assert not (tmp_path / "sub").exists()
    with pytest.raises(ConfigError, match=f"^--report: {tmp_path} is a directory, not a file$"):
        check_output_file(tmp_path, "--report")
    with pytest.raises(ConfigError, match="^--out: /proc/oaif.json is under /proc"):
        check_output_file("/proc/oaif.json", "--out")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"^--out: {blocker} is a file, so {blocker}/out.jsonl cannot be created$"):
        check_output_file(blocker / "out.jsonl", "--out")
    with pytest.raises(ConfigError, match="^--out: /dev/null is under /dev"):
        check_output_file("/dev/null", "--out")


def test_names_a_run_writes_must_be_free(tmp_path):
    from oaif.run.run_dir import check_run_entries

    check_run_entries(tmp_path / "new", overwrite=False)  # nothing there yet
    os.mkfifo(tmp_path / "latest")
    with pytest.raises(ConfigError, match=f"^train.output_dir: {tmp_path / 'latest'} is a special file; oaif keeps"):
        check_run_entries(tmp_path, overwrite=True)
    (tmp_path / "latest").unlink()
    (tmp_path / "checkpoint-2").write_text("x")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'checkpoint-2'} exists and is not a checkpoint directory"):
        check_run_entries(tmp_path, overwrite=False)
    check_run_entries(tmp_path, overwrite=True)  # train.overwrite_output_dir deletes it with the earlier run
    assert (tmp_path / "checkpoint-2").read_text() == "x"  # checking changes nothing
