"""Two gloo processes on CPU, each with half the batch, give the gradients of one process on all of it.

Each rank runs a tiny linear "CLIP" whose parameters start identical, computes its local loss
(features gathered with gradients) and back-propagates; the ranks' parameter gradients averaged
as DDP does (all_reduce / world_size, or DDP itself) must equal the full-batch gradient.
"""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from clipforge.model.clip import ClipOutput
from clipforge.train import distributed
from clipforge.train.accumulation import accumulated_contrastive_backward
from clipforge.train.loss import ContrastiveLoss
from support.runs import free_port

WORLD, N = 2, 12  # global batch; 6 per rank
# (name, loss kind, tile size, micro-batches per rank or 0 for a plain step, wrap in DDP)
CASES = [
    ("clip", "clip", None, 0, False),
    ("clip-tiled", "clip", 4, 0, False),
    ("siglip", "siglip", None, 0, False),
    ("siglip-tiled", "siglip", 4, 0, False),
    ("clip-ddp", "clip", None, 0, True),
    ("clip-tiled-ddp-accumulated", "clip", 4, 3, True),
    ("siglip-accumulated", "siglip", None, 2, False),
]


class TinyClip(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(10, 8)
        self.text = nn.Linear(7, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if bias else None

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> ClipOutput:
        img = F.normalize(self.image(images), dim=-1)  # [B, 8]
        txt = F.normalize(self.text(tokens), dim=-1)  # [B, 8]
        return ClipOutput(img, txt, self.logit_scale.exp(), self.logit_bias)


def data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 10, generator=g, dtype=dtype), torch.randn(N, 7, generator=g, dtype=dtype)


def step(model: nn.Module, loss_fn: ContrastiveLoss, images, tokens, micro: int) -> torch.Tensor:
    """One backward; returns the loss. ``micro`` > 0: GradCache accumulation over that many pieces."""
    if micro:
        pieces = list(zip(images.chunk(micro), tokens.chunk(micro)))
        return accumulated_contrastive_backward(model, loss_fn, pieces)
    out = model(images, tokens)
    loss = loss_fn(*out)
    loss.backward()
    return loss.detach()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, str(info.device)) == (rank, WORLD, "cpu")
    assert dist.get_backend() == "gloo"
    results = {}
    for dtype in (torch.float64, torch.float32):
        images, tokens = data(dtype)
        local = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        for name, kind, tile, micro, ddp in CASES:
            model = TinyClip(bias=kind == "siglip").to(dtype)
            net = nn.parallel.DistributedDataParallel(model) if ddp else model
            loss_fn = ContrastiveLoss(kind, tile_size=tile, world_size=WORLD, rank=rank)
            loss = step(net, loss_fn, images[local], tokens[local], micro)
            grads = {}
            for n, p in model.named_parameters():
                # DDP already averaged; otherwise average as DDP would.
                grads[n] = p.grad.clone() if ddp else distributed.all_reduce_sum(p.grad) / WORLD
            results[(name, str(dtype))] = (distributed.all_reduce_sum(loss) / WORLD, grads)
    # Free the DDP wrappers before the process group goes: one outliving it can abort the worker
    # at exit ("terminate called without an active exception"), as train() avoids the same way.
    del net, model
    gc.collect()
    distributed.barrier()
    if distributed.is_main(info):
        torch.save(results, Path(out_dir) / "results.pt")
    distributed.cleanup()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "results.pt")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_match_one_process_on_the_full_batch(two_rank_results, case, dtype) -> None:
    name, kind, tile, micro, _ = case
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    model = TinyClip(bias=kind == "siglip").to(dtype)
    images, tokens = data(dtype)
    ref_loss = step(model, ContrastiveLoss(kind), images, tokens, 0)  # one process, no tiles, full batch
    loss, grads = two_rank_results[(name, str(dtype))]
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert grads.keys() == dict(model.named_parameters()).keys()
    for n, p in model.named_parameters():
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(grads[n], p.grad, rtol=tol, atol=tol, msg=f"{name}: {n}")


# -- helpers that need no process group ------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node07", "node07"),
        ("gpu-[003-006,9]", "gpu-003"),
        ("gpu-[003-006,9],cpu1", "gpu-003"),
        ("a1,b[2-3]", "a1"),
        ("rack[2-3]-n[10-11]", "rack2-n10"),
    ],
)
def test_first_slurm_host(nodelist: str, host: str) -> None:
    assert distributed._first_host(nodelist) == host


def test_launch_env_torchrun_slurm_and_single() -> None:
    assert distributed._launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == (3, 1, 8, {})
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODELIST": "g[04-07]"}
    rank, local, world, export = distributed._launch_env(slurm)
    assert (rank, local, world) == (5, 1, 8)
    assert export == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "g04", "MASTER_PORT": "29500"}
    assert distributed._launch_env({**slurm, "MASTER_ADDR": "h", "MASTER_PORT": "1"})[3] == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"
    }
    assert distributed._launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 0, 1, {})  # an salloc shell
    assert distributed._launch_env({}) == (0, 0, 1, {})


def test_single_process_helpers_are_identities(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size) == (0, 1) and distributed.is_main(info)
    assert not dist.is_initialized()
    t = torch.arange(3.0, requires_grad=True)
    assert distributed.gather_with_grad(t) is t
    total = distributed.all_reduce_sum(t.detach())
    assert torch.equal(total, t.detach()) and total is not t
    distributed.barrier()
    distributed.cleanup()
