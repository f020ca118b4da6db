"""``clipforge convert``: rewrite a checkpoint in another format.

Reads anything ``clipforge.load`` reads (clipforge directory, OpenAI TorchScript archive,
OpenAI/OpenCLIP state dict, Hugging Face CLIP directory) and writes one of:

  clipforge  directory: config.json + model.safetensors
  hf         directory for transformers.CLIPModel.from_pretrained (ViT towers only)
  openclip   directory with open_clip_config.json (open_clip.create_model('local-dir:DIR')),
             or a single state-dict file when --out ends in .safetensors/.pt/.bin
  openai     OpenAI-layout state dict (.pt) for openai/CLIP's clip.load(path, jit=False)
  onnx       directory: image.onnx + text.onnx (dynamic batch; texts of any length up to the
             context), onnx.json, config.json and the tokenizer's files, for ONNX Runtime
             (clipforge.load(DIR), embed/serve --runtime onnx); --quantize int8 for int8 weights
             (activations quantised per batch), --quantize int8-static --calibration PATH for
             activation scales calibrated on a few dozen images (and captions). Checked against
             the PyTorch model before it is kept. --model may also be an fp32 ONNX export, to
             quantise it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("clipforge", "hf", "openclip", "openai", "onnx")
DTYPES = ("fp32", "fp16", "bf16")
# The flag every command that loads a model takes, for OpenCLIP's Hugging Face text towers.
HELP_TEXT_MODEL_DIR = ("local folder with the config.json and tokenizer files of a Hugging Face text tower that "
                       "the checkpoint names by hub id (OpenCLIP's roberta-*, xlm-roberta-*, mt5-*, nllb-clip-*); "
                       "default: fetched from the hub (never its weights)")

RUNTIMES = ("auto", "torch", "onnx")
HELP_RUNTIME = ("torch: the PyTorch model; onnx: an ONNX export (clipforge convert --to onnx) in ONNX Runtime on "
                "the CPU; auto (default): onnx for an ONNX export directory, torch otherwise")


@dataclass(frozen=True)
class ConvertConfig:
    model: str  # a checkpoint path or a pretrained name (see `clipforge pretrained`)
    to: str
    out: Path
    arch: str | None = None
    quick_gelu: bool | None = None
    dtype: str = "fp32"
    text_model_dir: Path | None = None  # a Hugging Face text tower's config + tokenizer, for hub ids
    quantize: str | None = None  # onnx only: "int8" or "int8-static"
    calibration: Path | None = None  # int8-static: a folder of images or an image/caption CSV


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
    p.add_argument("--quantize", choices=["none", "int8", "int8-static"], default="none",
                   help="--to onnx: int8 MatMul weights through ONNX Runtime, activations quantised per batch "
                        "(int8) or with scales calibrated on --calibration (int8-static); default none")
    p.add_argument("--calibration", type=Path, default=None, metavar="PATH",
                   help="--quantize int8-static: a folder of images or a CSV with image (and caption) columns; "
                        "up to 64 of them, spread through it, fix the activation scales")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = ConvertConfig(model=args.model, to=args.to, out=args.out, arch=args.arch,
                        quick_gelu=args.quick_gelu, dtype=args.dtype, text_model_dir=args.text_model_dir,
                        quantize=None if args.quantize == "none" else args.quantize, calibration=args.calibration)
    written = convert(cfg)
    print(f"wrote {cfg.to} checkpoint to {written}")
    return 0


def convert(cfg: ConvertConfig) -> Path:
    import torch

    from clipforge.cli import CliError
    from clipforge.model import checkpoints, pretrained

    if cfg.out.resolve() == Path(cfg.model).resolve():
        raise CliError("--out must differ from --model")
    if cfg.to != "onnx" and cfg.quantize:
        raise CliError("--quantize applies to --to onnx only")
    if (cfg.quantize == "int8-static") != (cfg.calibration is not None):
        raise CliError("--quantize int8-static needs --calibration PATH, and --calibration applies to it only")
    if cfg.to == "onnx":
        return _to_onnx(cfg)
    model = pretrained.load_weights(cfg.model, arch=cfg.arch, quick_gelu=cfg.quick_gelu,
                                    text_model_dir=cfg.text_model_dir)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    written = checkpoints.export(model.to(dtype).eval(), cfg.to, cfg.out)
    if cfg.to == "hf":  # the model card goes along: the source's (training, results) or a fresh one
        from clipforge.model.card import read_card_data, write_card

        data = read_card_data(cfg.model) if Path(cfg.model).is_dir() else {}
        write_card(written, model.config, data.get("training"), data.get("results"), library="transformers")
    return written


def _to_onnx(cfg: ConvertConfig) -> Path:
    from clipforge.cli import CliError
    from clipforge.config import ClipConfig
    from clipforge.model import onnx_export, onnx_runtime, pretrained

    if cfg.dtype != "fp32":
        raise CliError("--to onnx writes fp32 graphs (--quantize int8 for int8 weights), not --dtype " + cfg.dtype)
    if onnx_runtime.is_onnx_export(Path(cfg.model)):  # an fp32 export, to quantise
        if not cfg.quantize:
            raise CliError(f"{cfg.model} is already an ONNX export; --quantize int8 quantises it")
        preprocess = ClipConfig.from_json(Path(cfg.model) / onnx_runtime.CONFIG_FILE).preprocess
        return onnx_export.quantize_export(Path(cfg.model), cfg.out, calibration=_calibration(cfg, preprocess))
    model = pretrained.load_weights(cfg.model, arch=cfg.arch, quick_gelu=cfg.quick_gelu,
                                    text_model_dir=cfg.text_model_dir)
    calibration = _calibration(cfg, model.config.preprocess)  # read first: a bad path fails before the export
    return onnx_export.export_onnx(model, cfg.out, quantize=cfg.quantize, calibration=calibration)


def _calibration(cfg: ConvertConfig, preprocess):
    from clipforge.model import onnx_static

    return None if cfg.calibration is None else onnx_static.read_calibration(cfg.calibration, preprocess)
