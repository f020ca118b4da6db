"""``clipforge models``: list the registered architectures with their sizes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list registered architectures", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from clipforge.errors import ClipforgeError
    from clipforge.model.clip import CLIP
    from clipforge.model.registry import get_config, list_models

    rows = []
    for name in list_models():
        cfg = get_config(name)
        try:
            with torch.device("meta"):  # counts parameters without allocating them
                params: float | None = round(CLIP(cfg).num_params() / 1e6, 2)
            note = ""
        except ClipforgeError as e:  # a Hugging Face text tower whose package is not installed
            params, note = None, str(e)
        tower = f"ViT/{cfg.vision.patch_size} x{cfg.vision.layers}" if cfg.vision.arch == "vit" else (
            "ResNet " + "-".join(map(str, cfg.vision.resnet_layers)))
        if cfg.vision.arch == "vit" and cfg.vision.stem == "conv":
            tower += " conv stem" + (" |x|" if cfg.vision.stem_act == "abs" else "")
        rows.append({"name": name, "image_tower": tower, "text_tower": _text_tower(cfg.text),
                     "image_size": cfg.vision.image_size, "embed_dim": cfg.embed_dim, "params_m": params,
                     "quick_gelu": cfg.quick_gelu, **({"unavailable": note} if note else {})})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14}{'image tower':<22}{'px':>5}{'embed':>7}{'params (M)':>12}  activation  text tower")
    for r in rows:
        act = "QuickGELU" if r["quick_gelu"] else "GELU"
        params = f"{r['params_m']:.2f}" if r["params_m"] is not None else "-"
        text = r["text_tower"] + (f" (unavailable: {r['unavailable']})" if "unavailable" in r else "")
        print(f"{r['name']:<14}{r['image_tower']:<22}{r['image_size']:>5}{r['embed_dim']:>7}{params:>12}  "
              f"{act:<10}  {text}")
    return 0


def _text_tower(text) -> str:
    """'clip x12' (CLIP's transformer, end-token pooled), 'clip x2 mean', 'bag of words', or the HF encoder."""
    if text.hf_model:
        return text.hf_model
    if text.layers == 0:
        return "bag of words"
    return f"clip x{text.layers}" + (" mean" if text.pool == "mean" else "")
