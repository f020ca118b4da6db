"""Hostile input against ``clipforge serve``, before and after the fixes of issue 19: for each
attack, what it costs the server and whether another client kept being answered.

    .venv/bin/python benchmarks/faults/hostile_service.py [--only a,b] [--before-src DIR] [--work DIR]

"before" is the code of HEAD (``git archive HEAD src``, extracted to a temporary directory)
unless ``--before-src`` names another ``src/`` tree; "after" is this checkout's ``src/``. For
every attack and version a fresh ``clipforge serve --threads 1`` (PYTHONPATH pointing at that
tree) serves a small index of the ``nano`` model on 127.0.0.1, and while the attack runs a
second client sends a text ``/search`` again and again. Reported per attack:

    answers      the attack's status codes (a refusal is a 4xx with a one-line message)
    seconds      wall time of the attack (all its requests)
    peak MiB     the server's peak RSS growth during it (VmHWM, reset through /proc/PID/clear_refs)
    left MiB     RSS growth still there 1 s after it
    other        the other client's median latency idle and its worst latency during the attack,
                 and whether every one of its requests was answered (200)

Attacks (rows of the issue):
    tokenize-16k-word       (1) one word of 16,000 letters through the tokenizer, in-process, no server
    classify-audit-request  (1) the audit's /classify: 6 labels of 1,000 letters, a template of sixteen {}
    classify-worst-accepted (1) the costliest /classify the fixed service accepts at its default limits:
                            100 labels x 32 templates, every prompt a distinct 299-character word
    embed-long-words        (1) /embed/text with 64 texts, each one distinct 1,000-letter word
    upload-4x-6300px-rgba   (2) four concurrent uploads of a 154 KB 6300 x 6300 RGBA PNG
    upload-4x-4096px-rgba   (2) four concurrent uploads of a 4096 x 4096 RGBA PNG (allowed by both)
    thumbnail-36mpx         (also) the thumbnail of an indexed 6000 x 6000 PNG
    key-in-url              (8) GET /thumbnail/1?key=KEY on a server with a key
    foreign-host            (9) POST /search with Host: rebind.example (DNS rebinding)
    foreign-origin          (9) POST /search with Origin: http://evil.example
    docs-and-schema         (10) GET /docs (external URLs in it?) and /openapi.json without the key

Writes ``benchmarks/results/hostile_service-cpu-latest.json`` (earlier runs:
``results/history/hostile_service.jsonl``). CPU only; about five minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import print_table, write_record  # noqa: E402
from harness import REPO, free_port  # noqa: E402  (also puts tests/ on sys.path)
from support.images import solid_png  # noqa: E402
from support.search import write_synthetic_embeddings  # noqa: E402

KEY = "bench-key"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ATTACKS = ["tokenize-16k-word", "classify-audit-request", "classify-worst-accepted", "embed-long-words",
           "upload-4x-6300px-rgba", "upload-4x-4096px-rgba", "thumbnail-36mpx", "key-in-url", "foreign-host",
           "foreign-origin", "docs-and-schema"]  # fmt: skip
KEYED = {"key-in-url", "docs-and-schema"}


def words(rng: random.Random, n: int, length: int) -> list[str]:
    return ["".join(rng.choice(LETTERS) for _ in range(length)) for _ in range(n)]


# -- the world and the server ----------------------------------------------------------------------
def build(work: Path) -> tuple[Path, Path]:
    """A nano model and an index of 40 synthetic items whose files are real: item 0 a 6000 x 6000
    PNG (for the thumbnail attack), the others a small JPEG."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    import clipforge
    from clipforge.search.build import build_or_update
    from clipforge.search.index import IndexConfig
    from clipforge.search.layout import model_fingerprint

    model_dir, index_dir = work / "model", work / "index"
    if (index_dir / "index.json").exists() and (model_dir / "model.safetensors").exists():
        return model_dir, index_dir
    model = clipforge.create_model("nano", seed=0)
    clipforge.save(model, model_dir)
    (work / "img").mkdir(parents=True, exist_ok=True)
    small, huge = work / "img" / "small.jpg", work / "img" / "huge.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)).save(small, "JPEG")
    huge.write_bytes(solid_png(6000, 6000, "RGB"))
    emb = work / "emb"
    write_synthetic_embeddings(emb, rows=40, part_size=40, fingerprint=model_fingerprint(model))
    meta = next((emb / "metadata").glob("*.parquet"))
    table = pq.read_table(meta)
    table = table.set_column(table.column_names.index("path"), "path", [[str(huge)] + [str(small)] * 39])
    pq.write_table(table, meta)
    build_or_update([str(emb)], index_dir, IndexConfig(progress=False))
    return model_dir, index_dir


class Server:
    """``clipforge serve`` from the given source tree, on 127.0.0.1."""

    def __init__(self, src: Path, model: Path, index: Path, log: Path, key: str | None = None) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "clipforge", "serve", "--index", str(index), "--model", str(model),
               "--port", str(self.port), "--threads", "1", *(["--api-key", key] if key else [])]  # fmt: skip
        self._log = open(log, "wb")
        self.p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self.headers = {"X-API-Key": key} if key else {}
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("serve did not come up within 120 s")

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
        return 0

    def reset_peak(self) -> None:
        Path(f"/proc/{self.p.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self._log.close()


class OtherClient:
    """Another user: a text /search, again and again, until stopped; every latency kept."""

    def __init__(self, server: Server) -> None:
        self.server, self.latencies, self.codes = server, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.server.url, headers=self.server.headers, timeout=300) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    code = c.post("/search", json={"text": "a photo of a cat", "k": 5}).status_code
                except httpx.HTTPError:
                    code = -1
                self.latencies.append(time.perf_counter() - t0)
                self.codes.append(code)
                self._stop.wait(0.05)

    def __enter__(self) -> OtherClient:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=300)


def idle_latency(server: Server, n: int = 10) -> float:
    import httpx

    out = []
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.post("/search", json={"text": "a photo of a cat", "k": 5})
            out.append(time.perf_counter() - t0)
    return statistics.median(out[2:])


# -- the attacks: each returns (status codes, notes) --------------------------------------------
def _post(url: str, path: str, headers: dict | None = None, **kw):
    import httpx

    with httpx.Client(base_url=url, headers=headers or {}, timeout=600) as c:
        return c.post(path, **kw)


def _concurrent(fn, n: int) -> list:
    out: list = [None] * n

    def one(i: int) -> None:
        out[i] = fn()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return out


def _detail(r) -> str:
    try:
        return str(r.json().get("detail", ""))[:160]
    except ValueError:
        return r.text[:160]


def attack(name: str, s: Server) -> tuple[list[int], list[str]]:
    import httpx

    rng = random.Random(0)
    png = {"image": ("q.png", solid_png(32, 32, "RGB"), "image/png")}
    if name == "classify-audit-request":
        form = {"labels": words(rng, 6, 1000), "templates": ["{}" * 16]}
        r = _post(s.url, "/classify", s.headers, files=png, data=form)
        return [r.status_code], [_detail(r)] if r.status_code >= 400 else []
    if name == "classify-worst-accepted":
        templates = [f"{c}{{}}" for c in LETTERS[:26] + "éüßçñø"][:32]  # glued to the label: no prompt cached
        r = _post(s.url, "/classify", s.headers, files=png, data={"labels": words(rng, 100, 298),
                                                                   "templates": templates})  # fmt: skip
        return [r.status_code], [_detail(r)] if r.status_code >= 400 else []
    if name == "embed-long-words":
        r = _post(s.url, "/embed/text", s.headers, json={"texts": words(rng, 64, 1000)})
        return [r.status_code], [_detail(r)] if r.status_code >= 400 else []
    if name.startswith("upload-4x-"):
        side = 6300 if "6300" in name else 4096
        data = solid_png(side, side)
        rs = _concurrent(lambda: _post(s.url, "/search", s.headers, files={"image": ("big.png", data, "image/png")},
                                       data={"k": "3"}), 4)  # fmt: skip
        return [r.status_code for r in rs], sorted({_detail(r) for r in rs if r.status_code >= 400}) + [
            f"{len(data) // 1024} KB file"]
    if name == "thumbnail-36mpx":
        r = httpx.get(s.url + "/thumbnail/0", headers=s.headers, timeout=600)
        return [r.status_code], [_detail(r)] if r.status_code >= 400 else [f"{len(r.content)} byte JPEG"]
    if name == "key-in-url":
        r = httpx.get(f"{s.url}/thumbnail/1?key={KEY}", timeout=60)
        ok = httpx.get(f"{s.url}/thumbnail/1", headers=s.headers, timeout=60).status_code
        return [r.status_code], [f"with the header instead: {ok}"] + ([_detail(r)] if r.status_code >= 400 else [])
    if name == "foreign-host":
        r = _post(s.url, "/search", {**s.headers, "host": f"rebind.example:{s.port}"}, json={"text": "x", "k": 3})
        return [r.status_code], [_detail(r)] if r.status_code >= 400 else ["results served to the rebound name"]
    if name == "foreign-origin":
        r = _post(s.url, "/search", {**s.headers, "origin": "http://evil.example"}, json={"text": "x", "k": 3})
        return [r.status_code], [_detail(r)] if r.status_code >= 400 else ["results served to a foreign origin"]
    if name == "docs-and-schema":
        page = httpx.get(s.url + "/docs", timeout=60)
        spec = httpx.get(s.url + "/openapi.json", timeout=60)
        external = "http://" in page.text or "https://" in page.text
        return [page.status_code, spec.status_code], [
            f"/docs {'loads from external URLs (CDN)' if external else 'has no external URL'}",
            f"/openapi.json without the key: {spec.status_code}"]
    raise ValueError(name)


def tokenizer_row(src: Path) -> dict:
    """One 16,000-letter word through the tokenizer, in a fresh process over ``src``."""
    code = ("import random, time\nfrom clipforge.model.tokenizer import Tokenizer\nt = Tokenizer(); t('warm up')\n"
            "w = ''.join(random.Random(0).choice('abcdefghijklmnopqrstuvwxyz') for _ in range(16000))\n"
            "t0 = time.perf_counter(); t(w); print(time.perf_counter() - t0)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    return {"answers": [], "seconds": round(float(out.stdout.strip().splitlines()[-1]), 4), "notes": ["in-process"]}


def run_one(name: str, version: str, src: Path, model: Path, index: Path, work: Path) -> dict:
    if name == "tokenize-16k-word":
        return {"attack": name, "version": version, **tokenizer_row(src)}
    server = Server(src, model, index, work / f"serve-{version}-{name}.log", KEY if name in KEYED else None)
    try:
        idle = idle_latency(server)
        time.sleep(0.5)
        base = server.status("VmRSS")
        server.reset_peak()
        with OtherClient(server) as other:
            time.sleep(0.2)
            t0 = time.perf_counter()
            answers, notes = attack(name, server)
            seconds = time.perf_counter() - t0
        peak = server.status("VmHWM") - base
        time.sleep(1.0)
        left = server.status("VmRSS") - base
        alive = server.p.poll() is None
    finally:
        server.stop()
    lat = other.latencies
    return {
        "attack": name, "version": version, "answers": answers, "notes": notes, "seconds": round(seconds, 3),
        "peak_rss_growth_mib": round(peak / 1024, 1), "rss_left_mib": round(left / 1024, 1),
        "other_idle_ms": round(1000 * idle, 1), "other_max_ms": round(1000 * max(lat), 1) if lat else None,
        "other_requests": len(lat), "other_all_answered": bool(lat) and all(c == 200 for c in other.codes),
        "server_alive": alive,
    }  # fmt: skip


def head_src(into: Path) -> Path:
    """HEAD's src/ tree, extracted with ``git archive`` (the checkout is not touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ATTACKS), help=f"comma-separated subset of: {', '.join(ATTACKS)}")
    ap.add_argument("--before-src", type=Path, default=None, help="the 'before' src/ tree (default: HEAD's)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default: benchmarks/results)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # the world, in a child
    args = ap.parse_args()
    if args.build_only:
        build(args.work)
        return 0
    chosen = [a.strip() for a in args.only.split(",") if a.strip()]
    if set(chosen) - set(ATTACKS):
        ap.error(f"unknown attacks {sorted(set(chosen) - set(ATTACKS))}")
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="clipforge-hostile-"))
    versions = {"before": args.before_src or head_src(work / "head"), "after": REPO / "src"}
    # The model and index are written by the "before" code: the newer code reads older files,
    # not always the other way round.
    env = {**os.environ, "PYTHONPATH": str(versions["before"])}
    subprocess.run([sys.executable, __file__, "--build-only", "--work", str(work)], env=env, check=True)
    model, index = work / "model", work / "index"
    rows = []
    for name in chosen:
        for version, src in versions.items():
            print(f"[{time.strftime('%H:%M:%S')}] {name} ({version}) ...", flush=True)
            row = run_one(name, version, src, model, index, work)
            rows.append(row)
            print(f"    {row}", flush=True)
    table = print_table([
        [r["attack"], r["version"], " ".join(map(str, r["answers"])) or "-", r["seconds"],
         r.get("peak_rss_growth_mib", "-"), r.get("rss_left_mib", "-"),
         f"{r['other_idle_ms']} / {r['other_max_ms']}" if "other_idle_ms" in r else "-",
         {True: "yes", False: "NO"}.get(r.get("other_all_answered"), "-")]
        for r in rows
    ], ["attack", "code", "answers", "seconds", "peak MiB", "left MiB", "other ms idle / max", "other answered"])
    record = {
        "what": "hostile input against clipforge serve (issue 19): cost to the server and to another client",
        "before": "HEAD's src (git archive)" if args.before_src is None else str(args.before_src),
        "after": "this checkout's src", "rows": rows, "table": table,
    }  # fmt: skip
    path = write_record("hostile_service", record, "cpu", args.out)
    print(f"\nwritten: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
