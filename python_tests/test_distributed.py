"""torch.distributed: two CPU processes on gloo train memory-free flows with DistributedDataParallel
and with FSDP2 (``fully_shard``); the ranks agree bit for bit and equal single-process training on
the whole batch. ActNorm's data-dependent initialization is merged over the ranks.

The two workers run every scenario in one process group (spawning is the slow part); each test
checks one scenario's results against a single-process run in the test process."""

import math
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from invkernels.models import Glow
from invkernels.nn import ActNorm

STEPS = 3
WORLD = 2
GLOW = {"in_shape": (1, 8, 8), "levels": 2, "steps": 2, "hidden": 16}


def fresh_chain():
    """The chain of every block type, its ActNorm layers left to initialize from the data."""
    import test_sequential  # noqa: PLC0415

    torch.manual_seed(0)
    blocks = [test_sequential.block_of(kind, 4) for kind in test_sequential.KINDS]
    return test_sequential.InvertibleSequential(*blocks).double()


def fresh_glow():
    """A new Glow (ActNorm uninitialized). Its couplings start as the identity (zero last layers),
    where the gradient of the first ActNorm's bias is zero up to rounding and Adam's first step
    divides that rounding noise by its own size; random coupling weights make every gradient
    well-conditioned, so runs that differ only in rounding stay within 1e-10."""
    torch.manual_seed(0)
    glow = Glow(**GLOW).double()
    with torch.no_grad():
        for name, p in glow.named_parameters():
            if ".coupling." in name:
                p.copy_(0.1 * torch.randn_like(p))
    return glow


def dropout_conv(c_in, c_out):
    return torch.nn.Sequential(torch.nn.Conv2d(c_in, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Conv2d(8, c_out, 3, padding=1))


def fresh_reversible_chain(dropout=False, memory_free=True):
    """A RevNet-style chain: ReversibleBlocks (additive and affine) with half swaps between them,
    with dropout in both subnets of every block when asked."""
    from invkernels.nn import InvertibleSequential, Permute, ReversibleBlock  # noqa: PLC0415

    torch.manual_seed(0)
    blocks = []
    for coupling in ("additive", "affine", "additive"):
        subnet = dropout_conv if dropout else "conv"
        blocks += [ReversibleBlock(4, subnet, hidden=None if dropout else 8, coupling=coupling), Permute(4, "swap")]
    chain = InvertibleSequential(*blocks, memory_free=memory_free).double()
    with torch.no_grad():
        for p in chain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return chain


def chain_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2 * WORLD, 4, 8, 8, dtype=torch.float64, generator=g) * 3 + 1 for _ in range(STEPS)]


def glow_batches():
    g = torch.Generator().manual_seed(2)
    return [torch.rand(2 * WORLD, *GLOW["in_shape"], dtype=torch.float64, generator=g) for _ in range(STEPS)]


def chain_nll(model, x):
    y, logdet = model(x)
    return -(-0.5 * (y.square() + math.log(2 * math.pi)).flatten(1).sum(1) + logdet).mean()


def glow_nll(model, x):
    return -model.log_prob(x).mean()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, params, batches, loss, opt_type, shard=None):
    """Parameters (full tensors, detached) after each step."""
    opt = opt_type(params(), lr=1e-3)
    after = []
    for x in batches:
        if shard is not None:
            x = x.chunk(WORLD)[shard]
        opt.zero_grad()
        loss(model, x).backward()
        opt.step()
        after.append([full(p).detach().clone() for p in params()])
    return after


def uneven_actnorm_data():
    """Data with a large mean and a tiny spread (sums of squares cancel on it), split 3 + 5."""
    g = torch.Generator().manual_seed(3)
    x = 1e4 + 1e-4 * torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=g)
    return x, (x[:3], x[3:])


class NegLogLikelihood(torch.nn.Module):
    """``-log p(x)`` averaged over the batch, as one module so DistributedDataParallel wraps the
    whole computation."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return -self.flow.log_prob(x).mean()


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank)
            except Exception:  # noqa: BLE001 -- reported by the test of this scenario
                results[name] = traceback.format_exc()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def ddp_chain(rank):
    model = DistributedDataParallel(fresh_chain())
    return train(model, model.parameters, chain_batches(), chain_nll, torch.optim.SGD, rank)


def ddp_glow(rank):
    model = DistributedDataParallel(NegLogLikelihood(fresh_glow()))
    return train(model, model.parameters, glow_batches(), lambda m, x: m(x), torch.optim.Adam, rank)


def actnorm_uneven(rank):
    layer = ActNorm(3).double()
    layer(uneven_actnorm_data()[1][rank])
    return [layer.bias.detach().clone(), layer.log_scale.detach().clone()]


def fsdp_glow(rank, per_step):
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # noqa: PLC0415

    glow = fresh_glow()
    if per_step:
        for flow in glow.flows:
            for block in flow.blocks[1:]:
                fully_shard(block)
    fully_shard(glow)
    register_fsdp_forward_method(glow, "sample")
    after = train(glow, glow.parameters, glow_batches(), glow_nll, torch.optim.Adam, rank)
    torch.manual_seed(7)
    return after, glow.sample(3)


def fsdp_reversible(rank, per_block, dropout=False, memory_free=True):
    """FSDP2 on each ReversibleBlock (the pattern of docs/distributed.md) or on the root alone."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    chain = fresh_reversible_chain(dropout, memory_free)
    if per_block:
        for block in chain.blocks[::2]:
            fully_shard(block)
    fully_shard(chain)
    torch.manual_seed(100 + rank)
    return train(chain, chain.parameters, chain_batches(), chain_nll, torch.optim.Adam, rank)


def ddp_reversible_dropout(rank, memory_free):
    model = DistributedDataParallel(fresh_reversible_chain(True, memory_free))
    torch.manual_seed(100 + rank)
    return train(model, model.parameters, chain_batches(), chain_nll, torch.optim.Adam, rank)


SCENARIOS = {
    "ddp_chain": ddp_chain,
    "ddp_glow": ddp_glow,
    "actnorm_uneven": actnorm_uneven,
    "fsdp_steps": lambda rank: fsdp_glow(rank, per_step=True),
    "fsdp_root": lambda rank: fsdp_glow(rank, per_step=False),
    "fsdp_reversible_blocks": lambda rank: fsdp_reversible(rank, per_block=True),
    "fsdp_reversible_root": lambda rank: fsdp_reversible(rank, per_block=False),
    # Dropout in both subnets of every block: each rank draws its own masks (seeded per rank), so
    # the memory-free runs are compared with the same runs under plain autograd.
    **{f"{kind}_dropout_{mode}": (lambda rank, kind=kind, mf=(mode == "memory_free"):
                                  ddp_reversible_dropout(rank, mf) if kind == "ddp" else
                                  fsdp_reversible(rank, kind == "fsdp_blocks", True, mf))
       for kind in ("ddp", "fsdp_blocks", "fsdp_root") for mode in ("memory_free", "plain")},
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def result(ranks, key, rank=0):
    value = ranks[rank][key]
    if isinstance(value, str):
        pytest.fail(f"rank {rank} raised in scenario {key}:\n{value}")
    return value


def assert_ranks_identical(ranks, key):
    result(ranks, key, 1)
    for step_a, step_b in zip(ranks[0][key], ranks[1][key]):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)


def assert_equal_to_single(ranks, key, single):
    assert len(result(ranks, key)) == len(single) == STEPS
    for step, (got, want) in enumerate(zip(ranks[0][key], single)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {step + 1}: {m}")


def test_ddp_chain_of_every_block_type(ranks):
    single = fresh_chain()
    before = [p.detach().clone() for p in single.parameters()]
    after = train(single, single.parameters, chain_batches(), chain_nll, torch.optim.SGD)
    assert max((a - b).abs().max().item() for a, b in zip(after[-1], before)) > 1e-6
    assert_ranks_identical(ranks, "ddp_chain")
    assert_equal_to_single(ranks, "ddp_chain", after)


def test_ddp_glow_with_fresh_actnorm(ranks):
    single = NegLogLikelihood(fresh_glow())
    after = train(single, single.parameters, glow_batches(), lambda m, x: m(x), torch.optim.Adam)
    assert_ranks_identical(ranks, "ddp_glow")
    assert_equal_to_single(ranks, "ddp_glow", after)


def test_actnorm_initialization_merges_uneven_shards(ranks):
    x, _ = uneven_actnorm_data()
    layer = ActNorm(3).double()
    y, _ = layer(x)
    for a, b in zip(result(ranks, "actnorm_uneven"), result(ranks, "actnorm_uneven", 1)):
        assert torch.equal(a, b)
    torch.testing.assert_close(ranks[0]["actnorm_uneven"][0], layer.bias.detach(), rtol=1e-12, atol=0)
    # float64 holds the deviations (1e-4) of values near 1e4 to ulp(1e4) / 1e-4 = 2e-8 relative, so
    # two correct orders of summation agree on the standard deviation to about that; a sum of
    # squares (E[x²] - mean²) would be off by 100%.
    torch.testing.assert_close(ranks[0]["actnorm_uneven"][1], layer.log_scale.detach(), rtol=0, atol=2e-8)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64),
                               rtol=2e-8, atol=0)


@pytest.mark.parametrize("key", ["fsdp_steps", "fsdp_root"])
def test_fsdp2_memory_free_glow(ranks, key):
    single = fresh_glow()
    after = train(single, single.parameters, glow_batches(), glow_nll, torch.optim.Adam)
    torch.manual_seed(7)
    samples = single.sample(3)
    got = [result(ranks, key, rank) for rank in range(WORLD)]
    ranks = [{key: got[rank][0]} for rank in range(WORLD)]
    assert_ranks_identical(ranks, key)
    assert_equal_to_single(ranks, key, after)
    for rank in range(WORLD):
        torch.testing.assert_close(got[rank][1], samples, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("key", ["fsdp_reversible_blocks", "fsdp_reversible_root"])
def test_fsdp2_memory_free_reversible_chain(ranks, key):
    """Blocks on halves under fully_shard: the chain enters them through __call__, where FSDP2
    gathers their parameters."""
    single = fresh_reversible_chain()
    after = train(single, single.parameters, chain_batches(), chain_nll, torch.optim.Adam)
    assert_ranks_identical(ranks, key)
    assert_equal_to_single(ranks, key, after)


@pytest.mark.parametrize("kind", ["ddp", "fsdp_blocks", "fsdp_root"])
def test_dropout_in_both_subnets_trains_as_plain_autograd_on_every_rank(ranks, kind):
    """DDP, FSDP2 per block and FSDP2 on the root, with dropout in f and g of every ReversibleBlock:
    each rank's memory-free training equals the same training under plain autograd."""
    for rank in range(WORLD):
        got, want = result(ranks, f"{kind}_dropout_memory_free", rank), result(ranks, f"{kind}_dropout_plain", rank)
        assert len(got) == len(want) == STEPS
        for step, (a_step, b_step) in enumerate(zip(got, want)):
            for a, b in zip(a_step, b_step):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {rank} step {step}: {m}")
    assert_ranks_identical(ranks, f"{kind}_dropout_memory_free")
