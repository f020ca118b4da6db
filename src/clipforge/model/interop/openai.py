"""OpenAI / OpenCLIP state dicts: name mapping, architecture inference, open_clip configs.

OpenAI's layout (also OpenCLIP's ``CLIP``) keeps the image tower under ``visual.`` and the
text tower at the top level (``token_embedding``, ``transformer.resblocks.N``...). Ours keeps
the same names with the text tower under ``text.`` (which is also OpenCLIP's
``CustomTextCLIP`` layout), so mapping is a prefix change, checked key by key.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from clipforge.config import ClipConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.errors import CheckpointError
from clipforge.model.interop.openclip_coca import (
    attn_pool_fields,
    coca_to_openclip,
    decoder_from_openclip,
    vision_attn_pool_bad,
)
from clipforge.model.interop.openclip_text import text_from_openclip, text_to_openclip

# Top-level names of OpenAI's text tower; they live under ``text.`` in our layout.
_TEXT_TOP = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
# Tensors OpenAI's TorchScript archives (and traced OpenCLIP models) carry that are not weights:
# metadata scalars, checked against the inferred shapes, and the constant causal mask.
_META = ("input_resolution", "context_length", "vocab_size")
_MASK = re.compile(r"^(visual\.)?(transformer\.resblocks\.\d+\.)?attn_mask$")


def layout(state: dict[str, torch.Tensor]) -> str:
    """'own' (text under ``text.``), 'openai' (text at top level) or 'hf' (CLIPModel names)."""
    if "text.token_embedding.weight" in state:
        return "own"
    if "token_embedding.weight" in state:
        return "openai"
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        return "hf"
    return "unknown"


def from_openai(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """OpenAI/OpenCLIP names -> ours. Returns (weights, metadata scalars found). Any key that is
    neither a known weight prefix nor a known non-weight is an error."""
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, int] = {}
    unknown = []
    for k, v in state.items():
        if _MASK.match(k):
            continue  # a constant the model rebuilds
        if k.startswith("visual.") or k in ("logit_scale", "logit_bias"):
            out[k] = v
        elif k.split(".", 1)[0] in _TEXT_TOP:
            out["text." + k] = v
        elif k in _META and v.numel() == 1:
            meta[k] = int(v.item())
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors with no counterpart in the OpenAI layout "
                              f"(e.g. {', '.join(sorted(unknown)[:5])})")
    return out, meta


def to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> OpenAI/OpenCLIP names (the inverse of ``from_openai``)."""
    return {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}


def check_meta(meta: dict[str, int], cfg: ClipConfig, source: str) -> None:
    expected = {"input_resolution": cfg.vision.image_size, "context_length": cfg.text.context_length,
                "vocab_size": cfg.text.vocab_size}
    bad = [f"{k}={v} but the weights say {expected[k]}" for k, v in meta.items() if v != expected[k]]
    if bad:
        raise CheckpointError(f"{source}: metadata disagrees with the weights: {'; '.join(bad)}")


# -- architecture inference (as openai/CLIP build_model, then verified by strict loading) ----------

def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pat.match(k))})


def _ratio(hidden: int, width: int) -> float:
    r = hidden / width
    return r if int(width * r) == hidden else (hidden + 0.25) / width  # survive float rounding


def _grid(n_tokens: int, what: str, source: str) -> int:
    g = math.isqrt(n_tokens)
    if g * g != n_tokens:
        raise CheckpointError(f"{source}: {what} has {n_tokens} positions, not a square grid")
    return g


def infer_config(state: dict[str, torch.Tensor], quick_gelu: bool, source: str) -> ClipConfig:
    """Architecture from tensor shapes of an own-layout state dict. Heads cannot be seen in the
    shapes; like openai/CLIP we assume 64-dim heads (pass ``arch=`` when that is wrong)."""
    try:
        return _infer(state, quick_gelu, source)
    except KeyError as e:
        raise CheckpointError(f"{source}: cannot infer the architecture, tensor {e} is missing") from None


def _heads(width: int, what: str, source: str) -> int:
    if width % 64:
        raise CheckpointError(f"{source}: {what} width {width} is not a multiple of 64, so its head count "
                              "cannot be inferred; name the architecture with arch=")
    return width // 64


def _infer(s: dict[str, torch.Tensor], quick_gelu: bool, source: str) -> ClipConfig:
    if any(k.startswith("text.model.") for k in s):  # OpenCLIP's HF text tower, read as ours
        raise CheckpointError(f"{source}: the text tower is a Hugging Face model (text.transformer.*), which its "
                              "tensors do not name: put OpenCLIP's open_clip_config.json beside the weights, or "
                              "pass arch= with a registered architecture (clipforge models)")
    if any(k.startswith(("text_decoder.", "visual.attn_pool.")) for k in s):  # head counts are not in the shapes
        raise CheckpointError(f"{source}: a CoCa model (text_decoder.*, visual.attn_pool.*): put OpenCLIP's "
                              "open_clip_config.json beside the weights, or pass arch= (e.g. coca_ViT-B-32)")
    if "visual.proj" in s:
        width, _, patch, _ = s["visual.conv1.weight"].shape
        grid = _grid(s["visual.positional_embedding"].shape[0] - 1, "visual.positional_embedding", source)
        hidden = s["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        vision = VisionConfig(arch="vit", image_size=patch * grid, width=width, patch_size=patch,
                              layers=_count(s, "visual.transformer.resblocks."), mlp_ratio=_ratio(hidden, width))
        _heads(width, "vision", source)
        embed_dim = s["visual.proj"].shape[1]
    elif "visual.attnpool.c_proj.weight" in s:
        width = s["visual.layer1.0.conv1.weight"].shape[0]
        grid = _grid(s["visual.attnpool.positional_embedding"].shape[0] - 1, "visual.attnpool.positional_embedding",
                     source)
        stages = tuple(_count(s, f"visual.layer{i}.") for i in (1, 2, 3, 4))
        vision = VisionConfig(arch="resnet", image_size=grid * 32, width=width, resnet_layers=stages)
        embed_dim = s["visual.attnpool.c_proj.weight"].shape[0]
    elif any(k.startswith("visual.trunk.") for k in s):  # OpenCLIP's timm adapter: the shapes do not name the model
        raise CheckpointError(f"{source}: the image tower is a timm model (visual.trunk.*), which its tensors do not "
                              "name: put OpenCLIP's open_clip_config.json beside the weights, or pass arch= with a "
                              "registered architecture (clipforge models)")
    else:
        raise CheckpointError(f"{source}: no image tower found (neither visual.proj nor visual.attnpool)")
    twidth = s["text.ln_final.weight"].shape[0]
    vocab = s["text.token_embedding.weight"].shape[0]
    text = TextConfig(
        context_length=s["text.positional_embedding"].shape[0], vocab_size=vocab, width=twidth,
        heads=_heads(twidth, "text", source), layers=_count(s, "text.transformer.resblocks."),
        mlp_ratio=_ratio(s["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], twidth),
        # The last id is OpenAI's end-of-text; pooling at its first occurrence is their argmax rule.
        eot_token_id=vocab - 1,
    )
    if s["text.text_projection"].shape[1] != embed_dim:
        raise CheckpointError(f"{source}: image embedding size {embed_dim} != text embedding size "
                              f"{s['text.text_projection'].shape[1]}")
    bias = float(s["logit_bias"]) if "logit_bias" in s else None
    return ClipConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu, init_logit_bias=bias)


# -- open_clip_config.json (the file OpenCLIP's hf-hub: and local-dir: models carry) -----------------

# Options we implement, and the values of every other option that leave the model unchanged.
# (None: any value is fine, e.g. patch_dropout acts only in training.) Unlisted options must be falsy.
# output_tokens only adds a second output (CoCa's decoder reads it; a decoder in the config sets it).
_VISION_NEUTRAL = {"pos_embed_type": "learnable", "timm_pool": "avg", "timm_proj": "linear", "patch_dropout": None,
                   "block_type": "default", "output_tokens": None}
_VISION_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "pool_type",
                "final_ln_after_pool", "no_ln_pre", "ls_init_value", "attentional_pool", "attn_pooler_queries",
                "attn_pooler_heads"}
_VISION_POOLS = {"tok": "cls", "avg": "avg"}


def _unsupported(cfg: dict[str, Any], known: set[str], neutral: dict[str, Any]) -> list[str]:
    bad = []
    for k, v in cfg.items():
        if k in known or (k in neutral and (neutral[k] is None or v == neutral[k])):
            continue
        if v in (None, False, 0, 0.0, {}, []):
            continue
        bad.append(f"{k}={v!r}")
    return bad


def config_from_openclip(d: dict[str, Any], source: str) -> ClipConfig:
    m = d.get("model_cfg", d)
    v, t = dict(m.get("vision_cfg", {})), dict(m.get("text_cfg", {}))
    timm_vision = _timm_vision(v, source) if v.get("timm_model_name") else None
    if timm_vision is not None:  # OpenCLIP reads no other vision option of a timm tower
        v = {"image_size": v.get("image_size", 224)}
    text, text_bad = text_from_openclip(t)
    decoder, decoder_bad = decoder_from_openclip(m)
    bad = _unsupported(v, _VISION_KEYS, _VISION_NEUTRAL) + text_bad + decoder_bad + vision_attn_pool_bad(v)
    if isinstance(v.get("layers"), (list, tuple)) and v.get("attentional_pool"):
        bad.append("attentional_pool with a ResNet")
    if v.get("pool_type", "tok") not in _VISION_POOLS:
        bad.append(f"vision pool_type={v['pool_type']!r}")
    if isinstance(v.get("layers"), (list, tuple)) and any(v.get(k) for k in ("final_ln_after_pool", "no_ln_pre")):
        bad += [f"{k} with a ResNet" for k in ("final_ln_after_pool", "no_ln_pre") if v.get(k)]
    bad += [f"{k}={m[k]!r}" for k in ("cast_dtype",) if m.get(k)]
    if bad:
        raise CheckpointError(f"{source}: OpenCLIP options not supported by clipforge: {', '.join(bad)}")
    image = v.get("image_size", 224)
    image = image[0] if isinstance(image, (list, tuple)) and image[0] == image[-1] else image
    layers = v.get("layers", 12)
    width = v.get("width", 768)
    head_width = v.get("head_width", 64)
    if timm_vision is not None:
        vision = timm_vision
    elif isinstance(layers, (list, tuple)):
        vision = VisionConfig(arch="resnet", image_size=image, width=width, resnet_layers=tuple(layers),
                              heads=None if head_width == 64 else width * 32 // head_width)
    else:
        vision = VisionConfig(arch="vit", image_size=image, width=width, layers=layers,
                              patch_size=v.get("patch_size", 16),
                              heads=None if head_width == 64 else width // head_width,
                              mlp_ratio=v.get("mlp_ratio", 4.0),
                              pool=_VISION_POOLS.get(v.get("pool_type", "tok"), "cls"),
                              # OpenCLIP ignores final_ln_after_pool behind an attentional pooler.
                              final_ln_after_pool=bool(v.get("final_ln_after_pool")) and not v.get("attentional_pool"),
                              ln_pre=not v.get("no_ln_pre", False), ls_init_value=v.get("ls_init_value"),
                              **attn_pool_fields(v))
    p = d.get("preprocess_cfg", {})
    if p.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise CheckpointError(f"{source}: preprocessing resize_mode={p['resize_mode']!r} is not supported")
    defaults = PreprocessConfig()
    pre = PreprocessConfig(image_size=image, mean=tuple(p.get("mean", defaults.mean)),
                           std=tuple(p.get("std", defaults.std)),
                           interpolation=p.get("interpolation", "bicubic"),
                           resize_mode=p.get("resize_mode", "shortest"))
    return ClipConfig(embed_dim=m.get("embed_dim", 512), vision=vision, text=text,
                      quick_gelu=bool(m.get("quick_gelu", False)), init_logit_bias=m.get("init_logit_bias"),
                      init_logit_scale=float(m.get("init_logit_scale", ClipConfig.init_logit_scale)),
                      preprocess=pre, decoder=decoder)


_TIMM_OPTIONS = ("timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path")


def _timm_vision(v: dict[str, Any], source: str) -> VisionConfig:
    """A timm tower's vision_cfg: OpenCLIP builds it from the timm_* options, image_size and
    patch_dropout only (layers, width, ... are ignored there, so here too)."""
    image = v.get("image_size", 224)
    image = image[0] if isinstance(image, (list, tuple)) and image[0] == image[-1] else image
    # timm_model_pretrained only chose timm's ImageNet start; the CLIP weights beside it replace that.
    try:
        return VisionConfig(arch="timm", image_size=image, patch_dropout=float(v.get("patch_dropout") or 0.0),
                            **{k: v[k] for k in _TIMM_OPTIONS if k in v})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: vision_cfg of a timm tower: {e}") from None


def config_to_openclip(cfg: ClipConfig) -> dict[str, Any]:
    v, t = cfg.vision, cfg.text
    if v.arch == "timm":  # the inverse of _timm_vision
        vision: dict[str, Any] = {"image_size": v.image_size, "timm_model_pretrained": False,
                                  **{k: getattr(v, k) for k in _TIMM_OPTIONS}, "patch_dropout": v.patch_dropout}
    elif v.arch == "resnet":
        vision = {"image_size": v.image_size, "layers": list(v.resnet_layers), "width": v.width,
                  "head_width": v.width * 32 // v.num_heads}
    else:
        vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
                  "head_width": v.width // v.num_heads, "mlp_ratio": v.mlp_ratio}
        if v.pool != "cls":
            vision["pool_type"] = {val: key for key, val in _VISION_POOLS.items()}[v.pool]
        vision.update({"final_ln_after_pool": True} if v.final_ln_after_pool else {})
        vision.update({"no_ln_pre": True} if not v.ln_pre else {})
        vision.update({"ls_init_value": v.ls_init_value} if v.ls_init_value is not None else {})
    text = text_to_openclip(t)
    model: dict[str, Any] = {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu,
                             "vision_cfg": vision, "text_cfg": text}
    if cfg.init_logit_bias is not None:
        model["init_logit_bias"] = cfg.init_logit_bias
    coca_to_openclip(cfg, model)
    p = cfg.preprocess
    pre = {"size": p.image_size, "mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation,
           "resize_mode": p.resize_mode}
    return {"model_cfg": model, "preprocess_cfg": pre}


def check_openai_compatible(cfg: ClipConfig) -> None:
    """openai/CLIP's ``build_model`` rebuilds from shapes with 64-dim heads, QuickGELU and argmax
    pooling; a state dict that needs anything else would load there and silently compute garbage."""
    v, t = cfg.vision, cfg.text
    problems = []
    if v.arch not in ("vit", "resnet"):
        problems.append(f"its image tower ({v.arch}) is not one OpenAI's code builds")
    if v.arch == "vit" and (v.pool != "cls" or v.final_ln_after_pool or not v.ln_pre or v.ls_init_value is not None):
        problems.append("its ViT pools or normalises differently (pool, final_ln_after_pool, ln_pre)")
    if not cfg.quick_gelu:
        problems.append("uses GELU (OpenAI's code always runs QuickGELU)")
    vheads = v.width // 64 if v.arch == "vit" else v.width * 32 // 64
    if v.num_heads != vheads:
        problems.append(f"vision tower has {v.num_heads} heads, OpenAI's code would use {vheads}")
    if t.heads != t.width // 64:
        problems.append(f"text tower has {t.heads} heads, OpenAI's code would use {t.width // 64}")
    if v.arch == "vit" and v.mlp_ratio != 4.0 or t.mlp_ratio != 4.0:
        problems.append("MLP ratio is not 4")
    if t.eot_token_id != t.vocab_size - 1 or t.pool != "eot":
        problems.append("text is not pooled at the last vocabulary id (OpenAI pools at argmax)")
    if (not t.causal_mask or t.proj_bias or t.proj_type != "linear" or t.norm_eps != 1e-5
            or t.gelu_approximate != "none" or t.ls_init_value is not None):
        problems.append("text tower is not OpenAI's (attention mask, projection, LayerNorm eps, GELU or LayerScale)")
    if cfg.init_logit_bias is not None:
        problems.append("has a logit bias")
    if cfg.decoder is not None or v.attentional_pool or t.embed_cls:
        problems.append("is a CoCa model (attentional pooler, class token or captioning decoder)")
    if problems:
        raise CheckpointError("model cannot be expressed in OpenAI's layout: " + "; ".join(problems)
                              + "; export to the 'openclip' format instead")
