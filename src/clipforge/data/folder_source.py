"""A folder (searched recursively) of images, each with a same-stem ``.txt`` caption."""

from __future__ import annotations

import os

from clipforge.data.config import IMAGE_SUFFIXES, DataConfig
from clipforge.data.csv_source import PackedStrings
from clipforge.data.skips import RawSample
from clipforge.errors import DataError
from clipforge.imageio import walk_files


class FolderIndex:
    """Images in sorted relative-path order (stable across machines and file systems).

    An image without its ``.txt`` is indexed all the same and skipped as 'missing_caption'
    when visited, so skip counts are per visit for every source alike.
    """

    def __init__(self, root: str, rel_paths: list[str]) -> None:
        self.root = root
        self._paths = PackedStrings([os.fsencode(p) for p in rel_paths])

    def __len__(self) -> int:
        return len(self._paths)

    def raw(self, i: int) -> RawSample:
        path = os.path.join(self.root, os.fsdecode(self._paths[i]))
        return RawSample(path, path, None, caption_path=os.path.splitext(path)[0] + ".txt")

    def extra(self, i: int) -> None:
        return None


def read_folder(cfg: DataConfig) -> FolderIndex:
    """Every image under ``cfg.path`` (hidden files and folders left out). Links are followed, but
    no folder is walked twice and no linked image listed twice (``imageio.walk_files``): a link
    to ``.`` or a parent adds nothing, two links to one folder list its images once."""
    root = cfg.path
    found = walk_files(root, lambda name: os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES, skip_hidden=True)
    rel = [os.path.relpath(p, root) for p in found]
    if not rel:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    rel.sort()
    return FolderIndex(root, rel)
