"""Curating image-text pairs: what ``clipforge data curate`` runs.

Steps, in this order, each on the pairs the previous ones kept (a dropped pair carries the
first reason that removed it):

1. ``exact_image_duplicate``: identical image bytes (sha256), the first occurrence kept;
2. ``exact_caption_duplicate``: identical captions after lower-casing and collapsing spaces;
3. ``near_duplicate_image``: image embeddings at cosine >= ``near_threshold`` (joined into groups,
   the first row of each kept);
4. ``low_clip_score``: image-caption cosine under the model below ``min_score``, or outside the
   ``top_fraction`` best (LAION / DataComp CLIP-score filtering);
5. ``no_metadata_match`` / ``metadata_balance``: MetaCLIP balancing (``metaclip.py``).

Embeddings (steps 3-4) come from precomputed parts with caption embeddings, or are made once
with the model into ``work`` (resumable). Unreadable images are dropped as ``unreadable_image``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clipforge.errors import DataError
from clipforge.hygiene import inputs, metaclip, tables


@dataclass
class CurateJob:
    input: str  # CSV/TSV/Parquet of image paths and captions, or WebDataset shards
    out: str  # curated table (CSV/TSV/Parquet by suffix), or a folder of shards; OUT.report.json and
    #           OUT.dropped.csv beside it
    model: Any = None
    embeddings: str | None = None  # precomputed parts of the input (with caption embeddings)
    work: str | None = None
    exact_images: bool = False
    exact_captions: bool = False
    near_threshold: float | None = None
    min_score: float | None = None
    top_fraction: float | None = None
    metadata: str | None = None  # entries file
    per_entry: int = 20_000
    image_column: str | None = None
    caption_column: str | None = None
    batch_size: int = 256
    seed: int = 0
    progress: bool = True


def _norm_caption(c: str | None) -> str:
    return re.sub(r"\s+", " ", (c or "").strip().lower())


def _first_of_each(keys: list[Any], alive: np.ndarray) -> np.ndarray:
    """Rows (among ``alive``) whose key was already seen in an earlier alive row."""
    seen: set = set()
    dup = np.zeros(len(keys), bool)
    for i in np.nonzero(alive)[0]:
        if keys[i] in seen:
            dup[i] = True
        else:
            seen.add(keys[i])
    return dup


def _file_digest(path: str, offset: int | None = None, nbytes: int | None = None) -> str:
    try:
        with open(path if offset is None else path.rpartition(".tar/")[0] + ".tar", "rb") as f:
            if offset is not None:
                f.seek(offset)  # a shard member: its bytes sit at the listed offset
            return hashlib.sha256(f.read(nbytes if nbytes is not None else -1)).hexdigest()
    except OSError:
        return f"unreadable:{path}"  # unique: an unreadable file duplicates nothing


def near_duplicates(vectors: np.ndarray, alive: np.ndarray, threshold: float, k: int = 10) -> np.ndarray:
    """Rows to drop: every member of a near-duplicate group (cosine >= threshold) but its first row."""
    import faiss

    rows = np.nonzero(alive)[0]
    if len(rows) < 2:
        return np.zeros(len(vectors), bool)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors[rows], np.float32))
    scores, found = index.search(np.ascontiguousarray(vectors[rows], np.float32), min(k + 1, len(rows)))
    parent = np.arange(len(rows))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, (srow, frow) in enumerate(zip(scores, found)):
        for s, b in zip(srow, frow):
            if b >= 0 and b != a and s >= threshold:
                ra, rb = root(a), root(int(b))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)  # the earliest row stays the group's root
    drop = np.zeros(len(vectors), bool)
    drop[rows[[i for i in range(len(rows)) if root(i) != i]]] = True
    return drop


def _embeddings(job: CurateJob, n: int, work: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image [n, d], caption [n, d], readable [n]) aligned with the input rows."""
    if job.embeddings:
        vs = inputs.load_vectors(job.embeddings, with_text=True)
    else:
        if job.model is None:
            raise DataError("near-duplicate and CLIP-score filtering need --model or --embeddings")
        vs = inputs.load_vectors(inputs.embed_source(job.input, work / "curate_emb", job.model, with_text=True,
                                                     batch_size=job.batch_size, progress=job.progress),
                                 with_text=True)
    if job.model is not None:
        inputs.same_model(inputs.model_fingerprint_of(job.model), vs.model, "the model and the embeddings")
    pos = np.asarray(vs.meta.column("position").to_pylist(), np.int64)
    if len(pos) and pos.max() >= n:
        raise DataError(f"{vs.emb_dir}: embeddings of {pos.max() + 1}+ rows, but the input has {n}; embed this input")
    img = np.zeros((n, vs.vectors.shape[1]), np.float32)
    txt = np.zeros_like(img)
    img[pos], txt[pos] = vs.vectors, vs.text
    readable = np.zeros(n, bool)
    readable[pos] = True
    return img, txt, readable


def curate(job: CurateJob) -> dict[str, Any]:
    shards = tables.shard_files(job.input)
    if shards:  # listed as clipforge embed lists them: member paths, captions, byte offsets
        from clipforge.search.sources import InputSpec, list_images

        table = list_images(InputSpec(job.input))
        img_col, cap_col = "path", "caption"
        paths = table.column("path").to_pylist()
        if cap_col not in table.column_names:
            raise DataError(f"{job.input}: the shards hold no captions")
    else:
        table = tables.read_table(job.input)
        img_col = tables.image_column(table, job.input, job.image_column)
        cap_col = tables.caption_column(table, job.input, job.caption_column)
        paths = tables.absolute_paths(table, job.input, img_col)
    captions = table.column(cap_col).to_pylist()
    n = len(paths)
    if n == 0:
        raise DataError(f"{job.input}: no rows")
    reason = np.full(n, "", object)

    def drop(mask: np.ndarray, why: str) -> None:
        reason[mask & (reason == "")] = why

    steps: list[str] = []
    if job.exact_images:
        where = (zip(table.column("tar_offset").to_pylist(), table.column("nbytes").to_pylist()) if shards
                 else [(None, None)] * n)
        digests = [_file_digest(p, o, b) for p, (o, b) in tqdm(zip(paths, where), total=n, unit="img", desc="hash",
                                                               disable=not job.progress)]
        drop(_first_of_each(digests, reason == ""), "exact_image_duplicate")
        steps.append("exact_image_duplicate")
    if job.exact_captions:
        drop(_first_of_each([_norm_caption(c) for c in captions], reason == ""), "exact_caption_duplicate")
        steps.append("exact_caption_duplicate")
    scores = None
    score_threshold = None
    if job.near_threshold is not None or job.min_score is not None or job.top_fraction is not None:
        work = Path(job.work) if job.work else Path(job.out).resolve().parent / "curate_work"
        img, txt, readable = _embeddings(job, n, work)
        drop(~readable, "unreadable_image")
        if job.near_threshold is not None:
            drop(near_duplicates(img, reason == "", job.near_threshold), "near_duplicate_image")
            steps.append("near_duplicate_image")
        scores = (img * txt).sum(1)  # [n] image-caption cosine
        if job.min_score is not None or job.top_fraction is not None:
            alive = reason == ""
            score_threshold = job.min_score if job.min_score is not None else -1.0
            if job.top_fraction is not None and alive.any():
                cut = float(np.quantile(scores[alive], 1 - job.top_fraction))
                score_threshold = max(score_threshold, cut)
            drop(alive & (scores < score_threshold), "low_clip_score")
            steps.append("low_clip_score")
    entries_report = None
    if job.metadata:
        entries = metaclip.load_entries(job.metadata)
        alive = np.nonzero(reason == "")[0]
        matches = metaclip.match([captions[i] for i in alive], entries)
        kept, counts = metaclip.balance(matches, len(entries), job.per_entry, job.seed)
        unmatched = np.array([not m for m in matches], bool)
        drop(_scatter(n, alive, unmatched), "no_metadata_match")
        drop(_scatter(n, alive, ~kept & ~unmatched), "metadata_balance")
        after = np.zeros(len(entries), np.int64)
        for m, k in zip(matches, kept):
            if k:
                after[list(m)] += 1
        top = np.argsort(-counts)[:20]
        entries_report = {"entries": len(entries), "matched_entries": int((counts > 0).sum()), "per_entry": job.per_entry,
                          "head": [{"entry": entries[i], "before": int(counts[i]), "after": int(after[i])} for i in top]}
        steps += ["no_metadata_match", "metadata_balance"]
    keep = np.nonzero(reason == "")[0]
    if shards:
        tables.write_shards(shards, {paths[i] for i in np.nonzero(reason != "")[0]}, job.out)
    else:
        tables.write_rows(table, job.input, keep.tolist(), job.out, img_col)
    dropped = _write_dropped(Path(str(job.out) + ".dropped.csv"), reason, paths, captions, scores)
    counts = {r: int((reason == r).sum()) for r in dict.fromkeys(["unreadable_image", *steps]) if (reason == r).any()}
    report = {"input": job.input, "output": job.out, "rows_in": n, "rows_out": len(keep), "dropped": counts,
              "steps": steps, "score_threshold": score_threshold, "metadata": entries_report,
              "dropped_csv": str(dropped),
              "settings": {k: v for k, v in asdict(job).items() if k not in ("model", "input", "out")}}
    if scores is not None:
        report["clip_score"] = {"mean": float(scores.mean()), "p10": float(np.quantile(scores, 0.1)),
                                "p50": float(np.quantile(scores, 0.5)), "p90": float(np.quantile(scores, 0.9))}
    path = Path(str(job.out) + ".report.json")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)
    report["report"] = str(path)
    return report


def _scatter(n: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(n, bool)
    out[rows] = values
    return out


def _write_dropped(path: Path, reason: np.ndarray, paths, captions, scores) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "image", "caption", "reason", "clip_score"])
        for i in np.nonzero(reason != "")[0]:
            w.writerow([int(i), paths[i], captions[i], reason[i], "" if scores is None else round(float(scores[i]), 5)])
    return path
