"""Generate a whole world on disk, in parallel, reproducibly.

Layout (``format='csv'``)::

    OUT/world.json                 manifest: config, attributes, held-out pairs, splits, tasks
    OUT/<split>.csv                image,caption,<label columns>   (image relative to the CSV)
    OUT/<split>/000000.png ...
    OUT/tasks/<task>.json, <task>_classes.txt, <task>_templates.txt

With ``format='wds'`` each split is ``OUT/<split>/00000.tar ...`` holding ``<key>.png|jpg``,
``<key>.txt`` (caption) and ``<key>.json`` (caption + label columns) per sample, and no CSV.
``world.json`` is written last, so its presence marks a complete world.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.synth import world as W
from clipforge.data.synth.mechanisms import mechanisms
from clipforge.data.synth.render import render
from clipforge.data.synth.styles import write_caption
from clipforge.data.synth.tasks import (
    LABEL_COLUMNS, RELATION_CLASSES, build_tasks, label_columns, label_rule, labels, write_tasks,
)
from clipforge.utils import usable_cpus

MANIFEST = "world.json"
GENERATOR_VERSION = 1  # bump when the same config would produce different samples


@dataclasses.dataclass(frozen=True)
class Sample:
    scene: W.Scene  # the structured truth: what the caption and labels are checked against
    caption: str
    labels: dict[str, Any]

    def image(self, image_size: int = 64) -> Image.Image:
        return render(self.scene, image_size)


@lru_cache(maxsize=4)
def _world(cfg: W.SynthConfig) -> W.World:
    return W.World(cfg)


def make_sample(cfg: W.SynthConfig, split: str, index: int) -> Sample:
    """Sample ``index`` of ``split``: a pure function of ``(cfg.seed, split, index)``."""
    scene = _world(cfg).scene(split, index)
    text = write_caption(scene, W.split_rng(cfg.seed, split, index, 1), cfg)
    return Sample(scene, text, labels(scene, cfg.polysemy))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, "JPEG", quality=95)
    elif fmt == "bmp":
        image.save(buf, "BMP")
    else:
        image.save(buf, "PNG", compress_level=1)  # level 6 costs 50% more CPU for 12% smaller files
    return buf.getvalue()


def _key_width(n: int) -> int:
    return max(6, len(str(max(n - 1, 0))))


CSV_COLUMNS = ("image", "caption", *LABEL_COLUMNS)  # a plain world's; csv_columns(cfg) in general


def csv_columns(cfg: W.SynthConfig) -> tuple[str, ...]:
    return ("image", "caption", *label_columns(cfg))


def _work(job: tuple[W.SynthConfig, str, int, int, int, str]) -> tuple[str, int, int, str]:
    """Render samples [start, stop) of a split and write their files. Returns the chunk's CSV
    lines as text: far lighter to send back and hold than row dicts (100k rows stay ~40 MB)."""
    cfg, split, n, start, stop, out = job
    width, ext = _key_width(n), cfg.image_format
    members: list[tuple[str, bytes]] = []
    lines = io.StringIO()
    rows = csv.DictWriter(lines, fieldnames=csv_columns(cfg), lineterminator="\r\n")
    for i in range(start, stop):
        s = make_sample(cfg, split, i)
        data = _encode(s.image(cfg.image_size), ext)
        key = f"{i:0{width}d}"
        if cfg.format == "wds":
            meta = {"caption": s.caption, "split": split, "index": i, **s.labels}
            members += [(f"{key}.{ext}", data), (f"{key}.txt", s.caption.encode())]
            members.append((f"{key}.json", json.dumps(meta).encode()))
        else:
            (Path(out) / split / f"{key}.{ext}").write_bytes(data)
            rows.writerow({"image": f"{split}/{key}.{ext}", "caption": s.caption, **s.labels,
                           "objects": json.dumps(s.labels["objects"])})
    if cfg.format == "wds":
        _write_tar(Path(out) / split / f"{start // cfg.shard_size:05d}.tar", members)
    return split, start, stop - start, lines.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same bytes every run
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def _write_csv(path: Path, chunks: list[str], columns: tuple[str, ...]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f, lineterminator="\r\n").writerow(columns)
        f.writelines(chunks)
    os.replace(tmp, path)


def _jobs(cfg: W.SynthConfig, out: Path, workers: int) -> list[tuple]:
    jobs = []
    for split, n in cfg.split_sizes().items():
        if cfg.format == "wds":
            chunk = cfg.shard_size  # one job writes one shard
        else:  # small enough to balance the pool and keep the bar moving, big enough to amortise IPC
            chunk = min(500, max(16, math.ceil(n / (8 * workers))))
        jobs += [(cfg, split, n, s, min(s + chunk, n), str(out)) for s in range(0, n, chunk)]
    # Biggest first, so the pool does not end waiting on one long straggler.
    return sorted(jobs, key=lambda j: j[3] - j[4])


def _split_entry(cfg: W.SynthConfig, split: str, n: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"size": n, "description": W.SPLIT_DESCRIPTIONS[split]}
    if cfg.format == "wds":
        shards = math.ceil(n / cfg.shard_size)
        entry.update(shards=f"{split}/{{00000..{shards - 1:05d}}}.tar" if shards else "", num_shards=shards)
    else:
        entry.update(csv=f"{split}.csv", images=f"{split}/")
    return entry


def _is_complete(out: Path, manifest: dict[str, Any], cfg: W.SynthConfig) -> bool:
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("config") != cfg.record():
        return False
    paths = [out / p for p in manifest.get("tasks", {}).values()]
    for split, entry in manifest.get("splits", {}).items():
        if "csv" in entry:
            paths.append(out / entry["csv"])
        else:
            paths += [out / split / f"{k:05d}.tar" for k in range(entry.get("num_shards", 0))]
    return all(p.is_file() for p in paths)


def load_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The world.json of a generated world, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def generate_world(
    cfg: W.SynthConfig,
    out_dir: str | os.PathLike,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Write every split, the task files and world.json under ``out_dir``; return the manifest.

    A complete world generated earlier with an equal config is reused as is (unless ``force``).
    ``workers`` processes render in parallel (default: all CPUs; 1 renders in this process).
    Regenerating into a directory overwrites files by name; files of a larger old world stay.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    old = None if force else load_manifest(out)
    if old is not None and _is_complete(out, old, cfg):
        return old
    workers = max(1, workers if workers is not None else usable_cpus())
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten at the end
    sizes = cfg.split_sizes()
    for split in sizes:
        (out / split).mkdir(exist_ok=True)
    jobs = _jobs(cfg, out, workers)
    chunks: dict[str, dict[int, str]] = {s: {} for s in sizes}
    bar = tqdm(total=sum(sizes.values()), unit="img", desc="synth", disable=not progress, smoothing=0.1)
    try:
        if workers == 1:
            results = map(_work, jobs)
            _collect(results, chunks, bar)
        else:
            # fork: no re-import of the caller's __main__ (spawn would re-run unguarded scripts).
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
            with ctx.Pool(workers) as pool:
                _collect(pool.imap_unordered(_work, jobs), chunks, bar)
    finally:
        bar.close()
    if cfg.format == "csv":
        for split, parts in chunks.items():
            _write_csv(out / f"{split}.csv", [parts[start] for start in sorted(parts)], csv_columns(cfg))
    world = _world(cfg)
    tasks = build_tasks(cfg)
    manifest = {
        "name": "clipforge-synth",
        "version": GENERATOR_VERSION,
        "config": cfg.record(),
        "image_size": cfg.image_size,
        "attributes": {
            "colours": {k: list(v) for k, v in W.COLOURS.items()},
            "shapes": list(world.shapes),
            "sizes": dict(W.SIZE_EXTENT),
            "positions": list(W.POSITIONS),
            "relations": list(RELATION_CLASSES.values()),
            "backgrounds": {"seen": list(W.SEEN_BACKGROUNDS), "unseen": list(W.UNSEEN_BACKGROUNDS)},
            "max_objects": cfg.max_objects,
        },
        "heldout_pairs": [list(p) for p in world.heldout],
        "label_columns": list(label_columns(cfg)),
        "label_rule": label_rule(cfg),
        "splits": {s: _split_entry(cfg, s, n) for s, n in sizes.items()},
        "tasks": write_tasks(tasks, out / "tasks"),
    }
    if extra := mechanisms(world):  # absent in a plain world, which keeps its world.json bytes
        manifest["mechanisms"] = extra
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _collect(results: Any, chunks: dict[str, dict[int, str]], bar: Any) -> None:
    for split, start, count, text in results:
        chunks[split][start] = text
        bar.set_postfix_str(split, refresh=False)
        bar.update(count)
