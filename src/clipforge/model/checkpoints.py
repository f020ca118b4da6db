"""Load and save model weights.

clipforge's own format is a directory with ``config.json`` + ``model.safetensors``: no
pickle, and the config (architecture, activation, preprocessing) travels with the weights.
``load_any`` also reads, recognised by content rather than by name:

- OpenAI's TorchScript archives (``ViT-B-32.pt``), whose tensors are read without running
  the archived program (``interop.torchscript``);
- OpenAI / OpenCLIP state dicts in ``.pt``/``.bin``/``.safetensors``, bare or wrapped as an
  OpenCLIP training checkpoint (``{"state_dict": ..., "epoch": ...}``, ``module.`` prefixes),
  alone or beside an ``open_clip_config.json``;
- Hugging Face ``CLIPModel`` directories (``config.json`` + ``model.safetensors``/``pytorch_model.bin``).

A model whose text tower is a Hugging Face encoder also keeps that encoder's config and tokenizer
in ``text_model/`` beside ``config.json`` (``write_config``).

Nothing is ever unpickled beyond tensors and containers (``torch.load(weights_only=True)``);
a file that needs more is refused. Architectures inferred from shapes are verified by strict
loading: every adapter maps names and shapes one to one and fails on anything left over.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from clipforge.config import ClipConfig
from clipforge.errors import CheckpointError
from clipforge.model.card import write_card
from clipforge.model.clip import CLIP
from clipforge.model.hf_source import hub_name, with_text_model
from clipforge.model.hf_text import HFTextTower, check_saved_source
from clipforge.model.hf_tokenizer import with_local_tokenizer
from clipforge.model.interop import hf, hf_siglip, openai, openclip_hf, torchscript
from clipforge.model.weight_files import (
    fill_bn_counters,
    first_of,
    read_json,
    read_safetensors,
    read_weights_file,
    unwrap,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_MODEL_DIR = "text_model"  # a Hugging Face text tower's config and tokenizer
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ExportFormat = Literal["clipforge", "hf", "openclip", "openai"]


def save(model: CLIP, out_dir: str | Path) -> Path:
    """Write ``model`` in the own format; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors(model.state_dict(), out / WEIGHTS_NAME, {"format": "clipforge"})
    write_config(model, out)
    return out


def write_config(model: CLIP, out: Path) -> Path:
    """``config.json`` into the model directory ``out``. A Hugging Face text tower's config and
    tokenizer go to ``out/text_model/`` (its weights are in ``model.safetensors``), recorded by
    that relative path, so the directory stands alone and can be moved."""
    cfg = model.config
    if isinstance(model.text, HFTextTower):
        model.text.save_assets(out / TEXT_MODEL_DIR)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, hf_model=TEXT_MODEL_DIR, hf_hub_id=hub_name(cfg.text)))
    cfg.to_json(out / CONFIG_NAME)
    write_card(out, cfg)  # README.md, keeping the training record and results of a card already there
    return out / CONFIG_NAME


def is_own_format(path: Path) -> bool:
    if not (path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()):
        return False
    cfg = read_json(path / CONFIG_NAME, quiet=True)
    return cfg is not None and "vision" in cfg and "embed_dim" in cfg  # a Hugging Face config has vision_config


def load_own(path: Path) -> CLIP:
    cfg = ClipConfig.from_json(path / CONFIG_NAME)
    check_saved_source(cfg.text.hf_model, path)  # before any weight is read or code is imported
    return build_with_state(cfg, read_safetensors(path / WEIGHTS_NAME), source=str(path))


def build_with_state(cfg: ClipConfig, state: dict[str, torch.Tensor], source: str) -> CLIP:
    """``CLIP(cfg)`` holding ``state``, checked strictly. The model is built on the meta device and
    takes the checkpoint's tensors as its own (no random init, no second copy: a memory-mapped
    file stays mapped); a model with tensors the checkpoint does not hold (non-persistent
    buffers) is built normally and the state copied in."""
    with torch.device("meta"):
        model = CLIP(cfg)
    check_state(model, state, source)
    own = model.state_dict()
    # As a copy would: the model's dtype (e.g. fp32 from OpenAI's fp16 files), dense parameters.
    state = {k: v.to(own[k].dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = CLIP(cfg)
        model.load_state_dict(state, strict=True)
    return model


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, failing loudly on missing, unexpected or mis-shaped tensors."""
    check_state(model, state, source)
    model.load_state_dict(state, strict=True)


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """A one-line CheckpointError unless ``state`` has exactly ``model``'s names and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(f"{source}: weights do not match the architecture: " + "; ".join(parts))


# -- dispatch -------------------------------------------------------------------------------------

def load_any(path: str | Path, arch: str | None = None, *, quick_gelu: bool | None = None,
             text_model_dir: str | Path | None = None) -> CLIP:
    """Load any supported checkpoint, format detected from the content.

    ``arch`` names a registered architecture for weights whose shapes do not pin it down (head
    counts); ``quick_gelu`` overrides the activation where the file does not record it;
    ``text_model_dir`` is a local folder (config.json + tokenizer files) for a Hugging Face text tower
    that an OpenCLIP config or ``arch`` names by hub id (a clipforge directory carries its own)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_own_format(path):
            return load_own(path)
        cfg = read_json(path / CONFIG_NAME, quiet=True) if (path / CONFIG_NAME).is_file() else None
        hf_weights = first_of(path, HF_WEIGHTS)
        if hf_siglip.is_siglip(cfg) and hf_weights:  # SiglipModel / Siglip2Model
            return load_hf_siglip_dir(path, hf_weights, cfg)
        if cfg is not None and ("vision_config" in cfg or cfg.get("model_type") == "clip") and hf_weights:
            return load_hf_dir(path, hf_weights, quick_gelu=quick_gelu)
        oc_weights = first_of(path, OPENCLIP_WEIGHTS)
        if (path / OPENCLIP_CONFIG).is_file() and oc_weights:
            return load_state_file(oc_weights, arch=arch, quick_gelu=quick_gelu, text_model_dir=text_model_dir)
        if (path / "onnx.json").is_file():  # onnx_runtime.MANIFEST: graphs, not weights to rebuild a model from
            raise CheckpointError(f"{path}: an ONNX export; it runs in the onnx runtime (clipforge.load, "
                                  "--runtime onnx) and cannot be read back as PyTorch weights")
        raise CheckpointError(
            f"{path}: directory holds no recognised checkpoint (expected clipforge's config.json + "
            f"{WEIGHTS_NAME}, a Hugging Face config.json + model.safetensors/pytorch_model.bin, or "
            f"{OPENCLIP_CONFIG} + open_clip_model.safetensors)")
    return load_state_file(path, arch=arch, quick_gelu=quick_gelu, text_model_dir=text_model_dir)


def load_state_file(path: Path, arch: str | None = None, quick_gelu: bool | None = None,
                    text_model_dir: str | Path | None = None) -> CLIP:
    """One weights file: TorchScript archive, torch pickle, or safetensors."""
    source = str(path)
    state, file_quick_gelu, origin = _read_state(path)
    quick_gelu = file_quick_gelu if quick_gelu is None else quick_gelu
    kind = "openclip-hf" if openclip_hf.is_openclip_hf_state(state) else openai.layout(state)
    meta: dict[str, int] = {}
    if kind == "hf":
        if arch is None:
            raise CheckpointError(f"{source}: Hugging Face CLIP weights need their config.json; pass the "
                                  "directory that holds both (or name the architecture with arch=)")
        state = hf.from_hf(state, source)
    elif kind == "openai":
        state, meta = openai.from_openai(state, source)
    elif kind == "openclip-hf":  # OpenCLIP's HF text tower: text.transformer.* is our text.model.*
        state = openclip_hf.from_openclip_hf(state)
    elif kind != "own":
        raise CheckpointError(f"{source}: tensors are not a CLIP model in any known layout "
                              f"(first names: {', '.join(list(state)[:5])})")
    fill_bn_counters(state)
    cfg = _resolve_config(path, state, arch, quick_gelu, origin)
    if text_model_dir is not None:  # after naming: the registry names hub ids, not this machine's folders
        cfg = with_text_model(cfg, text_model_dir)
    openai.check_meta(meta, cfg, source)
    return build_with_state(cfg, state, source)


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], bool | None, str]:
    """(tensors, activation if the file records it, origin: 'openai' or 'openclip-training')."""
    if torchscript.is_torchscript_zip(path):
        state, types = torchscript.read_torchscript_state(path)
        # The archive names its modules' types, so the activation is read, not guessed.
        found = {t.rsplit(".", 1)[-1] for name, t in types.items() if name.endswith("mlp.gelu")}
        return state, (found == {"QuickGELU"}) if found in ({"QuickGELU"}, {"GELU"}) else None, "openai"
    obj = read_weights_file(path)
    training = isinstance(obj, dict) and "state_dict" in obj and "epoch" in obj
    return unwrap(obj, str(path)), None, "openclip-training" if training else "openai"


def _resolve_config(path: Path, state: dict[str, torch.Tensor], arch: str | None, quick_gelu: bool | None,
                    origin: str) -> ClipConfig:
    """The architecture: named (registry), from OpenCLIP's config file beside the weights, or
    inferred from shapes. Strict loading then verifies it."""
    oc_cfg_path = path.parent / OPENCLIP_CONFIG
    if arch is not None:
        from clipforge.model.registry import get_config

        try:
            cfg = get_config(arch)
        except KeyError as e:
            raise CheckpointError(str(e.args[0])) from None
    elif path.name in OPENCLIP_WEIGHTS and oc_cfg_path.is_file():
        cfg = openai.config_from_openclip(read_json(oc_cfg_path), str(oc_cfg_path))
        cfg = with_local_tokenizer(cfg, path.parent)  # its tokenizer files, when saved beside the weights
        cfg = cfg.replace(name=_registry_name(cfg, default=path.parent.name))
    else:
        if quick_gelu is None:
            # OpenAI's weights (and openai/CLIP's build_model) use QuickGELU; OpenCLIP trains with GELU.
            quick_gelu = origin != "openclip-training"
            warnings.warn(
                f"{path}: the file does not record its activation; assuming "
                f"{'QuickGELU (OpenAI)' if quick_gelu else 'GELU (OpenCLIP default)'}. "
                "Pass quick_gelu=True/False if that is wrong.", stacklevel=4)
        cfg = openai.infer_config(state, quick_gelu, str(path))
        return cfg.replace(name=_registry_name(cfg))
    return cfg if quick_gelu is None else cfg.replace(quick_gelu=quick_gelu)


def load_hf_dir(path: Path, weights: Path | None = None, quick_gelu: bool | None = None) -> CLIP:
    """A Hugging Face CLIPModel directory; ``quick_gelu`` overrides its config's hidden_act."""
    weights = weights or first_of(path, HF_WEIGHTS)
    if weights is None:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
    pre_path = path / "preprocessor_config.json"
    cfg = hf.config_from_hf(read_json(path / CONFIG_NAME), read_json(pre_path) if pre_path.is_file() else None,
                            str(path / CONFIG_NAME))
    cfg = cfg.replace(name=_registry_name(cfg, default=path.name))
    if quick_gelu is not None:
        cfg = cfg.replace(quick_gelu=quick_gelu)
    state = read_hf_weights(path, weights)
    model = build_with_state(cfg, hf.from_hf(state, str(weights)), str(path))
    return model


def load_hf_siglip_dir(path: Path, weights: Path, config: dict[str, Any]) -> CLIP:
    """A Hugging Face SiglipModel / Siglip2Model directory (``config`` its config.json)."""
    pre_path = path / "preprocessor_config.json"
    cfg, state = hf_siglip.convert(path, config, read_json(pre_path) if pre_path.is_file() else None,
                                   read_hf_weights(path, weights), str(weights))
    return build_with_state(cfg, state, str(path))


def read_hf_weights(path: Path, weights: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face directory's tensors: one file, or the shards an ``.index.json`` lists."""
    if not weights.name.endswith(".index.json"):
        return unwrap(read_weights_file(weights), str(weights))
    shards = sorted(set(read_json(weights).get("weight_map", {}).values()))  # {"weight_map": {name: shard}}
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if Path(shard).name != shard:
            raise CheckpointError(f"{weights}: shard name {shard!r} points outside the directory")
        state.update(unwrap(read_weights_file(path / shard), str(path / shard)))
    return state


def _registry_name(cfg: ClipConfig, default: str = "") -> str:
    """The registered architecture with these shapes, the one with the same activation first
    (``ViT-B-32`` is GELU, ``ViT-B-32-quickgelu`` OpenAI's QuickGELU, as in OpenCLIP)."""
    from clipforge.model.registry import get_config, list_models

    refs = {name: get_config(name) for name in list_models()}
    shape = (cfg.embed_dim, cfg.vision, cfg.text, cfg.decoder)
    same = [n for n, r in refs.items() if (r.embed_dim, r.vision, r.text, r.decoder) == shape]
    return next((n for n in same if refs[n].quick_gelu == cfg.quick_gelu), same[0] if same else default)


# -- export ---------------------------------------------------------------------------------------

def export(model: CLIP, fmt: ExportFormat, out: str | Path) -> Path:
    """Write ``model`` as clipforge's format, a Hugging Face CLIPModel directory, an OpenCLIP
    directory/state dict, or an OpenAI-layout state dict (``.pt``). Returns what was written."""
    writers = {"clipforge": save, "hf": save_hf, "openclip": save_openclip, "openai": save_openai}
    if fmt not in writers:
        raise CheckpointError(f"unknown export format {fmt!r}; choose from {', '.join(writers)}")
    openclip_tower = model.config.text.hf_proj != "matrix"  # OpenCLIP's HFTextEncoder, which only it reads
    if fmt != "clipforge" and model.config.text.hf_model is not None and not (fmt == "openclip" and openclip_tower):
        raise CheckpointError(f"cannot export to {fmt}: its format has no place for a Hugging Face text tower "
                              f"({model.config.text.hf_model}); save it in clipforge's format")
    if fmt != "clipforge" and model.config.vision.stem != "patch":
        raise CheckpointError(f"cannot export to {fmt}: its ViT has a single-conv patch embedding, this model a "
                              f"{model.config.vision.stem} stem; save it in clipforge's format")
    cfg = model.config
    if fmt in ("openclip", "openai") and cfg.vision.arch == "siglip":
        raise CheckpointError(f"cannot export to {fmt}: this SigLIP image tower is Hugging Face's layout (OpenCLIP "
                              "builds SigLIP from timm); export to hf (SiglipModel) or clipforge")
    if fmt == "hf" and (cfg.decoder is not None or cfg.vision.attentional_pool or cfg.text.embed_cls):
        raise CheckpointError("cannot export to hf: transformers' CLIPModel has no place for CoCa's attentional "
                              "pooler, class token or captioning decoder; export to openclip or clipforge")
    pool = model.config.text.pool
    if fmt != "clipforge" and (pool == "mean" or pool != "eot" and fmt == "openai"):
        raise CheckpointError(f"cannot export to {fmt}: its text tower pools at the end-of-text token, this model "
                              f"takes the {pool}; save it in clipforge's format")
    return writers[fmt](model, Path(out))


def save_hf(model: CLIP, out_dir: str | Path) -> Path:
    """``config.json`` + ``model.safetensors`` (+ ``preprocessor_config.json``) for
    ``transformers.CLIPModel.from_pretrained`` (``SiglipModel`` for a SigLIP image tower)."""
    if model.config.vision.arch == "siglip":
        config, pre = hf_siglip.config_to_hf_siglip(model.config)
        state = hf_siglip.to_hf_siglip(model.state_dict())
    else:
        config, pre = hf.config_to_hf(model.config)
        state = hf.to_hf(model.state_dict())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors(state, out / WEIGHTS_NAME, {"format": "pt"})  # transformers requires format=pt
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out


def save_openclip(model: CLIP, out: str | Path) -> Path:
    """A file (``.safetensors``, ``.pt``, ``.bin``): the state dict that
    ``open_clip.create_model(...).load_state_dict`` takes. A directory: that state dict plus
    ``open_clip_config.json``, which ``open_clip.create_model('local-dir:DIR')`` reads."""
    out = Path(out)
    state = model.state_dict()
    # OpenCLIP's CoCa and CustomTextCLIP (a class token needs it) keep the text tower under text. as
    # clipforge does; its CLIP at the top level.
    hf_tower = isinstance(model.text, HFTextTower)  # OpenCLIP's CustomTextCLIP: text.transformer.*, text.proj.*
    custom_text = model.config.decoder is not None or model.config.text.embed_cls or hf_tower
    state = state if custom_text else openai.to_openai(state)
    state = openclip_hf.to_openclip_hf(state) if hf_tower else state
    if out.suffix in (".safetensors", ".pt", ".bin", ".pth"):
        return _write_state(state, out)
    out.mkdir(parents=True, exist_ok=True)
    if hf_tower:  # open_clip's local-dir: reads the tokenizer from the directory itself
        model.text.tokenizer.save_pretrained(out)
    _write_safetensors(state, out / OPENCLIP_WEIGHTS[0], {"format": "pt"})
    (out / OPENCLIP_CONFIG).write_text(json.dumps(openai.config_to_openclip(model.config), indent=2) + "\n")
    return out


def save_openai(model: CLIP, out: str | Path) -> Path:
    """An OpenAI-layout state dict, as openai/CLIP's ``clip.load(path, jit=False)`` rebuilds it."""
    openai.check_openai_compatible(model.config)
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / "model.pt"
    return _write_state(openai.to_openai(model.state_dict()), out)


def _write_state(state: dict[str, torch.Tensor], out: Path) -> Path:
    if out.suffix == ".safetensors":
        return _write_safetensors(state, out, {"format": "pt"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
    tmp.replace(out)
    return out


def _write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; give the usual permissions
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
