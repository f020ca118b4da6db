"""Pretrained weights by name: ``clipforge.load("ViT-B-32", pretrained="openai")``, ``"ViT-B-32/openai"``,
``"hf-hub:org/repo"`` or a bare Hugging Face repo id.

The table (``pretrained_table``) records, per (architecture, tag), where the weights are and what the
file does not say: the activation and the preprocessing. A family added later registers its
architectures in ``registry`` and its weights with ``register``.
"""

from __future__ import annotations

import re
from pathlib import Path

from clipforge.config import PreprocessConfig
from clipforge.errors import CheckpointError
from clipforge.model import checkpoints, download
from clipforge.model.clip import CLIP
from clipforge.model.hf_tokenizer import TOKENIZER_FILES, with_local_tokenizer
from clipforge.model.pretrained_table import HUB_PREFIX, OPENAI, OPENCLIP, Pretrained

__all__ = ["Pretrained", "fetch", "get_pretrained", "list_entries", "list_pretrained", "load_weights", "register"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt")  # a missing file, not a repo
# What a hub repo's tokenizer needs beside its vocabulary files, fetched with the weights so the
# model's own tokenizer is read from the cache (offline too) rather than by hub name.
_TOKENIZER_EXTRAS = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json")

_TABLE: dict[tuple[str, str], Pretrained] = {}


def register(*entries: Pretrained) -> None:
    for e in entries:
        _TABLE[(e.arch, e.tag.lower())] = e


register(*OPENAI, *OPENCLIP)


def list_pretrained() -> list[tuple[str, str]]:
    """(architecture, tag) of every named weight, as ``open_clip.list_pretrained()``."""
    return list(_TABLE)


def list_entries() -> list[Pretrained]:
    return list(_TABLE.values())


def split_quickgelu(arch: str | None, quick_gelu: bool | None) -> tuple[str | None, bool | None]:
    """OpenCLIP's ``-quickgelu`` names: ``ViT-B-32-quickgelu`` is ViT-B-32 with QuickGELU."""
    if arch is not None and arch.lower().endswith("-quickgelu"):
        return arch[: -len("-quickgelu")], True if quick_gelu is None else quick_gelu
    return arch, quick_gelu


def get_pretrained(arch: str, tag: str) -> Pretrained:
    base, _ = split_quickgelu(arch, None)
    entry = _TABLE.get((base or arch, tag.lower()))
    if entry is None:
        tags = sorted(t for a, t in _TABLE if a == base)
        known = f"its tags: {', '.join(tags)}" if tags else "`clipforge pretrained` lists the named weights"
        raise CheckpointError(f"no pretrained weights {arch!r}/{tag!r}; {known}")
    return entry


def fetch(entry: Pretrained, cache_dir: str | Path | None = None) -> Path:
    """The local weights file of ``entry``, downloaded and verified on first use (with the hub
    repo's tokenizer files, when it has them, in the same folder)."""
    if entry.url and entry.sha256:
        return download.fetch_url(entry.url, entry.sha256, cache_dir)
    # The architecture comes from the table, so only the weights file is needed.
    names = [entry.filename] if entry.filename else list(checkpoints.OPENCLIP_WEIGHTS)
    return download.fetch_hub(entry.hf_hub, [[w] for w in names], cache_dir=cache_dir, extras=_TOKENIZER_EXTRAS)[0]


def load_weights(name: str | Path, pretrained: str | None = None, arch: str | None = None,
                 quick_gelu: bool | None = None, cache_dir: str | Path | None = None,
                 text_model_dir: str | Path | None = None) -> CLIP:
    """The model ``name`` means, in this order: ``name`` + ``pretrained`` (a tag, or OpenCLIP's
    weights file); an ``hf-hub:`` repo; an existing local path, as before names existed; ``arch/tag``
    in the table; a Hugging Face repo id ``org/name``. ``text_model_dir``: a local folder for a
    Hugging Face text tower that OpenCLIP's config names by hub id (``checkpoints.load_any``)."""
    local = {"text_model_dir": text_model_dir}
    arch, quick_gelu = split_quickgelu(arch, quick_gelu)
    text = str(name)
    if pretrained is not None:
        if Path(pretrained).expanduser().is_file():  # OpenCLIP's pretrained=<file>: name is the architecture
            base, quick_gelu = split_quickgelu(text, quick_gelu)
            return checkpoints.load_any(Path(pretrained).expanduser(), arch=base, quick_gelu=quick_gelu, **local)
        return _load_entry(text, pretrained, quick_gelu, cache_dir, text_model_dir)
    if text.startswith(HUB_PREFIX):
        return load_hub(text[len(HUB_PREFIX):], arch, quick_gelu, cache_dir, **local)
    path = Path(text).expanduser()
    if path.exists():
        return checkpoints.load_any(path, arch=arch, quick_gelu=quick_gelu, **local)
    head, _, tag = text.partition("/")
    if tag and ((split_quickgelu(head, None)[0], tag.lower()) in _TABLE or _is_arch(head)):
        return _load_entry(head, tag, quick_gelu, cache_dir, text_model_dir)
    if _REPO_ID.fullmatch(text) and not text.endswith(_FILE_SUFFIXES):
        try:
            return load_hub(text, arch, quick_gelu, cache_dir, **local)
        except CheckpointError as e:  # it may have been meant as a path: say both
            raise CheckpointError(f"{text}: no such file or directory; as a hub repo: {e}") from None
    if _is_arch(text):
        tags = sorted(t for a, t in _TABLE if a == split_quickgelu(text, None)[0])
        hint = f"name its weights ({', '.join(f'{text}/{t}' for t in tags)})" if tags else "no weights are named for it"
        raise CheckpointError(f"{text!r} is an architecture, not weights: {hint}, or build it untrained "
                              "with create_model")
    raise CheckpointError(f"{text}: no such file or directory, and not a pretrained name "
                          "(`clipforge pretrained` lists them), hf-hub:org/repo or a hub repo id")


def _is_arch(name: str) -> bool:
    from clipforge.model.registry import list_models

    return split_quickgelu(name, None)[0] in list_models()


def _load_entry(arch: str, tag: str, quick_gelu: bool | None, cache_dir: str | Path | None,
                text_model_dir: str | Path | None = None) -> CLIP:
    _, suffix_quick = split_quickgelu(arch, None)
    entry = get_pretrained(arch, tag)
    quick = quick_gelu if quick_gelu is not None else suffix_quick if suffix_quick is not None else entry.quick_gelu
    weights = fetch(entry, cache_dir)
    model = checkpoints.load_any(weights, arch=entry.arch, quick_gelu=quick, text_model_dir=text_model_dir)
    cfg = with_local_tokenizer(model.config, weights.parent)
    pre = PreprocessConfig(image_size=cfg.vision.image_size, mean=entry.mean, std=entry.std,
                           interpolation=entry.interpolation, resize_mode=entry.resize_mode)
    model.config = cfg.replace(preprocess=pre, name=entry.arch)
    return model


# Hub repos: OpenCLIP's layout (config + weights); OpenCLIP weights alone (timm's mirrors, whose
# config.json + model.safetensors are timm's image tower, not CLIP); a Hugging Face CLIPModel
# directory or clipforge's own (both config.json + model.safetensors).
# Safetensors first; a pickle is only read by checkpoints' tensors-only reader.
_HUB_LAYOUTS = ([[checkpoints.OPENCLIP_CONFIG, w] for w in checkpoints.OPENCLIP_WEIGHTS]
                + [[w] for w in checkpoints.OPENCLIP_WEIGHTS]
                + [[checkpoints.CONFIG_NAME, w] for w in checkpoints.HF_WEIGHTS])


def load_hub(repo: str, arch: str | None = None, quick_gelu: bool | None = None,
             cache_dir: str | Path | None = None, text_model_dir: str | Path | None = None) -> CLIP:
    """A hub repo's model: ``repo`` is ``org/name``, optionally ``@revision``."""
    repo, _, revision = repo.partition("@")
    paths = download.fetch_hub(repo, _HUB_LAYOUTS, revision=revision or None, cache_dir=cache_dir,
                               extras=["preprocessor_config.json", *_TOKENIZER_EXTRAS])
    weights = next(p for p in paths if p.name in checkpoints.OPENCLIP_WEIGHTS + checkpoints.HF_WEIGHTS)
    if weights.name in checkpoints.OPENCLIP_WEIGHTS:  # reads open_clip_config.json beside it when fetched
        return checkpoints.load_state_file(weights, arch=arch, quick_gelu=quick_gelu, text_model_dir=text_model_dir)
    # config.json + model.safetensors: a Hugging Face CLIPModel or clipforge's own format (told apart by content)
    return checkpoints.load_any(weights.parent, arch=arch, quick_gelu=quick_gelu, text_model_dir=text_model_dir)
