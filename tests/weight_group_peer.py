"""The other member of a weight-sync group for tests/test_weight_group.py: joins the group the test hosts
as rank 1 and saves each push it receives (``torch.save`` of the (name, tensor) list), or, with ``leave``,
exits right after joining (a server that stopped).

    python weight_group_peer.py PORT PUSHES OUT_PREFIX [leave]
"""

import sys

import torch

from oaif.generation import weight_group as wg

port, pushes, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
store = wg.connect_store("127.0.0.1", port, 2, 30)
group = wg.join_group(store, rank=1, size=2, backend="gloo", timeout_s=30, address="127.0.0.1")
if sys.argv[4:] == ["leave"]:
    group.close()
    sys.exit(0)
for i in range(pushes):
    torch.save([(name, t.clone()) for name, t in wg.receive_weights(group)], f"{prefix}{i}.pt")
group.close()
