"""Hugging Face ``CLIPModel`` (ViT towers): configs and parameter names, both directions.

HF splits attention into q/k/v projections and stores projections as ``nn.Linear`` weights
([out, in]); ours fuse q/k/v into ``in_proj_weight`` (OpenAI's layout) and store projections
as matrices applied on the right ([in, out]). Every name is mapped by rule, and anything a
rule does not cover is an error, in both directions.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch

from clipforge.config import ClipConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.errors import CheckpointError

# transformers' CLIPTextConfig / CLIPVisionConfig defaults: what a config.json means when it omits a key.
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5}
_ACTS = {"quick_gelu": True, "gelu": False}
_RESAMPLE = {3: "bicubic", 2: "bilinear"}

# name maps: ours <-> HF, for everything outside the per-layer blocks
_FIXED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text.text_projection": "text_projection.weight"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOWERS = {"visual": "vision_model", "text": "text_model"}
# Buffers HF has saved in some versions; derived from shapes, not weights.
_IGNORED = {"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"}

_HF_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OWN_LAYER = re.compile(r"^(visual|text)\.transformer\.resblocks\.(\d+)\.(.+)$")


def from_hf(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF CLIPModel names -> ours; q/k/v are concatenated into in_proj."""
    inverse_fixed = {v: k for k, v in _FIXED.items()}
    inverse_t = {v: k for k, v in _TRANSPOSED.items()}
    inverse_block = {v: k for k, v in _BLOCK.items()}
    tower_of = {v: k for k, v in _TOWERS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in state.items():
        if k in inverse_fixed:
            out[inverse_fixed[k]] = v
        elif k in inverse_t:
            out[inverse_t[k]] = v.t().contiguous()  # [E, W] -> [W, E]
        elif k in _IGNORED:
            continue
        elif m := _HF_LAYER.match(k):
            tower, idx, module, param = m.groups()
            prefix = f"{tower_of[tower]}.transformer.resblocks.{idx}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, param, k.rsplit(".", 3)[0]), {})[module[-6]] = v
            elif module in inverse_block:
                out[f"{prefix}{inverse_block[module]}.{param}"] = v
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    for (prefix, param, hf_prefix), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointError(f"{source}: {hf_prefix} lacks {', '.join(p + '_proj.' + param for p in missing)}")
        if len({tuple(t.shape) for t in parts.values()}) != 1:
            shapes = ", ".join(f"{n}_proj {tuple(t.shape)}" for n, t in sorted(parts.items()))
            raise CheckpointError(f"{source}: {hf_prefix} q/k/v {param}s differ in shape: {shapes}")
        out[f"{prefix}attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # [3W, ...]
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors with no counterpart in clipforge's CLIP "
                              f"(e.g. {', '.join(sorted(unknown)[:5])})")
    return out


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> HF CLIPModel names; in_proj is split into q/k/v. Fails on anything unmapped."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state.items():
        if k in _FIXED:
            out[_FIXED[k]] = v
        elif k in _TRANSPOSED:
            out[_TRANSPOSED[k]] = v.t().contiguous()  # [W, E] -> [E, W]
        elif m := _OWN_LAYER.match(k):
            tower, idx, rest = m.groups()
            prefix = f"{_TOWERS[tower]}.encoder.layers.{idx}."
            module, param = rest.rsplit(".", 1)
            if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
                kind = param[len("in_proj_"):]
                for name, part in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.clone()  # own storage, for safetensors
            elif module in _BLOCK:
                out[f"{prefix}{_BLOCK[module]}.{param}"] = v
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"cannot express in Hugging Face CLIP layout: {', '.join(sorted(unknown)[:5])}")
    return out


# -- configs ------------------------------------------------------------------------------------------

def _square(v: Any, what: str, source: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise CheckpointError(f"{source}: non-square {what} {v} is not supported")
        v = v[0]
    return int(v)


def config_from_hf(cfg: dict[str, Any], pre: dict[str, Any] | None, source: str) -> ClipConfig:
    if cfg.get("model_type", "clip") != "clip":
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not supported (only 'clip')")
    t = {**_TEXT_DEFAULTS, **(cfg.get("text_config") or {}), **(cfg.get("text_config_dict") or {})}
    v = {**_VISION_DEFAULTS, **(cfg.get("vision_config") or {}), **(cfg.get("vision_config_dict") or {})}
    acts = {t["hidden_act"], v["hidden_act"]}
    if not acts <= set(_ACTS) or len(acts) != 1:
        raise CheckpointError(f"{source}: activations text={t['hidden_act']!r} vision={v['hidden_act']!r}; "
                              "clipforge supports quick_gelu or gelu, the same in both towers")
    for tower, d in (("text", t), ("vision", v)):
        if not math.isclose(float(d["layer_norm_eps"]), 1e-5, rel_tol=1e-3):
            raise CheckpointError(f"{source}: {tower} layer_norm_eps {d['layer_norm_eps']} is not supported (1e-5)")
    if v["num_channels"] != 3:
        raise CheckpointError(f"{source}: {v['num_channels']}-channel images are not supported")
    eos = t["eos_token_id"]
    vocab = t["vocab_size"]
    # eos_token_id == 2 marks configs written before HF fixed it; HF then pools at argmax,
    # which the last vocabulary id reproduces.
    eot = vocab - 1 if eos == 2 or eos is None else int(eos[0] if isinstance(eos, list) else eos)
    image = _square(v["image_size"], "image_size", source)
    patch = _square(v["patch_size"], "patch_size", source)
    vw, tw = v["hidden_size"], t["hidden_size"]
    vision = VisionConfig(arch="vit", image_size=image, width=vw, layers=v["num_hidden_layers"], patch_size=patch,
                          heads=None if v["num_attention_heads"] == vw // 64 else v["num_attention_heads"],
                          mlp_ratio=v["intermediate_size"] / vw)
    text = TextConfig(context_length=t["max_position_embeddings"], vocab_size=vocab, width=tw,
                      heads=t["num_attention_heads"], layers=t["num_hidden_layers"],
                      mlp_ratio=t["intermediate_size"] / tw, eot_token_id=eot)
    for name, width, hidden in (("vision", vw, v["intermediate_size"]), ("text", tw, t["intermediate_size"])):
        if int(width * (hidden / width)) != hidden:
            raise CheckpointError(f"{source}: {name} intermediate_size {hidden} is not representable")
    return ClipConfig(embed_dim=cfg.get("projection_dim", 512), vision=vision, text=text,
                      quick_gelu=_ACTS[v["hidden_act"]],
                      init_logit_scale=float(cfg.get("logit_scale_init_value", 2.6592)),
                      preprocess=_preprocess_from_hf(pre, image, source))


def _edge(v: Any) -> tuple[int | None, bool]:
    """(pixels, is_shortest_edge) from an HF size/crop_size entry (int or dict)."""
    if v is None:
        return None, False
    if isinstance(v, dict):
        if "shortest_edge" in v:
            return int(v["shortest_edge"]), True
        if v.get("height") != v.get("width"):
            return None, False
        return int(v["height"]), False
    return int(v), True


def _preprocess_from_hf(pre: dict[str, Any] | None, image: int, source: str) -> PreprocessConfig:
    if not pre:
        return PreprocessConfig(image_size=image)
    defaults = PreprocessConfig()
    size, shortest = _edge(pre.get("size"))
    crop, _ = _edge(pre.get("crop_size"))
    center = pre.get("do_center_crop", True)
    pixels = (crop if center else size) or image
    if center and size is not None and crop is not None and size != crop:
        warnings.warn(f"{source}: preprocessing resizes to {size} then crops {crop}; clipforge resizes "
                      f"straight to {crop}", stacklevel=3)
    return PreprocessConfig(
        image_size=pixels,
        mean=tuple(pre.get("image_mean", defaults.mean)),
        std=tuple(pre.get("image_std", defaults.std)),
        interpolation=_RESAMPLE.get(pre.get("resample", 3), "bicubic"),
        resize_mode="shortest" if center or shortest else "squash",
    )


def config_to_hf(cfg: ClipConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) for ``transformers.CLIPModel``."""
    v, t = cfg.vision, cfg.text
    problems = []
    if v.arch != "vit":
        kind = {"resnet": "ResNet", "timm": f"timm ({v.timm_model_name})"}.get(v.arch, v.arch)
        problems.append(f"Hugging Face CLIPModel builds only its own ViT, not this model's {kind} image tower")
    elif v.pool != "cls" or v.final_ln_after_pool or not v.ln_pre or v.ls_init_value is not None:
        problems.append("its ViT pools or normalises differently from CLIPModel's (pool, final_ln_after_pool, ln_pre)")
    if (t.pool != "eot" or not t.causal_mask or t.proj_bias or t.proj_type != "linear"
            or t.ls_init_value is not None or t.gelu_approximate != "none"):
        problems.append("its text tower is not CLIPModel's (pooling, attention mask, projection, LayerScale or GELU)")
    if cfg.init_logit_bias is not None:
        problems.append("Hugging Face CLIPModel has no logit bias")
    if t.eot_token_id == 2:
        problems.append("end-of-text id 2 means 'argmax pooling' to Hugging Face")
    if problems:
        raise CheckpointError("cannot export to Hugging Face: " + "; ".join(problems))
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    text = {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "max_position_embeddings": t.context_length, "hidden_act": act,
            "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim, "eos_token_id": t.eot_token_id,
            "bos_token_id": max(t.eot_token_id - 1, 0), "pad_token_id": t.pad_token_id}
    vision = {"model_type": "clip_vision_model", "hidden_size": v.width,
              "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
              "num_attention_heads": v.num_heads, "num_channels": 3,
              "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": act, "layer_norm_eps": 1e-5,
              "projection_dim": cfg.embed_dim}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
              "logit_scale_init_value": cfg.init_logit_scale, "initializer_factor": 1.0,
              "text_config": text, "vision_config": vision}
    p = cfg.preprocess
    shortest = p.resize_mode == "shortest"
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
           "size": {"shortest_edge": p.image_size} if shortest else {"height": p.image_size, "width": p.image_size},
           "resample": {v: k for k, v in _RESAMPLE.items()}[p.interpolation], "do_center_crop": shortest,
           "crop_size": {"height": p.image_size, "width": p.image_size}, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std),
           "do_convert_rgb": True}
    return config, pre
