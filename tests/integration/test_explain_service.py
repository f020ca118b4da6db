"""``POST /explain`` in-process: maps for uploads and indexed items, each query kind, PNG and
JSON; the abuse cases answer 4xx; the key is required where one is set; the CLI writes maps."""

import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.cli import main as cli_main
from clipforge.search.build import build_or_update
from clipforge.search.embed import EmbedConfig, embed_images
from clipforge.search.index import IndexConfig
from clipforge.search.service import ServeSettings, create_app
from clipforge.search.sources import InputSpec, list_images


def _png(seed: int, size=(96, 80)) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    (root / "imgs").mkdir()
    for i in range(4):
        (root / "imgs" / f"{i}.png").write_bytes(_png(i))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = clipforge.create_model("nano", seed=0).eval()
    clipforge.save(model, root / "model")
    embed_images(model, list_images(InputSpec(str(root / "imgs"))), root / "emb",
                 EmbedConfig(batch_size=4, num_workers=0, progress=False))
    build_or_update([str(root / "emb")], root / "index", IndexConfig(progress=False))
    preprocess = clipforge.get_preprocess(model)
    settings = ServeSettings(max_request_bytes=200_000, max_image_pixels=1_000_000, max_templates=3)
    client = TestClient(create_app(root / "index", model, preprocess, settings))
    keyed = TestClient(create_app(root / "index", model, preprocess, ServeSettings(api_key="k3y")))
    yield client, keyed, root, model
    torch.set_num_threads(threads)


NO_FILE = {"_": ("", b"", "text/plain")}  # makes the body multipart without an image


def _img(data: bytes, field="image"):
    return {field: ("q.png", data, "image/png")}


def test_maps_for_uploads_and_indexed_items(served):
    client, _, _, model = served
    r = client.post("/explain", files=_img(_png(7)), data={"text": "a red circle"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["x-explain-method"] == "relevance"  # the ViT default
    assert Image.open(io.BytesIO(r.content)).size == (224, 224)
    r = client.post("/explain", data={"id": "2", "text": "a dog", "method": "dense", "format": "json"}, files=NO_FILE)
    body = r.json()
    assert r.status_code == 200 and body["method"] == "dense" and body["size"] == 64, r.text
    m = np.asarray(body["map"])
    assert m.shape == (64, 64) and m.min() >= 0 and m.max() == 1
    # the same map as the library computes for the same pixels and query
    stored = Image.open(io.BytesIO(_png(2))).convert("RGB")
    ref = clipforge.explain(model, stored, "a dog", method="dense").numpy()
    assert np.abs(ref - m).max() < 2e-3
    r = client.post("/explain", data={"id": "2", "text": "a dog", "method": "dense", "format": "json", "refine": "none"},
                    files=NO_FILE)
    plain = clipforge.explain(model, stored, "a dog", method="dense", refine="none").numpy()
    assert np.abs(np.asarray(r.json()["map"]) - plain).max() < 2e-3 and np.abs(plain - m).max() > 2e-2
    emb = json.dumps(torch.randn(model.config.embed_dim).tolist())
    for data, files in (({"id": "0", "embedding": emb, "shifts": "2"}, NO_FILE), ({"id": "1"}, _img(_png(3), "query_image")),
                        ({"id": "1", "label": "cat", "templates": ["a photo of a {}."]}, NO_FILE)):  # fmt: skip
        r = client.post("/explain", data=data, files=files)
        assert r.status_code == 200, r.text


ABUSE = [
    ({"data": {"text": "x"}}, 422, "an 'image' file or an indexed item's 'id'"),
    ({"data": {"id": "1", "text": "x"}, "image": True}, 422, "one of them"),
    ({"data": {"id": "999", "text": "x"}}, 404, "no indexed item"),
    ({"data": {"id": "-5", "text": "x"}}, 404, "no indexed item"),
    ({"data": {"id": "abc", "text": "x"}}, 422, "integer item id"),
    ({"data": {"id": "1"}}, 422, "give one query"),
    ({"data": {"id": "1", "text": "x", "label": "y"}}, 422, "got text, label"),
    ({"data": {"id": "1", "text": "x" * 1001}}, 422, "at most 1000 characters"),
    ({"data": {"id": "1", "embedding": "[1, 2]"}}, 422, "embedding: expected 64 numbers, got 2"),
    ({"data": {"id": "1", "embedding": json.dumps([0] * 64)}}, 422, "not all zeros"),
    ({"data": {"id": "1", "embedding": '["a"]'}}, 422, "JSON list"),
    ({"data": {"id": "1", "embedding": "{nope"}}, 422, "JSON list"),
    ({"data": {"id": "1", "text": "x", "method": "lime"}}, 422, "method: one of"),
    ({"data": {"id": "1", "text": "x", "format": "gif"}}, 422, "format: one of"),
    ({"data": {"id": "1", "text": "x", "refine": "sharp"}}, 422, "refine: one of guided, none"),
    ({"data": {"id": "1", "text": "x", "shifts": "3"}}, 422, "shifts: between 1 and 2"),
    ({"data": {"id": "1", "text": "x", "shifts": "two"}}, 422, "shifts: an integer"),
    ({"data": {"id": "1", "label": "x", "templates": ["no slot"]}}, 422, "templates: each needs a {}"),
    ({"data": {"id": "1", "label": "x", "templates": ["{}", "a {}", "b {}", "c {}"]}}, 422, "at most 3 templates"),
]


@pytest.mark.parametrize("case, status, message", ABUSE, ids=[a[2][:24] for a in ABUSE])
def test_abuse_answers_4xx(served, case, status, message):
    client, *_ = served
    files = _img(_png(1)) if case.get("image") else NO_FILE
    r = client.post("/explain", data=case["data"], files=files)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_transport_limits_and_key(served):
    client, keyed, *_ = served
    assert client.post("/explain", json={"text": "x"}).status_code == 415
    assert client.post("/explain", files=_img(b"not an image"), data={"text": "x"}).status_code == 422
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(big, "PNG")  # 1.2 M pixels: over the limit of 1 M
    r = client.post("/explain", files=_img(big.getvalue()), data={"text": "x"})
    assert r.status_code == 413
    huge = b"x" * 300_000
    assert client.post("/explain", files=_img(huge), data={"text": "x"}).status_code == 413
    assert keyed.post("/explain", files=_img(_png(1)), data={"text": "x"}).status_code == 401
    ok = keyed.post("/explain", files=_img(_png(1)), data={"text": "x"}, headers={"X-API-Key": "k3y"})
    assert ok.status_code == 200


def test_cli_writes_overlay_panel_and_arrays(served, tmp_path, capsys):
    _, _, root, _ = served
    img = root / "imgs" / "1.png"
    assert cli_main(["explain", "--model", str(root / "model"), "--image", str(img), "--text", "a red circle",
                     "--out", str(tmp_path / "one.png"), "--npy", str(tmp_path / "one.npy")]) == 0
    assert Image.open(tmp_path / "one.png").size == (224, 224)
    assert np.load(tmp_path / "one.npy").shape == (64, 64)
    assert cli_main(["explain", "--model", str(root / "model"), "--image", str(img), "--text", "a", "--text", "b",
                     "--query-image", str(root / "imgs" / "2.png"), "--method", "dense", "--refine", "none",
                     "--out", str(tmp_path / "panel.png"), "--npy", str(tmp_path / "p.npy")]) == 0
    assert Image.open(tmp_path / "panel.png").size == (224 * 4 + 12, 224 + 18)
    assert np.load(tmp_path / "p.npy").shape == (3, 64, 64)
    assert "dense maps for 3 queries" in capsys.readouterr().out
    for argv, message in ((["--text", "x", "--out", str(tmp_path / "x.jpg")], ".png"),
                          (["--out", str(tmp_path / "x.png")], "at least one --text"),
                          (["--text", "x", "--out", str(tmp_path / "x.png"), "--image", str(tmp_path / "none.png")],
                           "no such image")):  # fmt: skip
        base = ["explain", "--model", str(root / "model"), "--image", str(img)]
        assert cli_main(base + argv) == 2
        assert message in capsys.readouterr().err


def test_every_data_route_needs_the_key(served):
    """A route added without the key check would serve anyone: every route but the page, its static
    files, the docs page and /health answers 401 without the key."""
    from fastapi.routing import APIRoute

    _, keyed, *_ = served
    open_paths = {"/", "/docs", "/health"}
    routes = [r for r in keyed.app.routes if isinstance(r, APIRoute) and r.path not in open_paths]
    assert {"/explain", "/search", "/knn-service", "/thumbnail/{item_id}"} <= {r.path for r in routes}
    for r in routes:
        path = r.path.replace("{item_id}", "1")
        for method in r.methods - {"HEAD", "OPTIONS"}:
            assert keyed.request(method, path).status_code == 401, (method, path)
