"""Token tables that AdamW updates without touching their unused rows (``OptimConfig.sparse_embeddings``).

CLIP's token table has 49,408 rows, and a small model on a small vocabulary (the demo's world uses a
few hundred tokens) spends a large part of each CPU step on it: zeroing a dense gradient the size of
the table, measuring its norm and running AdamW over every row. With the table's gradient sparse
(``nn.Embedding(sparse=True)``: the rows a batch looked up), ``RowAdamW`` runs AdamW's update on the
rows that have ever been used (their moments keep decaying when a batch skips them, as AdamW's do)
and leaves the others, whose moments and gradient are zero, where AdamW would leave them too: the
same weights as AdamW, at the cost of the used rows only. Every other parameter goes through AdamW
itself (its fused kernel).

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
    """AdamW that also takes sparse gradients (a token table's), updating only the rows ever used;
    its ``state_dict`` is AdamW's plus each table's ``seen`` rows, so either optimizer resumes the other's."""

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
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # Rows with a moment: every row any batch has used. The others have zero moments and a zero
        # gradient, so AdamW would leave them where they are; these rows are all it would move.
        if "seen" not in state:  # kept between steps (a state from plain AdamW: read off its moments)
            state["seen"] = state["exp_avg_sq"].abs().sum(1) > 0  # [N]
        seen = state["seen"]
        seen[grad.indices()[0]] = True
        rows = seen.nonzero().squeeze(1)  # [R], sorted
        g = torch.zeros(len(rows), p.shape[1], dtype=p.dtype, device=p.device)
        g[torch.searchsorted(rows, grad.indices()[0])] = grad.values().to(p.dtype)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if wd:  # decoupled decay moves every row, used or not
            p.mul_(1 - lr * wd)
        m = state["exp_avg"][rows].mul_(beta1).add_(g, alpha=1 - beta1)
        v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        p.index_add_(0, rows, m.div_(denom), alpha=-lr / (1 - beta1**step))


def sparse_grad_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of sparse gradients (each coalesced first: repeated rows add up)."""
    norms = [torch.linalg.vector_norm(g.coalesce().values()) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
