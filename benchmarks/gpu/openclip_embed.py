"""The reference side of the embedding stage: JPEG files -> L2-normalised embeddings the way an
OpenCLIP user writes it (``open_clip.transform.image_transform`` on ``PIL.Image.open`` in a
``DataLoader``, ``encode_image`` under fp16 autocast on CUDA, ``F.normalize``, ``np.save``:
``bench_embed.openclip_pipeline``), with the weights of a clipforge model directory copied into
the same OpenCLIP architecture.

    python benchmarks/gpu/openclip_embed.py --model MODEL_DIR --input JPEG_DIR --out OUT_DIR \\
        --batch 256 --workers 8 --device cuda

Prints one JSON line: {"images": n, "seconds": s}, where s times the pipeline alone (listing,
decoding, the model, writing), as ``clipforge embed`` reports its own; loading the model and
starting the interpreter are left out on both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common, bench_embed

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a clipforge model directory (config.json + model.safetensors)")
    ap.add_argument("--input", required=True, type=Path, help="folder of .jpg files")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from bench_embed import openclip_pipeline
    from common import openclip_twin

    import clipforge

    device = torch.device(args.device)
    model, _ = clipforge.load(args.model)
    ref = openclip_twin(model).to(device).eval()
    size = model.config.preprocess.image_size
    del model
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emb = openclip_pipeline(ref, args.input, args.out, args.batch, args.workers, size, device)
    print(json.dumps({"images": int(emb.shape[0]), "seconds": round(time.perf_counter() - t0, 4)}))


if __name__ == "__main__":
    main()
