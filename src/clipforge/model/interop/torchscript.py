"""Read the tensors of a TorchScript archive (OpenAI's ``ViT-B-32.pt``) without running it.

A TorchScript archive is a zip holding the program (``code/``) and a pickle (``data.pkl``)
of the module tree. ``torch.jit.load`` would compile and run that program, and
``torch.load(weights_only=True)`` refuses the pickle because it names TorchScript classes
(``__torch__.model.CLIP``). The pickle itself only builds plain objects, so we read it with
an unpickler whose ``find_class`` hands out inert stand-ins for those classes and a short
allow-list of tensor constructors, refusing every other global: no code from the file runs.
The result is the module's ``state_dict()`` equivalent: every tensor attribute by dotted name.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from clipforge.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a pickled TorchScript object: keeps its attribute dict and nothing else."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name
        self.attrs: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.attrs = dict(state)


def _script_class(type_name: str) -> type:
    # NEWOBJ calls cls.__new__(cls); a fresh subclass per name keeps the type for messages.
    class _Obj(_ScriptObject):
        def __new__(cls, *args: Any) -> "_Obj":
            obj = object.__new__(cls)
            _ScriptObject.__init__(obj, type_name)
            return obj

        def __init__(self, *args: Any) -> None:
            pass

    return _Obj


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _identity(value: Any, *_: Any) -> Any:
    return value


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in (
            "restore_type_tag", "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"
        ):
            return _identity  # typed-list wrappers around plain values
        raise CheckpointError(
            f"{self.source}: TorchScript archive references {module}.{name}; refusing to read it "
            "(only tensors and module containers are accepted, so no code from the file runs)"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r} in TorchScript archive")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.source}: unexpected storage type {dtype!r}")
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise CheckpointError(f"{self.source}: TorchScript archive lacks tensor data {key!r}") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not isinstance(numel, int) or numel < 0:
                raise CheckpointError(f"{self.source}: tensor data {key!r} has a bad element count {numel!r}")
            # Judged from the zip directory before a byte is inflated: a deflated entry of a few
            # kilobytes can declare gigabytes. Then at most the expected bytes are inflated, whatever
            # the entry really holds (_read_entry), and its CRC is checked.
            if info.file_size != numel * itemsize:
                raise CheckpointError(f"{self.source}: tensor data {key!r} declares {info.file_size} bytes, "
                                      f"expected {numel * itemsize} (damaged or crafted archive); not decompressed")
            raw = _read_entry(self.archive, info, numel * itemsize)
            if len(raw) != numel * itemsize:
                raise CheckpointError(f"{self.source}: tensor data {key!r} has {len(raw)} bytes, "
                                      f"expected {numel * itemsize} (truncated archive?)")
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            self.storages[key] = flat.view(dtype)  # [numel]
        return self.storages[key]


MAX_PICKLE_BYTES = 64 * 2**20  # the module tree's pickle (names and tensor references): ~100 KB in OpenAI's


def _read_entry(z: zipfile.ZipFile, info: zipfile.ZipInfo, n: int) -> bytes:
    """At most ``n`` bytes of an entry. ``ZipFile.read`` would inflate a deflated entry in one call
    of up to 2 GiB whatever size it declares; reading ``n`` bytes inflates ~4 KiB past them at most."""
    with z.open(info) as f:
        return f.read(n)


def _small(z: zipfile.ZipFile, name: str, limit: int, source: str) -> bytes:
    """An entry that is never large, refused from its declared size before it is inflated."""
    info = z.getinfo(name)
    if info.file_size > limit:
        raise CheckpointError(f"{source}: {name} declares {info.file_size} bytes (at most {limit} expected); "
                              "not decompressed")
    return _read_entry(z, info, info.file_size)


def _prefix(names: list[str]) -> str | None:
    """'ViT-B-32/' for an archive whose program pickle is ViT-B-32/data.pkl."""
    for n in names:
        parts = n.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            return parts[0] + "/"
    return None


def is_torchscript_zip(path: Path) -> bool:
    """A zip with ``<dir>/data.pkl`` and ``<dir>/code/``: what ``torch.jit.save`` writes.
    (``torch.save`` archives have data.pkl but no code/.)"""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    prefix = _prefix(names)
    return prefix is not None and any(n.startswith(prefix + "code/") for n in names)


def read_torchscript_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor attribute of the archived module tree by dotted name, like ``state_dict()``;
    the TorchScript type name of every submodule by dotted path, e.g. to see the activation)."""
    source = str(path)
    try:
        with zipfile.ZipFile(path) as z:
            prefix = _prefix(z.namelist())
            if prefix is None:
                raise CheckpointError(f"{source}: zip archive has no data.pkl; not a TorchScript archive")
            has_order = prefix + "byteorder" in z.namelist()
            byteorder = _small(z, prefix + "byteorder", 64, source).decode().strip() if has_order else "little"
            if byteorder != "little":
                raise CheckpointError(f"{source}: {byteorder}-endian TorchScript archives are not supported")
            root = _SafeUnpickler(_small(z, prefix + "data.pkl", MAX_PICKLE_BYTES, source), z, prefix, source).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError, RuntimeError, KeyError,
            TypeError, IndexError, AttributeError, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"{source}: damaged TorchScript archive ({type(e).__name__}: {e})") from e
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{source}: TorchScript archive does not hold a module")
    state: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    _collect(root, "", state, types)
    return state, types


def _collect(obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor], types: dict[str, str]) -> None:
    types[prefix.rstrip(".")] = obj.type_name
    for name, value in obj.attrs.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out, types)
