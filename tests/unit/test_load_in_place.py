"""Loading builds the model on the meta device and adopts the checkpoint's tensors (issue 18,
item 5): the result is a normal, writable model in the model's dtype, and writing to it never
reaches the file it came from (a memory-mapped file is mapped privately)."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.model import checkpoints


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loaded_model_is_materialised_writable_and_detached_from_its_file(nano, tmp_path):
    for path in (clipforge.save(nano, tmp_path / "own") / "model.safetensors",
                 checkpoints.save_openclip(nano, tmp_path / "oc.bin")):
        before = _digest(path)
        model = checkpoints.load_any(path.parent if path.name == "model.safetensors" else path, quick_gelu=False)
        params = list(model.parameters())
        assert not any(p.is_meta for p in params) and all(p.requires_grad and p.is_contiguous() for p in params)
        for (name, a), b in zip(model.state_dict().items(), nano.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        loss = model.encode_image(torch.randn(2, 3, 64, 64)).sum()
        loss.backward()
        assert all(p.grad is not None for p in model.visual.parameters())
        assert _digest(path) == before  # the file is untouched by in-place writes


def test_half_precision_files_load_in_the_models_dtype(nano, tmp_path):
    own = clipforge.save(nano, tmp_path / "own")
    state = load_file(str(own / "model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(own / "model.safetensors"), {"format": "clipforge"})
    model = checkpoints.load_any(own)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model.visual.conv1.weight, nano.visual.conv1.weight.half().float())
