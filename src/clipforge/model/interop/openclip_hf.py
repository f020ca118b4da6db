"""OpenCLIP's Hugging Face text towers (its ``HFTextEncoder``): ``text_cfg`` <-> ``TextConfig``, and
parameter names.

OpenCLIP builds such a tower from ``hf_model_name`` (a hub id or a folder), pools it by
``hf_pooler_type`` and projects it by ``hf_proj_type``; every other ``text_cfg`` size option is
unused there. Its weights are a ``CustomTextCLIP``'s: ``text.transformer.*`` (the encoder) and
``text.proj.*`` (the head), which clipforge names ``text.model.*`` and ``text.proj.*``.
"""

from __future__ import annotations

from typing import Any

import torch

from clipforge.config import TextConfig
from clipforge.model.hf_source import hub_name, resolve_source

_POOLERS = {"mean_pooler": "mean", "cls_pooler": "pooler", "cls_last_hidden_state_pooler": "cls"}
# hf_proj_type None (explicitly null in the config) is OpenCLIP's identity, when widths agree.
_PROJS = {"linear": "linear", "mlp": "mlp", None: "none"}
_CLEANS = ("whitespace", "lower", "canonicalize")
# What OpenCLIP reads of an HF text_cfg besides the hf_* options: the tokenizer's options.
_TOKENIZER_KEYS = ("context_length", "tokenizer_kwargs", "tokenizer_mode", "hf_tokenizer_name")


def hf_text_from_openclip(t: dict[str, Any]) -> tuple[TextConfig, list[str]]:
    """(TextConfig, unsupported settings) of an OpenCLIP ``text_cfg`` with ``hf_model_name``."""
    name = str(t["hf_model_name"])
    bad: list[str] = []
    tokenizer = t.get("hf_tokenizer_name")
    if tokenizer not in (None, name):
        bad.append(f"text hf_tokenizer_name={tokenizer!r} differing from hf_model_name (the tower reads its own)")
    pooler = t.get("hf_pooler_type", "mean_pooler")
    if pooler not in _POOLERS:  # max_pooler: OpenCLIP's masks out the kept tokens, not the padding
        bad.append(f"text hf_pooler_type={pooler!r}")
    proj = t.get("hf_proj_type", "mlp")
    if proj not in _PROJS:
        bad.append(f"text hf_proj_type={proj!r}")
    if t.get("tokenizer_mode"):
        bad.append(f"text tokenizer_mode={t['tokenizer_mode']!r}")
    tok = dict(t.get("tokenizer_kwargs") or {})
    clean = tok.pop("clean", "whitespace")
    strip_sep = bool(tok.pop("strip_sep_token", False))
    if clean not in _CLEANS:
        bad.append(f"text tokenizer_kwargs.clean={clean!r}")
    bad += [f"text tokenizer_kwargs.{k}={v!r}" for k, v in tok.items()]
    # width and vocab_size describe the encoder; a CoCa decoder over it takes its width and, as
    # OpenCLIP's does, its output size from them (OpenCLIP's defaults 512 and 49408 when unset).
    text = TextConfig(context_length=int(t.get("context_length", 77)), hf_model=name,
                      width=int(t.get("width", TextConfig.width)), vocab_size=int(t.get("vocab_size", 49408)),
                      hf_pooling=_POOLERS.get(pooler, "mean"),  # type: ignore[arg-type]
                      hf_proj=_PROJS.get(proj, "mlp"),  # type: ignore[arg-type]
                      tokenizer_clean=clean if clean in _CLEANS else "whitespace", tokenizer_strip_sep=strip_sep)
    return text, bad


def hf_text_to_openclip(t: TextConfig) -> dict[str, Any]:
    """The ``text_cfg`` OpenCLIP builds the same tower from. The encoder is named by its hub id
    where known, else by its folder's absolute path (which open_clip reads on this machine)."""
    if t.hf_model is None or t.hf_proj == "matrix":
        raise ValueError("not an OpenCLIP Hugging Face text tower")
    name = hub_name(t) or str(resolve_source(t.hf_model).resolve())
    pooler = {v: k for k, v in _POOLERS.items()}[t.hf_pooling]
    proj = {v: k for k, v in _PROJS.items()}[t.hf_proj]
    out: dict[str, Any] = {"hf_model_name": name, "hf_tokenizer_name": name, "hf_proj_type": proj,
                           "hf_pooler_type": pooler, "context_length": t.context_length}
    out.update({k: getattr(t, k) for k in ("width", "vocab_size") if getattr(t, k) != getattr(TextConfig, k)})
    kwargs: dict[str, Any] = {}
    if t.tokenizer_clean != "whitespace":
        kwargs["clean"] = t.tokenizer_clean
    if t.tokenizer_strip_sep:
        kwargs["strip_sep_token"] = True
    return {**out, "tokenizer_kwargs": kwargs} if kwargs else out


def is_openclip_hf_state(state: dict[str, torch.Tensor]) -> bool:
    """OpenCLIP's HF text tower weights: ``text.transformer.*`` with no CLIP token embedding."""
    return "text.token_embedding.weight" not in state and any(k.startswith("text.transformer.") for k in state)


def from_openclip_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"text.model." + k[len("text.transformer."):] if k.startswith("text.transformer.") else k: v
            for k, v in state.items()}


def to_openclip_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"text.transformer." + k[len("text.model."):] if k.startswith("text.model.") else k: v
            for k, v in state.items()}
