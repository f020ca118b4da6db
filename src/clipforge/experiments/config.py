"""Typed configuration of the paper experiments: one ``Scale`` per run size, plus where to write.

A scale fixes everything that decides a number (world size and mechanisms, steps, batch, model
sizes, the training recipe), so a result JSON names its scale and can be rerun exactly. ``small``
is the default: the whole set of seven findings on two CPU cores within an hour. ``medium`` and
``large`` are the same experiments with more data, steps and bigger models, meant for a GPU.

Every scale trains with the demo's recipe (``clipforge.demo.pipeline``): the ``tiny-bow`` family
(conv stem, bag-of-words text), lr 2e-3, batch 128, sparse token-table updates, bf16 where the
CPU computes it natively, no random crop (captions state positions and sizes). The world has the
paper's mechanisms on (sentence captions, a polysemous name, a spurious background cue broken in
the shifted splits, 80-template ensembles), which findings 2, 5 and 7 rest on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.config import ClipConfig, TextConfig, VisionConfig
from clipforge.errors import ClipforgeError
from clipforge.model.registry import get_config, list_models

FINDINGS = ("objectives", "prompts", "fewshot", "probe", "robustness", "scaling", "labelset")

# Sizes below the registry's ``nano``, so that a CPU scaling sweep spans ~2 decades of compute.
# Heads are explicit: the ViT default (width // 64) would give zero heads at width 32.
_EXTRA_SIZES: dict[str, ClipConfig] = {
    "pico": ClipConfig(
        embed_dim=32, vision=VisionConfig(image_size=64, width=32, layers=1, patch_size=16, heads=1),
        text=TextConfig(width=32, heads=1, layers=1), name="pico"),
    "micro": ClipConfig(
        embed_dim=96, vision=VisionConfig(image_size=64, width=96, layers=3, patch_size=8, heads=2),
        text=TextConfig(width=96, heads=2, layers=3), name="micro"),
}


def _bow(name: str, width: int, layers: int) -> ClipConfig:
    """``tiny-bow`` (the demo's learner) at another width and depth: the scaling sweep's family,
    so that every size trains with the recipe that learns the world's tasks."""
    base = get_config("tiny-bow")
    vision = dataclasses.replace(base.vision, width=width, layers=layers, heads=max(1, width // 64))
    text = dataclasses.replace(base.text, width=width, heads=max(1, width // 64))
    return dataclasses.replace(base, embed_dim=width, vision=vision, text=text, name=name)


_EXTRA_SIZES.update({"pico-bow": _bow("pico-bow", 32, 1), "nano-bow": _bow("nano-bow", 64, 1),
                     "micro-bow": _bow("micro-bow", 96, 2)})


def model_config(name: str) -> ClipConfig:
    """An experiment size (``pico``, ``micro``) or any registered architecture."""
    if name in _EXTRA_SIZES:
        return _EXTRA_SIZES[name]
    if name in list_models():
        return get_config(name)
    raise ClipforgeError(f"unknown model size {name!r}; known: {', '.join([*_EXTRA_SIZES, *list_models()])}")


@dataclass(frozen=True)
class WorldSize:
    train: int = 20000  # the demo's world, on which its recipe learns every class task
    val: int = 1000
    test: int = 2000
    shifted: int = 1000
    image_size: int = 64
    seed: int = 0  # the world is fixed; experiment seeds vary initialisation and data order
    # The paper's mechanisms (SynthConfig options; benchmarks/paper/README.md): a bare class name
    # is rare in sentence captions (finding 2), "diamond" names two shapes (2, 7), the background
    # follows the shape in train/val/test only (5), and each task has 80 templates (2).
    caption_style: str = "sentence"
    polysemy: bool = True
    spurious: float = 0.9
    template_set: str = "paper"


@dataclass(frozen=True)
class Scale:
    """Sizes of every experiment. Step counts are optimizer steps of ``batch_size`` pairs."""

    name: str
    world: WorldSize = field(default_factory=WorldSize)
    batch_size: int = 128
    lr: float = 2e-3  # the demo's settings for the small models (AdamW, cosine, wd 0.1)
    weight_decay: float = 0.1
    warmup: int = 100  # the demo's (at most a tenth of a run's steps)
    # The demo's recipe: no random crop (a crop moves and resizes what captions state), the token
    # table updated at its batch's rows only, and bf16 autocast where the hardware computes it.
    crop_scale: tuple[float, float] = (1.0, 1.0)
    sparse_embeddings: bool = True
    # Findings 2-5 and 7 share one CLIP per seed, trained by the library's trainer.
    clip_model: str = "tiny-bow"
    clip_steps: int = 2000  # what the demo's targets took (clipforge.demo.pipeline.STEPS_FOR_TARGETS)
    # A task counts as learnt when its accuracy is at least chance + this margin in every seed;
    # a finding whose tasks are not all learnt reports "not learnt" instead of a verdict.
    learnt_margin: float = 0.10
    # Finding 1: three objectives on the image tower of ``objectives_model``.
    objectives_model: str = "tiny-bow"
    objectives_steps: int = 1500  # at 1,000 the contrastive model had position 6.9 points above chance in seed 0
    objectives_evals: int = 5  # evaluation points, log-spaced in samples seen
    objectives_eval_images: int = 1000  # first N test images
    # Finding 4/5: supervised baseline with the same image tower as ``clip_model``.
    supervised_steps: int = 1000
    supervised_evals: int = 5  # checkpoints along training: the baseline family of finding 5
    # Finding 3: k-shot probes.
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    fewshot_draws: int = 5
    # Linear probes (3, 4, 5): C search refinement (the paper uses 4, i.e. 8 steps per decade).
    probe_refine_steps: int = 2
    probe_max_train: int = 10000  # subsample the probe's training rows above this
    # Finding 6: model sizes in increasing compute, all trained for ``scaling_steps``.
    scaling_models: tuple[str, ...] = ("pico-bow", "nano-bow", "micro-bow", "tiny-bow")
    scaling_steps: int = 2000  # = clip_steps: the largest size is the shared CLIP run, trained once
    seeds: int = 3
    precision: str = "auto"  # auto: bf16 where native (CUDA, or a CPU with native bf16), else fp32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCALES: dict[str, Scale] = {
    # Seconds per finding: for tests and for checking a change end to end.
    "smoke": Scale(
        name="smoke", world=WorldSize(train=256, val=64, test=128, shifted=32), batch_size=32, warmup=1,
        clip_model="nano-bow", clip_steps=4, objectives_model="nano-bow", objectives_steps=4, objectives_evals=2,
        objectives_eval_images=48, supervised_steps=4, supervised_evals=2, shots=(1, 2), fewshot_draws=2,
        probe_refine_steps=0, probe_max_train=256, scaling_models=("pico-bow", "nano-bow"), scaling_steps=4,
        seeds=1),
    # The default: all seven findings, 3 seeds, sized for two CPU cores (cost: benchmarks/paper/REPORT.md).
    "small": Scale(name="small"),
    # GPU sizes: more data and steps, larger models, the paper's full C search.
    "medium": Scale(
        name="medium", world=WorldSize(train=50000, val=2000, test=5000, shifted=2000), batch_size=256,
        lr=1e-3, warmup=200, clip_model="small", clip_steps=3000, objectives_model="small", objectives_steps=3000,
        objectives_evals=7, objectives_eval_images=2000, supervised_steps=3000, supervised_evals=7,
        probe_refine_steps=4, probe_max_train=50000, scaling_models=("pico", "nano", "micro", "tiny", "small"),
        scaling_steps=3000, precision="bf16"),
    "large": Scale(
        name="large", world=WorldSize(train=200000, val=5000, test=10000, shifted=5000), batch_size=512,
        lr=1e-3, warmup=500, clip_model="medium", clip_steps=10000, objectives_model="medium",
        objectives_steps=10000, objectives_evals=8, objectives_eval_images=5000, supervised_steps=10000,
        supervised_evals=8, probe_refine_steps=4, probe_max_train=100000,
        scaling_models=("pico", "nano", "micro", "tiny", "small", "medium"), scaling_steps=10000, seeds=5,
        precision="bf16"),
}


def get_scale(name: str, **overrides: Any) -> Scale:
    """A preset with some fields replaced (``seeds=5``, ``clip_steps=1000`` ...)."""
    if name not in SCALES:
        raise ClipforgeError(f"unknown scale {name!r}; known: {', '.join(SCALES)}")
    fields = {f.name for f in dataclasses.fields(Scale)}
    unknown = set(overrides) - fields
    if unknown:
        raise ClipforgeError(f"unknown scale fields {sorted(unknown)}")
    scale = dataclasses.replace(SCALES[name], **{k: v for k, v in overrides.items() if v is not None})
    if scale.seeds < 1:
        raise ClipforgeError("seeds must be >= 1")
    for m in {scale.clip_model, scale.objectives_model, *scale.scaling_models}:
        model_config(m)  # fail now, not after an hour
    return scale


@dataclass(frozen=True)
class ExperimentConfig:
    """Where results go (``out``: JSON + plots, small; the repository keeps its own under
    benchmarks/paper/results), where the world, trained models and feature caches go (``work``:
    large, reusable between findings and reruns). Both are relative to the working directory."""

    scale: Scale = field(default_factory=lambda: SCALES["small"])
    out: Path = Path("experiments_out/results")
    work: Path = Path("runs/paper")
    device: str = "auto"
    progress: bool = True
    command: str = ""  # the command line that produced the results, recorded in each JSON

    def precision(self, device: str) -> str:
        """The scale's precision on ``device``: 'auto' is bf16 where it is computed natively."""
        from clipforge.utils import cpu_has_native_bf16

        if self.scale.precision != "auto":
            return self.scale.precision
        if device.startswith("cuda"):
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"

    @property
    def seeds(self) -> list[int]:
        return list(range(self.scale.seeds))

    @property
    def scale_dir(self) -> Path:
        return Path(self.work) / self.scale.name
