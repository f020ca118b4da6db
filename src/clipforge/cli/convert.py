"""``clipforge convert``: rewrite a checkpoint in another format.

Reads anything ``clipforge.load`` reads (clipforge directory, OpenAI TorchScript archive,
OpenAI/OpenCLIP state dict, Hugging Face CLIP directory) and writes one of:

  clipforge  directory: config.json + model.safetensors
  hf         directory for transformers.CLIPModel.from_pretrained (ViT towers only)
  openclip   directory with open_clip_config.json (open_clip.create_model('local-dir:DIR')),
             or a single state-dict file when --out ends in .safetensors/.pt/.bin
  openai     OpenAI-layout state dict (.pt) for openai/CLIP's clip.load(path, jit=False)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("clipforge", "hf", "openclip", "openai")
DTYPES = ("fp32", "fp16", "bf16")
# The flag every command that loads a model takes, for OpenCLIP's Hugging Face text towers.
HELP_TEXT_MODEL_DIR = ("local folder with the config.json and tokenizer files of a Hugging Face text tower that "
                       "the checkpoint names by hub id (OpenCLIP's roberta-*, xlm-roberta-*, mt5-*, nllb-clip-*); "
                       "default: fetched from the hub (never its weights)")


@dataclass(frozen=True)
class ConvertConfig:
    model: str  # a checkpoint path or a pretrained name (see `clipforge pretrained`)
    to: str
    out: Path
    arch: str | None = None
    quick_gelu: bool | None = None
    dtype: str = "fp32"
    text_model_dir: Path | None = None  # a Hugging Face text tower's config + tokenizer, for hub ids


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between formats", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint file or directory to read, or a pretrained name (clipforge pretrained)")
    p.add_argument("--to", required=True, choices=FORMATS, help="format to write")
    p.add_argument("--out", required=True, type=Path, help="output directory (or file, see above)")
    p.add_argument("--arch", default=None,
                   help="registered architecture name, for state dicts whose shapes do not pin it down")
    p.add_argument("--quick-gelu", dest="quick_gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="activation of weights whose file does not record it (default: QuickGELU for OpenAI "
                        "state dicts, GELU for OpenCLIP training checkpoints)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="precision of the written weights")
    p.add_argument("--text-model-dir", type=Path, default=None, metavar="DIR", help=HELP_TEXT_MODEL_DIR)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = ConvertConfig(model=args.model, to=args.to, out=args.out, arch=args.arch,
                        quick_gelu=args.quick_gelu, dtype=args.dtype, text_model_dir=args.text_model_dir)
    written = convert(cfg)
    print(f"wrote {cfg.to} checkpoint to {written}")
    return 0


def convert(cfg: ConvertConfig) -> Path:
    import torch

    from clipforge.model import checkpoints, pretrained

    if cfg.out.resolve() == Path(cfg.model).resolve():
        from clipforge.cli import CliError

        raise CliError("--out must differ from --model")
    model = pretrained.load_weights(cfg.model, arch=cfg.arch, quick_gelu=cfg.quick_gelu,
                                    text_model_dir=cfg.text_model_dir)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    return checkpoints.export(model.to(dtype).eval(), cfg.to, cfg.out)
