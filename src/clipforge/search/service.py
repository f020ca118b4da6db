"""The search service: a FastAPI app over an index directory and a model, plus its web page.

    GET  /health              liveness and what is served
    POST /search              JSON {"text"|"embedding", "k", "filter"} or multipart image + k (+ filter)
    POST /classify            multipart image + labels (+ templates): zero-shot probabilities, best first
    POST /embed/text          JSON {"texts": [...]} -> unit embeddings
    POST /embed/image         multipart image -> unit embedding
    GET  /thumbnail/{id}      JPEG thumbnail of an indexed image (only ids in the index)
    POST /explain             multipart image (or id) + a query: explanation map, PNG or JSON (explain_route.py)
    GET  /openapi.json        the OpenAPI document (behind the key when one is set)
    GET  /docs                a local page listing the endpoints from it (no external fetches)
    GET  /                    the web page (static/, no external fetches)
    /knn-service, /indices-list, /metadata: clip-retrieval's back-end API (knn_compat.py)

Every limit (request bytes, image pixels, labels, templates, prompt and text length, k) is in
``ServeSettings``; a request over one, or malformed, gets a 4xx whose ``detail`` names it.

Hostile clients (issue 19). No single request holds the model for long: text is tokenized
outside the model lock, a classifier's prompts go through the model in batches of
``_TEXT_BATCH``, and the lock is granted first come first served, so a ``/search`` waits for one
batch at most. Uploaded images over ``max_image_pixels`` (by their header) are refused unread;
at most ``max_decodes`` images (uploads and thumbnails) are decoded at once, the others wait in
the event loop, not in a thread; a large image is decoded at a reduced scale (JPEG ``draft``)
or reduced (``Image.reduce``) before it is converted and resized. Uploads are decoded to RGB as
every reader decodes (``clipforge.imageio``), so a query image gives its indexed embedding. The
API key is read from headers only (a URL lands in access logs). ``HostGuard`` (http.py) refuses
Host names that are not this server's (DNS rebinding) and cross-origin requests to data routes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile

from clipforge.errors import ClipforgeError
from clipforge.search.engine import DEFAULT_TEMPLATES, Engine, ServeSettings  # noqa: F401 (re-exported)
from clipforge.search.http import (
    BodyLimit,
    ClassifyResponse,
    EmbeddingsResponse,
    EmbedTextRequest,
    Health,
    HostGuard,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    classify_body_schema,
    form_list,
    image_body_schema,
    search_body_schema,
    validation_message,
)  # fmt: skip
from clipforge.search.explain_route import add_explain_route
from clipforge.search.knn_compat import add_clip_retrieval_routes
from clipforge.search.searcher import SearchIndex

STATIC = Path(__file__).parent / "static"


def create_app(
    index_dir: str | Path, model: torch.nn.Module, preprocess: Callable[[Any], torch.Tensor], settings: ServeSettings
) -> FastAPI:
    engine = Engine(SearchIndex(index_dir), model, preprocess, settings)
    _large_image_blocks()
    app = FastAPI(
        title="clipforge search",
        version="1",
        description="Text and image search over a CLIP embedding index, zero-shot classification, embeddings.",
        openapi_url=None, docs_url=None, redoc_url=None,  # served below: behind the key, no CDN
    )  # fmt: skip
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(HostGuard, trusted=settings.trusted_hosts, open_paths=("/", "/docs"),
                       open_prefixes=("/static/",))  # fmt: skip
    auth = _auth_dependency(settings.api_key)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc.errors())}, status_code=422)

    @app.exception_handler(ClipforgeError)
    async def _bad_input(request: Request, exc: ClipforgeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/health", response_model=Health)
    def health() -> dict:
        return engine.health()

    @app.post("/search", response_model=SearchResponse, dependencies=[Depends(auth)],
              openapi_extra=search_body_schema())  # fmt: skip
    async def search(request: Request) -> dict:
        """Nearest indexed images to a text, an uploaded image, or an embedding; best first."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await _form(request)
            image, text = form.get("image"), form.get("text")
            raw = {"k": form.get("k") or 10, "filter": _json_field(form.get("filter"), "filter")}
            if isinstance(image, UploadFile):
                req = SearchOptions.checked(raw, settings)
                pixels = await engine.decoded(await image.read())
                return {"results": await run_in_threadpool(engine.search_pixels, pixels, req.k, req.filter)}
            if text is None:
                raise HTTPException(422, "multipart search needs an 'image' file (or a 'text' field)")
            req = SearchRequest.checked({**raw, "text": text}, settings)
        elif ctype.startswith("application/json"):
            req = SearchRequest.checked(await _json(request), settings)
        else:
            raise HTTPException(415, "send application/json or multipart/form-data")
        if req.text is not None:
            return {"results": await run_in_threadpool(engine.search_text, req.text, req.k, req.filter)}
        return {"results": await run_in_threadpool(engine.search_vector, req.embedding, req.k, req.filter)}

    @app.post("/classify", response_model=ClassifyResponse, dependencies=[Depends(auth)],
              openapi_extra=classify_body_schema())  # fmt: skip
    async def classify(request: Request) -> dict:
        """Zero-shot classification of an uploaded image against the given labels (prompt-ensembled)."""
        form = await _form(request)
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise HTTPException(422, "classify needs an 'image' file")
        labels = form_list(form.getlist("labels"))
        templates = form_list(form.getlist("templates")) or list(settings.templates)
        _check_labels(labels, templates, settings)
        pixels = await engine.decoded(await image.read())
        return await run_in_threadpool(engine.classify, pixels, labels, templates)

    @app.post("/embed/text", response_model=EmbeddingsResponse, dependencies=[Depends(auth)])
    def embed_text(body: EmbedTextRequest) -> dict:
        """Unit-norm text embeddings, one per input text."""
        body.check(settings)
        return {"embeddings": engine.text_vectors(body.texts).tolist(), "dim": engine.dim}

    @app.post("/embed/image", response_model=EmbeddingsResponse, dependencies=[Depends(auth)],
              openapi_extra=image_body_schema())  # fmt: skip
    async def embed_image(request: Request) -> dict:
        """Unit-norm embedding of an uploaded image."""
        form = await _form(request)
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise HTTPException(422, "embed/image needs an 'image' file")
        pixels = await engine.decoded(await image.read())
        vec = await run_in_threadpool(engine.pixels_vector, pixels)
        return {"embeddings": [vec.tolist()], "dim": engine.dim}

    @app.get("/thumbnail/{item_id}", dependencies=[Depends(auth)], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})  # fmt: skip
    async def thumbnail(item_id: int) -> Response:
        data = await engine.thumbnail(item_id)
        headers = {"Cache-Control": "private, max-age=3600", "Vary": "X-API-Key, Authorization"}
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(auth)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    add_explain_route(app, engine, auth)
    add_clip_retrieval_routes(app, engine, auth)  # /knn-service, /indices-list, /metadata: clip-retrieval's API
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


_IMAGE_BLOCK_BYTES = 64 * 2**20


def _large_image_blocks() -> None:
    """Pillow allocates an image's pixels in blocks of 16 MiB by default; once glibc has seen such
    blocks freed, it serves the next ones from its heap and keeps them resident: after four
    concurrent 4096 x 4096 RGBA uploads, 40-230 MiB stayed (benchmarks/faults/hostile_service.py).
    Blocks of 64 MiB are above glibc's largest mmap threshold (32 MiB), so they always go back to
    the system when freed (8 MiB stayed). A process-wide Pillow setting; only ever raised."""
    if Image.core.get_block_size() < _IMAGE_BLOCK_BYTES:
        Image.core.set_block_size(_IMAGE_BLOCK_BYTES)


async def _form(request: Request):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data with an 'image' file")
    # Starlette answers malformed multipart bodies (and too many fields/files) with a 400 itself.
    return await request.form(max_files=1, max_fields=2 * 1000 + 10)


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"body is not valid JSON: {e}") from None
    except RecursionError:  # e.g. 100,000 nested brackets: the parser's stack, not ours to crash
        raise HTTPException(400, "body is not valid JSON: nested too deeply") from None


def _json_field(value: Any, name: str) -> Any:
    if value is None or value == "":
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        raise HTTPException(422, f"{name}: must be a JSON object, e.g. {{\"label\": \"cat\"}}") from None


def _check_labels(labels: list[str], templates: list[str], s: ServeSettings) -> None:
    if not labels:
        raise HTTPException(422, "labels: give at least one label")
    if len(labels) > s.max_labels:
        raise HTTPException(422, f"labels: at most {s.max_labels} labels, got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise HTTPException(422, "labels: each label must appear once")
    if len(templates) > s.max_templates:
        raise HTTPException(422, f"templates: at most {s.max_templates} templates, got {len(templates)}")
    for t in labels + templates:
        if len(t) > s.max_text_chars:
            raise HTTPException(422, f"labels/templates: each at most {s.max_text_chars} characters")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise HTTPException(422, f"templates: each needs a {{}} where the label goes, exactly one; got {bad[0][:80]!r}")
    longest = max(len(t) - 2 for t in templates) + max(len(label) for label in labels)
    if longest > s.max_prompt_chars:
        raise HTTPException(422, f"labels/templates: a filled prompt would have {longest} characters, "
                                 f"over the limit of {s.max_prompt_chars}")  # fmt: skip


def _auth_dependency(key: str | None):
    import secrets

    def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not secrets.compare_digest(given.encode(), key.encode()):
            if not given and "key" in request.query_params:
                raise HTTPException(401, "the API key goes in the X-API-Key header (or a Bearer token), "
                                         "not in the URL, where access logs keep it")  # fmt: skip
            raise HTTPException(401, "missing or wrong API key (X-API-Key header or Bearer token)")

    return check
