"""clip-retrieval's back-end API beside clipforge's own, so its ``ClipClient`` and its clip-front
page can search a clipforge index.

    GET  /indices-list   ["<index name>"]
    POST /knn-service    {"text" | "image" (base64) | "image_url" | "embedding_input", "modality",
                          "num_images", "num_result_ids", "indice_name", "deduplicate", ...}
                         -> [{"id", "similarity", "caption", "url", "image_path", "image"}, ...]
    POST /metadata       {"ids": [...], "indice_name"} -> [{"id", "metadata": {...}}, ...]

Bodies are read as JSON whatever their content type: clip-front posts JSON as ``text/plain`` and
``ClipClient`` with none. The options clipforge has no model for (``use_safety_model``,
``use_violence_detector``, ``aesthetic_score``, ``aesthetic_weight``) are accepted and do
nothing; the answer's ``X-Clipforge-Ignored`` header names those a request turned on. Options
that would change what the query means (``use_mclip``, ``modality: "text"``, another index) are
a 422. ``image_url`` makes the server fetch a URL, so it is refused (403) unless the operator
allows it. Auth, Host checks and limits are the service's own; ``cors_origins`` lets named web
origins (a clip-front page on another port or host) call these three routes from a browser.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clipforge.search.engine import Engine
from clipforge.search.http import validation_message

ROUTES = ("/indices-list", "/knn-service", "/metadata")
DUPLICATE_COSINE = 0.94  # clip-retrieval's threshold: results this close count as one image
_IGNORED = ("use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight")
_FETCH_TIMEOUT_S = 10.0


class KnnRequest(BaseModel):
    """The body ``ClipClient`` and clip-front send; unknown fields are a 422, not ignored."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="base64 image file")
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: str = "image"
    num_images: int = Field(40, ge=1)
    num_result_ids: int | None = Field(None, ge=1)
    indice_name: str | None = None
    deduplicate: bool = False
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: int | str | None = None
    aesthetic_weight: float | str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[int]
    indice_name: str | None = None


def add_clip_retrieval_routes(app: FastAPI, engine: Engine, auth) -> None:
    """Register clip-retrieval's routes on the service's app (behind its ``auth`` dependency)."""
    settings = engine.settings
    name = settings.index_name or engine.index.dir.resolve().name

    @app.get("/indices-list", dependencies=[Depends(auth)], tags=["clip-retrieval"])
    def indices_list() -> list[str]:
        """The index names this server answers for (one)."""
        return [name]

    @app.post("/knn-service", dependencies=[Depends(auth)], tags=["clip-retrieval"])
    async def knn_service(request: Request) -> JSONResponse:
        """clip-retrieval's search: nearest indexed images to a text, image or embedding."""
        req = _parsed(KnnRequest, await _body(request))
        _check_knn(req, name, settings)
        query = await _query_vector(req, engine)
        want = max(req.num_result_ids or req.num_images, req.num_images)
        results = await run_in_threadpool(_knn, engine, query, want, req.num_images, req.deduplicate)
        # ClipClient turns the safety and aesthetic options on by default: say they did nothing.
        ignored = [k for k in _IGNORED if getattr(req, k) not in (None, "", False)]
        headers = {"X-Clipforge-Ignored": ",".join(ignored)} if ignored else {}
        return JSONResponse(await _with_images(engine, results[: req.num_images]) + results[req.num_images :],
                            headers=headers)  # fmt: skip

    @app.post("/metadata", dependencies=[Depends(auth)], tags=["clip-retrieval"])
    async def metadata(request: Request) -> list[dict]:
        """Metadata of indexed items by id (clip-front fetches it while scrolling)."""
        req = _parsed(MetadataRequest, await _body(request))
        _check_index(req.indice_name, name)
        if len(req.ids) > settings.max_k:
            raise HTTPException(422, f"ids: at most {settings.max_k} per request, got {len(req.ids)}")
        ids = [i for i in req.ids if 0 <= i < 2**63]  # larger ones cannot be SQLite ids
        items = await run_in_threadpool(engine.index.items, ids)
        found = [_hit(items[i]) for i in ids if i in items]
        found = await _with_images(engine, found)
        return [{"id": h.pop("id"), "metadata": h} for h in found]

    if settings.cors_origins:
        app.add_middleware(CrossOriginPages, origins=settings.cors_origins, paths=ROUTES)


# -- requests -------------------------------------------------------------------------------------


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"body is not valid JSON: {e}") from None
    except RecursionError:  # the parser's stack on absurd nesting: a bad request, not a crash
        raise HTTPException(400, "body is not valid JSON: nested too deeply") from None


def _parsed(model: type[BaseModel], raw: Any):
    if not isinstance(raw, dict):
        raise HTTPException(422, "body: expected a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise HTTPException(422, validation_message(e.errors())) from None


def _check_index(indice_name: str | None, name: str) -> None:
    if indice_name not in (None, "", name):
        raise HTTPException(422, f"indice_name: this server has no index {indice_name[:100]!r}; it has {[name]}")


def _check_knn(req: KnnRequest, name: str, s) -> None:
    _check_index(req.indice_name, name)
    if req.modality != "image":
        raise HTTPException(422, f"modality: only 'image' is served (the index holds image embeddings), "
                                 f"got {req.modality[:40]!r}")  # fmt: skip
    if req.use_mclip:
        raise HTTPException(422, "use_mclip: this server has no multilingual text encoder; send use_mclip false")
    if req.num_images > s.max_k:
        raise HTTPException(422, f"num_images: at most {s.max_k}, got {req.num_images}")
    if req.num_result_ids is not None and req.num_result_ids > s.max_result_ids:
        raise HTTPException(422, f"num_result_ids: at most {s.max_result_ids}, got {req.num_result_ids}")
    given = [k for k in ("text", "image", "image_url") if getattr(req, k)] + (
        ["embedding_input"] if req.embedding_input is not None else [])  # fmt: skip
    if len(given) != 1:
        raise HTTPException(422, "give exactly one of text, image, image_url or embedding_input"
                                 + (f"; got {', '.join(given)}" if given else ""))  # fmt: skip
    if req.text and len(req.text) > s.max_text_chars:
        raise HTTPException(422, f"text: at most {s.max_text_chars} characters")
    if req.image_url and not s.allow_image_url:
        raise HTTPException(403, "image_url: this server does not fetch URLs (the operator can allow it with "
                                 "--allow-image-url); send the image itself as base64 in 'image'")  # fmt: skip


async def _query_vector(req: KnnRequest, engine: Engine) -> np.ndarray:
    if req.text:
        return (await run_in_threadpool(engine.text_vectors, [req.text]))[0]
    if req.embedding_input is not None:
        return np.asarray(req.embedding_input, np.float32)  # _knn checks its width and normalises it
    data = _b64(req.image) if req.image else await run_in_threadpool(_fetch, req.image_url, engine.settings)
    pixels = await engine.decoded(data)
    return await run_in_threadpool(engine.pixels_vector, pixels)


def _b64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL, as a browser's FileReader gives
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise HTTPException(422, f"image: not base64 ({e})") from None


def _fetch(url: str, s) -> bytes:
    """The bytes at an http(s) URL, at most ``max_request_bytes``; only http(s), also after redirects."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    if urlsplit(url).scheme not in ("http", "https"):
        raise HTTPException(422, "image_url: only http and https URLs")
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, urllib.request.HTTPRedirectHandler,
                    urllib.request.HTTPDefaultErrorHandler, urllib.request.HTTPErrorProcessor):  # fmt: skip
        opener.add_handler(handler())  # no file:, ftp: or data: handlers, even through a redirect
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "clipforge"})
        with opener.open(request, timeout=_FETCH_TIMEOUT_S) as r:
            data = r.read(s.max_request_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise HTTPException(422, f"image_url: could not fetch it ({e})") from None
    if len(data) > s.max_request_bytes:
        raise HTTPException(413, f"image_url: the image is over the limit of {s.max_request_bytes} bytes")
    return data


# -- search ---------------------------------------------------------------------------------------


def _knn(engine: Engine, query: np.ndarray, want: int, with_meta: int, deduplicate: bool) -> list[dict]:
    """Hits best first: the first ``with_meta`` with their metadata, the rest ``id`` + ``similarity``."""
    q = engine.unit_query(query, "embedding_input")
    scores, ids = engine.index.search_ids(q, want)
    keep = ids[0] >= 0
    scores, ids = scores[0][keep], ids[0][keep]
    if deduplicate and len(ids) > 1:
        unique = _first_of_near_duplicates(engine.index.vectors(ids))
        scores, ids = scores[unique], ids[unique]
    items = engine.index.items([int(i) for i in ids[:with_meta]])
    out = []
    for rank, (i, score) in enumerate(zip(ids.tolist(), scores.tolist())):
        hit = _hit(items[i]) if rank < with_meta and i in items else {"id": i}
        out.append({**hit, "similarity": round(float(score), 6)})
    return out


def _first_of_near_duplicates(vecs: np.ndarray, threshold: float = DUPLICATE_COSINE) -> np.ndarray:
    """Positions to keep, in order: a result is dropped when a better-ranked kept one is within
    ``threshold`` cosine of it (the same picture indexed twice shows once)."""
    v = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)  # [n, d]
    sim = v @ v.T  # [n, n]; at most max_result_ids^2 floats (36 MB at 3,000)
    keep = np.ones(len(v), dtype=bool)
    for i in range(len(v)):
        if keep[i]:
            keep[i + 1 :] &= sim[i, i + 1 :] < threshold
    return np.flatnonzero(keep)


def _hit(item: dict) -> dict:
    """An item in clip-retrieval's terms: ``caption``, ``url`` (a metadata column of that name),
    ``image_path`` (where clipforge read it)."""
    hit: dict[str, Any] = {"id": item["id"], "image_path": item["path"]}
    for key in ("caption", "url"):
        if item.get(key) is not None:
            hit[key] = item[key]
    return hit


async def _with_images(engine: Engine, hits: list[dict]) -> list[dict]:
    """``image``: a base64 JPEG thumbnail for hits without a ``url``, as clip-retrieval's back end
    sends the picture of a local ``image_path`` (clip-front shows it); left out when unreadable."""
    for hit in hits:
        if "url" not in hit and "image_path" in hit:
            try:
                hit["image"] = base64.b64encode(await engine.thumbnail(hit["id"])).decode()
            except HTTPException:
                pass
    return hits


# -- browsers on other origins --------------------------------------------------------------------


class CrossOriginPages:
    """ASGI middleware, outside ``HostGuard``: a browser request to ``paths`` whose ``Origin`` is
    one of ``origins`` is let through (its Origin and Sec-Fetch-Site are taken off, so the guard
    judges only its Host) and answered with ``Access-Control-Allow-Origin``; preflights are
    answered here. Other origins and paths are left to the guard, which refuses them."""

    def __init__(self, app, origins: tuple[str, ...], paths: tuple[str, ...]) -> None:
        self.app = app
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in origins)
        self.paths = frozenset(paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin.strip().rstrip("/").lower() not in self.origins:
            return await self.app(scope, receive, send)
        allow = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope.get("method") == "OPTIONS":
            extra = [(b"access-control-allow-methods", b"GET, POST"),
                     (b"access-control-allow-headers", b"content-type, x-api-key, authorization"),
                     (b"access-control-max-age", b"600"), (b"content-length", b"0")]  # fmt: skip
            if b"access-control-request-private-network" in headers:  # a public page calling localhost
                extra.append((b"access-control-allow-private-network", b"true"))
            await send({"type": "http.response.start", "status": 204, "headers": allow + extra})
            return await send({"type": "http.response.body", "body": b""})
        drop = (b"origin", b"sec-fetch-site")
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() not in drop]}

        async def send_allowed(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers") or []) + allow}
            await send(message)

        await self.app(scope, receive, send_allowed)
