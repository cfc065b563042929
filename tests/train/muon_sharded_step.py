"""Run by tests/train/test_muon.py under torch.distributed.run with 2 processes (gloo): the same model
plain on each rank and sharded with FSDP2 over both, the same full gradients given to each, three
optimizer steps of `model.optim.optimizer: muon`, with the Newton-Schulz iteration in bf16 and in
fp32; rank 0 writes, per precision and parameter, the largest difference between the sharded and the
plain weights.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/muon_sharded_step.py OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.train.optim import OptimConfig, build_optimizer


def steps(ns_dtype: str) -> dict[str, float]:
    torch.manual_seed(0)
    config = LlamaConfig.from_name("ci", intermediate_size=96)  # a tall, a wide and square matrices
    plain = Llama(config)
    sharded = Llama(config)
    sharded.load_state_dict(plain.state_dict())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in sharded.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    o = OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_weight_decay=0.01, warmup_steps=0,
                    muon_ns_dtype=ns_dtype)
    optimizers = build_optimizer(plain, o), build_optimizer(sharded, o)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for (_, p), (_, q) in zip(plain.named_parameters(), sharded.named_parameters()):
            full = torch.randn(p.shape, generator=gen)
            p.grad = full.clone()
            q.grad = distribute_tensor(full, q.device_mesh, q.placements, src_data_rank=None)
        for opt in optimizers:
            for group, ratio in zip(opt.param_groups, opt.lr_ratios):
                group["lr"] = 1e-3 * ratio
            opt.step()
    return {name: float((q.full_tensor() - p.detach()).abs().max())
            for (name, p), (_, q) in zip(plain.named_parameters(), sharded.named_parameters())}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    report = {ns_dtype: steps(ns_dtype) for ns_dtype in ("bfloat16", "float32")}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
