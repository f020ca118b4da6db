"""clipforge: contrastive language-image pretraining (CLIP).

    import clipforge
    model, preprocess = clipforge.load("path/to/checkpoint")
    tokens = clipforge.tokenize(["a photo of a cat"])  # CLIP's BPE; any model: clipforge.tokenizer_for(model)

Attributes are imported on first use, so ``import clipforge`` builds nothing and stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "list_models", "create_model", "load", "save", "tokenize", "tokenizer_for", "get_preprocess", "ClipConfig", "CLIP"
]


def __getattr__(name: str) -> Any:
    if name in ("list_models", "create_model", "load", "save", "tokenize", "tokenizer_for", "get_preprocess"):
        from clipforge import api

        return getattr(api, name)
    if name == "ClipConfig":
        from clipforge.config import ClipConfig

        return ClipConfig
    if name == "CLIP":
        from clipforge.model.clip import CLIP

        return CLIP
    raise AttributeError(f"module 'clipforge' has no attribute {name!r}")
