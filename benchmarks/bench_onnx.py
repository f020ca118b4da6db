"""The ONNX runtime on the CPU (``clipforge convert --to onnx``, ``--runtime onnx``) against PyTorch and
OpenCLIP: image embedding from JPEG files, and the latency of text queries to ``/search``.

    .venv/bin/python benchmarks/bench_onnx.py embed --setups ViT-B-32 small --images 64 --reps 3 --threads 1
    .venv/bin/python benchmarks/bench_onnx.py query --setup ViT-B-32 --queries 300 --threads 1
    .venv/bin/python benchmarks/bench_onnx.py accuracy --model runs/tiny/final --world demo_out/world

``embed``: JPEG files on disk -> L2-normalised embeddings (the photos of bench_embed.py), same weights,
batch, DataLoader workers and model threads on every side:
  open_clip    the pipeline people write with OpenCLIP: its eval transform on ``PIL.Image.open`` in a
               ``DataLoader``, ``encode_image``, normalise, ``np.save`` (bench_embed.openclip_pipeline)
  torch-fp32   ``clipforge.search.embed.embed_images`` with the PyTorch model (what ``clipforge embed`` ran before)
  onnx-fp32    the same with the model's ONNX export (``clipforge embed --runtime onnx``)
  onnx-int8    the same with the export's int8 weights (``clipforge convert --to onnx --quantize int8``)
  onnx-int8-static  int8 with activation scales calibrated on 32 other JPEGs (``--quantize int8-static``)
  torch-bf16   PyTorch under bf16 autocast (``clipforge embed --precision bf16``; AMX on recent Xeons)
Setups: ``ViT-B-32`` (224 px; on a CPU the network dominates) and ``small`` (the registered 64 px ViT:
the input pipeline dominates). Random weights (seed 0); embeddings are compared with OpenCLIP's and
torch-fp32's (cosine per image).

``query``: ``clipforge serve`` processes, one per runtime (torch fp32, onnx fp32, onnx int8), over one
index of synthetic unit vectors carrying the model's fingerprint; one client sends ``POST /search
{"text", "k": 10}`` with distinct captions (2-14 words), one request at a time, in blocks that
alternate between the servers (A B C / C B A). Reports p50/p99/mean latency per runtime, and the text
tower alone in this process (batch of one caption) for each.

``accuracy``: zero-shot accuracy per data-world task and retrieval recall@1 of a trained model through
``clipforge eval``, with the PyTorch model (fp32, and bf16 autocast: ``--precision bf16``), its fp32
export and its int8 exports (dynamic, and static
calibrated on ``--calibration``, by default the world's val split: images and captions the test split
does not hold).

Every server and model uses ``--threads`` threads (torch's and ONNX Runtime's intra-op threads).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE / "faults"))
from bench_embed import make_photos, openclip_pipeline  # noqa: E402
from common import alternate, openclip_twin, percentile, print_table, summarize, write_record  # noqa: E402

WORDS = ["a", "photo", "of", "the", "red", "small", "dog", "cat", "bicycle", "on", "beach", "at", "night", "two",
         "people", "walking", "in", "city", "old", "house", "near", "river", "with", "trees", "blue", "car", "sketch"]


def exports(model, root: Path, calibration: Path | None = None) -> dict[str, Path]:
    """fp32 and int8 ONNX exports of ``model`` (checked against it as they are written), with export
    seconds; a statically quantised one too, given a calibration folder or CSV."""
    from clipforge.model.onnx_export import export_onnx, quantize_export
    from clipforge.model.onnx_static import read_calibration

    t0 = time.perf_counter()
    fp32 = export_onnx(model, root / "onnx-fp32")
    t1 = time.perf_counter()
    paths = {"onnx-fp32": fp32, "onnx-int8": quantize_export(fp32, root / "onnx-int8")}
    t2 = time.perf_counter()
    print(f"  export {t1 - t0:.1f} s, int8 {t2 - t1:.1f} s", flush=True)
    if calibration is not None:
        cal = read_calibration(calibration, model.config.preprocess)
        paths["onnx-int8-static"] = quantize_export(fp32, root / "onnx-int8-static", calibration=cal)
        print(f"  int8-static {time.perf_counter() - t2:.1f} s", flush=True)
    return paths


def embed_with(model, folder: Path, out: Path, batch: int, workers: int, precision: str) -> np.ndarray:
    from clipforge.search.embed import EmbedConfig, embed_images
    from clipforge.search.sources import InputSpec, list_images

    table = list_images(InputSpec(str(folder)))
    cfg = EmbedConfig(batch_size=batch, num_workers=workers, device="cpu", precision=precision, decode="pil",
                      progress=False)
    s = embed_images(model, table, out, cfg)
    assert s.embedded == table.num_rows and s.unreadable == 0, s
    return np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])


def _cosines(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float32), b.astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 6),
            "max_abs_diff": round(float(np.abs(a - b).max()), 5)}


def _model(name: str):
    import clipforge

    if name not in ("ViT-B-32", "small"):
        raise SystemExit(f"unknown setup {name!r}")
    return clipforge.create_model(name, seed=0).eval()


def run_embed(name: str, args) -> dict:
    from clipforge.model.onnx_runtime import load_onnx

    photos = make_photos(args.cache / f"n{args.images}-s{args.seed}", args.images, args.seed)
    folder = photos[0].parent
    work = Path(tempfile.mkdtemp(prefix="cf-bench-onnx-"))
    model = _model(name)
    ref = openclip_twin(model).eval()
    size = model.config.preprocess.image_size
    print(f"{name}: exporting ...", flush=True)
    calib = make_photos(args.cache / f"calib-n32-s{args.seed + 1}", 32, args.seed + 1)[0].parent  # not the timed files
    paths = exports(model, work, calib if args.static else None)
    models = {"torch-fp32": (model, "fp32"), "torch-bf16": (model, "bf16")}
    models.update({k: (load_onnx(p, args.threads), "fp32") for k, p in paths.items()})
    models = {k: models[k] for k in ("torch-fp32", "onnx-fp32", "onnx-int8", "onnx-int8-static", "torch-bf16")
              if k in models}
    if not args.bf16:
        models.pop("torch-bf16")
    warm = work / "warm"
    warm.mkdir()
    for p in photos[: args.batch]:  # warm-up set: one batch (thread pools, allocator, worker start)
        (warm / p.name).symlink_to(p)
    outputs: dict[str, np.ndarray] = {}
    state = {"warming": True, "run": 0}
    b, w = args.batch, args.workers

    def side(key, fn):
        def go():
            state["run"] += 1
            out = work / f"run{state['run']}"
            out.mkdir()
            emb = fn(warm if state["warming"] else folder, out)
            if not state["warming"]:
                outputs[key] = emb
            shutil.rmtree(out, ignore_errors=True)
        return go

    sides = {"open_clip": side("open_clip", lambda f, o: openclip_pipeline(ref, f, o, b, w, size, torch.device("cpu")))}
    for key, (m, precision) in models.items():
        sides[key] = side(key, lambda f, o, m=m, p=precision: embed_with(m, f, o, b, w, p))
    for fn in sides.values():
        fn()
    state["warming"] = False
    times = alternate(sides, reps=args.reps, warmup=0)
    res = summarize(times, reference="open_clip", work=len(photos))
    res["vs_open_clip"] = {k: _cosines(v, outputs["open_clip"]) for k, v in outputs.items() if k != "open_clip"}
    res["vs_torch_fp32"] = {k: _cosines(v, outputs["torch-fp32"]) for k, v in outputs.items()
                            if k not in ("open_clip", "torch-fp32")}
    res["speedup_vs_torch_fp32"] = {k: round(res["median_s"]["torch-fp32"] / v, 3) for k, v in res["median_s"].items()}
    res["export_sizes_mb"] = {k: {f.name: round(f.stat().st_size / 2**20, 1) for f in sorted(p.glob("*.onnx"))}
                              for k, p in paths.items()}
    res.update(setup=name, images=len(photos), image_size=size, batch=b, workers=w)
    shutil.rmtree(work, ignore_errors=True)
    rows = [(k, f"{res['median_s'][k]:.2f}", f"{res['rate_per_s'][k]:.1f}", f"{res['speedup_vs_open_clip'][k]:.2f}x",
             f"{res['paired_speedup_median'][k]:.2f}x", f"{res['speedup_vs_torch_fp32'][k]:.2f}x",
             f"{res['vs_open_clip'][k]['cosine_min']:.4f}" if k in res["vs_open_clip"] else "-")
            for k in res["median_s"]]
    print(f"\n{name}: {len(photos)} JPEGs, {size} px, batch {b}, {w} workers, {args.threads} thread(s), "
          f"{args.reps} reps")
    res["table"] = print_table(rows, ("side", "median s", "images/s", "vs open_clip", "paired", "vs torch-fp32",
                                      "min cos vs OC"))
    return res


# -- text queries to /search ---------------------------------------------------------------------

def captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) + f" {i}" for i in range(n)]


def _servers(model, work: Path, args) -> dict:
    import clipforge
    from clipforge.model.identity import model_fingerprint
    from clipforge.search.build import build_or_update
    from clipforge.search.index import IndexConfig
    from harness import start_server
    from support.search import write_synthetic_embeddings

    paths = {"torch-fp32": clipforge.save(model, work / "torch"), **exports(model, work)}
    write_synthetic_embeddings(work / "emb", rows=args.items, part_size=10_000, dim=model.config.embed_dim,
                               fingerprint=model_fingerprint(model))
    build_or_update([str(work / "emb")], work / "index", IndexConfig(kind="flat", progress=False))
    runtime = {"torch-fp32": "torch", "onnx-fp32": "onnx", "onnx-int8": "onnx"}
    return {k: start_server(work / "index", p, work / "logs", ["--threads", str(args.threads), "--runtime", runtime[k]])
            for k, p in paths.items()}


def encoder_ms(model_or_path, texts: list[str], threads: int) -> float:
    """Median milliseconds of the text tower alone on one caption, in this process."""
    import clipforge

    model = clipforge.load(model_or_path)[0] if isinstance(model_or_path, Path) else model_or_path
    tokenize = clipforge.tokenizer_for(model)
    tokens = [tokenize([t]) for t in texts]
    times = []
    with torch.no_grad():
        for t in tokens[:10] + tokens:
            t0 = time.perf_counter()
            model.encode_text(t)
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times[10:]) * 1000, 2)


def run_query(args) -> dict:
    import httpx

    model = _model(args.setup)
    work = Path(tempfile.mkdtemp(prefix="cf-bench-query-"))
    servers = _servers(model, work, args)
    texts = captions(args.queries, args.seed)
    lat: dict[str, list[float]] = {k: [] for k in servers}
    try:
        clients = {k: httpx.Client(base_url=url, timeout=60) for k, (_, url) in servers.items()}
        health = {k: c.get("/health").json() for k, c in clients.items()}
        for k, c in clients.items():  # warm-up: first requests load lazily imported code
            for t in texts[:10]:
                c.post("/search", json={"text": "warm " + t, "k": 10}).raise_for_status()
        names, block = list(servers), args.block
        for r, start in enumerate(range(0, len(texts), block)):
            for k in names if r % 2 == 0 else names[::-1]:
                for t in texts[start : start + block]:
                    t0 = time.perf_counter()
                    clients[k].post("/search", json={"text": t, "k": 10}).raise_for_status()
                    lat[k].append((time.perf_counter() - t0) * 1000)
    finally:
        for proc, _ in servers.values():
            proc.p.terminate()
            proc.wait(30)
    enc = {"torch-fp32": encoder_ms(model, texts[:100], args.threads)}
    enc.update({k: encoder_ms(work / k, texts[:100], args.threads) for k in ("onnx-fp32", "onnx-int8")})
    shutil.rmtree(work, ignore_errors=True)
    res = {"setup": args.setup, "queries": len(texts), "items": args.items, "block": args.block,
           "health": {k: {f: h.get(f) for f in ("runtime", "precision", "index", "model_matches_index")}
                      for k, h in health.items()},
           "latency_ms": {k: {"p50": round(percentile(v, 50), 2), "p99": round(percentile(v, 99), 2),
                              "mean": round(statistics.fmean(v), 2)} for k, v in lat.items()},
           "text_tower_ms_one_caption": enc}
    rows = [(k, v["p50"], v["p99"], v["mean"], enc[k]) for k, v in res["latency_ms"].items()]
    print(f"\n{args.setup}: POST /search text, {len(texts)} queries per runtime, {args.items} items, "
          f"{args.threads} thread(s)")
    res["table"] = print_table(rows, ("runtime", "p50 ms", "p99 ms", "mean ms", "text tower alone ms"))
    return res


# -- accuracy on the data world -------------------------------------------------------------------

TASKS = ("colour", "shape", "size", "position", "count")


def run_accuracy(args) -> dict:
    """Zero-shot accuracy per data-world task and retrieval recall@1 of a trained model, through
    ``clipforge eval`` with each runtime: the PyTorch model (fp32, and bf16 autocast), its fp32
    export, its int8 exports."""
    import json

    import clipforge
    from clipforge.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="cf-bench-acc-"))
    model = clipforge.load(args.model)[0]
    calibration = args.calibration or args.world / "val.csv"
    paths = {"torch-fp32": args.model, "torch-bf16": args.model, **exports(model, work, calibration)}
    test = args.world / "test.csv"
    metrics: dict[str, dict[str, float]] = {k: {} for k in paths}
    for runtime, path in paths.items():
        for task in TASKS:
            out = work / f"{runtime}-{task}.json"
            assert cli(["eval", "zeroshot", "--model", str(path), "--data", str(test), "--task", task, "--out",
                        str(out), "--device", "cpu", "--no-progress", *_precision(runtime)]) == 0
            metrics[runtime][f"zeroshot_{task}_acc1"] = json.loads(out.read_text())["metrics"]["acc1"]
        out = work / f"{runtime}-retrieval.json"
        assert cli(["eval", "retrieval", "--model", str(path), "--data", str(test), "--out", str(out), "--device",
                    "cpu", "--no-progress", *_precision(runtime)]) == 0
        m = json.loads(out.read_text())["metrics"]
        metrics[runtime].update({k: m[k] for k in ("image_retrieval_recall@1", "text_retrieval_recall@1")})
    manifests = {k: json.loads((p / "onnx.json").read_text()) for k, p in paths.items() if k.startswith("onnx")}
    shutil.rmtree(work, ignore_errors=True)
    ref = metrics["torch-fp32"]
    int8 = [k for k in paths if k.startswith("onnx-int8")]
    lower = ["torch-bf16", *int8]  # the sides compared with torch fp32
    res = {"model": str(args.model), "world": str(args.world), "calibration": str(calibration), "metrics": metrics,
           "points_vs_torch_fp32": {k: {m: round(100 * (v[m] - ref[m]), 2) for m in ref} for k, v in metrics.items()},
           "int8_precision": {k: manifests[k]["precision"] for k in int8},
           "int8_cosine_min_vs_fp32_on_probes": {k: manifests[k]["quantization"]["cosine_min_vs_fp32"] for k in int8},
           "fp32_check": manifests["onnx-fp32"]["check"]}
    rows = [(m, *(f"{100 * metrics[k][m]:.2f}" for k in paths),
             *(f"{res['points_vs_torch_fp32'][k][m]:+.2f}" for k in lower)) for m in ref]
    print(f"\n{args.model} on {test} (percent)")
    res["table"] = print_table(rows, ("metric", *paths, *(f"{k} - torch-fp32 (points)" for k in lower)))
    return res


def _precision(runtime: str) -> list[str]:
    return ["--precision", "bf16"] if runtime == "torch-bf16" else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["embed", "query", "accuracy"])
    ap.add_argument("--setups", nargs="+", default=["ViT-B-32", "small"], help="embed: models")
    ap.add_argument("--setup", default="ViT-B-32", help="query: the model")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for every side")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="embed: leave out the torch-bf16 side")
    ap.add_argument("--no-static", dest="static", action="store_false",
                    help="embed: leave out the onnx-int8-static side")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="accuracy: calibration images/captions for int8-static (default: WORLD/val.csv)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--block", type=int, default=20, help="query: requests per server before switching")
    ap.add_argument("--items", type=int, default=10_000, help="query: vectors in the index (exact search)")
    ap.add_argument("--threads", type=int, default=1, help="model threads (torch and ONNX Runtime), every side")
    ap.add_argument("--model", type=Path, default=None, help="accuracy: a trained model directory")
    ap.add_argument("--world", type=Path, default=None, help="accuracy: the data world (clipforge data synth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "clipforge-bench-photos")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "embed":
        results = {name: run_embed(name, args) for name in args.setups}
        record = {"setup": "JPEG files on disk -> L2-normalised embeddings; same weights, batch, workers and model "
                  f"threads ({args.threads}) on every side; random weights (seed 0)",
                  "method": "one warm-up run per side on one batch of images, then alternating runs over all "
                  "images (A B C / C B A), medians; fresh output directory per run", "results": results}
    elif args.part == "accuracy":
        record = {"setup": "clipforge eval zeroshot (per task) and eval retrieval on the data world's test split, "
                  "one model through each runtime", "results": run_accuracy(args)}
    else:
        record = {"setup": f"one client, sequential POST /search text queries, {args.threads} model thread(s) per "
                  "server; servers alternate in blocks", "results": run_query(args)}
    path = write_record(f"onnx_{args.part}", record, "cpu", args.out,
                        code_paths=("src/clipforge/model", "src/clipforge/search"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
