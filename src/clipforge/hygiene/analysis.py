"""One overlap analysis from start to finish: what ``clipforge data overlap`` runs.

    report = run_overlap(OverlapJob(train="world/train_flawed.csv", test="world/test.csv", out="overlap.json",
                                    model=model, task="shape"))

Writes ``overlap.json`` (threshold and how it was chosen, counts, overlap fraction, every flagged
test item with its nearest training duplicate, All / Overlap / Clean accuracy when a task is
given), ``overlap.csv`` (the flagged items) and ``overlap.png`` beside it; with ``drop`` also the
training list without the flagged training items and ``<drop>.dropped.json``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import DataError
from clipforge.hygiene import calibrate as C
from clipforge.hygiene import inputs, tables
from clipforge.hygiene.accuracy import plot_overlap, split_accuracy, zeroshot_correct
from clipforge.hygiene.overlap import OverlapConfig, find_overlap


@dataclass
class OverlapJob:
    train: str
    test: str
    out: str
    model: Any = None  # a loaded model: embeds image sources, calibrates, classifies
    work: str | None = None  # embeddings and the training index (default: OUT's folder/overlap_work)
    threshold: float | None = None  # given: no calibration
    perceptual_threshold: float | None = None
    use_perceptual: bool = True
    max_fpr: float = 0.01
    calibration_images: int = 300
    k: int = 10
    task: str | None = None
    confidence: float = 0.95
    drop: str | None = None
    batch_size: int = 256
    seed: int = 0
    progress: bool = True


def _train_index(job: OverlapJob, work: Path, test_model: dict) -> tuple[Path, Path | None]:
    """The training side's index (built from embeddings when needed) and its embeddings directory."""
    from clipforge.search.build import build_or_update
    from clipforge.search.index import IndexConfig

    kind = inputs.kind_of(job.train)
    if kind == "index":
        index_dir, emb_dir = Path(job.train), None
    else:
        emb_dir = Path(job.train) if kind == "embeddings" else inputs.embed_source(
            job.train, work / "train_emb", job.model, batch_size=job.batch_size, progress=job.progress)
        index_dir = work / "train_index"
        build_or_update([str(emb_dir)], index_dir, IndexConfig(progress=job.progress))
    inputs.same_model(inputs.index_identity(index_dir), test_model, "train and test")
    return index_dir, emb_dir


def _test_images(job: OverlapJob, test: inputs.VectorSet):
    """open(row) -> that test image or None; and the readable rows in the calibration sample's order."""
    from clipforge.hygiene.overlap import open_item

    where = test.locations()
    return (lambda r: open_item(where[r])), np.random.default_rng(job.seed).permutation(len(where))


def _calibration(job: OverlapJob, test: inputs.VectorSet, search_size: int) -> C.Calibration:
    if job.threshold is not None:
        return C.given(job.threshold, job.perceptual_threshold if job.perceptual_threshold is not None else -1)
    if job.model is None:
        raise DataError("calibrating the threshold needs --model (or give --threshold)")
    inputs.same_model(inputs.model_fingerprint_of(job.model), test.model, "the model and the test embeddings")
    open_test, order = _test_images(job, test)
    images, rows = [], []
    for r in order:
        if len(images) >= min(job.calibration_images, len(order)):
            break
        im = open_test(int(r))
        if im is not None:  # unreadable or not a file: calibrate on the others
            images.append(im)
            rows.append(int(r))
    if len(images) < 2:
        raise DataError("fewer than 2 readable test images to calibrate on; give --threshold")
    cal = C.calibrate(job.model, images, test.vectors, np.array(rows), open_test if job.use_perceptual else None,
                      job.max_fpr, per_kind=max(1, len(images) // len(C.KINDS)), seed=job.seed, k=job.k,
                      search_size=search_size)
    if job.perceptual_threshold is not None:
        cal.perceptual_threshold = job.perceptual_threshold
    return cal


def _mirrored(job: OverlapJob, test: inputs.VectorSet, batch: int = 256) -> np.ndarray | None:
    """The test images' mirror-image vectors (a second query view), or None without a model.
    An unreadable image keeps its own vector: its second view finds what the first did."""
    if job.model is None or inputs.model_fingerprint_of(job.model)["model_fingerprint"] != test.model.get(
            "model_fingerprint"):
        return None
    open_test, _ = _test_images(job, test)
    out = test.vectors.copy()
    for lo in range(0, len(out), batch):
        got = [(r, im) for r in range(lo, min(lo + batch, len(out))) if (im := open_test(r)) is not None]
        if got:
            out[[r for r, _ in got]] = C.embed_pil(job.model, C.mirrored([im for _, im in got]))
    return out


def run_overlap(job: OverlapJob) -> dict[str, Any]:
    out = Path(job.out)
    work = Path(job.work) if job.work else out.resolve().parent / "overlap_work"
    test = inputs.resolve_side(job.test, work, "test", job.model, progress=job.progress, batch_size=job.batch_size)
    index_dir, train_emb = _train_index(job, work, test.model)
    cal = _calibration(job, test, inputs.index_size(index_dir))
    found = find_overlap(test, index_dir, cal, OverlapConfig(k=job.k, use_perceptual=job.use_perceptual,
                                                             progress=job.progress), mirrored=_mirrored(job, test))
    mask, nearest = found.pop("flagged_mask"), found.pop("nearest")
    report: dict[str, Any] = {"train": job.train, "test": job.test, "model": test.model, **found}
    if job.task:
        if job.model is None:
            raise DataError("accuracy on All / Overlap / Clean needs --model")
        source = job.test if inputs.kind_of(job.test) == "source" else None
        if source is None:
            raise DataError("--task needs --test as the labelled table or folder (embeddings hold no labels)")
        correct, labelled, info = zeroshot_correct(job.model, source, job.task, test.paths, job.batch_size,
                                                   job.progress)
        report["accuracy"] = {**info, **split_accuracy(correct[labelled], mask[labelled], job.confidence)}
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_overlap(nearest, mask, cal.emb_threshold, report.get("accuracy"), out.with_suffix(".png"),
                        title=f"{Path(job.test).name} vs {Path(job.train).name}")
    report["plot"] = str(plot)
    report["flagged_csv"] = str(_write_flagged(found["items"], out.with_suffix(".csv")))
    if job.drop:
        report["drop"] = decontaminate(job.train, train_emb, found["train_duplicates"], job.drop)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, out)
    return report


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    raise TypeError(type(v).__name__)


def _write_flagged(items: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["test", "train", "cosine", "perceptual", "signal"])
        for it in items:
            w.writerow([it["test"], it["train"], it["cosine"], "" if it["perceptual"] is None else it["perceptual"],
                        it["signal"]])
    return path


def decontaminate(train: str, train_emb: Path | None, duplicates: list[dict[str, Any]], out: str) -> dict[str, Any]:
    """The training list without ``duplicates``: shards without those samples in folder ``out`` when the
    training side is WebDataset shards, the table's own rows when it is a table, else ``image,caption``
    rows from the embedding metadata; plus ``<out>.dropped.json``."""
    drop = {os.path.abspath(d["path"]) for d in duplicates}
    shards = tables.shard_files(train)
    if shards:
        got = tables.write_shards(shards, drop, out)
        total, keep = got["samples_before"], range(got["samples_after"])
    elif tables.is_table(train):
        table = tables.read_table(train)
        col = tables.image_column(table, train)
        paths = tables.absolute_paths(table, train, col)
        keep = [i for i, p in enumerate(paths) if p not in drop]
        tables.write_rows(table, train, keep, out, col)
        total = len(paths)
    elif train_emb is not None:
        vs = inputs.load_vectors(train_emb)
        caps = vs.meta.column("caption").to_pylist() if "caption" in vs.meta.column_names else [None] * len(vs.paths)
        keep = [i for i, p in enumerate(vs.paths) if os.path.abspath(p) not in drop]
        tables.write_pairs([vs.paths[i] for i in keep], [caps[i] for i in keep], out)
        total = len(vs.paths)
    else:
        raise DataError("--drop needs the training side as a table, images or embeddings (an index lists no captions)")
    record = {"training_list": str(out), "rows_before": total, "rows_after": len(keep),
              "dropped": total - len(keep), "items": duplicates}
    Path(str(out).rstrip("/") + ".dropped.json").write_text(json.dumps(record, indent=1) + "\n")
    return {k: v for k, v in record.items() if k != "items"}
