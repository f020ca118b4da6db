"""``clipforge models``: list the registered architectures with their sizes.

    clipforge models                 # every architecture
    clipforge models siglip          # names containing 'siglip' (case-insensitive)
    clipforge models --params        # also count the parameters of timm towers (builds each: slower)
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list registered architectures", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filter", nargs="?", default=None, help="only names containing this text")
    parser.add_argument("--params", action="store_true",
                        help="count the parameters of timm image towers too (timm builds each one: ~20 s for all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from clipforge.model.registry import get_config, list_models

    names = [n for n in list_models() if args.filter is None or args.filter.lower() in n.lower()]
    if not names:
        from clipforge.cli import CliError

        raise CliError(f"no registered architecture contains {args.filter!r}")
    rows = [_row(name, get_config(name), args.params) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    tower_width = max(len(r["image_tower"]) for r in rows) + 2
    print(f"{'name':<{width}}{'image tower':<{tower_width}}{'px':>5}{'embed':>7}{'params (M)':>12}  "
          "activation  text tower")
    for r in rows:
        act = "QuickGELU" if r["quick_gelu"] else "GELU"
        params = f"{r['params_m']:.2f}" if r["params_m"] is not None else "-"
        text = r["text_tower"] + (f" (unavailable: {r['unavailable']})" if "unavailable" in r else "")
        print(f"{r['name']:<{width}}{r['image_tower']:<{tower_width}}{r['image_size']:>5}{r['embed_dim']:>7}"
              f"{params:>12}  {act:<10}  {text}")
    return 0


def _row(name: str, cfg, count_timm: bool) -> dict:
    import torch

    from clipforge.errors import ClipforgeError
    from clipforge.model.clip import CLIP
    from clipforge.model.hf_source import is_local

    params: float | None = None
    note = ""
    # A text encoder named by hub id is not fetched for a listing: its size stays unknown ("-").
    offline = cfg.text.hf_model is None or is_local(cfg.text.hf_model)
    if (cfg.vision.arch != "timm" or count_timm) and offline:  # timm initialises its trunks even on meta
        try:
            with torch.device("meta"):  # counts parameters without allocating them
                params = round(CLIP(cfg).num_params() / 1e6, 2)
        except ClipforgeError as e:  # a Hugging Face text tower whose package is not installed
            note = str(e)
        except ImportError as e:  # timm not installed
            note = f"needs {e.name or 'timm'}"
    text = _text_tower(cfg.text) + (f" + caption decoder x{cfg.decoder.layers}" if cfg.decoder else "")
    row = {"name": name, "image_tower": _image_tower(cfg.vision), "text_tower": text,
           "image_size": cfg.vision.image_size, "embed_dim": cfg.embed_dim, "params_m": params,
           "quick_gelu": cfg.quick_gelu}
    return {**row, "unavailable": note} if note else row


def _image_tower(v) -> str:
    """'ViT/32 x12', 'ViT/16 x12 conv stem |x|', 'ResNet 3-4-6-3', 'SigLIP ViT/16 x12', 'timm convnext_base'."""
    if v.arch == "timm":
        return f"timm {v.timm_model_name}"
    if v.arch == "resnet":
        return "ResNet " + "-".join(map(str, v.resnet_layers))
    tower = f"{'SigLIP ' if v.arch == 'siglip' else ''}ViT/{v.patch_size} x{v.layers}"
    if v.arch == "vit" and v.stem == "conv":
        tower += " conv stem" + (" |x|" if v.stem_act == "abs" else "") + \
            (f" {v.stem_kernel}x{v.stem_kernel}" if v.stem_kernel != 3 else "") + \
            (f" {v.stem_gray} gray" if v.stem_gray else "")
    if v.arch == "vit" and v.pool == "avg":
        tower += " avg"
    if v.attentional_pool:
        tower += " attn-pool"
    return tower


def _text_tower(text) -> str:
    """'clip x12' (CLIP's transformer, end-token pooled), 'clip x2 mean', 'bag of words', 'bidirectional
    x12 last' (SigLIP), or the HF encoder."""
    if text.hf_model:
        return text.hf_model
    if text.layers == 0:
        return "bag of words"
    kind = "clip" if text.causal_mask else "bidirectional"
    if text.embed_cls:  # pooled at the class token, whatever pool says
        return f"{kind} x{text.layers} cls"
    return f"{kind} x{text.layers}" + (f" {text.pool}" if text.pool != "eot" else "")
