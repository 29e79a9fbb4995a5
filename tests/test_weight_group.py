"""The weight-sync group (``vllm.weight_sync=collective``) in pure torch: buckets packed and unpacked, a
two-process gloo group formed from a TCP store without ``init_process_group``, pushes received intact, and
a group that does not form or whose peer is gone raising instead of hanging."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from oaif.generation import weight_group as wg
from oaif.generation.base import GenerationError

PEER = Path(__file__).with_name("weight_group_peer.py")


def mixed_weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(3, 5, generator=g)),
            ("b.idx", torch.arange(7)),
            ("c.big", torch.randn(600, generator=g).to(torch.bfloat16)),  # 1200 bytes: larger than a 1 KiB bucket
            ("d.scalar", torch.tensor(2.5, dtype=torch.float16)),
            ("e.mask", torch.tensor([True, False, True])),
            ("f.empty", torch.empty(0, 4)),
            ("g.half", torch.randn(2, 3, generator=g).half().t())]  # not contiguous


def assert_same(got, want):
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


def test_buckets_round_trip_mixed_dtypes_and_a_tensor_larger_than_a_bucket():
    weights = mixed_weights()
    got, groups = [], []
    for header, buffer in wg.packed(iter(weights), 1024, torch.device("cpu")):
        assert buffer.dtype == torch.uint8
        tensors = wg.unpack(header, buffer)
        groups.append([n for n, _ in tensors])
        got += tensors
    assert groups == [["a.weight", "b.idx"], ["c.big"], ["d.scalar", "e.mask", "f.empty", "g.half"]]
    assert_same(got, weights)


def host(port: int = 0):
    return wg.host_store("127.0.0.1", port, 2, 30)


def peer(port: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(PEER), str(port), *args])


def test_two_processes_form_a_group_beside_none_and_receive_two_pushes_intact(tmp_path):
    store = host()
    proc = peer(store.port, "2", str(tmp_path / "push"))
    try:
        group = wg.join_group(store, rank=0, size=2, backend="gloo", timeout_s=30, address="127.0.0.1")
        assert not dist.is_initialized()  # no default group: the trainer's own group is left alone
        weights = mixed_weights()

        def under_no_grad():  # as policy_weights gives them: a generator that turns gradients off while it runs
            with torch.no_grad():
                yield from weights

        pushed = under_no_grad()
        first = next(pushed)  # CollectiveSync.push looks at the first tensor (its device) before sending
        assert wg.send_weights(group, itertools.chain([first], pushed), 1024) > 0
        assert torch.is_grad_enabled()  # the trainer's next step still records gradients
        second = [(n, t + 1 if t.dtype.is_floating_point else t) for n, t in weights]
        wg.send_weights(group, second, 64)  # every tensor in a bucket of its own
        assert proc.wait(60) == 0
        group.close()
    finally:
        proc.kill()
    assert_same(torch.load(tmp_path / "push0.pt"), weights)
    assert_same(torch.load(tmp_path / "push1.pt"), second)


def test_a_group_whose_peer_never_joins_times_out_in_one_line():
    store = host()
    start = time.monotonic()
    with pytest.raises(GenerationError, match=r"weight-sync group \(rank 0 of 2, gloo\) did not form within 1s") as e:
        wg.join_group(store, rank=0, size=2, backend="gloo", timeout_s=1, address="127.0.0.1")
    assert "\n" not in str(e.value) and time.monotonic() - start < 20


def test_a_push_to_a_peer_that_left_raises_instead_of_hanging(tmp_path):
    store = host()
    proc = peer(store.port, "1", str(tmp_path / "push"), "leave")
    group = wg.join_group(store, rank=0, size=2, backend="gloo", timeout_s=60, address="127.0.0.1")
    assert proc.wait(60) == 0
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        wg.send_weights(group, mixed_weights(), 1024)
    assert time.monotonic() - start < 30  # the closed connection is seen, well before the group's 60 s timeout


def test_port_in_use_and_backend_choice():
    from oaif.errors import ConfigError

    store = host()
    with pytest.raises(ConfigError, match=rf"vllm.sync_port={store.port}: .*address already in use"):
        host(store.port)
    assert wg.resolve_backend("auto", "cpu") == "gloo" and wg.resolve_backend("auto", "cuda:0") == "nccl"
    assert wg.resolve_backend("gloo", "cuda:0") == "gloo"


def test_a_server_on_the_trainers_gpu_gets_gloo_or_a_one_line_refusal(monkeypatch):
    # Fakes a GPU (none here): NCCL cannot hold two ranks on one GPU, so auto falls back to gloo there
    from oaif.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(wg, "gpu_id", lambda device=None: "GPU-aaaa")
    assert wg.resolve_backend("auto", "cuda:0", ["GPU-aaaa"]) == "gloo"
    assert wg.resolve_backend("auto", "cuda:0", ["GPU-bbbb", None]) == "nccl"
    with pytest.raises(ConfigError, match=r"^vllm.sync_backend=nccl: the vLLM server runs on the trainer's GPU"):
        wg.resolve_backend("nccl", "cuda:0", ["GPU-aaaa"])
