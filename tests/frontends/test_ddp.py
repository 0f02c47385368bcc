"""Past one machine: a model compiled with the backend trains under DDP (2 CPU processes, gloo)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import attnrewrite
from _models import TinyAttention

STEPS = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = TinyAttention(), nn.Linear(16, 1)

    def forward(self, x):
        return self.head(x + self.attn(x)).mean()


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)                       # the same initial weights on every rank
        model = Net()
        start = [p.detach().clone() for p in model.parameters()]
        backend = attnrewrite.compile_backend("sparse", mode="topk", k=3, inner="eager")
        step = torch.compile(DistributedDataParallel(model), backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(100 + rank)       # different data on every rank
        for _ in range(STEPS):
            loss = step(torch.randn(4, 8, 16, generator=gen)) ** 2
            loss.backward()
            opt.step()
            opt.zero_grad()
        torch.save({"start": start, "end": [p.detach() for p in model.parameters()],
                    "rewritten": backend.sites_rewritten}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_end_identical_and_trained(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["rewritten"] >= 1 and r1["rewritten"] >= 1
    for a, b, s in zip(r0["end"], r1["end"], r0["start"]):
        assert torch.equal(a, b)                   # gradients were all-reduced: identical replicas
    assert any(not torch.equal(a, s) for a, s in zip(r0["end"], r0["start"]))   # and they trained
