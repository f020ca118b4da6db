"""OpenCLIP's architectures whose image tower comes from timm (``model.timm_vision``): ConvNeXt,
EVA, MobileCLIP, PE-Core, ViTamin, SigLIP, ... ``registry`` merges ``TIMM_ARCHITECTURES`` into its table.

Names and values are those of OpenCLIP's model configs (open-clip-torch 3.3, model_configs/*.json),
written out here as OpenCLIP dicts because open_clip is not a dependency. They go through
config_from_openclip, as an open_clip_config.json does, so a loaded checkpoint finds its name here.
timm_drop_path and patch dropout act only in training.
"""

from __future__ import annotations

from typing import Any

from clipforge.config import ClipConfig
from clipforge.model.zoo_openclip import oc as _oc
from clipforge.model.zoo_openclip import tt as _tt


def _tv(timm_name: str, image: int, pool: str = "", proj: str | None = "linear", drop_path: float | None = 0.1,
        **extra: Any) -> dict:
    """A timm tower's vision_cfg; drop_path None leaves timm's default (the option is unset)."""
    v = {"timm_model_name": timm_name, "timm_pool": pool, "timm_proj": proj, "image_size": image, **extra}
    return v if drop_path is None else {**v, "timm_drop": 0.0, "timm_drop_path": drop_path}


def _siglip_text(vocab: int, tokenizer: str, width: int, heads: int, layers: int, v2: bool = False,
                 mlp_ratio: float = 4.0, proj: bool = True, context: int = 64) -> dict:
    """SigLIP's text tower: bidirectional, last-position pooled, biased projection (or none),
    LayerNorm eps 1e-6, SigLIP 2 with tanh GELU; a Hugging Face tokenizer."""
    t = {"context_length": context, "vocab_size": vocab, "hf_tokenizer_name": f"timm/{tokenizer}",
         "tokenizer_kwargs": {"clean": "canonicalize"}, "width": width, "heads": heads, "layers": layers,
         "mlp_ratio": mlp_ratio, "no_causal_mask": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
         **({"proj_bias": True} if proj else {"proj_type": "none"})}
    return {**t, "act_kwargs": {"approximate": "tanh"}} if v2 else t


def _siglip_b(tokenizer: str, v2: bool = False, vocab: int | None = None) -> dict:
    return _siglip_text(vocab or (256000 if v2 else 32000), tokenizer, 768, 12, 12, v2)


def _siglip_l(tokenizer: str, v2: bool = False) -> dict:
    return _siglip_text(256000 if v2 else 32000, tokenizer, 1024, 16, 24, v2)


def _siglip_so(tokenizer: str, v2: bool = False, vocab: int | None = None, proj: bool = True,
               context: int = 64) -> dict:
    return _siglip_text(vocab or (256000 if v2 else 32000), tokenizer, 1152, 16, 27, v2, 3.7362, proj, context)


# SigLIP and SigLIP 2: timm ViTs pooled by attention (map), no head (timm_proj 'none'), logit bias -10.
# (name, timm model, image size, embed_dim, text tower); SigLIP's sizes share one tokenizer repo.
_SIGLIP = (
    ("ViT-B-16-SigLIP", "vit_base_patch16_siglip_224", 224, 768, _siglip_b("ViT-B-16-SigLIP")),
    ("ViT-B-16-SigLIP-256", "vit_base_patch16_siglip_256", 256, 768, _siglip_b("ViT-B-16-SigLIP")),
    ("ViT-B-16-SigLIP-384", "vit_base_patch16_siglip_384", 384, 768, _siglip_b("ViT-B-16-SigLIP")),
    ("ViT-B-16-SigLIP-512", "vit_base_patch16_siglip_512", 512, 768, _siglip_b("ViT-B-16-SigLIP")),
    ("ViT-B-16-SigLIP-i18n-256", "vit_base_patch16_siglip_256", 256, 768,
     _siglip_b("ViT-B-16-SigLIP-i18n-256", vocab=250000)),
    ("ViT-L-16-SigLIP-256", "vit_large_patch16_siglip_256", 256, 1024, _siglip_l("ViT-B-16-SigLIP")),
    ("ViT-L-16-SigLIP-384", "vit_large_patch16_siglip_384", 384, 1024, _siglip_l("ViT-B-16-SigLIP")),
    ("ViT-SO400M-14-SigLIP", "vit_so400m_patch14_siglip_224", 224, 1152,  # 16 tokens, as its weights were trained
     _siglip_so("ViT-B-16-SigLIP", context=16)),
    ("ViT-SO400M-14-SigLIP-378", "vit_so400m_patch14_siglip_378", 378, 1152, _siglip_so("ViT-B-16-SigLIP")),
    ("ViT-SO400M-14-SigLIP-384", "vit_so400m_patch14_siglip_384", 384, 1152, _siglip_so("ViT-B-16-SigLIP")),
    ("ViT-SO400M-16-SigLIP-i18n-256", "vit_so400m_patch16_siglip_256", 256, 1152,
     _siglip_so("ViT-B-16-SigLIP-i18n-256", vocab=250000, proj=False)),
    ("ViT-B-16-SigLIP2", "vit_base_patch16_siglip_224", 224, 768, _siglip_b("ViT-B-16-SigLIP2", True)),
    ("ViT-B-16-SigLIP2-256", "vit_base_patch16_siglip_256", 256, 768, _siglip_b("ViT-B-16-SigLIP2-256", True)),
    ("ViT-B-16-SigLIP2-384", "vit_base_patch16_siglip_384", 384, 768, _siglip_b("ViT-B-16-SigLIP2-384", True)),
    ("ViT-B-16-SigLIP2-512", "vit_base_patch16_siglip_512", 512, 768, _siglip_b("ViT-B-16-SigLIP2-512", True)),
    ("ViT-B-32-SigLIP2-256", "vit_base_patch32_siglip_256", 256, 768, _siglip_b("ViT-B-32-SigLIP2-256", True)),
    ("ViT-L-16-SigLIP2-256", "vit_large_patch16_siglip_256", 256, 1024, _siglip_l("ViT-L-16-SigLIP2-256", True)),
    ("ViT-L-16-SigLIP2-384", "vit_large_patch16_siglip_384", 384, 1024, _siglip_l("ViT-L-16-SigLIP2-384", True)),
    ("ViT-L-16-SigLIP2-512", "vit_large_patch16_siglip_512", 512, 1024, _siglip_l("ViT-L-16-SigLIP2-512", True)),
    ("ViT-SO400M-14-SigLIP2", "vit_so400m_patch14_siglip_224", 224, 1152, _siglip_so("ViT-SO400M-14-SigLIP2", True)),
    ("ViT-SO400M-14-SigLIP2-378", "vit_so400m_patch14_siglip_378", 378, 1152,
     _siglip_so("ViT-SO400M-14-SigLIP2-378", True)),
    ("ViT-SO400M-16-SigLIP2-256", "vit_so400m_patch16_siglip_256", 256, 1152,
     _siglip_so("ViT-SO400M-16-SigLIP2-256", True)),
    ("ViT-SO400M-16-SigLIP2-384", "vit_so400m_patch16_siglip_384", 384, 1152,
     _siglip_so("ViT-SO400M-16-SigLIP2-384", True)),
    ("ViT-SO400M-16-SigLIP2-512", "vit_so400m_patch16_siglip_512", 512, 1152,
     _siglip_so("ViT-SO400M-16-SigLIP2-512", True)),
    ("ViT-gopt-16-SigLIP2-256", "vit_giantopt_patch16_siglip_256", 256, 1536,
     _siglip_so("ViT-gopt-16-SigLIP2-256", True)),
    ("ViT-gopt-16-SigLIP2-384", "vit_giantopt_patch16_siglip_384", 384, 1536,
     _siglip_so("ViT-gopt-16-SigLIP2-384", True)),
)

_CONVNEXT_TEXT = {"base": _tt(512, 8, 12), "base_w": _tt(640, 10, 12), "large": _tt(768, 12, 12),
                  "large_d": _tt(768, 12, 16), "xlarge": _tt(1024, 16, 20), "xxlarge": _tt(1024, 16, 24)}
# MobileCLIP's FastViT-tower models use a bidirectional text transformer (OpenCLIP's no_causal_mask).
_MOBILE_TEXT = {512: _tt(512, 8, 12, no_causal_mask=True), 768: _tt(768, 12, 12, no_causal_mask=True)}

TIMM_ARCHITECTURES: dict[str, ClipConfig] = {
    # ConvNeXt (LAION's CLIP-ConvNeXt): the trunk's own pooling and norm, a linear (or MLP, _d) head.
    "convnext_tiny": _oc(1024, _tv("convnext_tiny", 224), _CONVNEXT_TEXT["base"]),
    "convnext_small": _oc(512, _tv("convnext_small", 224), _CONVNEXT_TEXT["base"]),
    "convnext_base": _oc(512, _tv("convnext_base", 224), _CONVNEXT_TEXT["base"]),
    "convnext_base_w": _oc(640, _tv("convnext_base", 256), _CONVNEXT_TEXT["base_w"]),
    "convnext_base_w_320": _oc(640, _tv("convnext_base", 320), _CONVNEXT_TEXT["base_w"]),
    "convnext_large": _oc(768, _tv("convnext_large", 224), _CONVNEXT_TEXT["large"]),
    "convnext_large_d": _oc(768, _tv("convnext_large", 256, proj="mlp"), _CONVNEXT_TEXT["large_d"]),
    "convnext_large_d_320": _oc(768, _tv("convnext_large", 320, proj="mlp"), _CONVNEXT_TEXT["large_d"]),
    "convnext_xlarge": _oc(1024, _tv("convnext_xlarge", 256), _CONVNEXT_TEXT["xlarge"]),
    "convnext_xxlarge": _oc(1024, _tv("convnext_xxlarge", 256), _CONVNEXT_TEXT["xxlarge"]),
    "convnext_xxlarge_320": _oc(1024, _tv("convnext_xxlarge", 320), _CONVNEXT_TEXT["xxlarge"]),
    # EVA-CLIP: class-token output through the trunk's own head (timm_proj None).
    "EVA01-g-14": _oc(1024, _tv("eva_giant_patch14_224", 224, "token", None, None), _tt(768, 12, 12)),
    "EVA01-g-14-plus": _oc(1024, _tv("eva_giant_patch14_224", 224, "token", None, None), _tt(1024, 16, 24)),
    "EVA02-B-16": _oc(512, _tv("eva02_base_patch16_clip_224", 224, "token", None, None), _tt(512, 8, 12)),
    "EVA02-L-14": _oc(768, _tv("eva02_large_patch14_clip_224", 224, "token", None, None), _tt(768, 12, 12)),
    "EVA02-L-14-336": _oc(768, _tv("eva02_large_patch14_clip_336", 336, "token", None, None), _tt(768, 12, 12)),
    "EVA02-E-14": _oc(1024, _tv("eva02_enormous_patch14_clip_224", 224, "token", None, None), _tt(1024, 16, 24)),
    "EVA02-E-14-plus": _oc(1024, _tv("eva02_enormous_patch14_clip_224", 224, "token", None, None),
                           _tt(1280, 20, 32)),
    # MobileCLIP / MobileCLIP 2: FastViT (mci) towers, and a ViT-B with a conv stem (vit_base_mci).
    "MobileCLIP-S1": _oc(512, _tv("fastvit_mci1", 256, "avg", None, 0.0), _MOBILE_TEXT[512]),
    "MobileCLIP-S2": _oc(512, _tv("fastvit_mci2", 256, "avg", None, 0.0), _MOBILE_TEXT[512]),
    "MobileCLIP-B": _oc(512, _tv("vit_base_mci_224", 224, "token", None, 0.0), _tt(512, 8, 12, no_causal_mask=False)),
    "MobileCLIP2-S0": _oc(512, _tv("fastvit_mci0", 256, "avg", None, 0.0), _MOBILE_TEXT[512]),
    "MobileCLIP2-S2": _oc(512, _tv("fastvit_mci2", 256, "avg", None, 0.0), _MOBILE_TEXT[512]),
    "MobileCLIP2-B": _oc(512, _tv("vit_base_mci_224", 224, "token", None, 0.0),
                         _tt(512, 8, 12, no_causal_mask=False)),
    "MobileCLIP2-S3": _oc(768, _tv("fastvit_mci3", 256, "avg", None, 0.0), _MOBILE_TEXT[768]),
    "MobileCLIP2-S4": _oc(768, _tv("fastvit_mci4", 256, "avg", None, 0.0), _MOBILE_TEXT[768]),
    "MobileCLIP2-L-14": _oc(768, _tv("vit_large_patch14_clip_224", 224, "token", None, 0.1), _MOBILE_TEXT[768]),
    # Perception Encoder (PE-Core): attention-pooled ViTs with rotary positions, short text context.
    "PE-Core-T-16-384": _oc(512, _tv("vit_pe_core_tiny_patch16_384", 384, "map", None, None), _tt(512, 8, 12, 32)),
    "PE-Core-S-16-384": _oc(512, _tv("vit_pe_core_small_patch16_384", 384, "map", None, None), _tt(512, 8, 12, 32)),
    "PE-Core-B-16": _oc(1024, _tv("vit_pe_core_base_patch16_224", 224, "map", None, None), _tt(1024, 16, 24, 32)),
    "PE-Core-L-14-336": _oc(1024, _tv("vit_pe_core_large_patch14_336", 336, "map", None, None),
                            _tt(1024, 16, 24, 32)),
    "PE-Core-bigG-14-448": _oc(1280, _tv("vit_pe_core_gigantic_patch14_448", 448, "map", None, None),
                               _tt(1280, 20, 24, 72)),
    # Other timm towers OpenCLIP configures: Swin, and timm ViTs with average pooling / relative positions.
    "swin_base_patch4_window7_224": _oc(640, _tv("swin_base_patch4_window7_224", 224, drop_path=None),
                                        _tt(640, 10, 12)),
    "vit_medium_patch16_gap_256": _oc(512, _tv("vit_medium_patch16_gap_256", 256, drop_path=None), _tt(512, 8, 12)),
    "vit_relpos_medium_patch16_cls_224": _oc(512, _tv("vit_relpos_medium_patch16_cls_224", 224, drop_path=None),
                                             _tt(512, 8, 12)),
}
# ViTamin: hybrid conv + ViT towers, linear head; -LTT pairs a small tower with a larger text tower.
# (OpenCLIP's ViTamin-XL-384 config says image_size 256, kept as it is.)
for _name, _timm_name, _image, _embed, _text in (
        ("ViTamin-S", "vitamin_small_224", 224, 384, _tt(384, 6, 12)),
        ("ViTamin-S-LTT", "vitamin_small_224", 224, 768, _tt(768, 12, 12)),
        ("ViTamin-B", "vitamin_base_224", 224, 512, _tt(512, 8, 12)),
        ("ViTamin-B-LTT", "vitamin_base_224", 224, 768, _tt(768, 12, 12)),
        ("ViTamin-L", "vitamin_large_224", 224, 768, _tt(768, 12, 12)),
        ("ViTamin-L-256", "vitamin_large_256", 256, 768, _tt(768, 12, 12)),
        ("ViTamin-L-336", "vitamin_large_336", 336, 768, _tt(768, 12, 12)),
        ("ViTamin-L-384", "vitamin_large_384", 384, 768, _tt(768, 12, 12)),
        ("ViTamin-L2", "vitamin_large2_224", 224, 1024, _tt(1024, 16, 24)),
        ("ViTamin-L2-256", "vitamin_large2_256", 256, 1024, _tt(1024, 16, 24)),
        ("ViTamin-L2-336", "vitamin_large2_336", 336, 1024, _tt(1024, 16, 24)),
        ("ViTamin-L2-384", "vitamin_large2_384", 384, 1024, _tt(1024, 16, 24)),
        ("ViTamin-XL-256", "vitamin_xlarge_256", 256, 1152, _tt(1152, 16, 27)),
        ("ViTamin-XL-336", "vitamin_xlarge_336", 336, 1152, _tt(1152, 16, 27)),
        ("ViTamin-XL-384", "vitamin_xlarge_384", 256, 1152, _tt(1152, 16, 27))):
    TIMM_ARCHITECTURES[_name] = _oc(_embed, _tv(_timm_name, _image), _text)
for _name, _timm_name, _image, _embed, _text in _SIGLIP:
    TIMM_ARCHITECTURES[_name] = _oc(_embed, _tv(_timm_name, _image, "map", "none", None), _text, init_logit_bias=-10)
