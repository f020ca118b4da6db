"""OpenCLIP's own ViTs and ResNets: the architectures of OpenCLIP's model configs whose towers are
its own (no timm image tower, no Hugging Face text tower), CoCa's included, with OpenCLIP's names
and values (open-clip-torch 3.3, model_configs/*.json).

They are written out as OpenCLIP dicts, because open_clip is not a dependency, and go through
``config_from_openclip`` as an ``open_clip_config.json`` does, so a loaded checkpoint finds its
name here. ``registry`` merges ``OPENCLIP_ARCHITECTURES`` into its table.

OpenAI's nine shapes (RN50 ... ViT-L-14-336) and their ``-quickgelu`` names are in ``registry``.
"""

from __future__ import annotations

from typing import Any

from clipforge.config import ClipConfig
from clipforge.model.interop.openai import config_from_openclip


def oc(embed: int, vision: dict, text: dict, **model: Any) -> ClipConfig:
    """A ClipConfig from OpenCLIP's model-config fields (embed_dim, vision_cfg, text_cfg, ...)."""
    return config_from_openclip({"embed_dim": embed, "vision_cfg": vision, "text_cfg": text, **model}, "registry")


def tt(width: int, heads: int, layers: int, context: int = 77, **extra: Any) -> dict:
    """CLIP's text transformer as an OpenCLIP text_cfg (BPE vocabulary)."""
    return {"context_length": context, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers, **extra}


# Image tower sizes: (width, layers, head_width, mlp_ratio); OpenCLIP's defaults are 64 and 4.0.
_TOWERS: dict[str, tuple[int, int, int, float]] = {
    "S": (384, 12, 64, 4.0),
    "M": (512, 12, 64, 4.0),
    "B": (768, 12, 64, 4.0),
    "B-plus": (896, 12, 64, 4.0),
    "L": (1024, 24, 64, 4.0),
    "H": (1280, 32, 80, 4.0),
    "g": (1408, 40, 88, 4.3637),
    "bigG": (1664, 48, 104, 4.9231),
    "e": (1792, 56, 112, 8.5715),
}
# The text tower and embed_dim that each size is paired with: (embed_dim, width, heads, layers).
_PAIRS: dict[str, tuple[int, int, int, int]] = {
    "S": (384, 384, 6, 12),
    "S-alt": (256, 256, 4, 10),
    "M": (512, 512, 8, 12),
    "M-alt": (384, 384, 6, 12),
    "B": (512, 512, 8, 12),
    "B-plus": (640, 640, 10, 12),
    "L": (768, 768, 12, 12),
    "H": (1024, 1024, 16, 24),
    "g": (1024, 1024, 16, 24),
    "bigG": (1280, 1280, 20, 32),
    "e": (1280, 1280, 20, 36),
}
# CLIPA (Li et al., "An inverse scaling law for CLIP training"): the image tower has no ln_pre and
# averages its patch tokens, normalised after pooling; the text tower is bidirectional, pooled at its
# last position, over BERT's uncased WordPiece vocabulary (32 tokens, [SEP] stripped).
_CLIPA_VISION = {"no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True}
_CLIPA_TEXT = {"context_length": 32, "vocab_size": 32000, "hf_tokenizer_name": "bert-base-uncased",
               "tokenizer_kwargs": {"strip_sep_token": True}, "pool_type": "last", "no_causal_mask": True}
# MetaCLIP 2 worldwide: CLIP's text transformer over a multilingual vocabulary, pooled at the
# tokenizer's end-of-sequence id (OpenCLIP's 'eos'). L-14 uses mT5's, H-14 and bigG-14 XLM-V's.
_WORLDWIDE_TEXT = {
    "L": {"hf_tokenizer_name": "google/mt5-base", "pool_type": "eos", "eos_id": 1,
          "tokenizer_kwargs": {"clean": "canonicalize"}, "context_length": 77, "vocab_size": 250100},
    "H": {"hf_tokenizer_name": "facebook/xlm-v-base", "pool_type": "eos", "eos_id": 2, "context_length": 77,
          "vocab_size": 901629},
}
_WORLDWIDE_TEXT["bigG"] = _WORLDWIDE_TEXT["H"]


def _coca(embed: int, vision: dict, text: dict, decoder: tuple[int, int, int]) -> ClipConfig:
    """CoCa: the towers give tokens too, the text tower appends a class token, and a captioning
    decoder (width, heads, layers) reads 76 tokens, as the text tower does."""
    width, heads, layers = decoder
    return oc(embed, {**vision, "output_tokens": True}, {**text, "embed_cls": True, "output_tokens": True},
              multimodal_cfg={"context_length": 76, "width": width, "heads": heads, "layers": layers})


def _vision(size: str, patch: int, image: int, **extra: Any) -> dict:
    width, layers, head_width, mlp_ratio = _TOWERS[size]
    v: dict[str, Any] = {"image_size": image, "layers": layers, "width": width, "patch_size": patch}
    v.update({"head_width": head_width} if head_width != 64 else {})
    v.update({"mlp_ratio": mlp_ratio} if mlp_ratio != 4.0 else {})
    return {**v, **extra}


def _vit(size: str, patch: int, image: int = 224, pair: str | None = None, text: str = "clip",
         quick: bool = False, **vision: Any) -> ClipConfig:
    """OpenCLIP's ViT of ``size`` with ``patch``-pixel patches at ``image`` pixels; ``pair`` names
    the text tower (default: the size's own); text 'clip', 'clipa' or 'worldwide'."""
    embed, width, heads, layers = _PAIRS[pair or size]
    model = {"quick_gelu": True} if quick else {}
    if text == "clipa":
        return oc(embed, _vision(size, patch, image, **_CLIPA_VISION),
                  {**_CLIPA_TEXT, "width": width, "heads": heads, "layers": layers}, **model)
    if text == "worldwide":
        return oc(embed, _vision(size, patch, image),
                  {**_WORLDWIDE_TEXT[size], "width": width, "heads": heads, "layers": layers}, **model)
    return oc(embed, _vision(size, patch, image, **vision), tt(width, heads, layers), **model)


OPENCLIP_ARCHITECTURES: dict[str, ClipConfig] = {
    # Small and medium ViTs; -alt pairs the tower with a narrower text tower and embedding.
    "ViT-S-32": _vit("S", 32),
    "ViT-S-32-alt": _vit("S", 32, pair="S-alt"),
    "ViT-S-16": _vit("S", 16),
    "ViT-S-16-alt": _vit("S", 16, pair="S-alt"),
    "ViT-M-32": _vit("M", 32),
    "ViT-M-32-alt": _vit("M", 32, pair="M-alt"),
    "ViT-M-16": _vit("M", 16),
    "ViT-M-16-alt": _vit("M", 16, pair="M-alt", ls_init_value=1e-4),  # LayerScale in the image tower
    # ViT-B at other resolutions, and the wider -plus towers (896 wide, 640-wide text).
    "ViT-B-32-256": _vit("B", 32, 256),
    "ViT-B-32-plus-256": _vit("B-plus", 32, 256),
    "ViT-B-16-plus": _vit("B-plus", 16),
    "ViT-B-16-plus-240": _vit("B-plus", 16, 240),
    # ViT-L/H at other patch sizes and resolutions, and the larger sizes (g, bigG, e).
    "ViT-L-14-280": _vit("L", 14, 280),
    "ViT-L-16": _vit("L", 16),
    "ViT-L-16-320": _vit("L", 16, 320),
    "ViT-H-14": _vit("H", 14),
    "ViT-H-14-quickgelu": _vit("H", 14, quick=True),
    "ViT-H-14-378": _vit("H", 14, 378),
    "ViT-H-14-378-quickgelu": _vit("H", 14, 378, quick=True),
    "ViT-H-16": _vit("H", 16),
    "ViT-g-14": _vit("g", 14),
    "ViT-bigG-14": _vit("bigG", 14),
    "ViT-bigG-14-quickgelu": _vit("bigG", 14, quick=True),
    "ViT-e-14": _vit("e", 14),
    # CLIPA.
    "ViT-L-14-CLIPA": _vit("L", 14, text="clipa"),
    "ViT-L-14-CLIPA-336": _vit("L", 14, 336, text="clipa"),
    "ViT-H-14-CLIPA": _vit("H", 14, text="clipa"),
    "ViT-H-14-CLIPA-336": _vit("H", 14, 336, text="clipa"),
    "ViT-bigG-14-CLIPA": _vit("bigG", 14, text="clipa"),
    "ViT-bigG-14-CLIPA-336": _vit("bigG", 14, 336, text="clipa"),
    # MetaCLIP 2 worldwide.
    "ViT-L-14-worldwide": _vit("L", 14, text="worldwide"),
    "ViT-L-14-worldwide-quickgelu": _vit("L", 14, text="worldwide", quick=True),
    "ViT-H-14-worldwide": _vit("H", 14, text="worldwide"),
    "ViT-H-14-worldwide-quickgelu": _vit("H", 14, text="worldwide", quick=True),
    "ViT-H-14-worldwide-378": _vit("H", 14, 378, text="worldwide"),
    "ViT-bigG-14-worldwide": _vit("bigG", 14, text="worldwide"),
    "ViT-bigG-14-worldwide-378": _vit("bigG", 14, 378, text="worldwide"),
    # CoCa (Yu et al. 2022): an attentional pooler's 256 queries over the ViT (the first one pooled,
    # the rest the decoder's image tokens) or, in coca_base, the patch tokens; the text's class token.
    "coca_ViT-B-32": _coca(512, _vision("B", 32, 224, attentional_pool=True, attn_pooler_heads=8),
                           tt(512, 8, 12, context=76), (512, 8, 12)),
    "coca_ViT-L-14": _coca(768, _vision("L", 14, 224, attentional_pool=True, attn_pooler_heads=8),
                           tt(768, 12, 12, context=76), (768, 12, 12)),
    "coca_base": _coca(512, _vision("B", 18, 288), {**tt(768, 12, 12, context=76), "vocab_size": 64000},
                       (768, 12, 12)),
}
