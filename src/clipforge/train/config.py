"""Typed, frozen training configuration, loadable from YAML/TOML with overrides.

A config file may be nested like ``TrainConfig.to_dict()`` (``optim: {lr: ...}``,
``data: {path: ...}``) or flat with the command-line names (``lr: 1e-3``,
``batch-size: 64``); ``FLAT_KEYS`` maps the flat names onto the nested fields. Overrides
(the flags a user typed) win over the file, which wins over the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clipforge.config import DEFAULT_CROP_SCALE
from clipforge.data.config import DataConfig
from clipforge.errors import ClipforgeError


class ConfigError(ClipforgeError):
    """A training configuration is inconsistent or cannot be read."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW. Weight decay skips gains, biases, embeddings and the logit scale/bias."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # The text tower's token table given a sparse gradient, AdamW run on its used rows only (the same
    # weights): faster on a CPU for small models whose table is most of the parameters (train.sparse_rows).
    sparse_embeddings: bool = False

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"betas must lie in [0, 1), got ({self.beta1}, {self.beta2})")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule over optimizer steps: a linear warm-up, then
    ``cosine`` decay to ``min_lr_ratio * lr``, ``constant``, or ``constant-cooldown``
    (constant, then a linear decay over the last ``cooldown_steps``)."""

    kind: Literal["cosine", "constant", "constant-cooldown"] = "cosine"
    warmup_steps: int = 0
    cooldown_steps: int = 0  # constant-cooldown only; 0 means the last 20% of the run
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "constant", "constant-cooldown"):
            raise ConfigError(f"unknown schedule {self.kind!r}; choose cosine, constant or constant-cooldown")
        if self.warmup_steps < 0 or self.cooldown_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("warmup/cooldown steps must be >= 0 and min_lr_ratio in [0, 1]")


@dataclass(frozen=True)
class ValConfig:
    """Periodic evaluation on a held-out table (CSV/TSV/Parquet): image<->text retrieval
    recall@1/5/10, plus zero-shot accuracy when ``classnames`` (a file, one class per line)
    is given and the table has a ``label_key`` column."""

    path: str
    image_key: str = "image"
    caption_key: str = "caption"
    label_key: str = "label"
    classnames: str | None = None
    templates: str | None = None  # file, one prompt per line with "{}"; default "a photo of a {}."
    every: int = 0  # steps between evaluations; 0: only at the end of the run
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.every < 0 or self.batch_size < 1:
            raise ConfigError("val every must be >= 0 and batch_size >= 1")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig | None = None
    model: str = "tiny"  # a registered architecture name (fresh init) or a checkpoint path (fine-tune)
    # A Hugging Face text encoder (local directory or alias, see clipforge.model.hf_text) replacing
    # the model's text tower, starting from its pretrained weights; the image tower is kept.
    text_model: str | None = None
    out: str = "runs/train"
    steps: int | None = None  # optimizer steps; exclusive with epochs
    # Wall-clock seconds for the training loop: the run ends when they are spent and the schedule
    # anneals to that end (``steps`` is then the upper bound). Fresh single-process runs only.
    time_budget_s: float | None = None
    epochs: int | None = None  # passes over the data (default 1 when steps is unset)
    batch_size: int = 64  # per process and micro-batch; global batch = batch_size * world * grad_accum
    grad_accum: int = 1  # micro-batches per step, negatives shared across all of them
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: Literal["auto", "clip", "siglip"] = "auto"  # auto: siglip for a model with a logit bias
    caption_loss_weight: float = 2.0  # CoCa models: weight of the captioning loss (OpenCLIP's default)
    loss_tile: int | None = None  # compute the loss in tiles of this many rows (memory)
    grad_checkpointing: bool = False
    compile: bool = False
    patch_dropout: float = 0.0  # FLIP: fraction of image patches dropped while training
    # Swapped-word negatives (train.swap_negatives): up to this many copies of each caption with one
    # attribute word exchanged for each other value of it, from the word groups in ``swap_words`` (JSON);
    # the word is drawn at random, or with ``swap_every_word`` each is swapped in turn.
    swap_negatives: int = 0
    swap_words: str | None = None
    swap_every_word: bool = False
    # ... and only copies whose neighbouring attribute words form a pair found in the training captions
    # (read once before the run; tables and folders): no "black hexagon" where none was ever shown
    swap_attested: bool = False
    init_logit_scale: float | None = None  # a fresh model's initial logit scale (1 / temperature); None: the architecture's
    # Random resized crop: the area fraction kept, drawn from [lo, hi]. (1, 1) keeps every pixel
    # where it is, for data whose captions state positions and sizes (the demo world).
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE
    lock_image: bool = False  # LiT: freeze the image tower ...
    lock_text: bool = False
    lock_unlocked_layers: int = 0  # ... except its last N blocks (and final norm + projection)
    fsdp: bool = False
    save_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    resume: str | None = None  # "auto" (newest complete checkpoint in out/, or start fresh) or a path
    nan_policy: Literal["stop", "skip"] = "stop"
    log_every: int = 10
    tensorboard: bool = True
    val: ValConfig | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "workers", "lock_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either steps or epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs < 1):
            raise ConfigError("steps and epochs must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16, fp16 or auto, got {self.precision!r}")
        if self.loss not in ("auto", "clip", "siglip"):
            raise ConfigError(f"loss must be auto, clip or siglip, got {self.loss!r}")
        if self.caption_loss_weight < 0:
            raise ConfigError(f"caption_loss_weight must be >= 0, got {self.caption_loss_weight}")
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"nan_policy must be stop or skip, got {self.nan_policy!r}")
        try:
            lo, hi = (float(v) for v in self.crop_scale)
        except (TypeError, ValueError):
            raise ConfigError(f"crop_scale must be two numbers (lo, hi), got {self.crop_scale!r}") from None
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale!r}")
        object.__setattr__(self, "crop_scale", (lo, hi))  # a list from YAML/JSON becomes the tuple
        if self.swap_negatives < 0 or (self.swap_negatives > 0) != (self.swap_words is not None):
            raise ConfigError("swap_negatives (>= 0) and swap_words (a JSON file of word groups) go together")
        if self.swap_every_word and not self.swap_negatives:
            raise ConfigError("swap_every_word needs swap_negatives")
        if self.swap_attested and not self.swap_negatives:
            raise ConfigError("swap_attested needs swap_negatives")
        if self.init_logit_scale is not None and not 0 < self.init_logit_scale <= 100:
            raise ConfigError(f"init_logit_scale must lie in (0, 100], got {self.init_logit_scale}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"patch_dropout must lie in [0, 1), got {self.patch_dropout}")
        if self.lock_image and self.lock_text and self.lock_unlocked_layers == 0:
            raise ConfigError("locking both towers completely leaves nothing to train but the temperature")
        if self.loss_tile is not None and self.loss_tile < 1:
            raise ConfigError("loss_tile must be >= 1")
        if self.time_budget_s is not None:
            if not self.time_budget_s > 0:
                raise ConfigError(f"time_budget_s must be > 0, got {self.time_budget_s}")
            if self.steps is None:
                raise ConfigError("time_budget_s needs steps as the run's upper bound")
            if self.resume is not None:
                raise ConfigError("a time-budgeted run cannot resume: its length depends on the clock, not the step")

    @property
    def run_epochs(self) -> int | None:
        """Epoch limit of the run: None when a step count bounds it instead."""
        return None if self.steps is not None else (self.epochs or 1)

    # -- dict / file round trip --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = expand_flat(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training config keys: {sorted(unknown)}")
        if isinstance(d.get("val"), dict) and "path" not in d["val"]:
            raise ConfigError(f"evaluation options {sorted(d['val'])} need a validation table (val_data)")
        if isinstance(d.get("data"), dict) and "path" not in d["data"]:
            raise ConfigError(f"data options {sorted(d['data'])} need a dataset path (data)")
        for key, sub in (("optim", OptimConfig), ("schedule", ScheduleConfig), ("data", DataConfig),
                         ("val", ValConfig)):
            if isinstance(d.get(key), dict):
                d[key] = _build(sub, d[key], key)
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Defaults <- config file (YAML or TOML) <- overrides (flat or nested keys)."""
        base = expand_flat(read_config_file(path)) if path else {}
        return cls.from_dict(merge(base, expand_flat(overrides or {})))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Command-line / flat names -> nested config paths. Anything not listed maps to a
# top-level field of the same name (dashes read as underscores).
FLAT_KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("optim", "lr"),
    "wd": ("optim", "weight_decay"),
    "weight_decay": ("optim", "weight_decay"),
    "beta1": ("optim", "beta1"),
    "beta2": ("optim", "beta2"),
    "eps": ("optim", "eps"),
    "grad_clip": ("optim", "grad_clip"),
    "sparse_embeddings": ("optim", "sparse_embeddings"),
    "warmup": ("schedule", "warmup_steps"),
    "schedule": ("schedule", "kind"),
    "cooldown": ("schedule", "cooldown_steps"),
    "min_lr_ratio": ("schedule", "min_lr_ratio"),
    "data": ("data", "path"),
    "data_kind": ("data", "kind"),
    "image_key": ("data", "image_key"),
    "caption_key": ("data", "caption_key"),
    "resampled": ("data", "resampled"),
    "cache_mb": ("data", "cache_mb"),
    "val_data": ("val", "path"),
    "val_image_key": ("val", "image_key"),
    "val_caption_key": ("val", "caption_key"),
    "val_label_key": ("val", "label_key"),
    "val_classnames": ("val", "classnames"),
    "val_templates": ("val", "templates"),
    "eval_every": ("val", "every"),
    "val_batch_size": ("val", "batch_size"),
}
_SECTIONS = ("optim", "schedule", "data", "val")


def expand_flat(d: dict[str, Any]) -> dict[str, Any]:
    """Turn flat keys (``lr``, ``batch-size``, ``data``: "path") into the nested layout."""
    out: dict[str, Any] = {}
    for raw_key, value in d.items():
        key = raw_key.replace("-", "_")
        if key in _SECTIONS and isinstance(value, dict):
            _set(out, (key,), {**out.get(key, {}), **{k.replace("-", "_"): v for k, v in value.items()}})
        elif key in FLAT_KEYS:
            _set(out, FLAT_KEYS[key], value)
        else:
            out[key] = value
    return out


def _set(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        cur = d.get(k)
        if not isinstance(cur, dict):
            cur = {} if cur is None else (dataclasses.asdict(cur) if dataclasses.is_dataclass(cur) else {})
            d[k] = cur
        d = cur
    d[path[-1]] = value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of ``over`` win; nested dicts merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from e
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            d = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text) or {}
    except Exception as e:  # yaml/toml/json each raise their own error types
        raise ConfigError(f"cannot parse config file {p}: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    return d


def dump_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved configuration (YAML, readable back by ``TrainConfig.load``)."""
    p = Path(path)
    d = cfg.to_dict()
    try:
        import yaml

        p.write_text(yaml.safe_dump(d, sort_keys=False))
    except ImportError:  # JSON is valid YAML, so the file stays loadable
        p.write_text(json.dumps(d, indent=2) + "\n")
    return p


def _build(cls: type, d: dict[str, Any], section: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown keys in {section}: {sorted(unknown)} (known: {sorted(names)})")
    try:
        return cls(**d)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {section} config: {e}") from e
