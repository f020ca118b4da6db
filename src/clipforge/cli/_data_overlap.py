"""``clipforge data overlap``: which test items have a near-duplicate in the training data.

Embeds both sides with --model (or reads precomputed ``clipforge embed`` parts, or a training
index), searches the training side through a FAISS index, and flags test items whose nearest
training item passes a threshold calibrated on generated near-duplicates (crops, JPEG, resizing,
flips, colour jitter, rotations) at --max-fpr; candidates whose images are readable are checked
on aligned colour thumbnails, then a sharper 24x24 look whose threshold is scaled to the training
side's size (the perceptual signal); the embedding alone decides the rest.
Writes OUT (JSON: threshold and its calibration, overlap fraction, each flagged item with its
training duplicate), OUT with .csv and .png; with --task, zero-shot accuracy on All / Overlap /
Clean with the difference and a Clopper-Pearson interval (the CLIP paper's Section 5).
--drop writes the training list without the flagged training items (a table, or shards without
those members when the training side is WebDataset shards).
"""

from __future__ import annotations

import argparse

from clipforge.cli._types import fraction, whole_number

_fraction, _positive = fraction(closed=False), whole_number(1)


def register(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("overlap", help="train/test near-duplicate analysis (and decontamination)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--train", required=True,
                   help="training side: a table, image folder or shards (embedded with --model), an embeddings "
                        "directory from clipforge embed, or an index directory")
    p.add_argument("--test", required=True,
                   help="test side: a labelled table or image folder, or an embeddings directory")
    p.add_argument("--out", required=True, help="report JSON; .csv (flagged items) and .png are written beside it")
    p.add_argument("--model", default=None, help="checkpoint or pretrained name: embeds images, calibrates, classifies")
    p.add_argument("--work", default=None, help="folder for embeddings and the training index (default: "
                                                "overlap_work beside --out; reused by later runs)")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine above which a pair is a near-duplicate (default: calibrated)")
    p.add_argument("--perceptual-threshold", type=float, default=None,
                   help="aligned-thumbnail cosine above which a readable pair is a near-duplicate "
                        "(default: calibrated; -1 turns the check off)")
    p.add_argument("--no-perceptual", action="store_true", help="use the embeddings only")
    p.add_argument("--max-fpr", type=_fraction, default=0.01,
                   help="false-positive rate allowed on unrelated pairs when calibrating" + d)
    p.add_argument("--calibration-images", type=_positive, default=300, help="test images sampled to calibrate" + d)
    p.add_argument("--neighbours", type=_positive, default=10, help="training candidates per test item" + d)
    p.add_argument("--task", default=None,
                   help="zero-shot task (a task JSON, or a name in tasks/ beside --test) for All/Overlap/Clean accuracy")
    p.add_argument("--confidence", type=_fraction, default=0.95, help="level of the binomial interval" + d)
    p.add_argument("--drop", default=None, metavar="LIST",
                   help="write the training list without the flagged training items here (a CSV; a folder of "
                        "shards when --train is shards), and LIST.dropped.json")
    p.add_argument("--batch-size", type=_positive, default=256, help="images per forward pass" + d)
    p.add_argument("--seed", type=int, default=0, help="calibration sample" + d)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.cli import CliError
    from clipforge.hygiene.analysis import OverlapJob, run_overlap

    if args.threshold is not None and not -1 <= args.threshold <= 1:
        raise CliError("--threshold is a cosine similarity in [-1, 1]")
    if args.perceptual_threshold is not None and not -1 <= args.perceptual_threshold <= 1:
        raise CliError("--perceptual-threshold is a cosine similarity in [-1, 1] (-1: off)")
    model = None
    if args.model:
        import clipforge

        model, _ = clipforge.load(args.model)
        model.eval()
    report = run_overlap(OverlapJob(
        train=args.train, test=args.test, out=args.out, model=model, work=args.work, threshold=args.threshold,
        perceptual_threshold=args.perceptual_threshold, use_perceptual=not args.no_perceptual, max_fpr=args.max_fpr,
        calibration_images=args.calibration_images, k=args.neighbours, task=args.task, confidence=args.confidence,
        drop=args.drop, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress))
    t = report["threshold"]
    how = "given" if t["source"] == "given" else f"calibrated at false-positive rate <= {t['max_fpr']}"
    perc = f"> {t['perceptual_threshold']:.4f}" if t["perceptual_threshold"] >= 0 else "off"
    if t["perceptual_threshold"] >= 0 and t.get("fine_threshold", -1) >= 0:
        perc += f", sharper second look > {t['fine_threshold']:.4f}"
    print(f"threshold: perceptual {perc} for candidates at cosine >= {t['floor']:.4f}; cosine > "
          f"{t['emb_threshold']:.4f} where images cannot be read ({how})")
    print(f"{report['flagged']} of {report['test_items']} test items overlap the training set "
          f"({100 * report['overlap_fraction']:.2f}%); {len(report['train_duplicates'])} training duplicates")
    acc = report.get("accuracy")
    if acc:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"
        line = f"{acc['task']}: all {pct(acc['all']['accuracy'])}, overlap {pct(acc['overlap']['accuracy'])} " \
               f"(n={acc['overlap']['n']}), clean {pct(acc['clean']['accuracy'])}"
        if acc["difference"] is not None:
            lo, hi = acc["difference_interval"]
            line += f"; difference {100 * acc['difference']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        print(line)
    if "drop" in report:
        print(f"dropped {report['drop']['dropped']} training rows; list written to {report['drop']['training_list']}")
    print(f"report written to {args.out} (plot {report['plot']})")
    return 0
