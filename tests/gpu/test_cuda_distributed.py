"""Distributed training on CUDA, in one process: ``init_distributed`` picks the GPU, an NCCL process
group of world size 1 (a tcp://127.0.0.1 store) runs the collectives the trainer uses, and a
DDP-wrapped model takes the same ``TrainStep`` as the bare one. Skipped without CUDA."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist

import clipforge
from clipforge.train.config import OptimConfig
from clipforge.train.distributed import init_distributed
from clipforge.train.optim import build_optimizer
from clipforge.train.step import TrainStep

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda", 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nccl():
    if not dist.is_nccl_available():
        pytest.fail("this CUDA build of torch has no NCCL")
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_init_distributed_without_a_launcher_takes_the_first_gpu(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.device) == (0, 1, CUDA)


def test_nccl_collectives_on_one_rank(nccl):
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    t = torch.arange(6.0, device=CUDA)
    dist.all_reduce(t)
    parts = [torch.empty_like(t)]
    dist.all_gather(parts, t)
    dist.barrier()
    torch.cuda.synchronize()
    assert torch.equal(parts[0], torch.arange(6.0, device=CUDA))


def test_ddp_step_over_nccl_equals_the_bare_step(nccl):
    from torch.nn.parallel import DistributedDataParallel

    bare = clipforge.create_model("tiny", seed=0).to(CUDA).train()
    wrapped = copy.deepcopy(bare)
    ddp = DistributedDataParallel(wrapped, device_ids=[CUDA.index])
    s = bare.config.vision.image_size
    images = torch.randn(8, 3, s, s, device=CUDA)
    tokens = clipforge.tokenize([f"caption {i}" for i in range(8)]).to(CUDA)
    results = []
    for module, params in ((bare, bare), (ddp, wrapped)):
        opt = build_optimizer(params, OptimConfig(lr=1e-3))
        results.append(TrainStep(module, opt, device=CUDA).step([(images, tokens)]))
    assert all(r.applied for r in results)
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-5)
    for (name, a), b in zip(bare.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)  # one rank: DDP's average is the identity
