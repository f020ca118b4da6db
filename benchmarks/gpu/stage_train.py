"""Stage: one training step of ViT-B-32 and of ViT-B-16 (bf16 autocast, batch 256, captions of
10-30 tokens), clipforge against OpenCLIP in one process on the same weights and inputs, timed
alternately (A B / B A, medians: ``common.alternate``): samples/s, MFU and peak memory per side.

Targets: ViT-B-32 >= 1.5x OpenCLIP's samples/s; ViT-B-16 >= 40 % MFU. MFU = achieved training
FLOP/s over --peak-tflops, counting 3 x the forward FLOPs of the work clipforge computes for both
sides (``torch.utils.flop_counter``, as bench_train_step.py does). Where a target is missed, the
profiler's top kernels of each side are recorded in the target's ``profile``.

--quick: ``nano`` stands in for both ViTs, batch 8, two repetitions: the record's
structure in seconds, on a CPU. Without open_clip the OpenCLIP side is recorded as skipped.
"""

from __future__ import annotations

# isort: off
from stagelib import Deadline, free_memory, open_clip_missing, run_stage, sig, stage_args, step_memory, sync, \
    target, top_ops  # first: puts benchmarks/ on sys.path
import sides as S
from common import alternate, summarize
# isort: on

ROLES = {"ViT-B-32": "vit_b32", "ViT-B-16": "vit_b16"}  # the model each figure is about -> figure prefix
FULL = {"ViT-B-32": ("ViT-B-32", 256), "ViT-B-16": ("ViT-B-16", 256)}
QUICK = {"ViT-B-32": ("nano", 8), "ViT-B-16": ("nano", 8)}
TARGET_OF = {"ViT-B-32": "vit_b32_speedup", "ViT-B-16": "vit_b16_mfu"}


def plan_reps(fns: dict, device, warmup: int, seconds: float, lo: int, hi: int) -> int:
    """Warm every side up, time one round of all sides, and fit the repetitions into ``seconds``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    t = alternate(fns, reps=1, warmup=0, device=device)
    round_s = sum(v[0] for v in t.values())
    return max(lo, min(hi, int(seconds / max(round_s, 1e-6))))


def measure(role: str, args, deadline: Deadline, share_s: float, result: dict) -> None:
    arch, batch = (QUICK if args.quick else FULL)[role]
    device, precision = args.device, "bf16"
    missing = open_clip_missing()
    cfg, ours, ref = S.build_models(arch, missing is None)
    sides = {"clipforge": S.clipforge_side(ours.to(device), device, precision)}
    if ref is not None:
        sides["open_clip"] = S.openclip_side(ref.to(device), device, precision)
    images, tokens = S.inputs(cfg, batch, device)
    fns = {k: (lambda s=s: s.step(images, tokens)) for k, s in sides.items()}
    reps = plan_reps(fns, device, 1 if args.quick else 3, share_s * 0.6, 2 if args.quick else 5,
                     2 if args.quick else 30)
    times = alternate(fns, reps=reps, warmup=0, device=device)
    res = summarize(times, reference="open_clip" if ref is not None else "clipforge", work=batch)
    res["memory"] = {}
    for k, s in sides.items():
        for other in sides.values():  # no gradients left from earlier steps: each step's own are counted
            other.opt.zero_grad(set_to_none=True)
        res["memory"][k] = step_memory(fns[k], device, s.resident() + [images, tokens])
    flops = S.train_flops(ours, images, tokens)
    res["train_flops_per_step"] = flops
    res["mfu"] = {k: sig(flops["clipforge"] * r / batch / (args.peak_tflops * 1e12)) for k, r in
                  res["rate_per_s"].items()}
    lengths = (tokens > 0).sum(1)
    res.update(arch=arch, stands_for=role, batch=batch, precision=precision, params=ours.num_params(),
               caption_tokens={"min": int(lengths.min()), "max": int(lengths.max())},
               fused_adamw=sides["clipforge"].extra["fused_adamw"],
               open_clip="measured" if ref is not None else {"status": "skipped", "reason": missing})
    result["models"][role] = res

    p = ROLES[role]
    fig = result["figures"]
    for k in sides:
        fig[f"{p}_{k}_samples_per_s"] = res["rate_per_s"][k]
        fig[f"{p}_{k}_mfu"] = res["mfu"][k]
        fig[f"{p}_{k}_peak_mib"] = res["memory"][k]["peak_mib"]
    speedup = res["speedup_vs_open_clip"]["clipforge"] if ref is not None else None
    if speedup is not None:
        fig[f"{p}_speedup_vs_open_clip"] = speedup
    value = speedup if role == "ViT-B-32" else res["mfu"]["clipforge"]
    t = target(TARGET_OF[role], value, arch, missing or "")
    if t["met"] is False and deadline.left() > 10:
        calls = 1 if args.quick else 3
        t["profile"] = {k: top_ops(fns[k], device, calls) for k in sides}  # both sides: where the time differs
    result["targets"].append(t)


def main(args, result: dict) -> None:
    deadline = Deadline(args.budget_s)
    result["models"] = {}
    result["peak_tflops"] = args.peak_tflops
    errors = []
    for i, role in enumerate(ROLES):
        share = (deadline.left() - 10) / (len(ROLES) - i)  # 10 s kept for the profiles
        try:
            measure(role, args, deadline, share, result)
        except Exception as e:  # noqa: BLE001 - the other model still runs; the stage is recorded as failed
            errors.append(f"{role}: {type(e).__name__}: {e}")
            result["targets"].append(target(TARGET_OF[role], None, (QUICK if args.quick else FULL)[role][0],
                                            f"failed: {type(e).__name__}: {str(e)[:300]}"))
        free_memory(args.device)  # the role's models are gone with its frame (and a failure's traceback)
    if errors:
        raise RuntimeError("; ".join(errors))


if __name__ == "__main__":
    run_stage(main, stage_args(__doc__))
