"""Peak memory and time of loading a ViT-L-14 checkpoint: ``clipforge.load(file)`` against
OpenCLIP's ``create_model_and_transforms("ViT-L-14", pretrained=file)``, the same file.

Each load runs in a fresh process (peak RSS: the process's ``VmHWM``), alternating the two
libraries, for the checkpoint as safetensors and as a torch pickle (OpenCLIP's
``open_clip_pytorch_model.bin``). Random weights, written once to a temporary directory.

    python benchmarks/bench_load_memory.py [--reps 2] [--arch ViT-L-14]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_record  # noqa: E402

CHILD = r"""
import json, sys, time
import torch
lib, arch, path = sys.argv[1:4]
t = time.perf_counter()
if lib == "clipforge":
    import clipforge
    model, _ = clipforge.load(path, quick_gelu=True)
else:
    import open_clip
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=path)
seconds = time.perf_counter() - t
with torch.no_grad():  # every weight read once: a lazily mapped file counts in full
    total = sum(float(p.float().sum()) for p in model.parameters())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mb": hwm_kb / 1024, "seconds": seconds,
                  "params": sum(p.numel() for p in model.parameters()), "checksum": total}))
"""


def write_checkpoints(arch: str, root: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file

    from clipforge.model import checkpoints, factory

    model = factory.create_model(arch)
    files = {"safetensors": root / "open_clip_model.safetensors", "pickle": root / "open_clip_pytorch_model.bin"}
    checkpoints.save_openclip(model, files["safetensors"])
    torch.save(load_file(str(files["safetensors"])), files["pickle"])  # the same tensors, OpenCLIP's names
    return files


def load_once(lib: str, arch: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, lib, arch, str(path)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{lib} failed to load {path.name}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--reps", type=int, default=2, help="loads per library and format, alternating")
    args = ap.parse_args()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_checkpoints(args.arch, Path(tmp))
        for fmt, path in files.items():
            runs: dict[str, list[dict]] = {"clipforge": [], "open_clip": []}
            for rep in range(args.reps):
                for lib in runs:
                    runs[lib].append(load_once(lib, args.arch, path))
                    print(f"{fmt} {lib} #{rep + 1}: {runs[lib][-1]['peak_mb']:.0f} MB", flush=True)
            a, b = runs["clipforge"], runs["open_clip"]
            assert a[0]["params"] == b[0]["params"] and abs(a[0]["checksum"] - b[0]["checksum"]) < 1e-3 * abs(
                b[0]["checksum"]) + 1e-3, "the two libraries loaded different weights"
            med = {lib: {k: statistics.median(r[k] for r in rs) for k in ("peak_mb", "seconds")}
                   for lib, rs in runs.items()}
            results[fmt] = {"runs": runs, "median": med,
                            "peak_ratio": med["clipforge"]["peak_mb"] / med["open_clip"]["peak_mb"],
                            "file_mb": path.stat().st_size / 2**20}
            rows.append([fmt, f"{results[fmt]['file_mb']:.0f}", f"{med['clipforge']['peak_mb']:.0f}",
                         f"{med['open_clip']['peak_mb']:.0f}", f"{results[fmt]['peak_ratio']:.2f}",
                         f"{med['clipforge']['seconds']:.1f}", f"{med['open_clip']['seconds']:.1f}"])
    table = print_table(rows, ["file", "file MB", "clipforge peak MB", "open_clip peak MB", "ratio",
                               "clipforge s", "open_clip s"])
    path = write_record("load_memory", {"arch": args.arch, "reps": args.reps, "results": results, "table": table})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
