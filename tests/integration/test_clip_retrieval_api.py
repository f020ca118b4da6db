"""clip-retrieval's back-end API on `clipforge serve`: the real ``ClipClient`` (from the installed
clip-retrieval package) against a served index on loopback, and the API's refusals in-process.

The collection: six photos in a WebDataset shard with captions, one of them twice (for
deduplication) and one with a ``url`` metadata field."""

from __future__ import annotations

import base64
import contextlib
import http.server
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
from fastapi.testclient import TestClient
from PIL import Image
from support.datasets import add_member
from support.runs import free_port

import clipforge
from clipforge.search.build import build_or_update
from clipforge.search.embed import EmbedConfig, embed_images
from clipforge.search.index import IndexConfig
from clipforge.search.service import ServeSettings, create_app
from clipforge.search.sources import InputSpec, list_images

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "horse.png", "camera.png"]
URL = "https://example.org/coffee.jpg"


def clip_client_module():
    """clip_retrieval/clip_client.py by itself: the package's __init__ imports its Flask back end."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed (make install-dev installs it)")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("knn")
    jpegs = {}
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i, name in enumerate(PHOTOS + ["chelsea.png"]):  # the cat twice
            im = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
            im.thumbnail((128, 128))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            jpegs.setdefault(name, buf.getvalue())
            meta = {"n": i, **({"url": URL} if name == "coffee.png" else {})}
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo: {name}".encode()),
                              ("json", json.dumps(meta).encode())):  # fmt: skip
                add_member(tar, f"{i:04d}.{ext}", data)
    model = clipforge.create_model("nano", seed=0).eval()
    clipforge.save(model, root / "model")
    embed_images(model, list_images(InputSpec(str(root / "shard-000.tar"))), root / "emb",
                 EmbedConfig(batch_size=8, num_workers=0, progress=False))  # fmt: skip
    build_or_update([str(root / "emb")], root / "photos", IndexConfig(progress=False))
    yield {"root": root, "model": model, "preprocess": clipforge.get_preprocess(model), "jpegs": jpegs}
    torch.set_num_threads(threads)


def app(world, **settings) -> TestClient:
    served = create_app(world["root"] / "photos", world["model"], world["preprocess"], ServeSettings(**settings))
    return TestClient(served)


@contextlib.contextmanager
def clipforge_serve(world, *flags):
    """`clipforge serve` in a child process on a free loopback port; yields its base URL."""
    import requests

    port = free_port()
    cmd = [sys.executable, "-m", "clipforge", "serve", "--index", str(world["root"] / "photos"),
           "--model", str(world["root"] / "model"), "--port", str(port), "--threads", "1", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "CLIPFORGE_API_KEY": ""})  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("clipforge serve did not start:\n" + proc.stdout.read().decode()[-2000:])
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_clip_client_against_clipforge_serve(world, tmp_path):
    """Text, image-file and embedding queries, num_images and deduplication, through ClipClient."""
    cc = clip_client_module()
    query = tmp_path / "cat.jpg"
    query.write_bytes(world["jpegs"]["chelsea.png"])
    with clipforge_serve(world, "--index-name", "photos") as base:
        import requests

        assert requests.get(base + "/indices-list").json() == ["photos"]
        client = cc.ClipClient(url=base + "/knn-service", indice_name="photos", num_images=7, deduplicate=False)
        both = client.query(image=str(query))
        assert [h["caption"] for h in both[:2]] == ["a photo: chelsea.png"] * 2  # the cat, indexed twice
        assert both[0]["similarity"] > 0.999 and both[1]["similarity"] > 0.999
        assert len(both) == 7 and all({"id", "similarity", "image_path"} <= set(h) for h in both)
        cat = next(h for h in both if "image" in h)
        Image.open(io.BytesIO(base64.b64decode(cat["image"]))).verify()  # a JPEG thumbnail, as clip-front shows
        assert next(h for h in both if h["caption"] == "a photo: coffee.png")["url"] == URL

        dedup = cc.ClipClient(url=base + "/knn-service", indice_name="photos", num_images=7)  # deduplicate=True
        once = dedup.query(image=str(query))
        captions = [h["caption"] for h in once]
        assert captions[0] == "a photo: chelsea.png" and captions.count("a photo: chelsea.png") == 1
        kept = [h["id"] for h in both if h["id"] in {o["id"] for o in once}]
        assert [h["id"] for h in once] == kept  # the same order, duplicates left out

        three = cc.ClipClient(url=base + "/knn-service", indice_name="photos", num_images=3, deduplicate=False)
        hits = three.query(text="a photo of a cat")
        assert len(hits) == 3 and hits == sorted(hits, key=lambda h: -h["similarity"])
        vec = requests.post(base + "/embed/text", json={"texts": ["a photo of a cat"]}).json()["embeddings"][0]
        by_vec = three.query(embedding_input=vec)
        assert [h["id"] for h in by_vec] == [h["id"] for h in hits]
        assert np.allclose([h["similarity"] for h in by_vec], [h["similarity"] for h in hits], atol=1e-4)


def test_options_without_a_model_are_noops_and_others_are_refused(world):
    client = app(world, max_k=20)
    base = {"text": "a cat", "modality": "image", "num_images": 3, "indice_name": "photos"}
    plain = client.post("/knn-service", content=json.dumps(base))  # no content type, as ClipClient posts
    assert plain.status_code == 200, plain.text
    noop = client.post("/knn-service", content=json.dumps({**base, "use_safety_model": True, "aesthetic_score": 9}),
                       headers={"content-type": "text/plain;charset=UTF-8"})  # as clip-front posts
    assert noop.json() == plain.json() and noop.headers["x-clipforge-ignored"] == "use_safety_model,aesthetic_score"
    refused = [
        ({"modality": "text"}, 422, "modality"), ({"use_mclip": True}, 422, "use_mclip"),
        ({"indice_name": "laion5B"}, 422, "indice_name"), ({"num_images": 21}, 422, "num_images: at most 20"),
        ({"num_result_ids": 10**6}, 422, "num_result_ids"), ({"colour": "red"}, 422, "colour"),
        ({"image_url": "http://127.0.0.1:1/x.jpg", "text": None}, 403, "--allow-image-url"),
        ({"image": "bm90IGFuIGltYWdl", "text": None}, 422, "image"), ({"text": None}, 422, "exactly one"),
        ({"embedding_input": [1.0, 2.0], "text": None}, 422, "expected 64 numbers"),
        ({"embedding_input": [0.0] * 64, "text": None}, 422, "not all zeros"),
    ]
    for change, status, words in refused:
        r = client.post("/knn-service", content=json.dumps({**base, **change}))
        assert r.status_code == status and words in r.json()["detail"], (change, r.status_code, r.text)
    assert client.post("/knn-service", content=b"{nope").status_code == 400
    assert client.post("/knn-service", content=b"[1, 2]").status_code == 422


def test_metadata_and_index_name(world):
    client = app(world)
    assert client.get("/indices-list").json() == ["photos"]  # the index directory's name by default
    hits = client.post("/knn-service", json={"text": "a cat", "num_images": 2, "num_result_ids": 5}).json()
    assert len(hits) == 5 and "image_path" in hits[0] and set(hits[4]) == {"id", "similarity"}
    meta = client.post("/metadata", json={"ids": [hits[4]["id"], 10**30, 99], "indice_name": "photos"}).json()
    assert [m["id"] for m in meta] == [hits[4]["id"]] and "caption" in meta[0]["metadata"]
    assert client.post("/metadata", json={"ids": list(range(201))}).status_code == 422


def test_same_key_and_origin_rules_and_named_origins_allowed(world):
    keyed = app(world, api_key="s3cret")
    assert keyed.get("/indices-list").status_code == 401
    assert keyed.post("/knn-service", json={"text": "a cat"}).status_code == 401
    ok = keyed.post("/knn-service", json={"text": "a cat", "num_images": 1}, headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200 and len(ok.json()) == 1
    front = "http://localhost:1235"
    plain = app(world)
    assert plain.get("/indices-list", headers={"Origin": front}).status_code == 403
    allowed = app(world, cors_origins=(front,))
    r = allowed.get("/indices-list", headers={"Origin": front, "Sec-Fetch-Site": "same-site"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == front
    pre = allowed.options("/knn-service", headers={"Origin": front, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == front
    assert allowed.get("/indices-list", headers={"Origin": "http://evil.example"}).status_code == 403
    assert allowed.post("/search", json={"text": "a cat"}, headers={"Origin": front}).status_code == 403


def test_image_url_only_when_allowed(world):
    data = world["jpegs"]["rocket.jpg"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/rocket.jpg"
        body = {"image_url": url, "num_images": 1}
        assert app(world).post("/knn-service", json=body).status_code == 403
        fetching = app(world, allow_image_url=True)
        hit = fetching.post("/knn-service", json=body).json()[0]
        assert hit["caption"] == "a photo: rocket.jpg" and hit["similarity"] > 0.999
        r = fetching.post("/knn-service", json={"image_url": "file:///etc/passwd"})
        assert r.status_code == 422 and "http" in r.json()["detail"]
        small = app(world, allow_image_url=True, max_request_bytes=1000)
        assert small.post("/knn-service", json=body).status_code == 413
    finally:
        server.shutdown()
