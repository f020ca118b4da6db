"""A supervised baseline: CLIP's image tower trained on the world's labels only, no captions.

One classifier head per class task (colour, shape, size, position, count), all read off the
tower's projection (one linear map to the concatenated class logits). Rows without a label for
a task (the single-object attributes of multi-object images) contribute nothing to that task's
loss. Evaluations during training give a family of supervised models of increasing accuracy:
the baseline that effective robustness is measured against (finding 5).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import VisionConfig
from clipforge.experiments.common import LoopConfig, SplitData, batched, fit
from clipforge.model.vision import VisionTransformer


class SupervisedClassifier(nn.Module):
    def __init__(self, vision: VisionConfig, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.tasks = list(num_classes)
        self.sizes = [num_classes[t] for t in self.tasks]
        self.visual = VisionTransformer(vision, sum(self.sizes), quick_gelu=False)
        self.bias = nn.Parameter(torch.zeros(sum(self.sizes)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.visual(images) + self.bias  # [B, sum C]
        return dict(zip(self.tasks, logits.split(self.sizes, dim=1)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the pooled, normalised class token) [B, W]: what a probe sees."""
        return self.visual(images, project=False)


def supervised_loss(model: SupervisedClassifier, labels: dict[str, torch.Tensor]
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Sum over tasks of the cross-entropy averaged over the batch (unlabelled rows count zero)."""
    def loss(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = model(images)
        total = images.new_zeros(())
        for task, logits in out.items():
            y = labels[task][idx].to(images.device)
            total = total + F.cross_entropy(logits, y, ignore_index=-1, reduction="sum") / len(idx)
        return total
    return loss


@torch.no_grad()
def accuracies(model: SupervisedClassifier, split: SplitData, tasks: dict[str, dict[str, Any]], device: str
               ) -> dict[str, float]:
    """Accuracy of each head on the split's labelled rows."""
    logits = batched(lambda x: torch.cat(list(model(x).values()), dim=1), split.images, device)  # [N, sum C]
    per_task = dict(zip(model.tasks, logits.split(model.sizes, dim=1)))
    out = {}
    for t in model.tasks:
        y = split.labels(tasks[t])
        keep = y >= 0
        out[t] = float((per_task[t][keep].argmax(1) == y[keep]).float().mean()) if keep.any() else float("nan")
    return out


def train_supervised(vision: VisionConfig, train: SplitData, tasks: dict[str, dict[str, Any]], loop: LoopConfig,
                     eval_splits: dict[str, SplitData], eval_steps: list[int], progress: bool = False
                     ) -> tuple[SupervisedClassifier, dict[str, Any]]:
    """Train on ``train``'s labels; evaluate every head on ``eval_splits`` at ``eval_steps``."""
    model = SupervisedClassifier(vision, {t: len(tasks[t]["classes"]) for t in tasks})
    labels = {t: train.labels(tasks[t]) for t in tasks}
    history: list[dict[str, Any]] = []

    def on_eval(step: int) -> None:
        history.append({"step": step, "samples": step * loop.batch_size,
                        "acc": {s: accuracies(model, d, tasks, loop.device) for s, d in eval_splits.items()}})

    stats = fit(model, supervised_loss(model, labels), train.images, loop, on_eval, eval_steps, progress,
                desc=f"supervised seed {loop.seed}")
    return model, {"train": stats, "history": history}
