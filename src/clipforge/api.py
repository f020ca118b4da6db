"""The public functions re-exported by ``clipforge``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from clipforge.config import ClipConfig
from clipforge.model import checkpoints
from clipforge.model.clip import CLIP
from clipforge.model.registry import get_config, list_models
from clipforge.model.transforms import eval_transform, train_transform

__all__ = ["list_models", "create_model", "load", "save", "tokenize", "get_preprocess"]


def create_model(
    name_or_config: str | ClipConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> CLIP:
    """A randomly initialised model from a registered name or a config."""
    cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if seed is not None:
        torch.manual_seed(seed)
    model = CLIP(cfg).to(device)
    return model.to(dtype) if dtype is not None else model


def get_preprocess(model_or_config: CLIP | ClipConfig, train: bool = False) -> Callable[[Any], torch.Tensor]:
    cfg = model_or_config.config if isinstance(model_or_config, CLIP) else model_or_config
    return train_transform(cfg.preprocess) if train else eval_transform(cfg.preprocess)


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    arch: str | None = None,
    quick_gelu: bool | None = None,
) -> tuple[CLIP, Callable[[Any], torch.Tensor]]:
    """Load any supported checkpoint (format auto-detected); returns (model in eval mode, preprocess).

    ``arch`` names the architecture for state dicts whose layout does not reveal it;
    ``quick_gelu`` sets the activation of weights whose file does not record it.
    """
    model = checkpoints.load_any(Path(path), arch=arch, quick_gelu=quick_gelu)
    model = model.to(device=device, dtype=dtype).eval()
    return model, get_preprocess(model)


def save(model: CLIP, out_dir: str | Path) -> Path:
    """Write the own format: ``config.json`` + ``model.safetensors``."""
    return checkpoints.save(model, out_dir)


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """OpenAI-identical token ids, LongTensor [N, context_length]."""
    from clipforge.model.tokenizer import tokenize as _tokenize

    return _tokenize(texts, context_length=context_length, truncate=truncate)
