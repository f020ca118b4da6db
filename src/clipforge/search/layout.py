"""The on-disk layout of embedding and index directories, read by both the writers
(``embed``, ``index``, ``build``) and the readers (``searcher``, ``service``).

    EMB_DIR/img_emb/img_emb_00000.npy  EMB_DIR/metadata/metadata_00000.parquet  EMB_DIR/embeddings.json
    INDEX_DIR/index.faiss  INDEX_DIR/meta.sqlite  INDEX_DIR/index.json
"""

from __future__ import annotations

import json
from pathlib import Path

from clipforge.errors import DataError
from clipforge.model.identity import model_fingerprint  # noqa: F401 (the readers' and writers' name for it)

EMB_FORMAT = "clipforge-embeddings/1"
INDEX_FORMAT = "clipforge-index/1"
REMOVABLE = ("flat", "ivf", "ivfpq")  # HNSW and ivfpqr (refine) cannot delete vectors: removals become tombstones


def part_name(kind: str, part: int, ext: str) -> str:
    return f"{kind}/{kind}_{part:05d}.{ext}"


def finished_parts(out_dir: str | Path) -> list[int]:
    """Part numbers whose metadata file (written last) exists."""
    meta = Path(out_dir) / "metadata"
    if not meta.is_dir():
        return []
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in meta.glob("metadata_*.parquet"))


def index_files(index_dir: Path) -> tuple[Path, Path, Path]:
    return index_dir / "index.faiss", index_dir / "meta.sqlite", index_dir / "index.json"


def load_info(index_dir: str | Path) -> dict:
    path = Path(index_dir) / "index.json"
    if not path.is_file():
        raise DataError(f"{str(index_dir)!r} is not an index directory (no index.json); build one first")
    info = json.loads(path.read_text())
    if info.get("format") != INDEX_FORMAT:
        raise DataError(f"{str(index_dir)!r}: unknown index format {info.get('format')!r}")
    return info
