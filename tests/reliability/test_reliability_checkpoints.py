"""Hostile and damaged checkpoints: refused with an error that names the problem, no code run.

tests/unit/test_checkpoints.py covers a bare .pt carrying a code-running pickle, a TorchScript
archive doing the same, and damaged/mismatched weights files. Here: the same payload inside
every other container clipforge reads (a training checkpoint's train_state.pt on resume, even with
its checksums forged to match; a Hugging Face or OpenCLIP directory; an OpenCLIP training wrapper),
a safetensors header that lies about its size, and damaged or mismatched *training* checkpoints on
resume: caught by the CRC-32s in their COMPLETE marker, and (for checkpoints written before those
existed) by the readers and the strict loader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib

import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge.cli import main
from clipforge.errors import CheckpointError
from clipforge.model.interop import openai
from clipforge.train import checkpointing as ckpt
from support.datasets import write_csv


class RunsCode:
    """Unpickling this runs ``touch MARKER``: what a loader must never do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real training checkpoint (two steps of nano), to damage copies of."""
    root = tmp_path_factory.mktemp("ckpt")
    data = write_csv(root / "data", n=8)
    rc = main(["train", "--data", str(data), "--model", "nano", "--out", str(root / "run"), "--steps", "2",
               "--batch-size", "8", "--workers", "0", "--save-every", "1", "--no-progress", "--no-tensorboard"])
    assert rc == 0
    return data, root / "run"


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_marker(step_dir) -> None:
    sums = {}
    for f in sorted(step_dir.rglob("*")):
        if f.is_file() and f.name != ckpt.MARKER:
            sums[str(f.relative_to(step_dir))] = f"{zlib.crc32(f.read_bytes()):08x}"
    marker = json.loads((step_dir / ckpt.MARKER).read_text())
    (step_dir / ckpt.MARKER).write_text(json.dumps({**marker, "crc32": sums}))


def _resume(data, run, capsys) -> str:
    rc = main(["train", "--data", str(data), "--model", "nano", "--out", str(run), "--steps", "3", "--batch-size", "8",
               "--workers", "0", "--save-every", "1", "--resume", "auto", "--no-progress", "--no-tensorboard"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in "\n".join(err) and err[-1].startswith("clipforge train: error: "), err  # one line
    return err[-1]


@pytest.mark.slow
def test_code_in_a_training_checkpoint_is_refused_on_resume(checkpoint, tmp_path, capsys):
    data, src = checkpoint
    run = _copy_run(src, tmp_path / "run")
    marker = tmp_path / "ran"
    state_file = run / "checkpoints" / "step_00000002" / ckpt.STATE_NAME
    state = torch.load(state_file, weights_only=True)
    state["ranks"][0]["rng"]["payload"] = RunsCode(str(marker))
    torch.save(state, state_file)
    _rewrite_marker(state_file.parent)  # an attacker who can plant a file can fix the checksums too
    err = _resume(data, run, capsys)
    assert "step_00000002: cannot read checkpoint: refusing to unpickle train_state.pt" in err, err
    assert "system" in err  # the offending global is named
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["hf-bin", "openclip-dir", "openclip-training-wrapper", "nested-in-list"])
def test_code_in_any_weights_container_is_refused(layout, nano, tmp_path):
    marker = tmp_path / "ran"
    state = openai.to_openai(nano.state_dict())
    evil = RunsCode(str(marker))
    if layout == "hf-bin":
        d = tmp_path / "hf"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {}, "text_config": {}}))
        torch.save({"vision_model.embeddings.patch_embedding.weight": evil}, d / "pytorch_model.bin")
        target = d
    elif layout == "openclip-dir":
        d = tmp_path / "oc"
        d.mkdir()
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
        torch.save({**state, "extra": evil}, d / "open_clip_pytorch_model.bin")
        target = d
    elif layout == "openclip-training-wrapper":
        target = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": state, "optimizer": evil}, target)
    else:
        target = tmp_path / "list.pt"
        torch.save({**state, "visual.proj": [torch.zeros(1), evil]}, target)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        clipforge.load(target)
    assert not marker.exists()


def test_safetensors_header_that_lies_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b'{"a": {}}')  # claims an exabyte-sized header
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        clipforge.load(path)
    d = tmp_path / "own"
    d.mkdir()
    clipforge.create_model("nano").config.to_json(d / "config.json")
    (d / "model.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"own/model.safetensors: cannot read safetensors"):
        clipforge.load(d)


DAMAGE = [  # (damage, marker as written / as an older clipforge wrote it: a bare step, no checksums)
    ("truncated-weights", "checksums", r"step_00000002: cannot read checkpoint: model.safetensors changed after"),
    ("bit-flip-state", "checksums", r"step_00000002: cannot read checkpoint: train_state.pt changed after"),
    ("deleted-weights", "checksums", r"step_00000002: cannot read checkpoint: model.safetensors is missing"),
    ("truncated-weights", "old", r"step_00000002: cannot read checkpoint: model.safetensors is damaged \(.+\)$"),
    ("truncated-state", "old",
     r"step_00000002: cannot read checkpoint: train_state.pt is damaged or truncated \(.+\)$"),
    ("other-architecture", "old", r"step_00000002: weights do not match the architecture: .*shape mismatches"),
    ("missing-tensor", "old", r"step_00000002: weights do not match the architecture: 1 missing \(e.g. logit_scale\)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("damage, marker, message", DAMAGE, ids=[f"{d}-{m}" for d, m, _ in DAMAGE])
def test_damaged_training_checkpoint_is_named_on_resume(damage, marker, message, checkpoint, tmp_path, capsys):
    data, src = checkpoint
    run = _copy_run(src, tmp_path / "run")
    step = run / "checkpoints" / "step_00000002"
    weights, state_file = step / "model.safetensors", step / ckpt.STATE_NAME
    if damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "truncated-state":
        state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    elif damage == "bit-flip-state":  # inside the pickle: it would load, with a different value
        data_ = bytearray(state_file.read_bytes())
        data_[200] ^= 0x01
        state_file.write_bytes(bytes(data_))
    elif damage == "deleted-weights":
        weights.unlink()
    elif damage == "other-architecture":
        cfg = json.loads((step / "config.json").read_text())
        cfg["embed_dim"] = 32
        (step / "config.json").write_text(json.dumps(cfg))
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
        del tensors["logit_scale"]
        save_file(tensors, str(weights))
    if marker == "old":
        (step / ckpt.MARKER).write_text("2\n")
    err = _resume(data, run, capsys)
    assert re.search(message, err), err
