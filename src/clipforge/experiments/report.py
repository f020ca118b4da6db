"""REPORT.md from the findings' JSON records: for each finding the paper's claim, the measured
result (tables built from the JSON, never typed by hand), the exact command, and the verdict
with its criterion. A hand-written discussion per finding (why a result agrees or not) is read
from ``<report dir>/discussion/<finding>.md`` when present.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from clipforge.experiments.config import FINDINGS

TITLES = {
    "objectives": "1. Contrastive vs. predictive objectives",
    "prompts": "2. Zero-shot transfer and prompt engineering",
    "fewshot": "3. Zero-shot vs. few-shot linear probes",
    "probe": "4. Linear probe vs. a supervised baseline",
    "robustness": "5. Robustness to distribution shift",
    "scaling": "6. Scaling: zero-shot error vs. compute",
    "labelset": "7. Label sets: a group's natural category",
}


def _p(ms: Any, digits: int = 1) -> str:
    """[mean, std] fraction -> '83.1 ± 1.2' percent."""
    if ms is None or ms[0] is None or (isinstance(ms[0], float) and math.isnan(ms[0])):
        return "–"
    return f"{100 * ms[0]:.{digits}f} ± {100 * (ms[1] or 0):.{digits}f}"


def _d(ms: Any) -> str:
    return "–" if ms is None or ms[0] is None else f"{100 * ms[0]:+.1f} ± {100 * (ms[1] or 0):.1f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _objectives(s: dict[str, Any]) -> tuple[str, str]:
    rows = [[k, _p(s["final_mean_acc"][k]), f"{s['train_gflops_per_sample'][k]:.3f}", f"{s['s_per_step'][k]:.2f}",
             f"{s['params_m'][k]:.2f}"] for k in ("caption", "bow", "contrastive")]
    eff = s["efficiency"]
    ratio_rows = [[n, f"{v['median']:.2f}" + (" (lower bound)" if v["any_lower_bound"] else ""),
                   ", ".join(f"{r:.2f}" for r in v["per_seed"])] for n, v in eff.items()]
    text = (_table(["objective", "final zero-shot acc. (%)", "train GFLOP / sample", "s / step", "params (M)"], rows)
            + f"\n\nChance level (mean over tasks): {100 * s['chance_mean_acc']:.1f}%.\n\n"
            + _table(["efficiency (x fewer samples)", "median over seeds", "per seed"], ratio_rows))
    short = (f"BoW vs caption {eff['bow_vs_caption']['median']:.1f}x, contrastive vs BoW "
             f"{eff['contrastive_vs_bow']['median']:.1f}x; final acc. caption {_p(s['final_mean_acc']['caption'])}, "
             f"BoW {_p(s['final_mean_acc']['bow'])}, contrastive {_p(s['final_mean_acc']['contrastive'])}")
    return text, short


def _prompts(s: dict[str, Any]) -> tuple[str, str]:
    sets = ("plain", "template", "ensemble")
    rows = [[t, *(_p(v[p]) for p in sets)] for t, v in s["per_task"].items()]
    rows.append(["**mean**", *(f"**{_p(s['mean_over_tasks'][p])}**" for p in sets)])
    text = (_table(["task (test split)", "class name only", "one template", "template ensemble"], rows) + "\n\n"
            + _table(["gain (points)", "mean ± std over seeds"], [[k, _d(v)] for k, v in s["deltas"].items()])
            + "\n\nOn the shifted splits (mean over tasks and splits): "
            + ", ".join(f"{p} {_p(s['shifted_splits_mean'][p])}" for p in sets) + ".")
    short = (f"template {_d(s['deltas']['template_minus_plain'])} pts, ensemble "
             f"{_d(s['deltas']['ensemble_minus_plain'])} pts over the class name (mean of {s['num_tasks']} tasks)")
    return text, short


def _k(k: Any) -> str:
    return ">max k" if k is None or (isinstance(k, float) and math.isinf(k)) else "<1" if k == 0 else f"{k:.1f}"


def _fewshot(s: dict[str, Any]) -> tuple[str, str]:
    shots = s["shots"]
    rows = [[t, _p(v["zero_shot"]), *(_p(a) for a in v["probe"]), _k(v["equivalent_k_median"]),
             ", ".join(_k(k) for k in v["equivalent_k_per_seed"])] for t, v in s["per_task"].items()]
    text = _table(["task", "zero-shot", *(f"{k}-shot probe" for k in shots), "zero-shot ≡ k-shot (median)",
                   "per seed"], rows)
    m = s["per_task"]["mean"]
    short = (f"zero-shot ≡ {_k(s['mean_equivalent_k'])}-shot probe on average; zero-shot {_p(m['zero_shot'])} vs "
             f"1-shot {_p(m['probe'][0])}")
    if "mean_learnt" in s["per_task"]:
        learnt = sorted({t for ts in s["learnt_tasks_per_seed"] for t in ts})
        text += (f"\n\n`mean_learnt`: the average over the tasks each seed's CLIP learnt at all (zero-shot above "
                 f"chance + 5 points: {', '.join(learnt)}); there zero-shot ≡ "
                 f"{_k(s['per_task']['mean_learnt']['equivalent_k_median'])}-shot.")
    return text, short


def _probe(s: dict[str, Any]) -> tuple[str, str]:
    rows = [[t + (" (transfer)" if t in s["transfer_tasks"] else ""), _p(v["clip_probe"]), _p(v["supervised_probe"]),
             _p(v["supervised_heads"]), _p(v["clip_zero_shot"]), _d(s["clip_minus_supervised_probe"][t])]
            for t, v in s["per_task"].items()]
    text = _table(["task", "CLIP features + probe", "supervised features + probe", "supervised model's heads",
                   "CLIP zero-shot", "CLIP − supervised probe (pts)"], rows)
    short = (f"CLIP probe ahead on {len(s['clip_wins'])}/{len(s['per_task'])} tasks "
             f"({', '.join(s['clip_wins']) or 'none'})")
    return text, short


def _robustness(s: dict[str, Any]) -> tuple[str, str]:
    names = {"supervised": "supervised (final)", "zero_shot": "zero-shot CLIP", "probe": "CLIP + reference probe"}
    rows = []
    for t, v in s["per_task"].items():
        rows += [[t, names[k], _p(r["reference"]), _p(r["shifted"]), _p(r["drop"]), _d(r["effective_robustness"])]
                 for k, r in v.items()]
    rows += [["**mean**", names[k], _p(r["reference"]), _p(r["shifted"]), "", _d(r["effective_robustness"])]
             for k, r in s["mean_over_tasks"].items()]
    d = s["probe_minus_zero_shot"]
    header = ["task", "model", "reference acc. (test)", "mean shifted acc.", "drop", "effective robustness (pts)"]
    text = (_table(header, rows)
            + f"\n\nShifted splits: {', '.join(s['shifted_splits'])}. Probe minus zero-shot, per seed (points): "
            + "reference " + ", ".join(f"{100 * x:+.1f}" for x in d["reference"])
            + "; shifted " + ", ".join(f"{100 * x:+.1f}" for x in d["shifted"])
            + "; effective robustness " + ", ".join(f"{100 * x:+.1f}" for x in d["effective_robustness"]) + ".")
    m = s["mean_over_tasks"]
    short = (f"effective robustness: zero-shot {_d(m['zero_shot']['effective_robustness'])} pts, reference probe "
             f"{_d(m['probe']['effective_robustness'])} pts")
    return text, short


def _scaling(s: dict[str, Any]) -> tuple[str, str]:
    rows = [[n, f"{v['params_m']:.2f}", f"{v['forward_gflops_per_sample']:.4f}", f"{v['train_pflops']:.4f}",
             _p(v["error"]), _p(v["relation_acc"])] for n, v in s["per_size"].items()]
    pl = s["power_law"]
    text = (_table(["size", "params (M)", "forward GFLOP / sample", "training PFLOP", "zero-shot error (%)",
                    "relation task acc. (%)"], rows)
            + f"\n\nLog-log fit: error ∝ compute^{pl['slope']:.3f} (R² = {pl['r2']:.3f}) over "
              f"{s['compute_range']:.0f}x of compute; monotone: {s['monotone']}.")
    short = (f"error ∝ C^{pl['slope']:.2f}, R² {pl['r2']:.2f} over {s['compute_range']:.0f}x compute, "
             f"monotone {s['monotone']}")
    return text, short


def _labelset(s: dict[str, Any]) -> tuple[str, str]:
    rows = [[g, _p(v["without"]), _p(v["with"])] for g, v in s["per_group"].items()]
    rows.append(["**mean**", f"**{_p(s['error_without'])}**", f"**{_p(s['error_with'])}**"])
    text = (_table(["group (shape)", "misfiled, its category left out (%)", "misfiled, its category in (%)"], rows)
            + f"\n\nDrop in the group's error: {_d(s['drop'])} points (per seed "
            + ", ".join(f"{100 * d:+.1f}" for d in s["drop_per_seed"])
            + f"); the control images' error drops {_d(s['control_drop'])} points.")
    short = (f"misfiling of a group {_p(s['error_without'])}% without its category, {_p(s['error_with'])}% with it "
             f"(drop {_d(s['drop'])} pts)")
    return text, short


def learnt_text(verdict: dict[str, Any]) -> str:
    """The learnt-above-chance check of a verdict: per model, task and seed, points above chance."""
    check = verdict.get("learnt")
    if not check:
        return ""
    checks = check.get("checks", [check])
    rows = []
    for c in checks:
        for task, above in c["above_chance"].items():
            cells = ", ".join("–" if a is None else f"{100 * a:+.1f}" for a in above)
            ok = all(a is not None and a >= c["margin"] for a in above)
            rows.append([c["what"], task, f"{100 * c['chance'][task]:.1f}", cells, "yes" if ok else "**no**"])
    margin = checks[0]["margin"]
    head = (f"**Learnt.** Each task averaged over, per seed, in points above chance (learnt: at least "
            f"+{100 * margin:.0f} in every seed)")
    if not check["all_learnt"]:
        head += (f"; not learnt: {', '.join(check['not_learnt'])}, so no conclusion is drawn (the rule alone would "
                 f"have said *{verdict.get('verdict_if_learnt')}*)")
    return head + ".\n\n" + _table(["model", "task", "chance (%)", "above chance per seed (pts)", "learnt"], rows)


FORMATS: dict[str, Callable[[dict[str, Any]], tuple[str, str]]] = {
    "objectives": _objectives, "prompts": _prompts, "fewshot": _fewshot, "probe": _probe,
    "robustness": _robustness, "scaling": _scaling, "labelset": _labelset}


def _rerun(command: str, name: str) -> str:
    words = command.split()
    if "all" in words[:3]:
        words[words.index("all")] = name
    return " ".join(words)


def write_report(results: Path, report: Path) -> Path:
    """Write ``report`` (REPORT.md) from ``results/<finding>.json``; missing findings say "not run yet"."""
    results, report = Path(results), Path(report)
    records = {n: json.loads((results / f"{n}.json").read_text())
               for n in FINDINGS if (results / f"{n}.json").is_file()}
    rel = Path(os.path.relpath(results, report.parent))
    summary_rows, sections = [], []
    for name in FINDINGS:
        rec = records.get(name)
        if rec is None:
            summary_rows.append([TITLES[name], "–", "**not run yet**"])
            sections.append(f"## {TITLES[name]}\n\n**Not run yet.** Run `clipforge experiment {name}`.\n")
            continue
        text, short = FORMATS[name](rec["summary"])
        v = rec["verdict"]
        env = rec["environment"]
        summary_rows.append([TITLES[name], short, f"**{v['verdict']}**"])
        discussion = report.parent / "discussion" / f"{name}.md"
        parts = [
            f"## {TITLES[name]}",
            f"**Paper.** {rec['claim']}",
            f"**Command.** `{_rerun(rec['command'], name)}` (run {env['date']}, {rec['wall_s']:.0f} s including "
            f"cached parts, {len(rec['seeds'])} seeds, scale `{rec['scale']['name']}`, {env['cpus']} CPUs, "
            f"{env['torch_threads']} torch threads{', GPU ' + env['gpu'] if env.get('gpu') else ''}).",
            f"**Measured.**\n\n{text}",
            f"![{name}]({(rel / f'{name}.png').as_posix()})",
            f"**Verdict: {v['verdict']}.** Criterion: {v['criterion']}.",
        ]
        if learnt_text(v):
            parts.insert(-1, learnt_text(v))
        if discussion.is_file():
            parts.append(discussion.read_text().strip())
        sections.append("\n\n".join(parts) + "\n")
    head = [
        "# The CLIP paper's central findings, reproduced in miniature",
        "Generated by `clipforge experiment report` from the JSON records in "
        f"[`{rel.as_posix()}/`]({rel.as_posix()}/); every number below comes from those runs. Each finding is "
        "one command (`clipforge experiment <finding>`), prints its table and writes `<finding>.json` and "
        "`<finding>.png`. Data: the built-in procedural world (`clipforge data synth`): captioned 64 px images of "
        "coloured shapes, with label columns and shifted test sets. Spreads are mean ± std over seeds (model "
        "initialisation and data order; the world is fixed). `--scale medium|large` reruns the same experiments "
        "at GPU sizes.",
        _table(["finding", "our result", "verdict"], summary_rows),
    ]
    if records:
        scale = next(iter(records.values()))["scale"]
        w = scale["world"]
        head.append(f"Scale `{scale['name']}`: world of {w['train']} training pairs ({w['image_size']} px), "
                    f"{w['test']} test and {w['shifted']} per shifted split; batch {scale['batch_size']}, AdamW "
                    f"lr {scale['lr']}, weight decay {scale['weight_decay']}, cosine schedule. The records' wall "
                    f"times add up to {sum(r['wall_s'] for r in records.values()) / 60:.1f} min (each includes "
                    "waiting for shared models; `experiment all` runs two findings at a time on a CPU).")
    budget = results / "budget.json"
    if budget.is_file():
        b = json.loads(budget.read_text())["estimate"]
        cpu = b["single_core_cpu_min"]
        per = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k != "total")
        head.append(f"**Cost of the default set** (an estimate from single-threaded CPU-time measurements of each "
                    f"unit of work, `python benchmarks/paper/budget.py`, "
                    f"[`budget.json`]({(rel / 'budget.json').as_posix()})): {cpu['total']:.0f} CPU-minutes ({per}); "
                    f"`clipforge experiment all` runs findings 2–5 and 1 + 6 as two single-threaded jobs, about "
                    f"**{b['two_streams_wall_min']:.0f} minutes on two free cores** (plus about a minute for the "
                    f"world). The wall times quoted per finding are those of the recorded run, on a machine shared "
                    f"with other jobs, and are much longer.")
    intro = report.parent / "discussion" / "intro.md"
    if intro.is_file():
        head.append(intro.read_text().strip())
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n\n".join(head) + "\n\n" + "\n".join(sections))
    return report
