"""Which registered families export to ONNX: one architecture per family, random weights, through
``export_onnx`` (which runs both graphs against PyTorch before keeping them) and ``quantize_export``.

    .venv/bin/python benchmarks/onnx_families.py                    # the default list below
    .venv/bin/python benchmarks/onnx_families.py --models RN50 coca_ViT-B-32

Families whose tokenizer lives on the Hugging Face hub (SigLIP's SentencePiece) are given a small local
SentencePiece model (tests/support/tokenizers.py) so the sweep runs offline; OpenCLIP's Hugging Face
text towers named by hub id (RoBERTa, XLM-R, mT5, NLLB) need their config files from the hub and are
left out offline (tiny-minilm covers a Hugging Face text tower). Records cosines, largest difference,
export seconds, int8 precision and its cosine to fp32, or the one-line error, per architecture.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))
from common import print_table, write_record  # noqa: E402

DEFAULT = ["ViT-B-32", "RN50", "tiny-coca", "tiny-minilm", "tiny-siglip", "PE-Core-T-16-384", "MobileCLIP2-S0",
           "convnext_tiny", "ViTamin-S", "EVA02-B-16", "swin_base_patch4_window7_224",
           "vit_relpos_medium_patch16_cls_224", "ViT-B-16-SigLIP", "coca_ViT-B-32"]


def build(name: str, tok_dir: Path):
    import clipforge
    from clipforge.model.hf_tokenizer import with_local_tokenizer
    from clipforge.model.registry import get_config

    cfg = get_config(name)
    if cfg.text.hf_tokenizer_name is not None and cfg.text.hf_model is None:
        cfg = with_local_tokenizer(cfg, tok_dir)  # offline: a small SentencePiece model stands in
    return clipforge.create_model(cfg, seed=0).eval()


def sweep(name: str, work: Path, tok_dir: Path) -> dict:
    import json

    from clipforge.errors import ClipforgeError
    from clipforge.model.onnx_export import export_onnx, quantize_export

    t0 = time.perf_counter()
    try:
        model = build(name, tok_dir)
        out = export_onnx(model, work / name)
        seconds = time.perf_counter() - t0
        check = json.loads((out / "onnx.json").read_text())["check"]
        int8 = json.loads((quantize_export(out, work / f"{name}-int8") / "onnx.json").read_text())
    except ClipforgeError as e:
        return {"exported": False, "error": str(e), "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"exported": True, "seconds": round(seconds, 1), "params_m": round(model.num_params() / 1e6, 1),
            **{k: check[k] for k in ("image_cosine_min", "text_cosine_min", "max_abs_diff")},
            "int8_precision": int8["precision"], "int8_cosine_min_vs_fp32": int8["quantization"]["cosine_min_vs_fp32"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from support.tokenizers import sentencepiece_dir

    root = Path(tempfile.mkdtemp(prefix="cf-onnx-families-"))
    tok_dir = sentencepiece_dir(root)
    results = {}
    for name in args.models:
        results[name] = sweep(name, root / "work", tok_dir)
        print(name, results[name], flush=True)
    shutil.rmtree(root, ignore_errors=True)
    rows = [(n, "yes" if r["exported"] else "NO", r.get("image_cosine_min", "-"), r.get("text_cosine_min", "-"),
             r.get("max_abs_diff", "-"), r.get("int8_precision", "-"), r["seconds"]) for n, r in results.items()]
    table = print_table(rows, ("architecture", "exports", "image cos", "text cos", "max abs diff", "int8", "s"))
    errors = {n: r["error"] for n, r in results.items() if not r["exported"]}
    path = write_record("onnx_families", {"setup": "random weights (seed 0), fp32 export checked against PyTorch "
                                          "on probe images and texts, then int8", "results": results,
                                          "errors": errors, "table": table}, "cpu", args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
