"""Autocast's weight casts kept across batches (``utils.autocast_casts_kept``)."""

import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from clipforge.utils import autocast, autocast_casts_kept

CPU = torch.device("cpu")


def _batches(keep: bool) -> list[tuple[torch.Tensor, int]]:
    """Three bf16 batches through two Linear layers: (output, casts counted in that batch)."""
    torch.manual_seed(0)
    net, x = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), torch.randn(4, 8)
    out = []
    with torch.no_grad(), autocast_casts_kept("bf16", CPU) if keep else contextlib.nullcontext():
        for _ in range(3):
            with profile(activities=[ProfilerActivity.CPU]) as prof, autocast("bf16", CPU):
                y = net(x)
            assert not torch.is_autocast_enabled("cpu")  # off between batches
            out.append((y, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")))
    return out


def test_weights_are_cast_once_per_run_not_once_per_batch():
    per_batch, kept = _batches(False), _batches(True)
    assert [n for _, n in per_batch] == [5, 5, 5]  # four weights and biases, and the input, every batch
    assert [n for _, n in kept] == [5, 1, 1]  # later batches cast only their input
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(per_batch, kept))
    assert isinstance(autocast_casts_kept("fp32", CPU), contextlib.nullcontext)
