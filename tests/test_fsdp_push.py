"""The weight push of a policy sharded with FSDP2 (``train.fsdp``) gathers one tensor at a time.

Two real gloo processes (torchrun) shard a tiny Llama (full, and under LoRA with nonzero adapters) with
``fully_shard``; nothing is faked (``fsdp_push_peer.py``). Process 0 packs the lazily gathered weights into
buckets as the collective push does, process 1 only takes part in the gathers; the tensors pushed equal the
unsharded model's, and no earlier tensor is still alive when the next one is gathered.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
def test_a_sharded_push_holds_one_full_tensor_at_a_time_and_equals_the_unsharded_weights(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as probe:  # torchrun's --master_port 0 is not a free port: it waits there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           str(HERE / "fsdp_push_peer.py"), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for case in ("full", "lora"):
        r = report[case]
        assert r["names"] and r["equal"], case  # the unsharded model's names and values, LoRA merged, bit for bit
        assert r["count"] > 10  # embeddings, 2 layers of 9 tensors, the norm
        assert r["alive_max"] == 0, case  # every tensor was dropped (packed) before the next gather
        assert r["hoard_alive_max"] == r["count"], case  # the count sees a consumer that keeps them all
