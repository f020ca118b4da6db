"""Reading weight files without running code: torch pickles through ``weights_only`` (a file
that needs more is refused with a one-line error), safetensors, training-checkpoint wrappers."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from clipforge.errors import CheckpointError


def read_weights_file(path: Path) -> Any:
    source = str(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{source}: empty file")
    is_zip, is_pickle = head[:4] == b"PK\x03\x04", head[:1] == b"\x80"
    if path.suffix == ".safetensors" or not (is_zip or is_pickle) and head[8:9] == b"{":
        return read_safetensors(path)  # an 8-byte header length, then the JSON header
    if not (is_zip or is_pickle):  # neither a zip archive nor a pickle (protocol >= 2)
        raise CheckpointError(f"{source}: not a PyTorch, safetensors or TorchScript file (unrecognised content)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            reason = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                          "it references Python objects other than tensors")
            raise CheckpointError(
                f"{source}: refusing to unpickle: the file references Python objects other than tensors "
                f"({reason}), and unpickling those can run arbitrary code. clipforge reads only tensors; "
                "if you trust the file, re-save its state_dict() with torch.save or as safetensors") from None
        raise CheckpointError(f"{source}: damaged pickle ({msg})") from e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{source}: damaged or truncated checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: OpenCLIP's {"state_dict": ...}, DDP's ``module.`` and
    torch.compile's ``_orig_mod.`` prefixes removed."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{source}: entries that are not named tensors: {', '.join(map(str, bad[:5]))}")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def fill_bn_counters(state: dict[str, torch.Tensor]) -> None:
    """BatchNorm's num_batches_tracked is a training counter that does not change outputs
    (momentum is set); some exports drop it. It is the only tensor we fill in."""
    for k in [k for k in state if k.endswith(".running_var")]:
        state.setdefault(k[: -len("running_var")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))


def read_json(path: Path, quiet: bool = False) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if quiet:
            return None
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e


def first_of(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)
