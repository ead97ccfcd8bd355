"""CompiledSOAP under torch.distributed DDP (gloo, 2 CPU processes): every rank runs the full optimizer step on
the all-reduced gradients, so the replicas must stay identical and equal a single-process run on the same averaged
gradients.

(Against a full-batch run the comparison would be meaningless: SOAP's first update is sign-like per eigen-direction,
so gradient rounding flips the tiny components of a tanh network's gradient.)"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compiled_soap import CompiledSOAP

STEPS = 8


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=gen)
    y = torch.randn(32, 6, generator=gen)
    return x, y


def _model():
    # Square layers: their factors are full rank from the first gradient, so the rounding difference between an
    # all-reduced and a full-batch gradient stays a rounding difference (spec trap 7).
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = CompiledSOAP(model.parameters(), precondition_frequency=3, compile=False)
    x, y = _data()
    shard = slice(rank * 16, (rank + 1) * 16)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_replicas_agree_with_single_process(tmp_path):
    out = tmp_path / "params.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    rank0, rank1 = torch.load(out)
    assert torch.equal(rank0, rank1)

    # The same optimizer in one process, fed the average of the two half-batch gradients: DDP pre-divides each
    # rank's gradient by the world size (exact for 2) and sums, which gives bitwise the same average.
    model = _model()
    opt = CompiledSOAP(model.parameters(), precondition_frequency=3, compile=False)
    x, y = _data()
    for _ in range(STEPS):
        halves = []
        for shard in (slice(0, 16), slice(16, 32)):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
            halves.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *halves):
            p.grad = (g0 + g1) / 2
        opt.step()
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    assert not torch.equal(single, start)
    torch.testing.assert_close(rank0, single, rtol=0, atol=1e-7)
