"""Stage: JPEG files on disk -> L2-normalised embeddings, ``clipforge embed`` (the command, with
its defaults on the device: batched JPEG decoding there, fp16) against ``openclip_embed.py`` (an
OpenCLIP + Pillow ``DataLoader`` script), same ViT-B-32 weights, same files, batch and workers.

Each run is a fresh process on a fresh output folder, alternating A B / B A. Both report the time
of their pipeline alone (from listing the files to the last file written); interpreter start and
model loading are recorded too (``wall``), but stay out of the rate. Inputs: photo-sized JPEGs
(800-1500 px, ``bench_embed.make_photos``), made in parallel, then linked under more names to
reach --images files (the decoders still decode every file). The embeddings of the two sides are
compared (cosine per image). Target: clipforge >= 2x the script's images/s; where it is missed,
the profiler's table of the ops with the most CPU time in one in-process ``embed_images`` run.

--quick: ``nano`` (64 px), 8 files, no workers, one repetition.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np

# isort: off
from stagelib import GPU_DIR, ROOT, Deadline, open_clip_missing, run_stage, stage_args, target, top_ops
from common import alternate, summarize  # found through the path stagelib sets
# isort: on


def _photos(job: tuple[str, int, int]) -> list[str]:
    from bench_embed import make_photos

    folder, n, seed = job
    return [str(p) for p in make_photos(Path(folder), n, seed)]


def make_inputs(folder: Path, distinct: int, total: int, procs: int) -> list[Path]:
    """``total`` JPEG names in ``folder``: ``distinct`` photos in ``procs`` parallel chunks, hard-linked round robin."""
    procs = max(1, min(procs, distinct))
    jobs = [(str(folder / f"src{k}"), distinct // procs + (k < distinct % procs), k) for k in range(procs)]
    if procs == 1:
        made = _photos(jobs[0])
    else:
        with Pool(procs) as pool:
            made = [p for chunk in pool.map(_photos, jobs) for p in chunk]
    out = folder / "jpegs"
    out.mkdir()
    names = []
    for i in range(total):
        dst = out / f"img_{i:06d}.jpg"
        os.link(made[i % len(made)], dst)
        names.append(dst)
    return names


def run_json(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; its last stdout line that parses as a JSON object."""
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {p.returncode}: {p.stderr.strip()[-1500:]}")
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON summary from {' '.join(cmd[:4])}: {p.stdout[-500:]}")


def embeddings(side: str, out: Path, folder: Path) -> dict[str, np.ndarray]:
    """{absolute path: embedding} from one side's output folder."""
    if side == "open_clip":  # rows in the order openclip_pipeline lists the files
        emb = np.load(out / "emb.npy").astype(np.float32)
        paths = sorted(str(p.resolve()) for p in folder.glob("*.jpg"))
        return dict(zip(paths, emb))
    import pyarrow.parquet as pq

    res = {}
    for meta in sorted((out / "metadata").glob("*.parquet")):
        emb = np.load(out / "img_emb" / meta.name.replace("metadata", "img_emb").replace(".parquet", ".npy"))
        for p, e in zip(pq.read_table(meta).column("path").to_pylist(), emb.astype(np.float32)):
            res[str(Path(p).resolve())] = e
    return res


def compare(last: dict[str, Path], folder: Path) -> dict:
    """Cosine similarity of the two sides' embeddings of each file both embedded."""
    a, b = (embeddings(k, last[k], folder) for k in ("clipforge", "open_clip"))
    cos = [float(a[p] @ b[p] / np.linalg.norm(a[p]) / np.linalg.norm(b[p])) for p in b if p in a]
    return {"compared": len(cos), "cosine_min": round(min(cos), 5), "cosine_mean": round(float(np.mean(cos)), 5)}


def main(args, result: dict) -> None:
    import clipforge

    deadline = Deadline(args.budget_s)
    q = args.quick
    arch, distinct, total, batch, workers, reps = ("nano", 4, 8, 4, 0, 1) if q else ("ViT-B-32", 384, 3072, 256, 8, 3)
    missing = open_clip_missing(import_it=False)
    work = Path(tempfile.mkdtemp(prefix="clipforge-gpu-embed-"))
    try:
        files = make_inputs(work, distinct, total, 1 if q else (os.cpu_count() or 1))
        model_dir = work / "model"
        clipforge.save(clipforge.create_model(arch, seed=0), model_dir)
        folder, dev, py = work / "jpegs", str(args.device), sys.executable
        result.update(arch=arch, images=len(files), distinct_images=distinct, batch=batch, workers=workers,
                      mean_file_kb=round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1))
        loop: dict[str, list[float]] = {}  # each run's own pipeline seconds, by side
        last: dict[str, Path] = {}  # each side's latest output folder
        unreadable: dict[str, int] = {}
        runs = [0]

        def side(name: str, cmd):
            def call():
                runs[0] += 1
                out = work / "runs" / f"{name}-{runs[0]}"
                out.parent.mkdir(exist_ok=True)
                s = run_json(cmd(out), timeout=max(30.0, deadline.left()))
                n, bad = s.get("embedded", s.get("images", 0)), s.get("unreadable", 0)
                if n == 0 or n + bad != len(files):
                    raise RuntimeError(f"{name} embedded {n} of {len(files)} images: {s}")
                unreadable[name] = bad  # a file the device decoder refused is a finding, not a crash
                loop.setdefault(name, []).append(float(s["seconds"]))
                last[name] = out
            return call

        fns = {"clipforge": side("clipforge", lambda o: [
            py, "-m", "clipforge", "embed", "--model", str(model_dir), "--input", str(folder), "--out", str(o),
            "--batch-size", str(batch), "--workers", str(workers), "--device", dev, "--no-progress"])}
        if missing is None:
            fns["open_clip"] = side("open_clip", lambda o: [
                py, str(GPU_DIR / "openclip_embed.py"), "--model", str(model_dir), "--input", str(folder),
                "--out", str(o), "--batch", str(batch), "--workers", str(workers), "--device", dev])
        else:
            result["open_clip"] = {"status": "skipped", "reason": missing}
        wall: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(reps):  # A B / B A, as common.alternate orders them, stopping when time runs short
            if r and deadline.left() < 1.5 * sum(wall[k][-1] for k in names) + 15:
                break
            t = alternate({k: fns[k] for k in (names if r % 2 == 0 else names[::-1])}, reps=1, warmup=0)
            for k, v in t.items():
                wall[k] += v
        ref = "open_clip" if "open_clip" in fns else "clipforge"
        res = summarize(loop, reference=ref, work=len(files))
        res["wall"] = summarize(wall, reference=ref, work=len(files))
        res["unreadable"] = unreadable
        result["results"] = res
        if any(unreadable.values()):
            result["warnings"] = [f"{k}: {v} of {len(files)} files unreadable" for k, v in unreadable.items() if v]
        fig = result["figures"]
        for k in fns:
            fig[f"{k}_images_per_s"] = res["rate_per_s"][k]
        ratio = res["speedup_vs_open_clip"]["clipforge"] if ref == "open_clip" else None
        if ratio is not None:
            fig["speedup_vs_open_clip"] = ratio
            res["embeddings_vs_open_clip"] = compare(last, folder)
            fig["cosine_min_vs_open_clip"] = res["embeddings_vs_open_clip"]["cosine_min"]
        t = target("embed_speedup", ratio, arch, missing or "")
        if t["met"] is False and deadline.left() > 15:
            t["profile"] = {"clipforge": profile_embed(model_dir, folder, work, args.device, batch, workers)}
        result["targets"].append(t)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile_embed(model_dir: Path, folder: Path, work: Path, device, batch: int, workers: int) -> str:
    """Top ops by CPU time (the main process's waits for decoded batches included) of one
    in-process ``embed_images`` run with the settings the command used."""
    import clipforge
    from clipforge.search import sources
    from clipforge.search.embed import EmbedConfig, embed_images

    model, _ = clipforge.load(str(model_dir))
    table = sources.list_images(sources.InputSpec(str(folder)))
    cfg = EmbedConfig(batch_size=batch, num_workers=workers, device=str(device), progress=False)
    count = [0]

    def run():
        count[0] += 1
        embed_images(model, table, work / "profile" / str(count[0]), cfg)

    return top_ops(run, device, calls=1, sort_by="cpu_time_total")


if __name__ == "__main__":
    run_stage(main, stage_args(__doc__))
