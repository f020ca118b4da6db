"""Training checkpoints: atomic, complete or absent, and loadable as a model.

Layout of ``<out>/checkpoints/step_00000420/``:

    config.json, model.safetensors   the model in the own format (``clipforge.load`` reads it)
    train_state.pt                   optimizer, scheduler, scaler, RNG of every rank, data position
    meta.json                        step, samples seen, ... (human-readable)
    COMPLETE                         written last, with a CRC-32 of every other file; a directory
                                     without it is never resumed from, one whose files no longer
                                     match it is refused by name

Everything is written into ``.tmp-step_...``, fsynced, and renamed into place, so a crash
or a full disk leaves at worst a temporary directory (removed by the next save) and the
previous checkpoints untouched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from clipforge.errors import CheckpointError
from clipforge.model.checkpoints import WEIGHTS_NAME, write_config
from clipforge.model.clip import CLIP

MARKER = "COMPLETE"
STATE_NAME = "train_state.pt"
META_NAME = "meta.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


# -- RNG ----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (patch dropout, augmentation in-process)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state holds an ndarray; stored as a tensor to load with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tupled(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _tupled(v: Any) -> Any:
    return tuple(_tupled(x) for x in v) if isinstance(v, (list, tuple)) else v


# -- save ---------------------------------------------------------------------------------
def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    model: CLIP,
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write one checkpoint atomically and prune the oldest beyond ``keep_last``. ``model``
    gives the config (and a Hugging Face text tower's files); ``model_state`` the weights.

    Raises ``CheckpointError`` (with the previous checkpoints intact) when the directory
    cannot be written, e.g. a full disk.
    """
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:  # left by a crash
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        write_model_dir(model_state, model, tmp)
        torch.save(train_state, tmp / STATE_NAME)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        # Last, with a checksum of every other file: a checkpoint that changes on disk afterwards
        # (bit rot, a stray partial overwrite) is refused by name rather than silently resumed.
        (tmp / MARKER).write_text(json.dumps({"step": step, "crc32": _checksums(tmp)}) + "\n")
        for f in tmp.rglob("*"):
            _fsync(f)
        _fsync(tmp)
        old = root / f".old-{final.name}-{os.getpid()}"
        if final.exists():  # the same step saved again (resume of a finished run): swap
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        shutil.rmtree(old, ignore_errors=True)
    except WRITE_ERRORS as e:
        why = _write_error(e, root)
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(root)
        kept = f"; the previous checkpoint {prev.name} is intact" if prev else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {why}{kept}") from e
    for _, old in list_checkpoints(root)[:-keep_last]:
        # Renamed out of the way first: a deletion cut short (rmtree's order is arbitrary) must not
        # leave a "complete" checkpoint without its weights. The next save sweeps the rest away.
        doomed = root / f".old-{old.name}-{os.getpid()}"
        try:
            os.replace(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    return final


# A full disk surfaces as OSError from Python, SafetensorError from safetensors and RuntimeError
# ("unexpected pos ...") from torch.save's zip writer.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def _write_error(e: Exception, where: Path) -> str:
    """Why a write failed, in words (checked before the partial files are removed)."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return why
    if free < 2**20 and "No space left" not in why:
        why = f"No space left on device ({free} bytes free): {why}"
    return why


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _checksums(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): _crc32(f) for f in sorted(d.rglob("*")) if f.is_file() and f.name != MARKER}


def verify_checksums(path: Path) -> None:
    """Raise ``CheckpointError`` naming the first file that differs from what was written.
    (Checkpoints from before checksums were recorded hold a bare step number: nothing to check.)"""
    try:
        recorded = json.loads((path / MARKER).read_text())["crc32"]
    except (ValueError, TypeError, KeyError, OSError):
        return
    for name, crc in recorded.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: cannot read checkpoint: {name} is missing")
        if _crc32(f) != crc:
            raise CheckpointError(f"{path}: cannot read checkpoint: {name} changed after it was written "
                                  "(checksum mismatch: damaged on disk?)")


def write_model_dir(state: dict[str, torch.Tensor], model: CLIP, out: Path) -> Path:
    """The own model format (``config.json`` + ``model.safetensors``) from a state dict (the full
    one under FSDP) and the model it belongs to."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "clipforge"})
    write_config(model, out)
    return out


def save_model_atomic(state: dict[str, torch.Tensor], model: CLIP, out: Path) -> Path:
    """Write a model directory under a temporary name, then swap it into place."""
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write_model_dir(state, model, tmp)
        for f in tmp.rglob("*"):
            _fsync(f)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except WRITE_ERRORS as e:
        why = _write_error(e, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write model to {out}: {why}") from e
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                sharded: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded (model, optimizer) state dicts. Under FSDP this is a collective: every rank
    calls it, rank 0 receives the full tensors (on CPU), the others empty dicts."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         sharded: bool) -> None:
    """Inverse of ``full_states`` for the optimizer (each rank keeps its shard under FSDP)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# -- load ---------------------------------------------------------------------------------
def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, train state) of a complete checkpoint. Errors name the file and the
    problem in one line; ``train_state.pt`` is read without unpickling anything but tensors
    and plain values, so a planted pickle payload is refused, not run."""
    import pickle

    from safetensors.torch import load_file

    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {MARKER} marker)")
    verify_checksums(path)
    try:
        model_state = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:  # damaged files raise many types
        raise CheckpointError(f"{path}: cannot read checkpoint: {WEIGHTS_NAME} is damaged ({_first_line(e)})") from e
    try:
        train_state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: cannot read checkpoint: {STATE_NAME} is damaged ({_first_line(e)})") from e
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(f"{path}: cannot read checkpoint: refusing to unpickle {STATE_NAME}, which references "
                              f"Python objects other than tensors and plain values ({why}); unpickling those can "
                              "run arbitrary code") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, missing file, ...
        raise CheckpointError(f"{path}: cannot read checkpoint: {STATE_NAME} is damaged or truncated "
                              f"({type(e).__name__}: {_first_line(e)})") from e
    return model_state, train_state


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
