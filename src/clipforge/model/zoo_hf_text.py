"""OpenCLIP's architectures whose text tower is a Hugging Face encoder (its ``HFTextEncoder``):
RoBERTa, XLM-RoBERTa, mT5 (encoder only) and NLLB (M2M100, encoder only), and CoCa over RoBERTa, with OpenCLIP's names and
values (open-clip-torch 3.3, model_configs/*.json).

The encoder is named by its hub id, as OpenCLIP names it; building one reads that model's config
and tokenizer files (``hf_source``: fetched once, or a local folder given as ``text_model_dir``),
never its weights. ``registry`` merges ``HF_TEXT_ARCHITECTURES`` into its table.
"""

from __future__ import annotations

from typing import Any

from clipforge.config import ClipConfig
from clipforge.model.interop.openai import config_from_openclip


def _oc(embed: int, vision: dict, text: dict, **model: Any) -> ClipConfig:
    return config_from_openclip({"embed_dim": embed, "vision_cfg": vision, "text_cfg": text, **model}, "registry")


def _hf(name: str, pooler: str, proj: str | None = None) -> dict:
    """An OpenCLIP text_cfg of a Hugging Face encoder; ``proj`` None leaves OpenCLIP's default (an MLP)."""
    text = {"hf_model_name": name, "hf_tokenizer_name": name, "hf_pooler_type": pooler}
    return {**text, "hf_proj_type": proj} if proj is not None else text


# OpenCLIP's own ViTs: B/32 (768 wide, 12 layers) and H/14 (1280 wide, 32 layers, 80-wide heads).
_B32 = {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}
_H14 = {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14}
# NLLB-SigLIP's timm SigLIP towers at 384 px: attention-pooled, no head (width == embed_dim).
_SIGLIP = {"image_size": 384, "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"}
_NLLB_BASE, _NLLB_LARGE = "facebook/nllb-200-distilled-600M", "facebook/nllb-200-distilled-1.3B"

HF_TEXT_ARCHITECTURES: dict[str, ClipConfig] = {
    # Mean-pooled encoders with OpenCLIP's default MLP head.
    "roberta-ViT-B-32": _oc(512, _B32, _hf("roberta-base", "mean_pooler"), quick_gelu=True),
    "xlm-roberta-base-ViT-B-32": _oc(512, _B32, _hf("xlm-roberta-base", "mean_pooler")),
    "xlm-roberta-large-ViT-H-14": _oc(1024, _H14, _hf("xlm-roberta-large", "mean_pooler")),
    "mt5-base-ViT-B-32": _oc(512, _B32, _hf("google/mt5-base", "mean_pooler")),
    "mt5-xl-ViT-H-14": _oc(1024, _H14, _hf("google/mt5-xl", "mean_pooler")),
    # NLLB-CLIP (Visheratin): NLLB's encoder at its first token (M2M100 has no pooling layer), a linear
    # head; the -siglip pair trains with SigLIP's loss (logit bias -10).
    "nllb-clip-base": _oc(512, _B32, _hf(_NLLB_BASE, "cls_pooler", "linear")),
    "nllb-clip-large": _oc(1024, _H14, _hf(_NLLB_LARGE, "cls_pooler", "linear")),
    "nllb-clip-base-siglip": _oc(768, {**_SIGLIP, "timm_model_name": "vit_base_patch16_siglip_384"},
                                 _hf(_NLLB_BASE, "cls_pooler", "linear"), init_logit_bias=-10),
    "nllb-clip-large-siglip": _oc(1152, {**_SIGLIP, "timm_model_name": "vit_so400m_patch14_siglip_384"},
                                  _hf(_NLLB_LARGE, "cls_pooler", "linear"), init_logit_bias=-10),
    # CoCa over RoBERTa: the decoder reads RoBERTa's token states and the ViT's patch tokens; its output
    # size is OpenCLIP's default text vocabulary (49,408), as OpenCLIP builds it (no weights released).
    "coca_roberta-ViT-B-32": config_from_openclip({
        "embed_dim": 512, "vision_cfg": {**_B32, "output_tokens": True},
        "text_cfg": {**_hf("roberta-base", "mean_pooler", "linear"), "width": 768, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "width": 768, "heads": 8, "layers": 12}, "custom_text": True},
        "registry"),
}
