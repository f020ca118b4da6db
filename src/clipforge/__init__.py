"""clipforge: contrastive language-image pretraining (CLIP).

    import clipforge
    model, preprocess = clipforge.load("path/to/checkpoint")
    tokens = clipforge.tokenize(["a photo of a cat"])  # CLIP's BPE; any model: clipforge.tokenizer_for(model)
    heat = clipforge.explain(model, image, "a photo of a cat")  # where in the image: [S, S] in [0, 1]

Attributes are imported on first use, so ``import clipforge`` builds nothing and stays cheap.
"""

from __future__ import annotations

from typing import Any

from clipforge.version import __version__ as __version__

__all__ = [
    "list_models", "list_pretrained", "create_model", "load", "save", "tokenize", "tokenizer_for", "get_preprocess", "explain",
    "ClipConfig", "CLIP"
]


def __getattr__(name: str) -> Any:
    if name in ("list_models", "list_pretrained", "create_model", "load", "save", "tokenize", "tokenizer_for", "get_preprocess"):
        from clipforge.model import factory

        return getattr(factory, name)
    if name == "explain":  # explanation maps (clipforge.explanations: dense similarity, relevance, Grad-CAM)
        from clipforge.explanations import explain

        return explain
    if name == "ClipConfig":
        from clipforge.config import ClipConfig

        return ClipConfig
    if name == "CLIP":
        from clipforge.model.clip import CLIP

        return CLIP
    raise AttributeError(f"module 'clipforge' has no attribute {name!r}")
