"""``clipforge demo``: generate the data world, train a small CLIP on it within a time budget,
evaluate it zero-shot (per task, per prompt set, under distribution shift) and by retrieval,
and write an HTML report."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and evaluate CLIP end to end on built-in data", description=__doc__)
    p.add_argument("--out", default="demo_out", help="output folder (world, run, report) [demo_out]")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="time budget for the whole demo; training gets what the rest leaves [5]")
    p.add_argument("--steps", type=int, default=None, help="train for exactly this many steps instead")
    p.add_argument("--model", default="tiny-bow", help="registered architecture to train [tiny-bow]")
    p.add_argument("--train-samples", type=int, default=20000, help="training pairs in the world [20000]")
    p.add_argument("--test-samples", type=int, default=2000, help="test images [2000]")
    p.add_argument("--shifted-samples", type=int, default=1000, help="images per shifted test set [1000]")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size [128]")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate [2e-3]")
    p.add_argument("--workers", type=int, default=0, help="data loader workers [0]")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX), else fp32 [auto]")
    p.add_argument("--cache-mb", type=int, default=1024,
                   help="decoded training images kept in memory, MiB; 0 = decode every epoch [1024]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.cli import CliError
    from clipforge.demo import DemoConfig, run_demo

    for name in ("train_samples", "test_samples", "shifted_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > args.train_samples:
        raise CliError("--batch-size is larger than --train-samples")
    if args.steps is not None and args.steps < 1:
        raise CliError("--steps must be >= 1")
    if args.steps is None and args.minutes <= 0:
        raise CliError("--minutes must be positive")
    if args.cache_mb < 0:
        raise CliError("--cache-mb must be >= 0")
    cfg = DemoConfig(
        out=args.out, minutes=args.minutes, steps=args.steps, model=args.model, seed=args.seed,
        train_samples=args.train_samples, test_samples=args.test_samples, shifted_samples=args.shifted_samples,
        batch_size=args.batch_size, lr=args.lr, workers=args.workers,
        precision=args.precision, cache_mb=args.cache_mb, progress=not args.no_progress,
    )
    run_demo(cfg)
    return 0
