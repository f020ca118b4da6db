"""The search service under hostile input: every malformed request gets a 4xx with a message,
and the service keeps serving the same answers afterwards.

tests/integration/test_search_service.py checks a list of 26 hand-picked malformed requests.
Here hypothesis generates them: arbitrary JSON (any types, NaN/Infinity, deep nesting),
arbitrary bytes as JSON, multipart forms with arbitrary fields, images that are random bytes or
valid files with bytes flipped and cut, path parameters of any size. Plus the regressions that
fuzzing found, the limits the issue names (thousands of labels, k = 10^9, bodies over the limit,
decompression bombs, non-images) and unusual but valid images, which must be answered (200).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipforge
from clipforge.search.build import build_or_update
from clipforge.search.layout import model_fingerprint
from clipforge.search.index import IndexConfig
from clipforge.search.service import ServeSettings, create_app
from support.images import encode, odd_valid_images, png_claiming_size
from support.search import write_synthetic_embeddings

# Mangled TIFFs make Pillow warn, 1e308-sized vectors make numpy warn on overflow: expected noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Truncated File Read", "ignore:overflow encountered",
                                      "ignore:Corrupt EXIF data")

SETTINGS = ServeSettings(max_k=50, max_labels=20, max_templates=8, max_request_bytes=200_000,
                         max_image_pixels=1_000_000)
FUZZ = settings(max_examples=int(os.environ.get("CLIPFORGE_FUZZ_EXAMPLES", 60)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("service")
    model = clipforge.create_model("nano", seed=0).eval()
    write_synthetic_embeddings(root / "emb", rows=300, part_size=100, fingerprint=model_fingerprint(model))
    build_or_update([str(root / "emb")], root / "index", IndexConfig(progress=False))
    app = create_app(root / "index", model, clipforge.get_preprocess(model), SETTINGS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    torch.set_num_threads(threads)


def _rgb(size=(24, 20), seed=0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


VALID_IMAGES = [encode(_rgb(), "PNG"), encode(_rgb(), "JPEG"), encode(_rgb(), "GIF"), encode(_rgb(), "BMP"),
                encode(_rgb(), "TIFF"), encode(_rgb(), "WEBP"), encode(_rgb().convert("L"), "PNG")]


def _check(r, what) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        detail = r.json().get("detail")
        assert isinstance(detail, str) and detail, f"{what}: no message: {r.text[:300]}"


def _baseline(client) -> dict:
    return {
        "text": client.post("/search", json={"text": "a photo of a cat", "k": 5}).json(),
        "image": client.post("/search", files={"image": ("q.png", VALID_IMAGES[0])}, data={"k": "5"}).json(),
        "classify": client.post("/classify", files={"image": ("q.png", VALID_IMAGES[1])},
                                data={"labels": "cat,dog,car"}).json(),
    }


@pytest.fixture(scope="module")
def baseline(client):
    return _baseline(client)


# -- generated requests ------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
search_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "text": json_values | st.text(max_size=1200), "k": json_values | st.integers(),
        "embedding": json_values | st.lists(st.floats(), min_size=64, max_size=64),
        "filter": json_values | st.dictionaries(st.sampled_from(["label", "path", "bad key", "n"]), json_values),
    }),
)


@st.composite
def mangled_images(draw) -> bytes:
    """Random bytes, or a valid image with bytes overwritten and/or cut short."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(VALID_IMAGES)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut])


@FUZZ
@given(body=search_bodies)
def test_fuzzed_json_searches(client, body):
    text = json.dumps(body)  # NaN and Infinity included, as some clients send them
    _check(client.post("/search", content=text, headers={"content-type": "application/json"}), text[:200])


@FUZZ
@given(body=st.one_of(json_values, st.fixed_dictionaries({"texts": json_values})), raw=st.binary(max_size=300))
def test_fuzzed_text_embedding_and_raw_bytes(client, body, raw):
    text = json.dumps(body)
    _check(client.post("/embed/text", content=text, headers={"content-type": "application/json"}), text[:200])
    for path in ("/search", "/embed/text"):
        _check(client.post(path, content=raw, headers={"content-type": "application/json"}), raw[:100])


@FUZZ
@given(image=mangled_images(), k=st.text(max_size=12) | st.integers().map(str), flt=st.text(max_size=40))
def test_fuzzed_image_searches(client, image, k, flt):
    _check(client.post("/search", files={"image": ("q", image)}, data={"k": k, "filter": flt}), (image[:40], k, flt))
    _check(client.post("/embed/image", files={"image": ("q", image)}), image[:40])


labels = st.lists(st.text(max_size=25), max_size=30)


@FUZZ
@given(image=mangled_images(), labels=labels, templates=st.lists(st.text(max_size=20), max_size=6),
       as_one_field=st.booleans())
def test_fuzzed_classify(client, image, labels, templates, as_one_field):
    data = {"labels": ",".join(labels) if as_one_field else labels, "templates": templates}
    try:
        r = client.post("/classify", files={"image": ("q", image)}, data=data)
    except UnicodeEncodeError:  # lone surrogates: the client cannot even send them
        return
    _check(r, (image[:40], labels, templates))


@FUZZ
@given(item=st.integers() | st.text(min_size=1, max_size=30))
def test_fuzzed_thumbnail_ids(client, item):
    from urllib.parse import quote

    _check(client.get(f"/thumbnail/{quote(str(item), safe='')}"), item)


# -- named cases -------------------------------------------------------------------------------
def _form(fields: list[tuple[str, bytes]], image: bytes | None = VALID_IMAGES[0]) -> tuple[bytes, dict]:
    """A hand-built multipart body (for bytes no client library would send)."""
    parts = [(b"image", image, True)] if image is not None else []
    parts += [(name.encode(), value, False) for name, value in fields]
    body = b""
    for name, value, is_file in parts:
        body += b'--B\r\nContent-Disposition: form-data; name="' + name + b'"'
        body += b'; filename="q.png"\r\n\r\n' if is_file else b"\r\n\r\n"
        body += value + b"\r\n"
    return body + b"--B--\r\n", {"content-type": "multipart/form-data; boundary=B"}


JSON = {"content-type": "application/json"}
REGRESSIONS = [  # each was a 500 before the fix beside it
    ("deep JSON nesting", "post", "/search", {"content": b"[" * 100_000, "headers": JSON}, 400, "not valid JSON"),
    ("deep JSON nesting, embed", "post", "/embed/text", {"content": b'{"texts": ' + b"[" * 100_000, "headers": JSON},
     400, "parsing the body"),
    ("filter integer beyond 64 bits", "post", "/search", {"json": {"text": "x", "filter": {"n": 10**30}}},
     422, "filter"),
    ("thumbnail id beyond 64 bits", "get", "/thumbnail/99999999999999999999999", {}, 404, "no indexed item"),
]
LIMITS = [
    ("k = 10^9 (JSON)", "post", "/search", {"json": {"text": "x", "k": 10**9}}, 422, "k: at most 50"),
    ("k = 10^9 (form)", "post", "/search", {"files": {"image": ("q", VALID_IMAGES[0])}, "data": {"k": "1000000000"}},
     422, "k: at most 50"),
    ("k = 10^400", "post", "/search", {"content": b'{"text": "x", "k": 1' + b"0" * 400 + b"}",
                                       "headers": {"content-type": "application/json"}}, 422, "k"),
    ("wrong types", "post", "/search", {"json": {"text": ["a"], "k": "ten"}}, 422, "text"),
    ("thousands of labels", "post", "/classify",
     {"files": {"image": ("q", VALID_IMAGES[0])}, "data": {"labels": ",".join(f"l{i}" for i in range(5000))}},
     422, "at most 20 labels"),
    ("thousands of label fields", "post", "/classify",
     {"files": {"image": ("q", VALID_IMAGES[0])}, "data": {"labels": [f"l{i}" for i in range(2100)]}},
     400, "Too many fields"),
    ("body over the limit", "post", "/search", {"json": {"text": "x" * 300_000}}, 413, "over the limit"),
    ("decompression bomb", "post", "/search", {"files": {"image": ("b.png", png_claiming_size(30_000, 30_000))}},
     (413, 422), "pixels"),  # over Pillow's own bomb limit: refused by it, before our size check
    ("PDF upload", "post", "/embed/image", {"files": {"image": ("a.pdf", b"%PDF-1.4\n%%EOF\n")}}, 422, "not an image"),
    ("HTML upload", "post", "/classify", {"files": {"image": ("a.html", b"<html></html>")}, "data": {"labels": "a"}},
     422, "not an image"),
    ("multipart without a boundary", "post", "/classify",
     {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
]


@pytest.mark.parametrize("name, method, path, kw, status, message", REGRESSIONS + LIMITS,
                         ids=[c[0] for c in REGRESSIONS + LIMITS])
def test_named_bad_requests_get_a_4xx_with_a_message(client, name, method, path, kw, status, message):
    r = getattr(client, method)(path, **kw)
    assert r.status_code in (status if isinstance(status, tuple) else (status,)), r.text[:300]
    assert message in r.json()["detail"], r.json()


def test_invalid_utf8_in_form_fields_is_answered(client):
    body, headers = _form([("labels", b"\xff\xfe,cat"), ("templates", b"a photo of a {}.")])
    r = client.post("/classify", content=body, headers=headers)
    assert r.status_code in (200, 422), r.text  # a label of odd characters is still a label
    body, headers = _form([("k", b"\xff\xfe")])
    r = client.post("/search", content=body, headers=headers)
    assert r.status_code == 422 and "k:" in r.json()["detail"]


@pytest.mark.parametrize("name", list(odd_valid_images()) + ["one-pixel", "float-tiff", "1-bit-bmp", "ico"])
def test_unusual_but_valid_images_are_answered(client, name):
    data = odd_valid_images().get(name) or {
        "one-pixel": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "float-tiff": encode(Image.fromarray(np.random.default_rng(0).random((16, 16)).astype(np.float32)), "TIFF"),
        "1-bit-bmp": encode(Image.new("1", (16, 16)), "BMP"),
        "ico": encode(Image.new("RGBA", (16, 16), (0, 0, 255, 255)), "ICO"),
    }[name]
    r = client.post("/search", files={"image": (name, data)}, data={"k": "3"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
    r = client.post("/classify", files={"image": (name, data)}, data={"labels": "cat,dog"})
    assert r.status_code == 200 and abs(sum(x["probability"] for x in r.json()["results"]) - 1) < 1e-5, r.text


def test_still_serving_the_same_answers_after_all_that(client, baseline):
    assert client.get("/health").json()["status"] == "ok"
    assert _baseline(client) == baseline
