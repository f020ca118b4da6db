"""Hugging Face ``SiglipModel`` / ``Siglip2Model`` directories: config, parameter names, loading.

Both map onto clipforge's CLIP with SigLIP's image tower (``VisionConfig.arch='siglip'``,
``model.siglip_vision``) and clipforge's text transformer set up as SigLIP's (bidirectional, pooled
at the last position, a biased projection, LayerNorm eps from the config, tanh GELU). The
encoder blocks use the same rules as Hugging Face CLIP (``interop.hf``: q/k/v fused into
``in_proj``); everything else is named here, and any tensor no rule covers is an error.

SigLIP 2's patch embedding is an ``nn.Linear`` over patches flattened as (row, column, channel);
it is stored as the equivalent conv weight. Images are then taken at one fixed square size, the
model's native grid (``sqrt(num_patches)`` patches a side), where SigLIP 2's position resizing is
the identity; NaFlex's variable aspect ratios and patch counts are not supported.

The tokenizer is the directory's own (``spiece.model`` for SigLIP, Gemma's ``tokenizer.json`` for
SigLIP 2), read through ``TextConfig.hf_tokenizer_name``, with the context length of the text
config and text padded to it, as both were trained.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from clipforge.config import ClipConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.errors import CheckpointError
from clipforge.model.interop import hf

MODEL_TYPES = ("siglip", "siglip2")
_TEXT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                  "layer_norm_eps": 1e-6, "pad_token_id": 1, "eos_token_id": 1, "projection_size": None}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                    "layer_norm_eps": 1e-6, "vision_use_head": True, "num_patches": 256}
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}

# ours <-> HF, outside the encoder blocks. Siglip2's patch weight is reshaped (see module doc).
_FIXED = {
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.text_projection.weight": "text_model.head.weight",
    "text.text_projection.bias": "text_model.head.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.conv1.bias": "vision_model.embeddings.patch_embedding.bias",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.attn_pool.probe": "vision_model.head.probe",
    "visual.attn_pool.attn.in_proj_weight": "vision_model.head.attention.in_proj_weight",
    "visual.attn_pool.attn.in_proj_bias": "vision_model.head.attention.in_proj_bias",
    "visual.attn_pool.attn.out_proj.weight": "vision_model.head.attention.out_proj.weight",
    "visual.attn_pool.attn.out_proj.bias": "vision_model.head.attention.out_proj.bias",
    "visual.attn_pool.norm.weight": "vision_model.head.layernorm.weight",
    "visual.attn_pool.norm.bias": "vision_model.head.layernorm.bias",
    "visual.attn_pool.mlp.c_fc.weight": "vision_model.head.mlp.fc1.weight",
    "visual.attn_pool.mlp.c_fc.bias": "vision_model.head.mlp.fc1.bias",
    "visual.attn_pool.mlp.c_proj.weight": "vision_model.head.mlp.fc2.weight",
    "visual.attn_pool.mlp.c_proj.bias": "vision_model.head.mlp.fc2.bias",
}
_SCALARS = ("logit_scale", "logit_bias")  # HF keeps them as [1] tensors, clipforge as scalars
_IGNORED = {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}


def is_siglip(cfg: dict[str, Any] | None) -> bool:
    return isinstance(cfg, dict) and cfg.get("model_type") in MODEL_TYPES


def _patch_to_conv(w: torch.Tensor, patch: int) -> torch.Tensor:
    """Siglip2's Linear weight [W, p*p*C] over (row, col, channel) -> a conv weight [W, C, p, p]."""
    return w.reshape(w.shape[0], patch, patch, -1).permute(0, 3, 1, 2).contiguous()


def from_hf_siglip(state: dict[str, torch.Tensor], cfg: ClipConfig, siglip2: bool,
                   source: str) -> dict[str, torch.Tensor]:
    """HF SiglipModel / Siglip2Model names -> ours."""
    inverse = {v: k for k, v in _FIXED.items()}
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state.items():
        if k in inverse:
            out[inverse[k]] = v
        elif k in _SCALARS:
            out[k] = v.reshape(())
        elif ".encoder.layers." in k:
            blocks[k] = v
        elif k not in _IGNORED:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors with no counterpart in clipforge's SigLIP "
                              f"(e.g. {', '.join(sorted(unknown)[:5])})")
    out.update(hf.from_hf(blocks, source))  # the encoder blocks are named as in HF CLIP
    patch = out.get("visual.conv1.weight")
    if siglip2 and patch is not None and patch.dim() == 2:
        out["visual.conv1.weight"] = _patch_to_conv(patch, cfg.vision.patch_size)
    return out


def _merged(cfg: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **(cfg.get(key) or {})}


def config_from_hf_siglip(cfg: dict[str, Any], pre: dict[str, Any] | None, source: str,
                          tokenizer_dir: Path | None = None) -> ClipConfig:
    """A ClipConfig from a SiglipModel/Siglip2Model ``config.json`` (+ preprocessor config)."""
    siglip2 = cfg.get("model_type") == "siglip2"
    t, v = _merged(cfg, "text_config", _TEXT_DEFAULTS), _merged(cfg, "vision_config", _VISION_DEFAULTS)
    if v["hidden_act"] != "gelu_pytorch_tanh" or not math.isclose(float(v["layer_norm_eps"]), 1e-6):
        raise CheckpointError(f"{source}: SigLIP image tower with hidden_act={v['hidden_act']!r}, layer_norm_eps="
                              f"{v['layer_norm_eps']}: only gelu_pytorch_tanh and 1e-6 are supported")
    if t["hidden_act"] not in _GELU:
        raise CheckpointError(f"{source}: text hidden_act {t['hidden_act']!r} is not supported ({', '.join(_GELU)})")
    if not v["vision_use_head"]:
        raise CheckpointError(f"{source}: vision_use_head=false (no pooling head) is not supported")
    if v["num_channels"] != 3:
        raise CheckpointError(f"{source}: {v['num_channels']}-channel images are not supported")
    patch = hf._square(v["patch_size"], "patch_size", source)
    if siglip2:
        grid = math.isqrt(int(v["num_patches"]))
        if grid * grid != v["num_patches"]:
            raise CheckpointError(f"{source}: num_patches {v['num_patches']} is not a square grid")
        image = grid * patch
    else:
        image = hf._square(v["image_size"], "image_size", source)
    vw, tw = int(v["hidden_size"]), int(t["hidden_size"])
    proj = t["projection_size"] or tw
    if proj != vw:
        raise CheckpointError(f"{source}: text projection_size {proj} != image width {vw}")
    vision = VisionConfig(arch="siglip", image_size=image, width=vw, layers=v["num_hidden_layers"], patch_size=patch,
                          heads=v["num_attention_heads"], mlp_ratio=v["intermediate_size"] / vw)
    vocab = int(t["vocab_size"])
    eos = t["eos_token_id"]
    eos = int(eos[0] if isinstance(eos, list) else eos) if eos is not None else vocab - 1
    text = TextConfig(
        context_length=t["max_position_embeddings"], vocab_size=vocab, width=tw, heads=t["num_attention_heads"],
        layers=t["num_hidden_layers"], mlp_ratio=t["intermediate_size"] / tw,
        eot_token_id=eos if eos < vocab else vocab - 1, pad_token_id=int(t["pad_token_id"] or 0),
        pool="last", causal_mask=False, proj_bias=True, norm_eps=float(t["layer_norm_eps"]),
        gelu_approximate=_GELU[t["hidden_act"]],  # type: ignore[arg-type]
        hf_tokenizer_name=None if tokenizer_dir is None else str(tokenizer_dir.resolve()),
        # SiglipTokenizer canonicalises text itself; SigLIP 2 was trained on lower-cased text,
        # which Gemma's tokenizer does not do (transformers' Siglip2Tokenizer adds it).
        tokenizer_clean="lower" if siglip2 else "none",
    )
    for name, width, hidden in (("vision", vw, v["intermediate_size"]), ("text", tw, t["intermediate_size"])):
        if int(width * (hidden / width)) != hidden:
            raise CheckpointError(f"{source}: {name} intermediate_size {hidden} is not representable")
    return ClipConfig(embed_dim=vw, vision=vision, text=text, quick_gelu=False,
                      init_logit_scale=math.log(10.0), init_logit_bias=-10.0,  # the SigLIP paper's initialisation
                      preprocess=_preprocess(pre, image), name="")


def _preprocess(pre: dict[str, Any] | None, image: int) -> PreprocessConfig:
    """SigLIP's processors resize to the square input without cropping (squash), mean/std 0.5."""
    pre = pre or {}
    return PreprocessConfig(image_size=image, mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
                            std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
                            interpolation=_RESAMPLE.get(pre.get("resample", 2), "bilinear"),  # type: ignore[arg-type]
                            resize_mode="squash")


def convert(path: Path, cfg_json: dict[str, Any], pre_json: dict[str, Any] | None,
            state: dict[str, torch.Tensor], source: str) -> tuple[ClipConfig, dict[str, torch.Tensor]]:
    """(config, clipforge-named tensors) of the SiglipModel / Siglip2Model directory ``path``. Its
    own tokenizer files are the model's tokenizer; a directory without them still names itself, so
    tokenizing fails with a clear error rather than falling back to CLIP's BPE (other ids)."""
    cfg = config_from_hf_siglip(cfg_json, pre_json, str(path / "config.json"), path)
    cfg = cfg.replace(name=path.name)
    return cfg, from_hf_siglip(state, cfg, cfg_json.get("model_type") == "siglip2", source)


# -- export: the inverse of the above ------------------------------------------------------------------

def to_hf_siglip(state: dict[str, torch.Tensor], siglip2: bool = False) -> dict[str, torch.Tensor]:
    """Our names -> SiglipModel's (``siglip2``: Siglip2Model's, its patch weight flattened back)."""
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state.items():
        if k in _FIXED:
            out[_FIXED[k]] = v
        elif k in _SCALARS:
            out[k] = v.reshape(1)
        elif ".transformer.resblocks." in k:
            blocks[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"cannot express in Hugging Face SigLIP layout: {', '.join(sorted(unknown)[:5])}")
    out.update(hf.to_hf(blocks))
    patch = "vision_model.embeddings.patch_embedding.weight"
    if siglip2 and patch in out:  # [W, C, p, p] -> [W, p*p*C] over (row, column, channel)
        out[patch] = out[patch].permute(0, 2, 3, 1).reshape(out[patch].shape[0], -1).contiguous()
    return out


def config_to_hf_siglip(cfg: ClipConfig, siglip2: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) for ``transformers.SiglipModel`` (or Siglip2Model)."""
    v, t = cfg.vision, cfg.text
    problems = []
    if v.arch != "siglip":
        problems.append(f"its image tower is {v.arch!r}, not SigLIP's")
    if t.hf_model is not None or t.pool != "last" or t.causal_mask or not t.proj_bias or t.proj_type != "linear":
        problems.append("its text tower is not SigLIP's (bidirectional, last-position pooled, biased projection)")
    if t.ls_init_value is not None:
        problems.append("its text tower has LayerScale")
    if cfg.init_logit_bias is None:
        problems.append("it has no logit bias")
    if problems:
        raise CheckpointError("cannot export to Hugging Face SigLIP: " + "; ".join(problems))
    act = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}[t.gelu_approximate]
    text = {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "hidden_act": act, "layer_norm_eps": t.norm_eps, "pad_token_id": t.pad_token_id,
            "eos_token_id": t.eot_token_id, "projection_size": cfg.embed_dim}
    vision = {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
              "num_attention_heads": v.num_heads, "num_channels": 3, "patch_size": v.patch_size,
              "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    grid = v.image_size // v.patch_size
    if siglip2:
        vision["num_patches"] = grid * grid
    else:
        vision["image_size"] = v.image_size
    kind = "siglip2" if siglip2 else "siglip"
    config = {"architectures": ["Siglip2Model" if siglip2 else "SiglipModel"], "model_type": kind,
              "text_config": {"model_type": f"{kind}_text_model", **text},
              "vision_config": {"model_type": f"{kind}_vision_model", **vision}}
    p = cfg.preprocess
    pre: dict[str, Any] = {
        "do_resize": True, "resample": {name: code for code, name in _RESAMPLE.items()}[p.interpolation],
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean),
        "image_std": list(p.std)}
    if siglip2:  # NaFlex's processor, capped at the native patch count (square images land on the grid)
        pre.update(image_processor_type="Siglip2ImageProcessor", patch_size=v.patch_size, max_num_patches=grid * grid)
    else:
        pre.update(image_processor_type="SiglipImageProcessor", size={"height": p.image_size, "width": p.image_size})
    return config, pre
