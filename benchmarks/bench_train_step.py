"""Training-step throughput (samples/s) of clipforge against OpenCLIP: same architecture, same
weights, same batch, same input tensors, same precision and threads, alternating runs.

    .venv/bin/python benchmarks/bench_train_step.py                       # CPU: tiny + reduced ViT-B-32
    .venv/bin/python benchmarks/bench_train_step.py --models tiny --batch 64 --reps 9
    .venv/bin/python benchmarks/bench_train_step.py --device cuda --models ViT-B-32 ViT-B-16 \\
        --batch 256 --precision bf16 --peak-tflops 989                    # GPU: bf16 + MFU

A step is what each library's trainer does per batch: zero the gradients, forward both
towers, contrastive loss, backward, AdamW step (no gradient clipping on either side):

  open_clip   open_clip.CLIP built from the same config with clipforge's weights copied in,
              ``open_clip.loss.ClipLoss``, ``torch.optim.AdamW`` with open_clip_train's
              parameter groups and its default implementation (per-tensor loop on a CPU,
              multi-tensor "foreach" on CUDA).
  clipforge   ``clipforge.CLIP``, ``ContrastiveLoss``, ``train.optim.build_optimizer`` (fused AdamW).

clipforge skips work whose results are never used, and computes the rest as OpenCLIP does:
  - text positions after a batch's longest caption (causal attention: they cannot change the
    pooled end-token output), see ``TextTransformer.trim_padding``;
  - the last block of each tower runs only at the pooled position (class token, end token):
    every other output of that block is discarded, see ``Transformer.pooled_last_block``.
Ablations, timed in the same alternation: ``open_clip+fused`` (OpenCLIP with fused AdamW: what
the optimizer alone is worth) and ``clipforge-full`` (both skips off: clipforge doing all of
OpenCLIP's work). Captions are token sequences of 10-30 tokens (start and end included) padded
to 77, the lengths of alt-text captions. Threads default to 1 on a CPU: on a shared machine a
multi-threaded region waits for its slowest, descheduled thread, which adds noise, not speed.

Before timing, the script checks that both models compute the same thing on these inputs: the
loss and every parameter's gradient are compared (max |diff| recorded; the run stops if they
disagree beyond fp32 rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, openclip_twin, print_table, summarize, write_record  # noqa: E402

REDUCED = {  # ViT-B-32's widths, heads and 224 px input with fewer layers, so a CPU step takes seconds
    "ViT-B-32-reduced": ("ViT-B-32", 4, 4),
    "ViT-B-16-reduced": ("ViT-B-16", 4, 4),
}


def clipforge_config(name: str):
    from clipforge.model.registry import get_config

    if name in REDUCED:
        base, v_layers, t_layers = REDUCED[name]
        cfg = get_config(base)
        return cfg.replace(name=name, vision=_replace(cfg.vision, layers=v_layers),
                           text=_replace(cfg.text, layers=t_layers))
    return get_config(name)


def _replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def caption_tokens(batch: int, lengths: tuple[int, int], context: int, vocab: int, seed: int) -> torch.Tensor:
    """[B, context] ids: start token, random BPE ids, end token; total length uniform in
    ``lengths`` (the end token is the highest id, as in OpenAI's vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context, dtype=torch.long)
    n = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=g)
    for i, k in enumerate(n.tolist()):
        tokens[i, 0] = vocab - 2  # <start_of_text>
        tokens[i, 1 : k - 1] = torch.randint(256, vocab - 2, (k - 2,), generator=g)
        tokens[i, k - 1] = vocab - 1  # <end_of_text>
    return tokens


def build_pair(cfg, device: torch.device):
    """(clipforge model, OpenCLIP model) with identical weights, both in train mode."""
    import clipforge

    torch.manual_seed(0)
    ours = clipforge.create_model(cfg)
    ref = openclip_twin(ours)
    return ours.to(device).train(), ref.to(device).train()


def openclip_optimizer(model, lr: float, wd: float, fused: bool):
    """open_clip_train's AdamW: no decay for gains, biases, norms and the logit scale."""
    excluded = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if excluded(n, p) and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if not excluded(n, p) and p.requires_grad], "weight_decay": wd},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True if fused else None)


def make_steps(ours, ref, images, tokens, args, device):
    from open_clip.loss import ClipLoss

    from clipforge.train.config import OptimConfig
    from clipforge.train.loss import ContrastiveLoss
    from clipforge.train.optim import build_optimizer

    def amp():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    cf_opt = build_optimizer(ours, OptimConfig(lr=args.lr, weight_decay=0.2))
    cf_loss = ContrastiveLoss()
    oc_loss = ClipLoss()
    oc_opt = openclip_optimizer(ref, args.lr, 0.2, fused=False)

    def clipforge_step(skip: bool = True):
        set_skips(ours, skip)
        cf_opt.zero_grad(set_to_none=True)
        with amp():
            out = ours(images, tokens)
        loss = cf_loss(out.image_features.float(), out.text_features.float(), out.logit_scale.float())
        loss.backward()
        cf_opt.step()
        set_skips(ours, True)
        return loss.detach()

    def openclip_step(opt):
        opt.zero_grad(set_to_none=True)
        with amp():
            img, txt, scale = ref(images, tokens)
        loss = oc_loss(img.float(), txt.float(), scale.float())
        loss.backward()
        opt.step()
        with torch.no_grad():  # as open_clip_train does after every step
            ref.logit_scale.clamp_(0, 4.6052)
        return loss.detach()

    steps = {"open_clip": lambda: openclip_step(oc_opt), "clipforge": clipforge_step}
    if args.ablations:
        oc_fused = openclip_optimizer(ref, args.lr, 0.2, fused=True)
        steps["open_clip+fused"] = lambda: openclip_step(oc_fused)
        steps["clipforge-full"] = lambda: clipforge_step(skip=False)
    return steps


def set_skips(model, on: bool) -> None:
    """clipforge's two skips of unused work (see the module docstring), on or off."""
    model.text.trim_padding = on
    model.text.transformer.pooled_last_block = on
    model.visual.transformer.pooled_last_block = on


def check_equal(ours, ref, images, tokens) -> dict:
    """Loss and gradients of one forward/backward of each model on the same batch (fp32)."""
    from open_clip.loss import ClipLoss

    from clipforge.model.interop.openai import to_openai
    from clipforge.train.loss import ContrastiveLoss

    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    out = ours(images, tokens)
    a = ContrastiveLoss()(out.image_features, out.text_features, out.logit_scale)
    a.backward()
    img, txt, scale = ref(images, tokens)
    b = ClipLoss()(img, txt, scale)
    b.backward()
    ref_grads = dict(ref.named_parameters())
    worst, worst_rel, name = 0.0, 0.0, ""
    for k, p in to_openai(dict(ours.named_parameters())).items():
        g1, g2 = p.grad, ref_grads[k].grad
        d = float((g1 - g2).abs().max())
        rel = d / max(float(g2.abs().max()), 1e-12)
        if rel > worst_rel:
            worst, worst_rel, name = d, rel, k
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    a, b = a.detach(), b.detach()
    res = {"loss_clipforge": float(a), "loss_open_clip": float(b), "loss_abs_diff": float((a - b).abs()),
           "grad_max_abs_diff": worst, "grad_max_rel_diff": worst_rel, "grad_worst_param": name}
    if res["loss_abs_diff"] > 1e-4 or worst_rel > 1e-3:
        raise SystemExit(f"clipforge and OpenCLIP disagree on the same inputs: {res}")
    return res


def step_flops(model, images, tokens) -> dict:
    """Training FLOPs per step = 3 x forward FLOPs counted by torch's FlopCounterMode: of what
    clipforge computes, and of the full computation (every position, all 77 text tokens: the
    work OpenCLIP does)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for skip in (True, False):
        set_skips(model, skip)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(images, tokens)
        out["clipforge" if skip else "full"] = 3 * fc.get_total_flops()
    set_skips(model, True)
    return out


def run_model(name: str, args, device: torch.device) -> dict:
    cfg = clipforge_config(name)
    ours, ref = build_pair(cfg, device)
    s = cfg.vision.image_size
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, s, s, generator=g).to(device)
    tokens = caption_tokens(args.batch, tuple(args.caption_tokens), cfg.text.context_length, cfg.text.vocab_size,
                            args.seed).to(device)
    lengths = (tokens > 0).sum(1)
    equal = check_equal(ours, ref, images, tokens) if args.precision == "fp32" or device.type == "cpu" else None
    steps = make_steps(ours, ref, images, tokens, args, device)
    times = alternate(steps, reps=args.reps, warmup=args.warmup, device=device)
    res = summarize(times, reference="open_clip", work=args.batch)
    res.update(
        model=name, config=cfg.to_dict(), batch=args.batch, precision=args.precision,
        caption_tokens={"min": int(lengths.min()), "max": int(lengths.max()),
                        "mean": round(float(lengths.float().mean()), 1)},
        same_outputs=equal, params=ours.num_params(),
    )
    flops = step_flops(ours, images, tokens)
    res["train_flops_per_step"] = flops
    res["flops_skipped_fraction"] = round(1 - flops["clipforge"] / flops["full"], 3)
    if device.type == "cuda":
        # MFU counts only the FLOPs clipforge needs (the useful work), for every side alike:
        # crediting OpenCLIP's padding FLOPs would make the slower side look busier.
        res["mfu"] = {k: round(flops["clipforge"] * r / args.batch / (args.peak_tflops * 1e12), 4)
                      for k, r in res["rate_per_s"].items()}
        res["mfu_note"] = (f"achieved training FLOP/s (3 x forward FLOPs of the work clipforge computes) / "
                           f"{args.peak_tflops} TFLOP/s peak dense {args.precision}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "ViT-B-32-reduced"],
                    help=f"registry names or {', '.join(REDUCED)}")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 32], help="per model (the last value repeats)")
    ap.add_argument("--reps", type=int, nargs="+", default=[9, 5], help="per model (the last value repeats)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--caption-tokens", type=int, nargs=2, default=[10, 30], metavar=("MIN", "MAX"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on a CPU)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense TFLOP/s of the GPU at --precision (H100 SXM bf16: 989)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)

    results = {}
    for i, name in enumerate(args.models):
        sub = argparse.Namespace(**vars(args))
        sub.batch = args.batch[min(i, len(args.batch) - 1)]
        sub.reps = args.reps[min(i, len(args.reps) - 1)]
        r = run_model(name, sub, device)
        results[name] = r
        print(f"\n{name}: batch {sub.batch}, {args.precision}, captions {r['caption_tokens']}, {sub.reps} reps")
        if r["same_outputs"]:
            print(f"  same inputs -> loss diff {r['same_outputs']['loss_abs_diff']:.2e}, "
                  f"max grad rel diff {r['same_outputs']['grad_max_rel_diff']:.2e}")
        rows = [(k, f"{r['median_s'][k]:.4f}", f"{r['rate_per_s'][k]:.1f}", f"{r['speedup_vs_open_clip'][k]:.2f}x",
                 f"{r['paired_speedup_median'][k]:.2f}x") + ((f"{r['mfu'].get(k, 0):.1%}",) if "mfu" in r else ())
                for k in r["median_s"]]
        r["table"] = print_table(rows, ("side", "median s/step", "samples/s", "vs open_clip", "paired")
                                 + (("MFU",) if "mfu" in r else ()))

    record = {
        "setup": "one training step per call: zero_grad, forward, contrastive loss, backward, AdamW step; "
        "same weights, batch, input tensors, precision and threads on both sides; no gradient clipping",
        "method": f"{args.warmup} warm-up steps each, then alternating A B C D / D C B A repetitions, medians; "
        "loss and gradients checked equal before timing",
        "results": results,
    }
    path = write_record("train_step", record, device, args.out,
                        code_paths=("src/clipforge/model", "src/clipforge/train"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
