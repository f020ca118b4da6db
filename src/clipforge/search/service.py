"""The search service: a FastAPI app over an index directory and a model, plus its web page.

    GET  /health              liveness and what is served
    POST /search              JSON {"text"|"embedding", "k", "filter"} or multipart image + k (+ filter)
    POST /classify            multipart image + labels (+ templates): zero-shot probabilities, best first
    POST /embed/text          JSON {"texts": [...]} -> unit embeddings
    POST /embed/image         multipart image -> unit embedding
    GET  /thumbnail/{id}      JPEG thumbnail of an indexed image (only ids in the index)
    GET  /                    the web page (static/, no external fetches)

Every limit (request bytes, image pixels, labels, templates, k, text length) is in
``ServeSettings``; a request over one, or malformed, gets a 4xx whose ``detail`` names it.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile

from clipforge.errors import ClipforgeError
from clipforge.model.factory import tokenizer_for
from clipforge.search import decode
from clipforge.search.layout import model_fingerprint
from clipforge.search.http import (
    BodyLimit, ClassifyResponse, EmbeddingsResponse, EmbedTextRequest, Health, SearchOptions, SearchRequest,
    SearchResponse, classify_body_schema, form_list, image_body_schema, search_body_schema, validation_message,
)  # fmt: skip
from clipforge.search.searcher import SearchIndex

STATIC = Path(__file__).parent / "static"
DEFAULT_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
    "a close-up photo of a {}.", "art of the {}.",
)  # fmt: skip


@dataclass(frozen=True)
class ServeSettings:
    max_request_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000  # larger uploads are refused before decoding (decompression bombs)
    max_k: int = 200
    max_labels: int = 100
    max_templates: int = 32
    max_text_chars: int = 1000
    max_texts: int = 64  # per /embed/text request
    api_key: str | None = None  # required on every endpoint but /health and the page's static files
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    thumbnail_size: int = 256


def create_app(
    index_dir: str | Path, model: torch.nn.Module, preprocess: Callable[[Any], torch.Tensor], settings: ServeSettings
) -> FastAPI:
    engine = _Engine(SearchIndex(index_dir), model, preprocess, settings)
    app = FastAPI(
        title="clipforge search",
        version="1",
        description="Text and image search over a CLIP embedding index, zero-shot classification, embeddings.",
    )
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
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
                data = await image.read()
                return {"results": await run_in_threadpool(engine.search_image, data, req.k, req.filter)}
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
        data = await image.read()
        return await run_in_threadpool(engine.classify, data, labels, templates)

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
        vec = await run_in_threadpool(engine.image_vector, await image.read())
        return {"embeddings": [vec.tolist()], "dim": engine.dim}

    @app.get("/thumbnail/{item_id}", dependencies=[Depends(auth)], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})  # fmt: skip
    def thumbnail(item_id: int) -> Response:
        data = engine.thumbnail(item_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


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
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise HTTPException(422, f"templates: each needs a {{}} where the label goes; got {bad[0]!r}")


def _auth_dependency(key: str | None):
    import secrets

    def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key") or request.query_params.get("key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, "missing or wrong API key (X-API-Key header, Bearer token or ?key=)")

    return check


class _Engine:
    """The model-side work, run in worker threads; one forward pass at a time."""

    def __init__(self, index: SearchIndex, model, preprocess, settings: ServeSettings) -> None:
        self.index, self.model, self.preprocess, self.settings = index, model.eval(), preprocess, settings
        self.device = next(model.parameters()).device
        self.dim = index.dim
        self.image_size = model.config.preprocess.image_size
        self._lock = threading.Lock()
        self.tokenizer = tokenizer_for(model)  # CLIP's BPE, or a Hugging Face text tower's own
        self._classifiers: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        expected = index.info.get("model", {}).get("model_fingerprint")
        self.model_matches = expected is None or expected == model_fingerprint(model)
        if model.config.embed_dim != index.dim:
            raise ClipforgeError(f"the model embeds into {model.config.embed_dim} dims but the index holds {index.dim}")

    def health(self) -> dict:
        return {
            "status": "ok", "items": len(self.index), "dim": self.dim, "index": self.index.kind,
            "model": self.model.config.name, "model_matches_index": self.model_matches,
            "auth": self.settings.api_key is not None, "limits": _limits(self.settings),
        }  # fmt: skip

    # -- encoders ------------------------------------------------------------------------------
    def _open(self, data: bytes) -> Image.Image:
        if not data:
            raise HTTPException(422, "image: the uploaded file is empty")
        try:
            im = decode.open_image(data, self.settings.max_image_pixels)
            im.draft("RGB", (self.image_size, self.image_size))  # as the embedder decodes (decode.py)
            im.load()
            return im
        except decode.UnreadableImage as e:
            code = 413 if "too many pixels" in str(e) else 422
            raise HTTPException(code, f"image: {e}") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise HTTPException(422, f"image: cannot decode ({e})") from None

    @torch.no_grad()
    def image_vector(self, data: bytes) -> np.ndarray:
        x = self.preprocess(self._open(data)).unsqueeze(0).to(self.device)  # [1, 3, S, S]
        with self._lock:
            feats = self.model.encode_image(x)  # [1, E]
        return F.normalize(feats.float(), dim=-1)[0].cpu().numpy()

    @torch.no_grad()
    def text_vectors(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)  # [N, context_length]
        with self._lock:
            feats = self.model.encode_text(tokens)  # [N, E]
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    # -- endpoints' work -----------------------------------------------------------------------
    def search_vector(self, vec, k: int, flt: dict | None) -> list[dict]:
        q = np.asarray(vec, np.float32).reshape(1, -1)  # [1, d]
        if q.shape[1] != self.dim:
            raise HTTPException(422, f"embedding: expected {self.dim} numbers, got {q.shape[1]}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0:
            raise HTTPException(422, "embedding: must be finite and not all zeros")
        return self.index.search(q / norm, k, flt)[0]

    def search_text(self, text: str, k: int, flt: dict | None) -> list[dict]:
        return self.search_vector(self.text_vectors([text])[0], k, flt)

    def search_image(self, data: bytes, k: int, flt: dict | None) -> list[dict]:
        return self.search_vector(self.image_vector(data), k, flt)

    @torch.no_grad()
    def classify(self, data: bytes, labels: list[str], templates: list[str]) -> dict:
        from clipforge.eval.zeroshot import build_zeroshot_classifier

        img = torch.from_numpy(self.image_vector(data))  # [E]
        key = (tuple(labels), tuple(templates))
        with self._lock:
            weights = self._classifiers.get(key)
            if weights is None:
                weights = build_zeroshot_classifier(self.model, labels, templates, device=self.device)  # [E, C]
                self._classifiers[key] = weights
                if len(self._classifiers) > 64:
                    self._classifiers.popitem(last=False)
            self._classifiers.move_to_end(key)
            scale = float(self.model.scale())
        cos = img @ weights.float().cpu()  # [C]
        probs = torch.softmax(scale * cos, dim=-1)  # [C]
        order = torch.argsort(probs, descending=True).tolist()
        results = [{"label": labels[i], "probability": float(probs[i]), "score": float(cos[i])} for i in order]
        return {"results": results, "templates": templates}

    def thumbnail(self, item_id: int) -> bytes:
        if not 0 <= item_id < 2**63:  # ids are SQLite integers; larger ones cannot even be looked up
            raise HTTPException(404, f"no indexed item with id {item_id}")
        size = self.settings.thumbnail_size
        with self._lock:
            cached = self._thumbs.get((item_id, size))
        if cached is not None:
            return cached
        items = self.index.items([item_id])
        if item_id not in items:
            raise HTTPException(404, f"no indexed item with id {item_id}")
        item = items[item_id]
        try:
            data = decode.read_bytes(item["path"], item.get("tar_offset"), item.get("nbytes"))
            im = decode.open_image(data, 2**27)
            im.draft("RGB", (size, size))
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=85)
        except (decode.UnreadableImage, OSError, ValueError) as e:
            raise HTTPException(404, f"image of item {item_id} is not readable: {e}") from None
        out = buf.getvalue()
        with self._lock:
            self._thumbs[(item_id, size)] = out
            if len(self._thumbs) > 512:
                self._thumbs.popitem(last=False)
        return out


def _limits(s: ServeSettings) -> dict:
    return {
        "max_request_bytes": s.max_request_bytes, "max_image_pixels": s.max_image_pixels, "max_k": s.max_k,
        "max_labels": s.max_labels, "max_templates": s.max_templates, "max_text_chars": s.max_text_chars,
    }  # fmt: skip
