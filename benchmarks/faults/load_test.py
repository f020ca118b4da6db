"""Load test: concurrent clients against a real ``clipforge serve`` on 127.0.0.1, bounded in time.

    .venv/bin/python benchmarks/faults/load_test.py [--seconds 60] [--clients 50] [--items 100000]
    .venv/bin/python benchmarks/faults/load_test.py --runtime onnx-int8    # the model's int8 ONNX export

Builds (or reuses, with --work) an index of ``--items`` synthetic unit vectors with metadata
(path, caption, label) directly through ``clipforge.search`` — text and embedding queries need
no images — for the ``nano`` model whose fingerprint it carries. Starts ``clipforge serve`` and
runs ``--clients`` asyncio clients for ``--seconds``, each sending one request at a time (httpx's,
or with ``--client raw`` the lean keep-alive client of ``rawhttp.py``, which leaves more of a
shared machine's CPU to the server):

    text      POST /search {"text", "k"}, one in ten with a metadata filter
    image     POST /search multipart: a small PNG upload + k
    classify  POST /classify multipart: PNG + labels (mostly a few fixed label sets, which the
              service caches; one in four a fresh random set, which costs prompt encoding)

Reports requests, throughput, p50/p99 latency per kind, every status code (5xx must be 0, and no
request may fail to get an answer), and the server's resident memory sampled every second: it
must stay flat: after a warm-up (the first quarter of the run, at most 15 s), the median of the
last third of the samples within 5% + 16 MiB of the first third's.
Writes ``benchmarks/results/load_test-latest.json`` (earlier runs: ``results/history/load_test.jsonl``);
exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import save_record  # noqa: E402
from harness import REPO, start_server  # noqa: E402
from support.images import encode  # noqa: E402
from support.search import LABELS, write_synthetic_embeddings  # noqa: E402

WORDS = ["cat", "dog", "car", "tree", "boat", "house", "bird", "flower", "red", "small", "old", "a photo of",
         "on the beach", "at night", "in the snow", "close-up", "painting", "sketch"]
LABEL_SETS = [["cat", "dog"], ["car", "boat", "plane"], list(LABELS), ["day", "night"], ["red", "green", "blue"]]
MIB = 2**20


def onnx_model(model_dir: Path, runtime: str) -> Path:
    """The nano model's ONNX export (``--runtime onnx``), int8 for ``onnx-int8``; made once, reused."""
    from clipforge.cli import main as cli

    out = model_dir.parent / f"model-{runtime}"
    if not (out / "onnx.json").exists():
        args = ["convert", "--model", str(model_dir), "--to", "onnx", "--out", str(out)]
        if cli(args + (["--quantize", "int8"] if runtime == "onnx-int8" else [])) != 0:
            raise SystemExit(f"could not export {model_dir} to ONNX")
    return out


def build(work: Path, items: int, kind: str) -> tuple[Path, Path, dict]:
    import clipforge
    from clipforge.search.build import build_or_update
    from clipforge.search.layout import model_fingerprint
    from clipforge.search.index import IndexConfig

    model_dir, index_dir = work / "model", work / f"index-{items}-{kind}"
    if (index_dir / "index.json").exists() and (model_dir / "model.safetensors").exists():
        info = json.loads((index_dir / "index.json").read_text())
        return model_dir, index_dir, {"reused": True, "kind": info["kind"], "params": info.get("params"),
                                      "recall": info.get("recall")}
    model = clipforge.create_model("nano", seed=0)
    clipforge.save(model, model_dir)
    t0 = time.time()
    write_synthetic_embeddings(work / f"emb-{items}", rows=items, part_size=10_000,
                               fingerprint=model_fingerprint(model))
    t1 = time.time()
    report = build_or_update([str(work / f"emb-{items}")], index_dir, IndexConfig(kind=kind, progress=False))
    return model_dir, index_dir, {"reused": False, "kind": report.kind, "reason": report.reason,
                                  "params": report.params, "recall": report.recall,
                                  "write_embeddings_s": round(t1 - t0, 1), "build_index_s": round(time.time() - t1, 1)}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def load(url: str, pid: int, seconds: float, clients: int, max_requests: int, seed: int,
               client_kind: str = "httpx") -> dict:
    import httpx

    import rawhttp

    rng = random.Random(seed)
    pngs = [encode_png(i) for i in range(32)]
    results: list[tuple[str, int, float]] = []  # (kind, status or -1, seconds)
    errors: list[str] = []
    rss: list[tuple[float, float]] = []
    t0 = time.time()
    cpu0 = time.process_time()  # the client's own CPU: on a shared machine, what the server lacks
    deadline = t0 + seconds

    def request():
        kind = rng.choices(["text", "image", "classify"], weights=[4, 3, 3])[0]
        k = rng.choice([1, 5, 10, 20, 50])
        if kind == "text":
            body = {"text": " ".join(rng.sample(WORDS, rng.randint(1, 4))), "k": k}
            if rng.random() < 0.1:
                body["filter"] = {"label": rng.choice(LABELS)}
            return kind, {"json": body}
        png = rng.choice(pngs)
        if kind == "image":
            return kind, {"files": {"image": ("q.png", png, "image/png")}, "data": {"k": str(k)}}
        labels = rng.choice(LABEL_SETS) if rng.random() < 0.75 else rng.sample(WORDS, rng.randint(2, 8))
        return kind, {"files": {"image": ("q.png", png, "image/png")}, "data": {"labels": json.dumps(labels)}}

    async def client(send) -> None:
        """One request at a time through ``send(path, request kwargs) -> status`` until the deadline."""
        while time.time() < deadline and len(results) + len(errors) < max_requests:
            kind, kw = request()
            path = "/classify" if kind == "classify" else "/search"
            start = time.perf_counter()
            try:
                results.append((kind, await send(path, kw), time.perf_counter() - start))
            except (httpx.HTTPError, rawhttp.HTTPError) as e:
                errors.append(f"{kind}: {type(e).__name__}: {e}")

    async def raw_client() -> None:
        c = rawhttp.Client(url)

        async def send(path: str, kw: dict) -> int:
            body = rawhttp.json_body(kw["json"]) if "json" in kw else rawhttp.multipart_body(kw["files"], kw["data"])
            return await c.post(path, *body)

        try:
            await client(send)
        finally:
            await c.close()

    async def sample_memory() -> None:
        while time.time() < deadline:
            value = rss_mib(pid)
            if value is not None:
                rss.append((round(time.time() - t0, 2), round(value, 1)))
            await asyncio.sleep(1.0)

    if client_kind == "raw":
        await asyncio.gather(sample_memory(), *(raw_client() for _ in range(clients)))
    else:
        # Idle connections expire on our side first (the server closes them after 5 s): otherwise a
        # request sent just as the server closes one is lost in the race, as with any HTTP/1.1 client.
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            async def send(path: str, kw: dict) -> int:
                return (await c.post(path, **kw)).status_code

            await asyncio.gather(sample_memory(), *(client(send) for _ in range(clients)))
    return {"results": results, "errors": errors, "rss": rss, "elapsed": time.time() - t0,
            "client_cpu_s": time.process_time() - cpu0}


def encode_png(i: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(i)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return encode(Image.fromarray(small).resize((64, 64), Image.BILINEAR), "PNG")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def summarise(run: dict) -> dict:
    res, elapsed = run["results"], run["elapsed"]
    out: dict = {"requests": len(res) + len(run["errors"]), "answered": len(res), "failed": len(run["errors"]),
                 "seconds": round(elapsed, 1), "throughput_rps": round(len(res) / elapsed, 1),
                 "client_cpu_ms_per_request": round(1000 * run["client_cpu_s"] / max(1, len(res)), 2)}
    statuses: dict[str, int] = {}
    for _, s, _ in res:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    out["statuses"] = dict(sorted(statuses.items()))
    out["5xx"] = sum(n for s, n in statuses.items() if s.startswith("5"))
    kinds = {}
    for kind in ("text", "image", "classify", "all"):
        lat = [t * 1000 for k, s, t in res if (kind == "all" or k == kind) and s == 200]
        kinds[kind] = {"ok": len(lat), "p50_ms": round(percentile(lat, 50), 1), "p99_ms": round(percentile(lat, 99), 1),
                       "mean_ms": round(statistics.fmean(lat), 1) if lat else None}
    out["latency"] = kinds
    rss = [v for _, v in run["rss"]]
    # The first quarter (at most 15 s) is warm-up under full load: threads start, caches fill.
    warm = [v for t, v in run["rss"] if t >= min(15.0, elapsed / 4)] or rss
    third = max(1, len(warm) // 3)
    first, last = statistics.median(warm[:third]), statistics.median(warm[-third:])
    out["rss_mib"] = {"first": rss[0], "max": max(rss), "last": rss[-1], "median_first_third": first,
                      "median_last_third": last, "growth": round(last - first, 1),
                      "flat": last <= first * 1.05 + 16}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--items", type=int, default=100_000, help="vectors in the synthetic index")
    ap.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"])
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    ap.add_argument("--server-threads", type=int, default=1, help="model threads of the server (--threads)")
    ap.add_argument("--runtime", default="torch", choices=["torch", "onnx", "onnx-int8"],
                    help="the server's model: PyTorch, or its ONNX export (fp32 or int8) in ONNX Runtime")
    ap.add_argument("--client", default="httpx", choices=["httpx", "raw"],
                    help="httpx's async client (the test as first written), or a lean one (rawhttp.py) that "
                         "leaves more of a shared machine's CPU to the server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="where the index is built (reused when present)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="clipforge-load-"))
    work.mkdir(parents=True, exist_ok=True)

    print(f"index: {args.items} vectors ({args.kind}) in {work} ...", flush=True)
    model_dir, index_dir, built = build(work, args.items, args.kind)
    print(f"  {built}", flush=True)
    if args.runtime != "torch":
        model_dir = onnx_model(model_dir, args.runtime)
    runtime = [] if args.runtime == "torch" else ["--runtime", args.runtime.split("-")[0]]  # torch: the default,
    # and the flag older servers lack (a before/after run starts the old code with PYTHONPATH)
    server, url = start_server(index_dir, model_dir, work / "logs", ["--threads", str(args.server_threads), *runtime])
    try:
        import httpx

        health = httpx.get(url + "/health", timeout=10).json()
        warm = asyncio.run(load(url, server.pid, 3, 2, 30, args.seed + 1))  # classifier cache, lazy imports
        idle_rss = rss_mib(server.pid)
        print(f"serving {health['items']} items ({health['index']}) at {url}; {len(warm['results'])} warm-up "
              f"requests; RSS {idle_rss:.0f} MiB. Load: {args.clients} clients for {args.seconds:.0f} s ...",
              flush=True)
        run = asyncio.run(load(url, server.pid, args.seconds, args.clients, args.max_requests, args.seed, args.client))
        after = httpx.get(url + "/health", timeout=30)
        still_serving = after.status_code == 200 and server.alive()
    finally:
        server.p.terminate()
        server.wait(30)
    s = summarise(run)
    s["still_serving_after"] = still_serving
    passed = s["5xx"] == 0 and s["failed"] == 0 and s["rss_mib"]["flat"] and still_serving
    print_table(s, args)
    record = {
        "benchmark": "load_test", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/faults/load_test.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                   "(client and server share them)",
        "python": platform.python_version(),
        "setup": {"items": args.items, "clients": args.clients, "seconds": args.seconds, "server_threads":
                  args.server_threads, "model": "nano (64-d, random weights)", "index": built, "client": args.client,
                  "runtime": {k: health.get(k) for k in ("runtime", "precision")},
                  "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                  "mix": "text 40% (10% filtered), image 30%, classify 30% (25% of them fresh label sets)"},
        "summary": s, "passed": passed, "errors": run["errors"][:20], "rss_series_mib": run["rss"],
    }
    path = save_record(record, "load_test", args.out, dt.datetime.fromisoformat(record["date"]))
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    print(f"\n{'PASSED' if passed else 'FAILED'}; written: {shown}")
    return 0 if passed else 1


def print_table(s: dict, args) -> None:
    print(f"\n{args.clients} clients, {s['seconds']} s: {s['requests']} requests, {s['answered']} answered, "
          f"{s['failed']} failed; throughput {s['throughput_rps']} req/s; statuses {s['statuses']} (5xx: {s['5xx']}); "
          f"client CPU {s['client_cpu_ms_per_request']} ms a request")
    print(f"\n{'kind':<9} {'ok':>7} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for kind, v in s["latency"].items():
        print(f"{kind:<9} {v['ok']:>7} {v['p50_ms']:>8} {v['p99_ms']:>8} {v['mean_ms']!s:>8}")
    m = s["rss_mib"]
    print(f"\nserver RSS (MiB): first {m['first']}, max {m['max']}, last {m['last']}; after warm-up, median of the "
          f"first third {m['median_first_third']} -> last third {m['median_last_third']} ({m['growth']:+}): "
          f"{'flat' if m['flat'] else 'GROWING'}; still serving after: {s['still_serving_after']}")


if __name__ == "__main__":
    sys.exit(main())
