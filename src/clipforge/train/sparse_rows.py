"""Token tables updated only at the rows a batch uses (``OptimConfig.sparse_embeddings``).

CLIP's token table has 49,408 rows, and a small model on a small vocabulary (the demo's world uses a
few hundred tokens) spends a large part of each CPU step on it: zeroing a dense gradient the size of
the table, measuring its norm and running AdamW over every row. With the table's gradient sparse
(``nn.Embedding(sparse=True)``: the rows a batch looked up), ``RowAdamW`` updates only those rows,
with Adam's moments kept per row and advanced when the row is used ("lazy" Adam, as PyTorch's
SparseAdam); every other parameter goes through AdamW as before (its fused kernel). The table is
never weight-decayed (``optim.decays``), so a row left alone is exactly where AdamW without momentum
would leave it; what differs is that an unused row does not keep drifting on its old momentum.

Single process only: the trainer refuses the option under DDP/FSDP, whose gradient reduction is
built for dense tensors.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


def sparse_tables(model: nn.Module) -> list[nn.Embedding]:
    """The token tables of ``model``'s text tower made to produce sparse gradients (others keep dense)."""
    table = getattr(getattr(model, "text", None), "token_embedding", None)
    if not isinstance(table, nn.Embedding):
        raise ValueError("sparse_embeddings needs a text tower with a token table (clipforge's text transformer)")
    table.sparse = True
    return [table]


class RowAdamW(torch.optim.AdamW):
    """AdamW, except that parameters whose gradient is sparse are updated at their gradient's rows only
    (lazy Adam moments per row); its ``state_dict`` has AdamW's layout, so checkpoints resume as AdamW's."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held: list[tuple[nn.Parameter, torch.Tensor, dict[str, Any]]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    held.append((p, p.grad, group))
                    p.grad = None  # AdamW skips a parameter without a gradient
        super().step()
        for p, grad, group in held:
            p.grad = grad
            self._row_update(p, grad.coalesce(), group)
        return loss

    def _row_update(self, p: nn.Parameter, grad: torch.Tensor, group: dict[str, Any]) -> None:
        rows, values = grad.indices()[0], grad.values()  # [R], [R, D]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        m = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
        v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        update = m.div_(denom).mul_(lr / (1 - beta1**step))
        if wd:
            update.add_(p[rows], alpha=lr * wd)  # decoupled decay, at the rows updated
        p.index_add_(0, rows, update, alpha=-1.0)


def sparse_grad_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of sparse gradients (each coalesced first: repeated rows add up)."""
    norms = [torch.linalg.vector_norm(g.coalesce().values()) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
