"""A process group of the trainer and a vLLM server's workers, and the weights sent through it in buckets.

``vllm.weight_sync=collective``: the trainer's main process is rank 0, the server's workers ranks
1..W (W = the server's tensor-parallel size). The group is built from a ``torch.distributed.TCPStore``
that the trainer hosts, *without* ``init_process_group``, so it lives beside the trainer's own
process group (accelerate's, with several training processes) and the server's. The backend is the
only difference between CPU (gloo) and GPUs (NCCL).

A push is a series of buckets. Each bucket packs whole tensors into one flat byte buffer of about
``vllm.sync_bucket_mib`` (a larger tensor travels alone; each tensor is copied in as it comes), and
is sent as three broadcasts from rank 0: its sizes (two int64: header bytes, buffer bytes), a JSON
header (name, dtype, shape, offset of each tensor) and the buffer; sizes ``(0, 0)`` end the push.
The sender packs the next bucket while the previous one is in flight, so at most two buckets are
held at once; the receiver yields the tensors of each bucket as views into its buffer
(:func:`receive_weights`), which is what vLLM's
``model.load_weights`` reads from.
"""

from __future__ import annotations

import datetime
import json
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from oaif.errors import ConfigError
from oaif.generation.base import GenerationError

_ALIGN = 64  # bytes; every tensor starts at a multiple, so a view of any dtype is aligned


@dataclass
class WeightGroup:
    """One rank's handle on the group: the process group, where its buffers live, and who it is."""

    pg: dist.ProcessGroup
    rank: int
    size: int
    device: torch.device
    store: dist.Store | None = None  # the trainer keeps its store alive as long as the group

    def close(self) -> None:
        """Leave the group (its peers see the connection close)."""
        try:
            self.pg.shutdown()
        except (RuntimeError, AttributeError):  # already broken, or a torch without shutdown()
            pass


def gpu_id(device: torch.device | str | None = None) -> str | None:
    """The UUID of a CUDA device (the current one by default); None on CPU."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None and torch.cuda.is_available() \
        else torch.device(device or "cpu")
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def resolve_backend(setting: str, device: torch.device | str, server_gpus: list[str | None] = ()) -> str:
    """``vllm.sync_backend``: ``auto`` is nccl when the weights are on a CUDA device, else gloo. NCCL cannot
    hold two ranks on one GPU: when a server worker is on the trainer's GPU, auto is gloo, and nccl is refused."""
    mine = gpu_id(device) if torch.device(device).type == "cuda" and torch.cuda.is_available() else None
    shared = mine is not None and mine in server_gpus
    if setting == "nccl" and shared:
        raise ConfigError(f"vllm.sync_backend=nccl: the vLLM server runs on the trainer's GPU ({device}), and NCCL "
                          f"cannot join two ranks on one GPU; use auto or gloo, or start the server on another GPU")
    if setting != "auto":
        return setting
    return "nccl" if torch.device(device).type == "cuda" and not shared else "gloo"


def host_store(host: str, port: int, size: int, timeout_s: float) -> dist.TCPStore:
    """The trainer's store (it listens on every interface; ``port`` 0 picks a free one: ``store.port``)."""
    try:  # an address of another machine: said here, before torch's store retries it noisily
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
    except OSError as e:
        raise ConfigError(f"vllm.sync_host={host}: cannot host the weight-sync group's store there ({e.strerror or e}); "
                          f"is it this machine's address, as the server reaches it?") from e
    try:
        return dist.TCPStore(host, port, size, True, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError is a RuntimeError
        if "EADDRINUSE" in str(e) or "already in use" in str(e):
            raise ConfigError(f"vllm.sync_port={port}: cannot listen for the weight-sync group (address already "
                              f"in use); use another port or 0 (a free one)") from e
        raise ConfigError(f"vllm.sync_host={host}: cannot host the weight-sync group's store there "
                          f"({_first_line(e)}); is it this machine's address, as the server reaches it?") from e


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


def local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (no packet is sent: a UDP socket is only connected)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port or 9))
            return s.getsockname()[0]
    except OSError:
        return host


def join_group(store: dist.Store, *, rank: int, size: int, backend: str, timeout_s: float,
               address: str) -> WeightGroup:
    """Form the group (this call returns once every rank has joined, or raises after ``timeout_s``).

    ``address`` is where this rank listens for its peers (gloo: the trainer's ``vllm.sync_host``; a
    server worker, its own address on the route to it)."""
    try:
        return _form(store, rank=rank, size=size, backend=backend, timeout_s=timeout_s, address=address)
    except (RuntimeError, OSError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
        raise GenerationError(f"the weight-sync group (rank {rank} of {size}, {backend}) did not form within "
                              f"{timeout_s:g}s (vllm.sync_timeout_s): {_first_line(e)}") from e


def _form(store: dist.Store, *, rank: int, size: int, backend: str, timeout_s: float, address: str) -> WeightGroup:
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore("oaif_weight_sync", store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        pg = dist.ProcessGroupGloo(prefixed, rank, size, opts)
        device = torch.device("cpu")
    elif backend == "nccl":
        if not torch.cuda.is_available() or not hasattr(dist, "ProcessGroupNCCL"):
            raise ConfigError("vllm.sync_backend=nccl: this torch has no CUDA/NCCL; use gloo (or auto)")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, size, opts)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise ConfigError(f"vllm.sync_backend: expected gloo or nccl, got {backend!r}")
    return WeightGroup(pg, rank, size, device)


def connect_store(host: str, port: int, size: int, timeout_s: float) -> dist.TCPStore:
    """A client of the trainer's store (a server worker's side)."""
    return dist.TCPStore(host, port, size, False, timeout=datetime.timedelta(seconds=timeout_s))


# -- buckets --------------------------------------------------------------------------------------

def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def packed(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
           device: torch.device) -> Iterator[tuple[bytes, torch.Tensor]]:
    """The weights in buckets of about ``bucket_bytes`` (whole tensors, in order; a larger tensor alone), each
    ``(header, buffer)``: a JSON header naming each tensor's dtype, shape and byte offset, and the bytes. Each
    tensor is copied into its bucket's buffer as it comes and dropped at once, so tensors gathered one at a
    time (a sharded policy) are never held more than one at a time here."""
    entries, buffer, used = [], None, 0
    for name, t in weights:
        n = t.numel() * t.element_size()
        if entries and used + _aligned(n) > bucket_bytes:
            yield json.dumps(entries).encode(), buffer[:used]
            entries, buffer, used = [], None, 0
        if buffer is None:
            buffer = torch.empty(max(bucket_bytes, _aligned(n)), dtype=torch.uint8, device=device)
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), used])
        if n:
            buffer[used:used + n].copy_(t.detach().reshape(-1).view(torch.uint8))  # detached: no grad kept
        used += _aligned(n)
        del t  # before the next tensor is made (a gather)
    if entries:
        yield json.dumps(entries).encode(), buffer[:used]


def unpack(header: bytes, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a packed bucket, as views into ``buffer`` (the inverse of :func:`pack`)."""
    out = []
    for name, dtype, shape, start in json.loads(header):
        dt = getattr(torch, dtype)
        numel = 1
        for d in shape:
            numel *= d
        n = numel * torch.empty((), dtype=dt).element_size()
        out.append((name, buffer[start:start + n].view(dt).view(shape)))
    return out


def _broadcast(group: WeightGroup, t: torch.Tensor):
    return group.pg.broadcast([t], dist.BroadcastOptions())


def send_weights(group: WeightGroup, weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> int:
    """Broadcast the weights from rank 0 in buckets; the number of bytes sent. Raises what the group raises
    (a peer gone, a timeout)."""
    in_flight, sent = [], 0

    def launch(header: bytes, buffer: torch.Tensor) -> list:
        sizes = torch.tensor([len(header), buffer.numel()], dtype=torch.int64, device=group.device)
        head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(group.device) if header else \
            torch.empty(0, dtype=torch.uint8, device=group.device)
        works = [_broadcast(group, sizes)]
        if header:
            works += [_broadcast(group, head), _broadcast(group, buffer)]
        return [(w, (sizes, head, buffer)) for w in works]  # the tensors stay alive until their work is done

    # no torch.no_grad() here: ``weights`` may be a generator that sets the grad mode itself (policy_weights),
    # and a block around its end would restore the mode it found, not the caller's
    for header, buffer in packed(weights, bucket_bytes, group.device):
        sent += buffer.numel()
        for work, _ in in_flight:  # the previous bucket is delivered before a third one is packed
            work.wait()
        in_flight = launch(header, buffer)
    for work, _ in in_flight:
        work.wait()
    for work, _ in launch(b"", torch.empty(0, dtype=torch.uint8, device=group.device)):
        work.wait()
    return sent


def _receive(group: WeightGroup, shape: int, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=group.device)
    _broadcast(group, t).wait()
    return t


def receive_weights(group: WeightGroup) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors rank 0 sends with :func:`send_weights`, bucket by bucket, until its end marker."""
    while True:
        header_len, nbytes = (int(v) for v in _receive(group, 2, torch.int64).tolist())
        if header_len == 0:
            return
        header = bytes(_receive(group, header_len, torch.uint8).cpu().numpy())
        yield from unpack(header, _receive(group, nbytes, torch.uint8))
