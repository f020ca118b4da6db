"""Evaluation datasets: labelled images and captioned images, read from folders or tables.

- A folder with one sub-folder per class (its names, sorted, are the classes), like torchvision's
  ``ImageFolder``.
- A CSV/TSV/Parquet table with an image column and a label (or caption) column; relative image
  paths are resolved against the table's folder.

Only paths are read here; images are decoded lazily by :class:`ImageDataset`, which reports an
unreadable image instead of raising, so one damaged file is skipped and counted, not fatal.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from clipforge.errors import DataError
from clipforge.imageio import as_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "LabelledImages",
    "CaptionedImages",
    "load_labelled",
    "load_captions",
    "read_table",
    "ImageDataset",
    "collate_images",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
TABLE_EXTENSIONS = frozenset({".csv", ".tsv", ".parquet", ".pq"})


@dataclass
class LabelledImages:
    """Image paths with integer labels; ``classnames[label]`` names a label when known."""

    paths: list[Path]
    labels: list[int]
    classnames: list[str] | None = None
    name: str = ""
    skipped_rows: int = 0  # table rows without an image or a label

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        if self.classnames is not None:
            return len(self.classnames)
        return max(self.labels) + 1 if self.labels else 0

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        return replace(self, paths=[self.paths[i] for i in indices], labels=[self.labels[i] for i in indices])


@dataclass
class CaptionedImages:
    """Unique images and their captions; ``text_to_image[j]`` is the image of caption ``j``."""

    image_paths: list[Path]
    captions: list[str]
    text_to_image: list[int]
    name: str = ""
    skipped_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# -- reading ------------------------------------------------------------------------------


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV, TSV or Parquet file as dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix not in (".csv", ".tsv"):
        raise DataError(f"{path}: expected a .csv, .tsv or .parquet table")
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))


def _require_columns(path: Path, rows: list[dict[str, Any]], *keys: str) -> None:
    if not rows:
        raise DataError(f"{path}: the table has no rows")
    missing = [k for k in keys if k not in rows[0]]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, rows[0]))})")


def _resolve(base: Path, value: Any) -> Path:
    p = Path(str(value))
    return p if p.is_absolute() else base / p


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value != value  # NaN


def _folder_classes(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _label_folder(root: Path, classnames: Sequence[str] | None, name: str) -> LabelledImages:
    dirs = _folder_classes(root)
    if not dirs:
        raise DataError(f"{root}: no class sub-folders (expected one folder of images per class)")
    folder_names = [d.name for d in dirs]
    if classnames is None:
        names, folder_labels = folder_names, list(range(len(dirs)))
    elif set(folder_names) <= set(classnames):
        # Folders named after classes (all of them, or a subset as in shifted test sets):
        # the class list's order defines the labels.
        names = list(classnames)
        first = {c: i for i, c in reversed(list(enumerate(classnames)))}
        folder_labels = [first[n] for n in folder_names]
    elif len(classnames) == len(dirs):
        names, folder_labels = list(classnames), list(range(len(dirs)))  # display names, sorted-folder order
    else:
        raise DataError(
            f"{root}: {len(dirs)} class folders but {len(classnames)} class names; the names must either "
            "include every folder name or give one display name per sorted folder"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, d in zip(folder_labels, dirs):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return LabelledImages(paths, labels, names, name)


def _parse_labels(path: Path, raw: list[Any], classnames: Sequence[str] | None) -> tuple[list[int], list[str] | None]:
    """Labels as class names (mapped through ``classnames``) or as integer indices."""
    as_str = [str(v).strip() for v in raw]
    if classnames is not None:
        index = {c: i for i, c in reversed(list(enumerate(classnames)))}  # first occurrence wins
        if all(s in index for s in as_str):
            return [index[s] for s in as_str], list(classnames)
    try:
        ints = [int(float(s)) if isinstance(v, float) else int(s) for v, s in zip(raw, as_str)]
    except ValueError:
        if classnames is None:
            return _names_to_labels(as_str)
        unknown = sorted({s for s in as_str if s not in index})
        raise DataError(f"{path}: labels not in the class names: {', '.join(unknown[:5])}") from None
    bound = len(classnames) if classnames is not None else None
    if min(ints) < 0 or (bound is not None and max(ints) >= bound):
        raise DataError(f"{path}: integer labels must lie in [0, {bound or 'inf'}), found {min(ints)}..{max(ints)}")
    return ints, list(classnames) if classnames is not None else None


def _names_to_labels(names: list[str]) -> tuple[list[int], list[str]]:
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return [index[s] for s in names], classes


def load_labelled(
    path: str | Path,
    classnames: Sequence[str] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    name: str | None = None,
) -> LabelledImages:
    """Read a labelled image set from a class-folder tree or a CSV/TSV/Parquet table.

    Table labels may be class names (mapped through ``classnames``, or sorted into classes when no
    names are given) or integer indices into ``classnames``.
    """
    path = Path(path)
    name = name or (path.name if path.is_dir() else path.stem)
    if path.is_dir():
        return _label_folder(path, classnames, name)
    rows = read_table(path)
    _require_columns(path, rows, image_key, label_key)
    kept = [r for r in rows if not _is_empty(r[image_key]) and not _is_empty(r[label_key])]
    if not kept:
        raise DataError(f"{path}: no row has both {image_key!r} and {label_key!r}")
    labels, names = _parse_labels(path, [r[label_key] for r in kept], classnames)
    paths = [_resolve(path.parent, r[image_key]) for r in kept]
    return LabelledImages(paths, labels, names, name, skipped_rows=len(rows) - len(kept))


def load_captions(
    path: str | Path, image_key: str = "image", caption_key: str = "caption", name: str | None = None
) -> CaptionedImages:
    """Read image-caption pairs; rows sharing an image become several captions of one image."""
    path = Path(path)
    rows = read_table(path)
    _require_columns(path, rows, image_key, caption_key)
    images: dict[Path, int] = {}
    captions: list[str] = []
    t2i: list[int] = []
    skipped = 0
    for r in rows:
        if _is_empty(r[image_key]) or _is_empty(r[caption_key]):
            skipped += 1
            continue
        idx = images.setdefault(_resolve(path.parent, r[image_key]), len(images))
        captions.append(str(r[caption_key]))
        t2i.append(idx)
    if not captions:
        raise DataError(f"{path}: no row has both {image_key!r} and {caption_key!r}")
    return CaptionedImages(list(images), captions, t2i, name or path.stem, skipped)


# -- decoding -----------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and transforms images; an unreadable one yields ``(index, None, reason)``."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            with Image.open(self.paths[i]) as im:  # decoded as training and embedding decode (clipforge.imageio)
                return i, self.transform(as_rgb(im)), None
        except Exception as e:  # PIL raises many types for missing, truncated or foreign files
            return i, None, f"{type(e).__name__}: {e}"


def collate_images(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:
    """(images [B, 3, H, W] of the readable items, their indices [B], [(index, reason)] of the rest)."""
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, str(err)) for i, x, err in items if x is None]
    images = torch.stack([x for _, x in ok]) if ok else None
    return images, torch.tensor([i for i, _ in ok], dtype=torch.long), failed
