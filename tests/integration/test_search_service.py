"""The HTTP service in-process (fastapi.testclient): endpoints, limits, malformed requests, API key.

The collection is a WebDataset shard of real photos with captions and a JSON ``label``, so
thumbnails are read back from the shard and the label is a filterable metadata field."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.cli import build_parser
from clipforge.search.build import build_or_update
from clipforge.search.embed import EmbedConfig, embed_images
from clipforge.search.index import IndexConfig
from clipforge.search.service import STATIC, ServeSettings, create_app
from clipforge.search.sources import InputSpec, list_images
from support.datasets import add_member

PHOTOS = {"astronaut.png": "person", "chelsea.png": "cat", "coffee.png": "drink", "rocket.jpg": "rocket",
          "horse.png": "animal", "camera.png": "person"}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine
    root = tmp_path_factory.mktemp("service")
    jpegs = {}
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i, (name, label) in enumerate(PHOTOS.items()):
            im = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
            im.thumbnail((160, 160))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            jpegs[label if label not in jpegs else f"{label}2"] = buf.getvalue()
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo: {name}".encode()),
                              ("json", json.dumps({"label": label, "n": i}).encode())):  # fmt: skip
                add_member(tar, f"{i:04d}.{ext}", data)
    model = clipforge.create_model("nano", seed=0).eval()
    table = list_images(InputSpec(str(root / "shard-000.tar")))
    embed_images(model, table, root / "emb", EmbedConfig(batch_size=4, num_workers=0, progress=False))
    build_or_update([str(root / "emb")], root / "index", IndexConfig(progress=False))
    preprocess = clipforge.get_preprocess(model)
    settings = ServeSettings(max_k=20, max_labels=4, max_request_bytes=300_000, max_image_pixels=2_000_000)
    client = TestClient(create_app(root / "index", model, preprocess, settings))
    keyed = TestClient(create_app(root / "index", model, preprocess, ServeSettings(api_key="s3cret")))
    yield client, keyed, jpegs, root
    torch.set_num_threads(threads)


def _image(data: bytes, name="q.jpg"):
    return {"image": (name, data, "image/jpeg")}


def test_health_and_openapi(world):
    client, *_ = world
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["items"] == 6 and h["dim"] == 64 and h["index"] == "flat"
    assert h["model_matches_index"] is True and h["auth"] is False and h["limits"]["max_k"] == 20
    spec = client.get("/openapi.json").json()
    assert {"/health", "/search", "/classify", "/embed/text", "/embed/image"} <= set(spec["paths"])
    assert set(spec["paths"]["/search"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "labels" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


def test_search_by_image_text_and_embedding(world):
    client, _, jpegs, root = world
    for label, data in jpegs.items():
        r = client.post("/search", files=_image(data), data={"k": "3"})
        assert r.status_code == 200, r.text
        hits = r.json()["results"]
        assert hits[0]["label"] == label.rstrip("2") and hits[0]["score"] > 0.999
        assert hits[0]["path"].startswith(str(root / "shard-000.tar") + "/") and hits[0]["caption"].startswith("a photo")
    hits = client.post("/search", json={"text": "a photo of a cat", "k": 6}).json()["results"]
    assert len(hits) == 6 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    vec = client.post("/embed/image", files=_image(jpegs["rocket"])).json()["embeddings"][0]
    assert len(vec) == 64 and abs(np.linalg.norm(vec) - 1) < 1e-4
    hits = client.post("/search", json={"embedding": [3 * v for v in vec], "k": 2}).json()["results"]
    assert hits[0]["label"] == "rocket"
    texts = client.post("/embed/text", json={"texts": ["a cat", "a dog"]}).json()
    assert texts["dim"] == 64 and np.allclose(np.linalg.norm(texts["embeddings"], axis=1), 1, atol=1e-4)


def test_search_with_metadata_filter(world):
    client, _, jpegs, _ = world
    r = client.post("/search", json={"text": "anything", "k": 10, "filter": {"label": "person"}})
    assert sorted(h["n"] for h in r.json()["results"]) == [0, 5]
    r = client.post("/search", files=_image(jpegs["cat"]), data={"k": "5", "filter": json.dumps({"label": ["rocket", "drink"]})})
    assert {h["label"] for h in r.json()["results"]} == {"rocket", "drink"}


def test_classify(world):
    client, _, jpegs, _ = world
    for labels in (["cat", "rocket", "cup"], json.dumps(["cat", "rocket", "cup"]), "cat, rocket, cup"):
        r = client.post("/classify", files=_image(jpegs["cat"]), data={"labels": labels})
        assert r.status_code == 200, r.text
        body = r.json()
        probs = [x["probability"] for x in body["results"]]
        assert sorted(x["label"] for x in body["results"]) == ["cat", "cup", "rocket"]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        assert len(body["templates"]) > 1  # the default prompt ensemble
    r = client.post("/classify", files=_image(jpegs["cat"]), data={"labels": ["cat", "dog"], "templates": ["art of a {}."]})
    assert r.json()["templates"] == ["art of a {}."]


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buf, "PNG")  # 9 Mpx in a few kB
    return buf.getvalue()


MALFORMED = [
    ("search", {"json": {"k": 3}}, 422, "exactly one of 'text' or 'embedding'"),
    ("search", {"json": {"text": "x", "k": 0}}, 422, "k:"),
    ("search", {"json": {"text": "x", "k": 21}}, 422, "k: at most 20"),
    ("search", {"json": {"text": "x" * 1001}}, 422, "text: at most 1000"),
    ("search", {"json": {"embedding": [1.0, 2.0]}}, 422, "expected 64 numbers"),
    ("search", {"json": {"embedding": [0.0] * 64}}, 422, "not all zeros"),
    ("search", {"json": {"text": "x", "filter": {"bad key": 1}}}, 422, "filter"),
    ("search", {"json": {"text": "x", "unknown": 1}}, 422, "unknown: Extra inputs"),
    ("search", {"json": [1, 2]}, 422, "expected a JSON object"),
    ("search", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("search", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "application/json or multipart"),
    ("search", {"files": {"image": ("x.jpg", b"garbage", "image/jpeg")}}, 422, "not an image"),
    ("search", {"files": {"image": ("x.jpg", b"", "image/jpeg")}}, 422, "empty"),
    ("search", {"files": {"image": ("b.png", _bomb(), "image/png")}}, 413, "too many pixels"),
    ("search", {"files": {"image": ("x.jpg", b"\xff" * 400_000, "image/jpeg")}}, 413, "over the limit"),
    ("search", {"files": {"other": ("x.txt", b"x")}}, 422, "needs an 'image' file"),
    ("classify", {"files": {"image": ("x.jpg", b"garbage")}, "data": {"labels": "a,b"}}, 422, "not an image"),
    ("classify", {"data": {"labels": "a"}}, 415, "multipart/form-data"),
    ("classify", {"files": {"other": ("x", b"x")}, "data": {"labels": "a"}}, 422, "'image' file"),
    ("classify", "no labels", 422, "at least one label"),
    ("classify", "too many labels", 422, "at most 4 labels"),
    ("classify", "duplicate labels", 422, "once"),
    ("classify", "bad template", 422, "templates: each needs a {}"),
    ("classify", "bad json labels", 422, "JSON array"),
    ("embed/text", {"json": {"texts": []}}, 422, "texts"),
    ("embed/text", {"json": {"texts": ["a"] * 65}}, 422, "at most 64"),
]


@pytest.mark.parametrize("endpoint, request_kw, status, message", MALFORMED, ids=[f"{m[0]}-{m[3][:20]}" for m in MALFORMED])
def test_malformed_requests_get_a_clear_4xx(world, endpoint, request_kw, status, message):
    client, _, jpegs, _ = world
    if isinstance(request_kw, str):
        data = {"no labels": {"labels": " , "}, "too many labels": {"labels": "a,b,c,d,e"},
                "duplicate labels": {"labels": "a,a"}, "bad template": {"labels": "a", "templates": "no slot"},
                "bad json labels": {"labels": "[1, 2]"}}[request_kw]  # fmt: skip
        request_kw = {"files": _image(jpegs["cat"]), "data": data}
    r = client.post(f"/{endpoint}", **request_kw)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_streamed_body_over_the_limit_is_refused(world):
    client, *_ = world

    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]


def test_thumbnails(world):
    client, *_ = world
    r = client.get("/thumbnail/1")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) <= 256
    assert client.get("/thumbnail/999").status_code == 404
    assert client.get("/thumbnail/abc").status_code == 422


def test_api_key(world):
    _, keyed, jpegs, _ = world
    assert keyed.get("/health").json()["auth"] is True
    assert keyed.get("/").status_code == 200  # the page itself loads; it asks for the key
    r = keyed.post("/search", json={"text": "x"})
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert keyed.post("/search", json={"text": "x"}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert keyed.post("/search", json={"text": "x"}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert keyed.post("/classify", files=_image(jpegs["cat"]), data={"labels": "a,b"},
                      headers={"Authorization": "Bearer s3cret"}).status_code == 200  # fmt: skip
    assert keyed.get("/thumbnail/0").status_code == 401
    assert keyed.get("/thumbnail/0?key=s3cret").status_code == 401  # never in a URL (access logs)
    assert keyed.get("/thumbnail/0", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_page_and_static_files_fetch_nothing_external(world):
    client, *_ = world
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text and 'id="classify-form"' in page.text
    for f in STATIC.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f
        assert client.get(f"/static/{f.name}").status_code == 200


def test_serve_binds_to_localhost_by_default():
    args = build_parser().parse_args(["serve", "--index", "i", "--model", "m"])
    assert args.host == "127.0.0.1"
