"""Building models by name or config, loading and saving them, and what feeds them (preprocess,
tokenizer). ``clipforge`` re-exports these functions."""

from __future__ import annotations

from pathlib import Path
import functools
from typing import Any, Callable, Literal, Sequence

import torch

from clipforge.config import DEFAULT_CROP_SCALE, ClipConfig
from clipforge.errors import CheckpointError
from clipforge.model import checkpoints, onnx_runtime
from clipforge.model import pretrained as pretrained_weights
from clipforge.model.clip import CLIP
from clipforge.model.hf_text import HFTextTower
from clipforge.model.onnx_runtime import OnnxCLIP
from clipforge.model.pretrained import list_pretrained
from clipforge.model.registry import get_config, list_models
from clipforge.model.transforms import eval_transform, train_transform

Runtime = Literal["auto", "torch", "onnx"]
__all__ = ["list_models", "list_pretrained", "create_model", "load", "save", "tokenize", "tokenizer_for", "get_preprocess"]


def create_model(
    name_or_config: str | ClipConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> CLIP:
    """A new model from a registered name or a config: randomly initialised, except that a
    Hugging Face text tower starts from the pretrained weights of its model directory (a tower named
    by hub id, as OpenCLIP's configs name them, starts random: only its config and tokenizer are
    fetched)."""
    cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if seed is not None:
        torch.manual_seed(seed)
    model = CLIP(cfg)
    if isinstance(model.text, HFTextTower):
        model.text.load_pretrained()
    model = model.to(device)
    return model.to(dtype) if dtype is not None else model


def get_preprocess(model_or_config: CLIP | OnnxCLIP | ClipConfig, train: bool = False,
                   crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE) -> Callable[[Any], torch.Tensor]:
    """The model's image transform: evaluation (resize, centre crop, normalise) or, with
    ``train``, a random resized crop keeping ``crop_scale`` of the area, then normalise."""
    cfg = model_or_config if isinstance(model_or_config, ClipConfig) else model_or_config.config
    return train_transform(cfg.preprocess, crop_scale) if train else eval_transform(cfg.preprocess)


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    arch: str | None = None,
    quick_gelu: bool | None = None,
    *,
    pretrained: str | None = None,
    cache_dir: str | Path | None = None,
    text_model_dir: str | Path | None = None,
    runtime: Runtime = "auto",
) -> tuple[CLIP | OnnxCLIP, Callable[[Any], torch.Tensor]]:
    """Load weights by path or by name; returns (model in eval mode, preprocess).

    ``path`` is a checkpoint file or directory (format auto-detected), a pretrained name
    (``"ViT-B-32/openai"``, or ``"ViT-B-32"`` with ``pretrained="openai"``; ``clipforge pretrained``
    lists them), ``"hf-hub:org/repo"`` or a Hugging Face repo id ``"org/repo"``. Named weights are
    downloaded once, verified and cached (``cache_dir``, default ``$CLIPFORGE_CACHE`` or
    ``~/.cache/clipforge``; hub repos use huggingface_hub's cache unless ``cache_dir`` is given).

    ``arch`` names the architecture for state dicts whose layout does not reveal it (OpenCLIP's
    ``-quickgelu`` suffix sets QuickGELU); ``quick_gelu`` sets the activation of weights whose file
    does not record it (the pretrained table records it for every named weight).

    ``text_model_dir`` is a local folder with the config.json and tokenizer files of a Hugging Face
    text tower that OpenCLIP's config (or ``arch``) names by hub id (``xlm-roberta-base-ViT-B-32``,
    ``nllb-clip-base``, ...); without it they are fetched from the hub (never the encoder's weights:
    the checkpoint holds them).

    ``runtime``: "torch" builds the PyTorch model; "onnx" runs an ONNX export directory (``image.onnx``
    + ``text.onnx``, from ``clipforge convert --to onnx``) in ONNX Runtime on the CPU, returned as an
    ``OnnxCLIP`` with CLIP's encode_image / encode_text; "auto" picks "onnx" for such a directory.
    """
    if _runtime_for(path, runtime) == "onnx":
        if torch.device(device).type != "cpu" or dtype != torch.float32:
            raise CheckpointError(f"{path}: an ONNX export runs on the CPU in its own precision "
                                  f"(asked for {device}, {dtype})")
        onnx_model = onnx_runtime.load_onnx(path)
        return onnx_model, get_preprocess(onnx_model.config)
    model = pretrained_weights.load_weights(path, pretrained=pretrained, arch=arch, quick_gelu=quick_gelu,
                                            cache_dir=cache_dir, text_model_dir=text_model_dir)
    model = model.to(device=device, dtype=dtype).eval()
    return model, get_preprocess(model)


def _runtime_for(path: str | Path, runtime: Runtime) -> str:
    """The runtime that runs ``path``, or a one-line error where it cannot."""
    export = onnx_runtime.is_onnx_export(Path(str(path)).expanduser())
    if runtime not in ("auto", "torch", "onnx"):
        raise CheckpointError(f"unknown runtime {runtime!r}; choose auto, torch or onnx")
    if runtime == "onnx" and not export:
        raise CheckpointError(f"{path}: the onnx runtime needs an ONNX export (a directory with image.onnx and "
                              "text.onnx, written by `clipforge convert --to onnx`)")
    if runtime == "torch" and export:
        raise CheckpointError(f"{path}: an ONNX export runs only in the onnx runtime")
    return "onnx" if export else "torch"


def save(model: CLIP, out_dir: str | Path) -> Path:
    """Write the own format: ``config.json`` + ``model.safetensors``."""
    return checkpoints.save(model, out_dir)


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """OpenAI-identical token ids, LongTensor [N, context_length]."""
    from clipforge.model.tokenizer import tokenize as _tokenize

    return _tokenize(texts, context_length=context_length, truncate=truncate)


def tokenizer_for(model_or_config: CLIP | ClipConfig) -> Callable[[Sequence[str]], torch.Tensor]:
    """The tokenizer a model's text tower reads: texts -> LongTensor [N, context_length].

    CLIP's BPE (``tokenize``) for clipforge's text transformer, or the Hugging Face tokenizer its
    family was trained with (``TextConfig.hf_tokenizer_name``: SigLIP's SentencePiece, SigLIP 2's
    Gemma, CLIPA's BERT ...; ``hf_tokenizer``), at the family's context length; the encoder's own
    tokenizer for a Hugging Face text tower (its text cleaned as OpenCLIP's HFTokenizer cleans it for
    OpenCLIP's towers). The result can be pickled (DataLoader workers)."""
    if isinstance(model_or_config, ClipConfig):
        cfg = model_or_config
    else:  # a CLIP model, also compiled (whose attributes forward to the original)
        cfg = getattr(model_or_config, "config", None)
        if not isinstance(cfg, ClipConfig):
            raise TypeError(f"tokenizer_for takes a CLIP model or a ClipConfig, got {type(model_or_config).__name__}")
        tower = getattr(model_or_config, "text", None)
        if isinstance(tower, HFTextTower):
            from clipforge.model.hf_tokenizer import tower_tokenizer

            return tower_tokenizer(cfg.text, tower.tokenizer)
    if cfg.text.hf_model is not None:
        from clipforge.model.hf_tokenizer import tower_tokenizer

        return tower_tokenizer(cfg.text)
    if cfg.text.hf_tokenizer_name is not None:
        from clipforge.model.hf_tokenizer import FamilyTokenizer

        return FamilyTokenizer.from_text_config(cfg.text)
    from clipforge.model.tokenizer import tokenize as _tokenize

    return functools.partial(_tokenize, context_length=cfg.text.context_length)
