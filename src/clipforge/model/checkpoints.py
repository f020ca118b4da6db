"""Load and save model weights.

clipforge's own format is a directory with ``config.json`` + ``model.safetensors``: no
pickle, and the config (architecture, activation, preprocessing) travels with the weights.
Other formats (OpenAI, OpenCLIP, Hugging Face) are recognised by ``detect_format`` and
mapped by adapters that check every name and shape one to one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clipforge.config import ClipConfig
from clipforge.errors import CheckpointError
from clipforge.model.clip import CLIP

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save(model: CLIP, out_dir: str | Path) -> Path:
    """Write ``model`` in the own format; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "clipforge"})
    tmp.replace(out / WEIGHTS_NAME)  # atomic: a reader never sees half a file
    model.config.to_json(out / CONFIG_NAME)
    return out


def is_own_format(path: Path) -> bool:
    if not (path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()):
        return False
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "vision" in cfg and "embed_dim" in cfg  # a Hugging Face config has vision_config instead


def load_own(path: Path) -> CLIP:
    cfg = ClipConfig.from_json(path / CONFIG_NAME)
    model = CLIP(cfg)
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path / WEIGHTS_NAME}: cannot read safetensors file ({e})") from e
    load_state_strict(model, state, source=str(path))
    return model


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, failing loudly on missing, unexpected or mis-shaped tensors."""
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
    model.load_state_dict(state, strict=True)
def load_any(path, arch=None):
    from pathlib import Path
    if is_own_format(Path(path)):
        return load_own(Path(path))
    raise CheckpointError(f"{path}: unrecognised checkpoint format")
