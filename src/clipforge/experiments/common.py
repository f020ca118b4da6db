"""Shared pieces of the experiments: the world, images held in memory, labels, a small training
loop for the baselines, seeds, result records and plots.

The baselines (predictive objectives, supervised classifier) train from uint8 image tensors held
in memory with the scale's recipe (its crop scale, precision, sparse token tables) and the
trainer's optimisation step (``train.step.TrainStep``: AdamW with CLIP's decay exclusions,
clipping, warm-up + cosine), so that the objective is the only difference between runs compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from clipforge.config import OPENAI_MEAN, OPENAI_STD
from clipforge.experiments.config import ExperimentConfig
from clipforge.imageio import as_rgb
from clipforge.utils import usable_cpus

# -- the world ------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (a lock file): findings running in parallel processes
    then train, evaluate or write each shared artefact once, the others waiting for it. With
    ``wait=False`` it yields False at once when another process holds the lock (that process
    is making the artefact: do something else first), True when the lock is held here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: run findings one at a time
            yield True
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_world(cfg: ExperimentConfig) -> Path:
    """The scale's data world under ``work`` (generated once, reused while its config matches)."""
    from clipforge.data.synth import SynthConfig, generate_world

    w = cfg.scale.world
    path = cfg.scale_dir / "world"
    synth = SynthConfig(seed=w.seed, image_size=w.image_size, train=w.train, val=w.val, test=w.test, shifted=w.shifted,
                        caption_style=w.caption_style, polysemy=w.polysemy, spurious=w.spurious,  # type: ignore[arg-type]
                        template_set=w.template_set, image_format="bmp")  # type: ignore[arg-type]
    with locked(cfg.scale_dir / ".world.lock"):
        generate_world(synth, path, workers=None, progress=cfg.progress)
    return path


def load_task_specs(world: Path) -> dict[str, dict[str, Any]]:
    from clipforge.eval.world import load_tasks

    return load_tasks(world)


# Tasks whose prompts are per class (not per row); the relation task needs per-row prompts.
CLASS_TASKS = ("colour", "shape", "size", "position", "count")


@dataclass
class SplitData:
    """A split's images as uint8 [N, 3, H, W] (in memory) with its CSV rows."""

    images: torch.Tensor
    rows: list[dict[str, Any]]
    paths: list[Path]

    def labels(self, task: dict[str, Any]) -> torch.Tensor:
        """Class index per row for ``task``, -1 where the row has no label for it. [N]"""
        index = {c: i for i, c in enumerate(task["classes"])}
        return torch.tensor([index.get(str(r.get(task["label_column"]) or ""), -1) for r in self.rows])

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]


def load_split(world: Path, split: str, limit: int | None = None) -> SplitData:
    """Decode a split once and keep a ``.npy`` copy next to the CSV for the next process."""
    from PIL import Image

    from clipforge.eval.datasets import read_table

    rows = read_table(world / f"{split}.csv")[:limit]
    paths = [world / r["image"] for r in rows]
    cache = world / f".{split}-{len(rows)}.npy"
    if cache.is_file():
        arr = np.load(cache)
    else:
        arr = np.stack([np.asarray(as_rgb(Image.open(p))) for p in paths]).transpose(0, 3, 1, 2)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, arr)
        tmp.replace(cache)
    return SplitData(torch.from_numpy(np.ascontiguousarray(arr)), rows, paths)


_MEAN = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, CLIP mean/std (as the model's preprocessing does)."""
    x = images.float().div_(255)
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)


def random_resized_crop(images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.9, 1.0)
                        ) -> torch.Tensor:
    """The trainer's augmentation on a uint8 batch: one random crop per image, resized back."""
    import torchvision.transforms.v2.functional as TF

    b, _, h, w = images.shape
    out = torch.empty_like(images)
    areas = torch.empty(b).uniform_(*scale, generator=generator)
    ratios = torch.exp(torch.empty(b).uniform_(np.log(3 / 4), np.log(4 / 3), generator=generator))
    for i in range(b):
        ch = int(min(h, round(float((areas[i] * h * w / ratios[i]).sqrt()))))
        cw = int(min(w, round(float((areas[i] * h * w * ratios[i]).sqrt()))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        out[i] = TF.resized_crop(images[i], top, left, ch, cw, [h, w], antialias=True)
    return out


# -- training loop for the baselines --------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int
    seed: int = 0
    crop_scale: tuple[float, float] = (1.0, 1.0)  # (1, 1): no crop, as the demo trains
    device: str = "cpu"
    precision: str = "fp32"
    sparse_embeddings: bool = False

    @classmethod
    def from_scale(cls, cfg: ExperimentConfig, steps: int, seed: int, device: str) -> "LoopConfig":
        scale = cfg.scale
        return cls(steps=steps, batch_size=scale.batch_size, lr=scale.lr, weight_decay=scale.weight_decay,
                   warmup=min(scale.warmup, max(1, steps // 10)), seed=seed, crop_scale=scale.crop_scale,
                   device=device, precision=cfg.precision(device), sparse_embeddings=scale.sparse_embeddings)


StepLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images [B,3,H,W] float, row idx [B]) -> loss


def fit(model: nn.Module, step_loss: StepLoss, images: torch.Tensor, cfg: LoopConfig,
        on_eval: Callable[[int], None] | None = None, eval_steps: Sequence[int] = (), progress: bool = False,
        desc: str = "train") -> dict[str, Any]:
    """Minimise ``step_loss`` over shuffled epochs of ``images`` (uint8, CPU) with the trainer's
    step (``TrainStep``: its optimizer, clipping at 1.0 and warm-up + cosine schedule), so that
    the objective is the only difference from a CLIP run. ``on_eval(step)`` runs after the listed
    optimizer steps (and never counts towards the training time)."""
    from tqdm.auto import tqdm

    from clipforge.errors import ClipforgeError
    from clipforge.train.config import OptimConfig, ScheduleConfig
    from clipforge.train.optim import LrSchedule, build_optimizer
    from clipforge.train.runtime import reuse_freed_memory
    from clipforge.train.step import TrainStep

    device = torch.device(cfg.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as the trainer does
    model.to(device).train()
    # only a CLIP text tower has a token table; the predictive and supervised models have none
    sparse = cfg.sparse_embeddings and isinstance(getattr(getattr(model, "text", None), "token_embedding", None),
                                                  nn.Embedding)
    opt = build_optimizer(model, OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, sparse_embeddings=sparse))
    sched = LrSchedule(opt, ScheduleConfig(kind="cosine", warmup_steps=cfg.warmup), cfg.steps)
    train_step = TrainStep(model, opt, grad_clip=1.0, precision=cfg.precision, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    per_epoch = n // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the {n} training images")
    losses, train_s, evals = [], 0.0, set(eval_steps)
    order = torch.randperm(n, generator=gen)
    with tqdm(total=cfg.steps, desc=desc, disable=not progress, leave=False) as bar:
        for step in range(cfg.steps):
            t = time.perf_counter()
            pos = step % per_epoch
            if pos == 0 and step:
                order = torch.randperm(n, generator=gen)
            idx = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]  # [B]
            batch = images[idx]
            if cfg.crop_scale != (1.0, 1.0):
                batch = random_resized_crop(batch, gen, cfg.crop_scale)
            x = normalize(batch.to(device))
            result = train_step.minimise(lambda: step_loss(x, idx))
            if not result.applied:
                raise ClipforgeError(f"{desc}: non-finite loss {result.loss} or gradient norm "
                                     f"{result.grad_norm} at step {step + 1}")
            sched.set_step(step + 1)
            losses.append(result.loss)
            train_s += time.perf_counter() - t
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_eval is not None and step + 1 in evals:
                model.eval()
                with torch.no_grad():
                    on_eval(step + 1)
                model.train()
    model.eval()
    return {"steps": cfg.steps, "samples_seen": cfg.steps * cfg.batch_size, "train_s": round(train_s, 2),
            "s_per_step": round(train_s / max(1, cfg.steps), 4), "first_loss": losses[0], "final_loss": losses[-1],
            "loss_curve": losses[:: max(1, len(losses) // 50)]}


def log_spaced_steps(total: int, points: int) -> list[int]:
    """``points`` distinct steps, about evenly spaced in log(samples seen), ending at ``total``."""
    if points <= 1 or total <= 1:
        return [total]
    raw = np.geomspace(max(1, total / 2 ** (points - 1)), total, points)
    return sorted({max(1, int(round(s))) for s in raw} | {total})


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: str, batch: int = 256
            ) -> torch.Tensor:
    """``fn`` over normalised chunks of a uint8 image tensor -> concatenated CPU output."""
    out = [fn(normalize(images[s:s + batch].to(device))).float().cpu() for s in range(0, images.shape[0], batch)]
    return torch.cat(out)


# -- records and plots ----------------------------------------------------------------------


def environment() -> dict[str, Any]:
    cpus = usable_cpus()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": cpus, "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "machine": platform.machine()}


def record(cfg: ExperimentConfig, finding: str, claim: str, results: dict[str, Any], summary: dict[str, Any],
           verdict: dict[str, Any], wall_s: float) -> dict[str, Any]:
    return {"finding": finding, "claim": claim, "command": cfg.command, "scale": cfg.scale.to_dict(),
            "seeds": cfg.seeds, "environment": environment(), "wall_s": round(wall_s, 1), "summary": summary,
            "verdict": verdict, "results": results}


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2, default=_jsonable, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _finite(x: Any) -> Any:
    """Strict JSON: NaN and infinities become null (readers such as jq reject them)."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return _finite(x.item())
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _finite(x.tolist())
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return (float(np.mean(v)), float(np.std(v))) if v else (float("nan"), float("nan"))


def figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg canvas (no display, no global backend switch) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also returned), numbers formatted for reading."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    lines = [title, "  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    """'83.1 ± 1.2' (percent by default)."""
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
