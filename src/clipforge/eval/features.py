"""Batched feature extraction for evaluation, with an on-disk cache.

Image features come from the frozen image tower, after the projection (the shared embedding
space, what zero-shot and retrieval need) or before it (``project=False``, the tower's own
width, which the paper's linear probes also report). Cached features are keyed by a hash of the
weights, the image files (path, size, mtime), the preprocessing and the options that change the
numbers, so a changed checkpoint or image never returns stale features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from clipforge.eval.datasets import ImageDataset, collate_images
from clipforge.utils import Precision, autocast, autocast_casts_kept, resolve_device

__all__ = [
    "FeatureOptions",
    "ImageFeatures",
    "Tokenizer",
    "default_tokenizer",
    "extract_image_features",
    "extract_text_features",
    "weights_digest",
]

Tokenizer = Callable[[list[str]], torch.Tensor]  # texts -> LongTensor [N, L]


@dataclass(frozen=True)
class FeatureOptions:
    """How features are computed.

    ``device=None`` leaves the model where it is (so evaluating during training moves nothing);
    ``'auto'`` picks CUDA when available; otherwise any ``torch.device`` string. The model is put
    in eval mode for the extraction and its previous mode restored afterwards.
    """

    batch_size: int = 64
    device: str | None = None
    precision: Precision = "fp32"
    workers: int = 0  # DataLoader worker processes decoding images
    project: bool = True  # False: pre-projection image features
    cache_dir: Path | None = None  # None: no cache
    progress: bool = True


@dataclass
class ImageFeatures:
    """Features of the readable images, in input order; ``index`` maps rows back to input positions."""

    features: torch.Tensor  # [M, D] float32, CPU
    index: torch.Tensor  # [M] long, positions in the input path list
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of skipped images

    @property
    def num_failed(self) -> int:
        return len(self.failed)


def default_tokenizer(model: nn.Module) -> Tokenizer:
    """The tokenizer of the model's text tower (``tokenizer_for``); for other modules, CLIP's BPE
    padded to their ``context_length``."""
    from clipforge.config import ClipConfig
    from clipforge.model.factory import tokenize, tokenizer_for

    if isinstance(getattr(model, "config", None), ClipConfig):
        return tokenizer_for(model)
    length = int(getattr(model, "context_length", 77))
    return lambda texts: tokenize(list(texts), context_length=length)


@contextlib.contextmanager
def _inference(model: nn.Module, options: FeatureOptions) -> Iterator[torch.device]:
    """Move the model to ``options.device`` (if set) and run it in eval mode, restoring the mode after;
    autocast's weight casts are kept until then (cast once for the run, not once a batch)."""
    if options.device is not None:
        model.to(resolve_device(options.device))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with autocast_casts_kept(options.precision, device):
            yield device
    finally:
        model.train(was_training)


def weights_digest(model: nn.Module) -> str:
    """A hash of the configuration and every weight: identical only for identical models."""
    h = hashlib.blake2b(digest_size=16)
    cfg = getattr(model, "config", None)
    h.update((cfg.to_json() if hasattr(cfg, "to_json") else type(model).__qualname__).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_key(model: nn.Module, paths: Sequence[Path], preprocess_id: str, options: FeatureOptions) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(weights_digest(model).encode())
    h.update(json.dumps({"pre": preprocess_id, "project": options.project, "precision": options.precision}).encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{Path(p).resolve()}|{stamp}\n".encode())
    return h.hexdigest()


def _preprocess_id(model: nn.Module, preprocess: Callable | None) -> str:
    if preprocess is None:
        cfg = getattr(getattr(model, "config", None), "preprocess", None)
        return json.dumps(cfg.__dict__, default=list) if cfg is not None else "default"
    return re.sub(r" at 0x[0-9a-f]+", "", repr(preprocess))  # object addresses change between runs


def _load_cache(path: Path) -> ImageFeatures | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            failed = list(zip(z["failed_paths"].tolist(), z["failed_reasons"].tolist()))
            return ImageFeatures(torch.from_numpy(z["features"]), torch.from_numpy(z["index"]), failed)
    except (OSError, KeyError, ValueError):
        return None  # a damaged cache entry is recomputed, not fatal


def _save_cache(path: Path, feats: ImageFeatures) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(
        tmp,
        features=feats.features.numpy(),
        index=feats.index.numpy(),
        failed_paths=np.array([p for p, _ in feats.failed], dtype=str),
        failed_reasons=np.array([r for _, r in feats.failed], dtype=str),
    )
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


@torch.no_grad()
def extract_image_features(
    model: nn.Module,
    paths: Sequence[str | Path],
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    options: FeatureOptions = FeatureOptions(),
    desc: str = "image features",
) -> ImageFeatures:
    """Encode images with ``model.encode_image`` in batches; unreadable images are skipped and listed.

    ``preprocess`` defaults to the model's own eval transform. The model is moved to
    ``options.device`` (when set) and run in eval mode. Features are returned unnormalised,
    float32 on CPU.
    """
    paths = [Path(p) for p in paths]
    cache_file = None
    if options.cache_dir is not None:
        key = _cache_key(model, paths, _preprocess_id(model, preprocess), options)
        cache_file = Path(options.cache_dir) / f"{key}.npz"
        cached = _load_cache(cache_file) if cache_file.is_file() else None
        if cached is not None:
            return cached
    if preprocess is None:
        from clipforge.model.factory import get_preprocess

        preprocess = get_preprocess(model)
    with _inference(model, options) as device:
        result = _encode_images(model, paths, preprocess, options, device, desc)
    if cache_file is not None:
        _save_cache(cache_file, result)
    return result


def _encode_images(
    model: nn.Module, paths: list[Path], preprocess: Callable[[Any], torch.Tensor], options: FeatureOptions,
    device: torch.device, desc: str,
) -> ImageFeatures:
    loader = torch.utils.data.DataLoader(
        ImageDataset(paths, preprocess),
        batch_size=options.batch_size,
        num_workers=options.workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    chunks: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    failed: list[tuple[str, str]] = []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not options.progress) as bar:
        for images, index, bad in loader:
            failed += [(str(paths[i]), reason) for i, reason in bad]
            if images is not None:
                with autocast(options.precision, device):
                    feats = model.encode_image(images.to(device, non_blocking=True), project=options.project)
                chunks.append(feats.float().cpu())  # [B, D]
                kept.append(index)
            bar.update(len(index) + len(bad))
    return ImageFeatures(
        torch.cat(chunks) if chunks else torch.zeros(0, 0),
        torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long),
        failed,
    )


@torch.no_grad()
def extract_text_features(
    model: nn.Module,
    texts: Sequence[str],
    options: FeatureOptions = FeatureOptions(),
    tokenizer: Tokenizer | None = None,
    desc: str = "text features",
) -> torch.Tensor:
    """Encode texts with ``model.encode_text`` in batches -> [N, E] float32 on CPU, unnormalised."""
    tokenizer = tokenizer or default_tokenizer(model)
    out: list[torch.Tensor] = []
    texts = list(texts)
    with _inference(model, options) as device, tqdm(
        total=len(texts), desc=desc, unit="text", disable=not options.progress
    ) as bar:
        for s in range(0, len(texts), options.batch_size):
            batch = texts[s : s + options.batch_size]
            tokens = tokenizer(batch).to(device)  # [B, L]
            with autocast(options.precision, device):
                out.append(model.encode_text(tokens).float().cpu())  # [B, E]
            bar.update(len(batch))
    return torch.cat(out) if out else torch.zeros(0, 0)
