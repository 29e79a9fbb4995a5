"""One of two gloo processes of test_fsdp_push.py (started by torchrun): a tiny Llama, full and under LoRA,
sharded for real with FSDP2; its pushed weights gathered one at a time, packed into buckets on process 0
while process 1 only takes part in the gathers. Process 0 writes what it saw to the JSON file argv[1]."""

from __future__ import annotations

import json
import sys
import weakref

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from oaif.generation import weight_group as wg
from oaif.generation.weights import GatheredWeights, policy_weights, take_part
from oaif.models.sharding import shard


def build(lora: bool):
    torch.manual_seed(0)  # the same model on both processes
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a delta that is not zero makes the merge show
                torch.nn.init.normal_(p)
    return model


def tracked(weights, alive: list[int]):
    """``weights``, noting before each next tensor is made (gathered) how many of those given before are still alive."""
    it, refs = iter(weights), []
    while True:
        alive.append(sum(r() is not None for r in refs))
        try:
            item = next(it)
        except StopIteration:
            return
        refs.append(weakref.ref(item[1]))
        yield item
        del item


def measure(rank: int) -> dict:
    report = {}
    for case in ("full", "lora"):
        want = {n: t.clone() for n, t in policy_weights(build(case == "lora"))}  # unsharded, as one process pushes
        model = build(case == "lora")
        shard(model)
        weights = policy_weights(model)
        assert isinstance(weights, GatheredWeights)
        alive, got = [], {}
        if rank == 0:  # the main process packs them as the collective push does (a 4 KiB bucket: several tensors)
            for header, buffer in wg.packed(tracked(weights, alive), 4096, torch.device("cpu")):
                got.update((n, t.clone()) for n, t in wg.unpack(header, buffer))
        else:
            take_part(GatheredWeights(tracked(weights, alive)))
        held = []  # a consumer that keeps every tensor (on both processes): the count sees it, so the check can fail
        hoard = list(tracked(policy_weights(model), held))
        report[case] = {"alive_max": max(alive), "hoard_alive_max": max(held), "count": len(hoard),
                        "names": sorted(got) == sorted(want),
                        "equal": all(torch.equal(got[n], want[n]) for n in want if n in got)}
    return report


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = measure(rank)  # its sharded models are freed on return, before the group goes
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
    dist.barrier()  # neither process tears the group down while the other may still use it (CI saw one abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
