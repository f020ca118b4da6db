"""Process-group setup (torchrun or SLURM) and the few collectives training needs.

Every helper is a no-op (or the identity) when the process group is not initialised, so
single-process code calls them unconditionally.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu-[003-006,9],cpu1' -> 'gpu-003'."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # split on commas outside brackets
    # Each bracket group stands for a set of ranges; its first range's start is the first host.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first)


def _launch_env(env: Mapping[str, str]) -> tuple[int, int, int, dict[str, str]]:
    """(rank, local_rank, world_size, variables to export) from torchrun's or SLURM's variables."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.launch
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), {}
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:  # srun, one task per GPU
        rank, local, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
        export = {"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world)}
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise RuntimeError("SLURM launch without MASTER_ADDR or SLURM_NODELIST: cannot find rank 0's host")
            export["MASTER_ADDR"] = _first_host(nodelist)
        if "MASTER_PORT" not in env:
            export["MASTER_PORT"] = "29500"
        return rank, local, world, export
    return 0, 0, 1, {}


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by the launcher's environment variables.

    Not launched distributed (or world size 1): returns rank 0 of 1 without creating a group.
    Backend: NCCL when CUDA is available, else gloo (override with ``backend``). The device is
    this process's GPU (LOCAL_RANK) when CUDA is available, unless gloo was asked for: then CPU.
    """
    rank, local_rank, world_size, export = _launch_env(os.environ)
    cuda = torch.cuda.is_available() and backend != "gloo"
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        os.environ.update(export)
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main(info: DistInfo) -> bool:
    return info.rank == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks, as a new tensor (the input is left as it was).

    The tensor must live where the backend can reach it: CPU for gloo, CUDA for NCCL.
    """
    out = tensor.clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    Every rank's loss depends on every rank's features, so the gradient of the features of
    rank r is the sum over ranks of d(loss_k)/d(features_r): an all-reduce, then our slice.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts)  # [W*B, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce writes in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` [B, ...] from all ranks in rank order -> [W*B, ...], differentiably.

    Every rank must pass the same shape (use drop_last batches). Identity when not distributed.
    """
    if not _active():
        return t
    return _GatherWithGrad.apply(t)
