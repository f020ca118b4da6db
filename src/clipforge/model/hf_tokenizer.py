"""The tokenizers of non-CLIP families, for clipforge's own text transformer.

CLIP's BPE (``clipforge.model.tokenizer``) is one family's tokenizer; SigLIP reads a SentencePiece
model, SigLIP 2 Gemma's tokenizer, CLIPA BERT's WordPiece, MetaCLIP 2 worldwide XLM-V or mT5.
Those come as Hugging Face tokenizer files (``tokenizer.json``, ``spiece.model``,
``tokenizer_config.json`` ...), read with transformers' ``AutoTokenizer``, so ids are the ones its
own tokenizer classes give. ``TextConfig`` says which (``hf_tokenizer_name``: a directory, usually
the checkpoint's own, or a hub name) and how the text is prepared, as OpenCLIP's ``HFTokenizer``
does for the same model configs:

- cleaning (``tokenizer_clean``): "whitespace" (ftfy, HTML entities, single spaces), "lower" (and
  lower case), "canonicalize" (and no punctuation: big_vision's SigLIP recipe), or "none";
- ids truncated to the context length, end token kept, then padded with the tokenizer's pad id
  (SigLIP was trained on fixed-length padded text and pools at the last position);
- ``tokenizer_strip_sep``: BERT's [SEP] replaced by 0 (its pad id), as CLIPA was trained.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import string
from pathlib import Path
from typing import Any, Sequence

import ftfy
import torch

from clipforge.config import ClipConfig, TextConfig
from clipforge.errors import CheckpointError
from clipforge.model.hf_text import HFTokenizer, _quiet, _transformers, load_hf_tokenizer, resolve_source

# Vocabulary files of Hugging Face tokenizers; a directory holding one is a tokenizer directory.
# (transformers 5 builds some tokenizer classes from config.json alone, with an empty vocabulary:
# a directory without one of these is refused rather than read that way.)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt",
                   "vocab.json")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic(text: str) -> str:
    # ftfy repairs mojibake; entities are unescaped twice because scraped captions are often
    # escaped twice ("&amp;amp;").
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean(text: str, mode: str) -> str:
    """``text`` prepared as OpenCLIP's HFTokenizer prepares it for the ``clean`` setting ``mode``."""
    if mode == "none":
        return text
    text = _basic(text)
    if mode == "canonicalize":
        # big_vision's text canonicalisation: underscores are word breaks, punctuation goes,
        # then lower case and single spaces.
        text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
    elif mode == "lower":
        text = text.lower()
    elif mode != "whitespace":
        raise ValueError(f"unknown tokenizer clean mode {mode!r}")
    return " ".join(text.split())


def tokenizer_dir(directory: str | Path) -> Path | None:
    """``directory`` if it holds Hugging Face tokenizer files, else None."""
    d = Path(directory)
    return d if d.is_dir() and any((d / name).is_file() for name in TOKENIZER_FILES) else None


@functools.lru_cache(maxsize=8)
def _load(name: str) -> Any:
    # Cached: converting a SentencePiece model to a fast tokenizer takes seconds, and
    # tokenizer_for is called per command, per evaluation, per service start.
    transformers = _transformers()
    local = Path(name).expanduser()
    with _quiet(transformers):
        try:
            if local.is_dir():
                if tokenizer_dir(local) is None:
                    raise OSError(f"{local} holds none of {', '.join(TOKENIZER_FILES)}")
                return transformers.AutoTokenizer.from_pretrained(local, local_files_only=True,
                                                                trust_remote_code=False)
            return transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=False)  # a hub name: its cache, HF_HUB_OFFLINE
        except (OSError, ValueError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"tokenizer {name!r}: cannot load it ({first}); give a directory with its "
                                  f"files ({', '.join(TOKENIZER_FILES[:3])} ...)") from None


class FamilyTokenizer(HFTokenizer):
    """Texts -> LongTensor [N, context_length] with a Hugging Face tokenizer, cleaned, truncated,
    padded (and [SEP] stripped) as ``TextConfig`` says. Picklable for DataLoader workers."""

    def __init__(self, tokenizer: Any, context_length: int, clean: str = "whitespace",
                 strip_sep: bool = False) -> None:
        super().__init__(tokenizer, context_length)
        if clean not in ("whitespace", "lower", "canonicalize", "none"):
            raise ValueError(f"unknown tokenizer clean mode {clean!r}")
        self.clean = clean
        self.strip_sep = strip_sep
        if strip_sep and tokenizer.sep_token_id is None:
            raise CheckpointError("tokenizer_strip_sep is set but the tokenizer has no [SEP] token")
        if tokenizer.pad_token_id is None:
            raise CheckpointError("the tokenizer has no padding token; fixed-length text needs one")

    @classmethod
    def from_text_config(cls, cfg: TextConfig) -> "FamilyTokenizer":
        if cfg.hf_tokenizer_name is None:
            raise ValueError("FamilyTokenizer needs TextConfig.hf_tokenizer_name")
        return cls(_load(str(cfg.hf_tokenizer_name)), cfg.context_length, cfg.tokenizer_clean,
                   cfg.tokenizer_strip_sep)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = super().__call__([clean(t, self.clean) for t in texts])  # [N, context_length]
        if self.strip_sep:
            ids = ids.masked_fill(ids == self.tokenizer.sep_token_id, 0)  # OpenCLIP writes 0, BERT's pad id
        return ids


def tower_tokenizer(cfg: TextConfig, tokenizer: Any | None = None) -> HFTokenizer:
    """The tokenizer of a Hugging Face text tower (``tokenizer``: the tower's own, else read from
    ``cfg.hf_model``): as the encoder's own call for clipforge's towers, or cleaned (and [SEP]
    stripped) as OpenCLIP's HFTokenizer does for OpenCLIP's (``hf_proj`` other than 'matrix')."""
    if tokenizer is None:
        if cfg.hf_model is None:
            raise ValueError("tower_tokenizer needs TextConfig.hf_model")
        tokenizer = load_hf_tokenizer(resolve_source(cfg.hf_model))
    if cfg.hf_proj == "matrix":
        return HFTokenizer(tokenizer, cfg.context_length)
    return FamilyTokenizer(tokenizer, cfg.context_length, cfg.tokenizer_clean, cfg.tokenizer_strip_sep)


def with_local_tokenizer(cfg: ClipConfig, directory: str | Path) -> ClipConfig:
    """``cfg`` reading its Hugging Face tokenizer from ``directory`` when that holds tokenizer files,
    as OpenCLIP's ``local-dir:`` and hub checkpoints carry them beside the weights (so a hub name in
    their config is never fetched); unchanged for CLIP's BPE or a directory without them."""
    local = tokenizer_dir(directory)
    if cfg.text.hf_tokenizer_name is None or cfg.text.hf_model is not None or local is None:
        return cfg
    return cfg.replace(text=dataclasses.replace(cfg.text, hf_tokenizer_name=str(local.resolve())))
