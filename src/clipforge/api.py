"""The public functions, re-exported from the model layer (``clipforge.model.factory``)."""

from clipforge.model.factory import (
    create_model, get_preprocess, list_models, list_pretrained, load, save, tokenize, tokenizer_for,
)

__all__ = ["list_models", "list_pretrained", "create_model", "load", "save", "tokenize", "tokenizer_for", "get_preprocess"]
