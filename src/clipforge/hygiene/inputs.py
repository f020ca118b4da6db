"""The two sides of a comparison as vectors: embedding parts, indexes, or images embedded on the way.

A side is given as any of

- an index directory (``clipforge index``; has ``index.json``): searched as it is (train side only);
- an embeddings directory (``clipforge embed``; has ``embeddings.json``): read, never re-embedded;
- anything ``clipforge embed --input`` reads (a folder, a CSV/TSV/Parquet, WebDataset shards):
  embedded once with the given model into ``WORK/<name>_emb`` (resumable, reused on the next run).

Both sides must come from the same weights (``model_fingerprint``): cosines between two models'
spaces mean nothing, so a mismatch is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.errors import DataError
from clipforge.search.index import read_part, scan_embeddings


@dataclass
class VectorSet:
    """Unit vectors [n, d] (float32) with their metadata rows (``path``, ``caption``, ``position``...)."""

    vectors: np.ndarray
    meta: pa.Table
    model: dict
    emb_dir: Path
    text: np.ndarray | None = None  # caption embeddings, row-aligned, when the parts hold them

    @property
    def paths(self) -> list[str]:
        return self.meta.column("path").to_pylist() if "path" in self.meta.column_names else [""] * len(self.vectors)

    def locations(self) -> list[dict]:
        """Per row, where its image is: ``path``, and for a WebDataset member ``tar_offset`` and ``nbytes``."""
        cols = [c for c in ("path", "tar_offset", "nbytes") if c in self.meta.column_names]
        if not cols:
            return [{} for _ in range(len(self.vectors))]
        return self.meta.select(cols).to_pylist()


def kind_of(spec: str | Path) -> str:
    """'index', 'embeddings' or 'source'."""
    p = Path(spec)
    if p.is_dir() and (p / "index.json").is_file():
        return "index"
    if p.is_dir() and (p / "embeddings.json").is_file():
        return "embeddings"
    return "source"


def model_identity(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in ("model", "model_fingerprint", "embed_dim")}


def same_model(a: dict, b: dict, what: str) -> None:
    """Refuse two sides embedded by different weights (or of different dimension)."""
    if a.get("embed_dim") != b.get("embed_dim") or a.get("model_fingerprint") != b.get("model_fingerprint"):
        raise DataError(f"{what}: the two sides come from different models' embeddings ({a.get('model')!r} "
                        f"{str(a.get('model_fingerprint'))[:12]}, {b.get('model')!r} "
                        f"{str(b.get('model_fingerprint'))[:12]}); embed both with one model")


def embed_source(source: str, out_dir: Path, model, with_text: bool = False, batch_size: int = 256,
                 workers: int = 0, progress: bool = True) -> Path:
    """Embed ``source`` into ``out_dir`` (finished parts of an earlier run are kept) and return it."""
    from clipforge.search.embed import EmbedConfig, embed_images
    from clipforge.search.sources import InputSpec, list_images

    if model is None:
        raise DataError(f"{source!r} is not an embeddings or index directory: give --model to embed it")
    table = list_images(InputSpec(str(source)))
    cfg = EmbedConfig(batch_size=batch_size, num_workers=workers, device="cpu" if workers == 0 else "auto",
                      embed_captions=with_text and "caption" in table.column_names, progress=progress)
    embed_images(model, table, out_dir, cfg, source=str(source))
    return out_dir


def load_vectors(emb_dir: str | Path, with_text: bool = False) -> VectorSet:
    """Every finished part of an embeddings directory, in input order."""
    parts, manifest = scan_embeddings(emb_dir)
    if not parts:
        raise DataError(f"{emb_dir}: no finished embedding parts")
    vecs = np.concatenate([read_part(p) for p in parts]) if parts else np.zeros((0, 0), np.float32)  # [n, d]
    meta = pa.concat_tables([pq.read_table(p.meta) for p in parts], promote_options="permissive")
    text = None
    if with_text:
        if not manifest.get("text_embeddings"):
            raise DataError(f"{emb_dir}: no caption embeddings (embed with --embed-captions)")
        text = np.concatenate([np.load(Path(p.emb_dir) / "text_emb" / f"text_emb_{p.name}.npy").astype(np.float32)
                               for p in parts])
    return VectorSet(vecs, meta, model_identity(manifest), Path(emb_dir), text)


def resolve_side(spec: str, work: Path, name: str, model, with_text: bool = False, progress: bool = True,
                 batch_size: int = 256) -> VectorSet:
    """Vectors for ``spec`` (embeddings directory, or a source embedded into ``WORK/<name>_emb``)."""
    kind = kind_of(spec)
    if kind == "index":
        raise DataError(f"{spec!r} is an index; give the {name} side as embeddings or images")
    emb_dir = Path(spec) if kind == "embeddings" else embed_source(spec, work / f"{name}_emb", model, with_text,
                                                                   batch_size, progress=progress)
    return load_vectors(emb_dir, with_text)


def index_identity(index_dir: str | Path) -> dict:
    info = json.loads((Path(index_dir) / "index.json").read_text())
    return model_identity(info.get("model") or {})


def index_size(index_dir: str | Path) -> int:
    """Items a search of the index can return (hidden ones excluded)."""
    info = json.loads((Path(index_dir) / "index.json").read_text())
    return int(info.get("count", 0)) - int(info.get("hidden", 0))


def model_fingerprint_of(model) -> dict:
    from clipforge.search.layout import model_fingerprint

    return {"model": model.config.name, "model_fingerprint": model_fingerprint(model),
            "embed_dim": model.config.embed_dim}
