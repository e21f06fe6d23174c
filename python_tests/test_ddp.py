"""Memory-free InvertibleSequential under DistributedDataParallel: two CPU processes on gloo train a
few steps; the parameters equal single-process training on the whole batch and agree across ranks."""

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

STEPS = 3
WORLD = 2


def build_model():
    import test_sequential  # noqa: PLC0415

    torch.manual_seed(0)
    return test_sequential.chain(8, torch.float64, squeeze=False)


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2 * WORLD, 4, 8, 8, dtype=torch.float64, generator=g) for _ in range(STEPS)]


def nll(model, x):
    y, logdet = model(x)
    log_pz = -0.5 * (y.square() + math.log(2 * math.pi)).flatten(1).sum(1)
    return -(log_pz + logdet).mean()


def train(model, shard=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for x in batches():
        if shard is not None:
            x = x.chunk(WORLD)[shard]
        opt.zero_grad()
        nll(model, x).backward()
        opt.step()


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(build_model())
        train(model, shard=rank)
        torch.save([p.detach() for p in model.module.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    import sys  # noqa: PLC0415

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = build_model()
    before = [p.detach().clone() for p in single.parameters()]
    train(single)
    after = [p.detach() for p in single.parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(after, before))
    assert moved > 1e-6
    for a, b in zip(ranks[0], ranks[1]):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0], after):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
