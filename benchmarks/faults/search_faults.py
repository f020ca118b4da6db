"""Search trials: ``clipforge embed`` and ``clipforge index`` SIGKILLed at random moments and run
again, a really full disk while embedding, and a live ``clipforge serve`` fed malformed requests.

"Data lost" counts input positions missing from, or present twice in, the embeddings (and
vectors that differ from an uninterrupted run), index items lost or duplicated, vectors
without an item or items without a vector, and for the service, requests answered with a 5xx
or not answered at all.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
from harness import Proc, Row, run, sleep_or_exit, start_server, tmpfs
from support.images import encode, png_claiming_size
from support.search import index_accounting, write_synthetic_embeddings


# -- embedding -----------------------------------------------------------------------------------
def make_images(root: Path, n: int = 300) -> Path:
    from PIL import Image

    d = root / "images"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = (np.random.default_rng(i).random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((48, 40)).save(d / f"{i:04d}.{'jpg' if i % 2 else 'png'}")
    for j, junk in enumerate([b"", b"not an image", b"\xff\xd8\xff\xe0 cut"]):
        (d / f"broken{j}.jpg").write_bytes(junk)
    return d


def _embed_args(model: Path, images: Path, out: Path, part_size: int = 20) -> list[str]:
    return ["embed", "--model", str(model), "--input", str(images), "--out", str(out), "--part-size", str(part_size),
            "--batch-size", "8", "--workers", "1", "--device", "cpu", "--no-progress"]


def _read_embeddings(out: Path):
    import pyarrow.parquet as pq

    from clipforge.search import embed

    parts = embed.finished_parts(out)
    vecs = np.concatenate([np.load(out / embed.part_name("img_emb", p, "npy")) for p in parts])
    positions = [r["position"] for p in parts
                 for r in pq.read_table(out / embed.part_name("metadata", p, "parquet")).to_pylist()]
    return vecs, positions


def _embed_lost(out: Path, clean: Path) -> tuple[int, str]:
    vecs, pos = _read_embeddings(out)
    ref_vecs, ref_pos = _read_embeddings(clean)
    missing, twice = len(set(ref_pos) - set(pos)), len(pos) - len(set(pos))
    differ = 0 if (missing or twice) else int((vecs != ref_vecs).any(axis=1).sum())
    skipped_same = (out / "skipped.tsv").read_text() == (clean / "skipped.tsv").read_text()
    lost = missing + twice + differ + (0 if skipped_same else 1)
    return lost, f"{len(pos)} embedded, {missing} missing, {twice} twice, {differ} vectors differ, " \
                 f"skip file {'identical' if skipped_same else 'DIFFERENT'}"


class EmbedWorld:
    def __init__(self, root: Path) -> None:
        import clipforge

        self.root = root
        self.images = make_images(root)
        self.model = clipforge.save(clipforge.create_model("nano", seed=0), root / "model")
        self.clean = root / "clean"
        rc, err, self.seconds = run(_embed_args(self.model, self.images, self.clean), root / "logs")
        assert rc == 0, err


def embed_sigkill(world: EmbedWorld, trials: int, rng: random.Random, kills: int = 5) -> Row:
    row = Row(f"embed: SIGKILL x{kills} at random moments, then run again")
    for t in range(trials):
        out = world.root / f"killed-{t}"
        done = 0
        for _ in range(kills * 3):
            if done == kills:
                break
            p = Proc(_embed_args(world.model, world.images, out), world.root / "logs")
            # early enough that a resumed run, with fewer parts left, is still under way
            if sleep_or_exit(p, rng.uniform(0.15, 0.65) * world.seconds) and p.kill():
                done += 1
            else:
                p.wait()
        rc, err, _ = run(_embed_args(world.model, world.images, out), world.root / "logs")
        lost, how = _embed_lost(out, world.clean) if rc == 0 else (1, err)
        row.add(rc == 0 and done == kills, lost, f"trial {t}: {done} kills; after the rerun: {how}")
    return row


def embed_disk_full(world: EmbedWorld, rng: random.Random) -> Row:
    row = Row("embed: disk full mid-run (real tmpfs), then space freed and run again")
    mnt = world.root / "mnt"
    with tmpfs(mnt, "64k") as resize:
        if resize is None:
            row.notes.append("skipped: mounting a tmpfs is not allowed here")
            return row
        out = mnt / "emb"
        p = Proc(_embed_args(world.model, world.images, out), world.root / "logs")
        rc, line = p.wait(), p.last_line()
        from clipforge.search import embed

        kept = embed.finished_parts(out)
        clean = rc == 2 and "No space left on device" in line and "Traceback" not in p.stderr()
        temporaries = [q.name for q in out.rglob("*") if q.name.endswith(".tmp")]
        resize("16m")
        rc2, err, _ = run(_embed_args(world.model, world.images, out), world.root / "logs")
        lost, how = _embed_lost(out, world.clean) if rc2 == 0 else (1, err)
        row.add(clean and not temporaries and rc2 == 0, lost,
                f"exit {rc}: {line[:170]!r}; {len(kept)} finished parts kept, temporaries left: {temporaries}; "
                f"after freeing space: {how}")
    return row


# -- indexing ------------------------------------------------------------------------------------
def index_sigkill(root: Path, trials: int, rng: random.Random, kills: int = 5) -> Row:
    """Index updates and rebuilds SIGKILLed at random moments; a refused index is rebuilt."""
    dirs = []
    for k in range(5):
        d = root / f"emb{k}"
        write_synthetic_embeddings(d, rows=8000, part_size=2000, seed=k, prefix=f"set{k}")
        dirs.append(str(d))
    expected = {f"/data/set{k}/{i:07d}.jpg" for k in range(5) for i in range(8000)}
    row = Row(f"index: update/rebuild SIGKILLed x{kills} at random moments, then run again")
    for t in range(trials):
        out = root / f"index-{t}"
        rc, err, _ = run(["index", "--embeddings", dirs[0], "--out", str(out), "--no-progress"], root / "logs")
        assert rc == 0, err
        rc, err, full = run(["index", "--embeddings", *dirs[:2], "--out", str(out), "--no-progress"], root / "logs")
        assert rc == 0, err
        done, refused, inconsistent, events = 0, 0, 0, []
        rebuild = False
        for _ in range(kills * 2):
            if done == kills:
                break
            rebuild = rebuild or rng.random() < 0.3
            args = ["index", "--embeddings", *dirs, "--out", str(out), "--no-progress"]
            args += ["--rebuild"] if rebuild else []
            p = Proc(args, root / "logs")
            mode = rng.choice(["random", "writing"])
            if mode == "random":
                alive = sleep_or_exit(p, rng.uniform(0.2, 1.5) * full)
            else:  # aimed: as soon as the index is being written (SQLite journal, temporaries, a build dir)
                alive = False
                while p.alive():
                    if _index_writing(out):
                        time.sleep(rng.uniform(0, 0.005))
                        alive = True
                        break
                    time.sleep(0.0005)
            if alive and p.kill():
                done += 1
                events.append(f"{'rebuild' if rebuild else 'update'}/{mode}")
                try:
                    acc = index_accounting(out)  # opens as the service would: consistent, or refused
                    inconsistent += int(acc["vectors"] != acc["items"] or acc["vectors_without_item"] > 0
                                        or acc["items_without_vector"] > 0 or acc["duplicate_paths"] > 0)
                    rebuild = False
                except Exception as e:  # noqa: BLE001 - a refusal (versions disagree) means: rebuild next
                    refused += 1
                    rebuild = "disagree" in str(e) or rebuild
            else:  # it finished first: everything is indexed, so the next attempt rebuilds (there is work to cut)
                p.wait()
                rebuild = True
        args = ["index", "--embeddings", *dirs, "--out", str(out), "--no-progress"]
        rc, err, _ = run(args, root / "logs")
        if rc == 2 and "--rebuild" in err:
            refused += 1
            rc, err, _ = run(args + ["--rebuild"], root / "logs")
        acc = index_accounting(out, expected) if rc == 0 else None
        lost = (acc["lost"] + acc["duplicate_paths"] + acc["vectors_without_item"] + acc["items_without_vector"]
                + abs(acc["items"] - len(expected))) if acc else len(expected)
        ok = rc == 0 and done == kills and acc is not None and acc["self_hit_misses"] == 0
        row.add(ok, lost + inconsistent, f"trial {t}: {done} kills during {events}; {inconsistent} times the index "
                f"opened inconsistent, {refused} times refused (versions disagree) and rebuilt; final: {acc or err}")
    return row


def _index_writing(out: Path) -> bool:
    import os

    try:
        names = os.listdir(out) if out.exists() else []
        siblings = os.listdir(out.parent)
    except OSError:
        return False
    return any(n.endswith((".tmp", "-journal")) for n in names) or any(
        n.startswith(f".{out.name}.build-") for n in siblings)


# -- the live service ----------------------------------------------------------------------------
def _malformed(rng: random.Random, png: bytes) -> tuple[str, str, dict]:
    """One random malformed (or borderline) request: (method, path, httpx keyword arguments)."""
    junk = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    mangled = bytearray(png)
    for _ in range(rng.randrange(1, 5)):
        mangled[rng.randrange(len(mangled))] = rng.randrange(256)
    mangled = bytes(mangled[: rng.randrange(1, len(mangled) + 1)])
    json_ct = {"content-type": "application/json"}
    cases = [
        ("post", "/search", {"content": junk, "headers": json_ct}),
        ("post", "/search", {"content": b"[" * rng.randrange(1, 200_000), "headers": json_ct}),
        ("post", "/search", {"json": {"text": "x", "k": rng.choice([0, -1, 10**9, 10**30, 2**63])}}),
        ("post", "/search", {"content": json.dumps({"embedding": [rng.choice([float("nan"), float("inf"), 1e308, 0.0,
                                                                              "a", None])] * 64}), "headers": json_ct}),
        ("post", "/search", {"json": {"text": rng.choice([None, 5, [], {}, "x" * 5000])}}),
        ("post", "/search", {"json": {"text": "x", "filter": rng.choice([{"a": 10**30}, {"": 1}, {"label": [[1]]},
                                                                          {"label": list(range(2000))}, []])}}),
        ("post", "/search", {"files": {"image": ("q.png", mangled)}, "data": {"k": rng.choice(["x", "-5", "1e9"])}}),
        ("post", "/search", {"files": {"image": ("b.png", png_claiming_size(rng.choice([5000, 40_000]), 40_000))}}),
        ("post", "/search", {"content": b"x" * rng.choice([10, 20 * 2**20]), "headers": json_ct}),
        ("post", "/classify", {"files": {"image": ("q.png", rng.choice([png, mangled, junk]))},
                               "data": {"labels": ",".join(f"l{i}" for i in range(rng.choice([0, 1, 5000])))}}),
        ("post", "/classify", {"files": {"image": ("q.png", png)},
                               "data": {"labels": "a,b", "templates": rng.choice(["no slot", "{}" * 3000, ""])}}),
        ("post", "/classify", {"content": junk, "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("post", "/embed/text", {"json": {"texts": rng.choice([[], ["a"] * 500, "abc", [None], ["x" * 9000]])}}),
        ("post", "/embed/image", {"files": {"image": ("q", rng.choice([junk, mangled, b"%PDF-1.4"]))}}),
        ("get", f"/thumbnail/{rng.choice([-1, 10**25, 'abc', 2**63, 12])}", {}),
        ("get", "/nope", {}),
        ("put", "/search", {"json": {"text": "x"}}),
    ]
    return rng.choice(cases)


def service_fuzz(root: Path, requests: int, rng: random.Random) -> Row:
    import httpx

    import clipforge
    from clipforge.search.build import build_or_update
    from clipforge.search.layout import model_fingerprint
    from clipforge.search.index import IndexConfig
    from PIL import Image

    model = clipforge.create_model("nano", seed=0)
    clipforge.save(model, root / "svc-model")
    write_synthetic_embeddings(root / "svc-emb", rows=2000, part_size=1000, fingerprint=model_fingerprint(model))
    build_or_update([str(root / "svc-emb")], root / "svc-index", IndexConfig(progress=False))
    p, url = start_server(root / "svc-index", root / "svc-model", root / "logs", ["--threads", "1"])
    png = encode(Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)), "PNG")
    row = Row(f"serve: {requests} random malformed/hostile requests to a live `clipforge serve`")
    statuses: dict[int, int] = {}
    failures = []
    t0 = time.time()
    with httpx.Client(base_url=url, timeout=60) as client:
        before = client.post("/search", json={"text": "a photo of a cat", "k": 5}).json()
        for i in range(requests):
            method, path, kw = _malformed(rng, png)
            try:
                r = client.request(method.upper(), path, **kw)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code >= 500 or (r.status_code >= 400 and not _has_detail(r)):
                    failures.append(f"{method} {path}: {r.status_code} {r.text[:120]}")
            except httpx.HTTPError as e:
                failures.append(f"{method} {path}: {type(e).__name__}: {e}")
        after = client.post("/search", json={"text": "a photo of a cat", "k": 5}).json()
        healthy = client.get("/health").json().get("status") == "ok"
    alive = p.alive()
    p.kill()
    row.add(not failures and alive and healthy and before == after, len(failures),
            f"{requests} requests in {time.time() - t0:.0f} s; statuses {dict(sorted(statuses.items()))}; "
            f"server alive {alive}, healthy {healthy}, same answers before/after {before == after}")
    row.notes += failures[:5]
    return row


def _has_detail(r) -> bool:
    try:
        return isinstance(r.json().get("detail"), str)
    except (json.JSONDecodeError, AttributeError):
        return False
