"""A model's identity as embedding manifests and indexes record it (``model_fingerprint``)."""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of the weights (a few tensors), so parts from two models are never mixed.
    Stored as ``model_fingerprint`` in embedding manifests and ``index.json``. An ONNX export
    (``OnnxCLIP``) answers with the fingerprint of the weights it was exported from, so an index
    built with either runtime is served by the other."""
    source = getattr(model, "source_fingerprint", None)
    if isinstance(source, str):
        return source
    h = hashlib.sha256()
    params = list(model.state_dict().items())
    for name, t in params[:4] + params[-4:]:
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[:65536])
    return h.hexdigest()[:16]
