"""Batch embedding throughput from JPEG files on disk to L2-normalised embeddings: clipforge's
``embed_images`` against the pipeline people write with OpenCLIP (its eval preprocess in a
Pillow ``DataLoader``), same model weights, same batch size, same CPU workers.

    .venv/bin/python benchmarks/bench_embed.py                          # both setups, 400 photos
    .venv/bin/python benchmarks/bench_embed.py --setups ViT-B-32 --images 160 --reps 3

Inputs: photo-sized JPEGs (long side 800-1500 px, quality 85-95, some progressive, some
greyscale) made from scikit-image's bundled pictures: random crops, rescaled, recoloured,
with film-grain noise so that they compress like photographs. Generated once, then cached
under --cache (the page cache is warm for both sides).

Sides (each run = list the folder, decode, preprocess, encode, normalise, store):
  open_clip         ``open_clip.transform.image_transform(size, is_train=False)`` on
                    ``PIL.Image.open`` in a DataLoader; ``model.encode_image``; F.normalize; np.save
  clipforge         ``clipforge.search.embed.embed_images`` (decode="pil", draft=True): JPEG draft
                    decoding (libjpeg scales by 1/2..1/8 inside the DCT, keeping both sides >= the
                    target), bicubic resampling of the center crop only, uint8 chunks of
                    batch / (2 x workers) images in shared memory, joined into model batches in
                    the main process and normalised there in place into one reused float buffer,
                    float16 parts + Parquet metadata
  clipforge-nodraft the same without draft decoding and crop-only resampling (ablation): its
                    pixels are OpenCLIP's exactly

Setups: ``ViT-B-32`` (the full model: on a CPU the network itself dominates), and
``pipeline-224`` (a one-layer, 64-wide ViT fed 224 px: the model costs ~nothing, so the
figure is the input pipeline's, as on a GPU where decoding is the limit).
Embeddings are compared against the OpenCLIP pipeline's (cosine similarity per image).

Also recorded, in one process without a DataLoader: milliseconds per image of the per-worker
work alone (file -> preprocessed pixels): OpenCLIP's transform (float, normalised) against
clipforge's ``decode.ImageDataset`` item (uint8; normalisation happens later, batched, on the
embedding device). With a GPU doing the model this is the part that sets the pace.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, openclip_twin, print_table, summarize, write_record  # noqa: E402

SOURCES_RGB = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "colorwheel")
SOURCES_GREY = ("camera", "grass", "gravel", "brick", "moon", "coins")
ASPECTS = (4 / 3, 3 / 2, 1.0, 3 / 4, 16 / 9, 2 / 3)


def make_photos(out: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of 800-1500 px on the long side (cached: reused when already there)."""
    from PIL import Image
    from skimage import data

    done = out / f".complete-{n}-{seed}"
    if done.exists():
        return sorted(out.glob("*.jpg"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    srcs = {k: getattr(data, k)() for k in SOURCES_RGB + SOURCES_GREY}
    for i in range(n):
        grey = rng.random() < 0.25
        name = rng.choice(SOURCES_GREY if grey else SOURCES_RGB)
        a = srcs[name]
        a = np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))  # random crop
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        long_side = int(rng.integers(800, 1501))
        aspect = ASPECTS[rng.integers(len(ASPECTS))]
        size = (long_side, int(long_side / aspect)) if aspect >= 1 else (int(long_side * aspect), long_side)
        im = Image.fromarray(np.ascontiguousarray(a[y : y + ch, x : x + cw])).resize(size, Image.BICUBIC)
        px = np.asarray(im, np.float32) * rng.uniform(0.75, 1.25, 3) + rng.uniform(-20, 20)  # recolour
        px += rng.normal(0, rng.uniform(2, 6), px.shape)  # grain: photo-like file sizes
        im = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
        if grey and rng.random() < 0.5:
            im = im.convert("L")
        im.save(out / f"photo_{i:05d}.jpg", quality=int(rng.integers(85, 96)), progressive=bool(rng.random() < 0.15))
    done.touch()
    return sorted(out.glob("*.jpg"))


def setup_model(name: str):
    import clipforge
    from clipforge.config import VisionConfig
    from clipforge.model.registry import get_config

    cfg = get_config("ViT-B-32")
    if name == "pipeline-224":
        tiny = get_config("nano")
        cfg = tiny.replace(name=name, vision=VisionConfig(image_size=224, width=64, layers=1, patch_size=32, heads=1),
                           preprocess=None)
    elif name != "ViT-B-32":
        raise SystemExit(f"unknown setup {name!r}")
    model = clipforge.create_model(cfg, seed=0).eval()
    return model, openclip_twin(model).eval()


class _OpenClipFiles(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.open(self.paths[i]))


def openclip_pipeline(ref, folder: Path, out: Path, batch: int, workers: int, size: int, device) -> np.ndarray:
    from open_clip.transform import image_transform

    paths = sorted(str(p.resolve()) for p in folder.glob("*.jpg"))
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(_OpenClipFiles(paths, image_transform(size, is_train=False)),
                                         batch_size=batch, num_workers=workers, pin_memory=cuda)
    feats = []
    amp = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()  # as clipforge on CUDA
    with torch.no_grad(), amp:
        for x in loader:
            f = ref.encode_image(x.to(device, non_blocking=True)).float()  # [B, E]
            feats.append(F.normalize(f, dim=-1).half().cpu().numpy())
    emb = np.concatenate(feats)
    np.save(out / "emb.npy", emb)
    return emb


def clipforge_pipeline(model, folder: Path, out: Path, batch: int, workers: int, draft: bool, device) -> np.ndarray:
    from clipforge.search.embed import EmbedConfig, embed_images
    from clipforge.search.sources import InputSpec, list_images

    table = list_images(InputSpec(str(folder)))
    cuda = device.type == "cuda"  # on CUDA: fp16 and batched nvJPEG decoding, embed_images' defaults there
    cfg = EmbedConfig(batch_size=batch, num_workers=workers, device=str(device), precision="fp16" if cuda else "fp32",
                      decode="auto" if cuda else "pil", draft=draft, progress=False)
    s = embed_images(model, table, out, cfg)
    assert s.embedded == table.num_rows and s.unreadable == 0, s
    return np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])


def per_image_costs(photos: list[Path], size: int, reps: int) -> dict:
    """Per-worker work per image, both sides in this process, alternating, medians."""
    from open_clip.transform import image_transform
    from PIL import Image

    from clipforge.config import PreprocessConfig
    from clipforge.search import decode

    paths = [str(p) for p in photos]
    oc = image_transform(size, is_train=False)
    cf = decode.ImageDataset(paths, None, None, PreprocessConfig(image_size=size), "pil", True)
    cf_full = decode.ImageDataset(paths, None, None, PreprocessConfig(image_size=size), "pil", False)
    sides = {
        "open_clip": lambda: [oc(Image.open(p)) for p in paths],
        "clipforge": lambda: [cf[i] for i in range(len(paths))],
        "clipforge-nodraft": lambda: [cf_full[i] for i in range(len(paths))],
    }
    res = summarize(alternate(sides, reps=reps, warmup=1), reference="open_clip", work=len(paths))
    res["ms_per_image"] = {k: round(1000 / v, 2) for k, v in res.pop("rate_per_s").items()}
    res["images"] = len(paths)
    return res


def run_setup(name: str, args) -> dict:
    photos = make_photos(args.cache, args.images, args.seed)
    folder = args.cache
    warm_dir = Path(tempfile.mkdtemp(prefix="cf-embed-warm-"))
    for p in photos[: args.batch]:  # warm-up set: one batch (thread pools, allocator, worker start)
        (warm_dir / p.name).symlink_to(p)
    model, ref = setup_model(name)
    model, ref = model.to(args.device), ref.to(args.device)
    size = model.config.preprocess.image_size
    scratch = Path(tempfile.mkdtemp(prefix="cf-embed-"))
    outputs: dict[str, np.ndarray] = {}
    counter = [0]

    def fresh() -> Path:  # a new output directory per run (an existing one would be resumed)
        counter[0] += 1
        d = scratch / f"run{counter[0]}"
        d.mkdir()
        return d

    def side(key, fn):
        def run():
            src = folder if not warming[0] else warm_dir
            out = fn(src, fresh())
            if not warming[0]:
                outputs[key] = out
            shutil.rmtree(scratch / f"run{counter[0]}", ignore_errors=True)
        return run

    warming = [True]
    b, w, dev = args.batch, args.workers, args.device
    sides = {
        "open_clip": side("open_clip", lambda f, o: openclip_pipeline(ref, f, o, b, w, size, dev)),
        "clipforge": side("clipforge", lambda f, o: clipforge_pipeline(model, f, o, b, w, True, dev)),
    }
    if args.ablations:
        sides["clipforge-nodraft"] = side(
            "clipforge-nodraft", lambda f, o: clipforge_pipeline(model, f, o, b, w, False, dev))
    for fn in sides.values():
        fn()
    warming[0] = False
    times = alternate(sides, reps=args.reps, warmup=0, device=args.device)
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(warm_dir, ignore_errors=True)
    res = summarize(times, reference="open_clip", work=len(photos))
    ref_emb = outputs["open_clip"].astype(np.float32)
    res["embeddings_vs_open_clip"] = {}
    for k, e in outputs.items():
        if k == "open_clip":
            continue
        cos = (e.astype(np.float32) * ref_emb).sum(1) / np.linalg.norm(e.astype(np.float32), axis=1) \
            / np.linalg.norm(ref_emb, axis=1)
        res["embeddings_vs_open_clip"][k] = {"cosine_min": round(float(cos.min()), 5),
                                             "cosine_mean": round(float(cos.mean()), 5),
                                             "max_abs_diff": float(np.abs(e.astype(np.float32) - ref_emb).max())}
    if args.per_image:
        res["per_image_worker_cost"] = per_image_costs(photos[: args.per_image], size, max(3, args.reps))
    sizes = [p.stat().st_size for p in photos]
    res.update(setup=name, images=len(photos), batch=args.batch, workers=args.workers, image_size=size,
               model_config=model.config.to_dict(), mean_file_kb=round(sum(sizes) / len(sizes) / 1024, 1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", nargs="+", default=["pipeline-224", "ViT-B-32"])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for every side")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the model runs (cuda: fp16, clipforge decodes with nvJPEG)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process (the model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-image", type=int, default=80, help="images for the per-image cost table (0: skip)")
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "clipforge-bench-photos")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.cache = args.cache / f"n{args.images}-s{args.seed}"
    args.device = torch.device(args.device)

    results = {}
    for name in args.setups:
        r = run_setup(name, args)
        results[name] = r
        print(f"\n{name}: {r['images']} JPEGs (mean {r['mean_file_kb']} kB), {r['image_size']} px input, "
              f"batch {args.batch}, {args.workers} workers, {args.reps} reps")
        rows = [(k, f"{r['median_s'][k]:.2f}", f"{r['rate_per_s'][k]:.1f}", f"{r['speedup_vs_open_clip'][k]:.2f}x",
                 f"{r['paired_speedup_median'][k]:.2f}x",
                 f"{r['embeddings_vs_open_clip'][k]['cosine_min']:.4f}" if k in r["embeddings_vs_open_clip"] else "-")
                for k in r["median_s"]]
        r["table"] = print_table(rows, ("side", "median s", "images/s", "vs open_clip", "paired", "min cos vs OC"))
        if "per_image_worker_cost" in r:
            c = r["per_image_worker_cost"]
            print(f"per-image worker work ({c['images']} images, one process, {c['reps']} reps):")
            r["per_image_table"] = print_table(
                [(k, f"{c['ms_per_image'][k]:.2f}", f"{c['speedup_vs_open_clip'][k]:.2f}x",
                  f"{c['paired_speedup_median'][k]:.2f}x") for k in c["ms_per_image"]],
                ("side", "ms/image", "vs open_clip", "paired"))
    record = {
        "setup": "JPEG files on disk -> L2-normalised embeddings; same weights, batch, workers and main-process "
        "threads on every side; fp32 on CPU (fp16 autocast on CUDA, both sides)",
        "method": "one warm-up run per side on one batch of images, then alternating A B C / C B A runs over all "
        "images, medians; fresh output directory per run",
        "results": results,
    }
    path = write_record("embed", record, args.device, args.out,
                        code_paths=("src/clipforge/model", "src/clipforge/search"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
