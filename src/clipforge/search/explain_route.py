"""``POST /explain``: where in an image the model finds a query, as a picture or as numbers.

Multipart form:

- the image: ``image`` (an upload) or ``id`` (an indexed item, e.g. a search result);
- the query, one of: ``text``; ``query_image`` (an upload: image-to-image); ``embedding`` (a JSON
  list of ``dim`` numbers); ``label`` with optional ``templates`` (a zero-shot class, its prompts
  ensembled as ``/classify`` ensembles them);
- ``method``: auto (default), dense, relevance or gradcam; ``shifts``: 1 (default) to
  ``max_explain_shifts``, passes per axis over shifted copies (finer maps, shifts^2 the work);
  ``refine``: guided (default; the map fitted to the image's colour edges) or none (bilinear);
  ``format``: png (default; the map over the part of the image the model sees) or json (the map
  as numbers, [S][S] in [0, 1]).

The same key, body and pixel limits as the other routes; the model lock is held for the
explanation's passes (gradient methods run a backward pass), so searches wait for one explanation
at most. Explanations need the PyTorch model: an ONNX runtime answers 501.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from clipforge.errors import ClipforgeError
from clipforge.explanations import METHODS, REFINES, explain, methods_for
from clipforge.explanations.render import model_view, overlay
from clipforge.search.engine import Engine

FORMATS = ("png", "json")


def add_explain_route(app: FastAPI, engine: Engine, auth) -> None:
    settings = engine.settings

    @app.post("/explain", dependencies=[Depends(auth)], response_class=Response,
              responses={200: {"content": {"image/png": {}, "application/json": {}}}})  # fmt: skip
    async def explain_route(request: Request) -> Response:
        """Explanation map of an uploaded or indexed image for a text, image, embedding or label."""
        if not hasattr(engine.model, "visual"):
            raise HTTPException(501, f"explanations need the PyTorch model; this server runs {engine.runtime}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send multipart/form-data: an 'image' file (or an 'id') and a query")
        form = await request.form(max_files=2, max_fields=settings.max_templates + 10)
        method = str(form.get("method") or "auto")
        if method != "auto" and method not in METHODS:
            raise HTTPException(422, f"method: one of auto, {', '.join(METHODS)}")
        try:
            shifts = int(str(form.get("shifts") or 1))
        except ValueError:
            raise HTTPException(422, "shifts: an integer") from None
        if not 1 <= shifts <= settings.max_explain_shifts:
            raise HTTPException(422, f"shifts: between 1 and {settings.max_explain_shifts}")
        refine = str(form.get("refine") or "guided")
        if refine not in REFINES:
            raise HTTPException(422, f"refine: one of {', '.join(REFINES)}")
        fmt = str(form.get("format") or "png")
        if fmt not in FORMATS:
            raise HTTPException(422, f"format: one of {', '.join(FORMATS)}")
        query = await _query(form, engine)
        image = await _image(form, engine)
        try:
            maps, used = await run_in_threadpool(_run, engine, image, query, method, shifts, refine)
        except ClipforgeError as e:
            raise HTTPException(422, str(e)) from None
        headers = {"X-Explain-Method": used}
        if fmt == "json":
            values = [[round(float(v), 4) for v in row] for row in maps.tolist()]
            return JSONResponse({"method": used, "size": len(values), "map": values}, headers=headers)
        buf = io.BytesIO()
        await run_in_threadpool(lambda: overlay(model_view(image, engine.model.config.preprocess), maps).save(buf, "PNG"))
        return Response(buf.getvalue(), media_type="image/png", headers=headers)


async def _image(form, engine: Engine):
    upload, item = form.get("image"), form.get("id")
    if isinstance(upload, UploadFile) == (item is not None and item != ""):
        raise HTTPException(422, "give the image to explain: an 'image' file or an indexed item's 'id', one of them")
    if isinstance(upload, UploadFile):
        return await engine.decoded_image(await upload.read())
    try:
        item_id = int(str(item))
    except ValueError:
        raise HTTPException(422, f"id: an integer item id, got {str(item)[:40]!r}") from None
    return await engine.indexed_image(item_id)


async def _query(form, engine: Engine) -> Any:
    s = engine.settings
    given = [k for k in ("text", "query_image", "embedding", "label") if form.get(k) not in (None, "")]
    if len(given) != 1:
        raise HTTPException(422, "give one query: 'text', 'query_image', 'embedding' or 'label'"
                            + (f" (got {', '.join(given)})" if given else ""))
    kind, value = given[0], form.get(given[0])
    if kind in ("text", "label"):
        if not isinstance(value, str):
            raise HTTPException(422, f"{kind}: a text field, not a file")
        if len(value) > s.max_text_chars:
            raise HTTPException(422, f"{kind}: at most {s.max_text_chars} characters")
        if kind == "text":
            return value
        templates = [t for t in form.getlist("templates") if isinstance(t, str) and t.strip()] or list(s.templates)
        _check_templates(templates, value, s)
        weights = await run_in_threadpool(engine.classifier, [value], templates)  # [E, 1]
        return weights[:, 0].float()
    if kind == "query_image":
        if not isinstance(value, UploadFile):
            raise HTTPException(422, "query_image: an image file")
        return await engine.decoded_image(await value.read())
    try:
        numbers = json.loads(value)
        if not isinstance(numbers, list):
            raise TypeError
        vec = engine.unit_query(numbers, "embedding")[0]
    except (json.JSONDecodeError, TypeError, ValueError, RecursionError):
        raise HTTPException(422, "embedding: a JSON list of numbers") from None
    return torch.from_numpy(vec)


def _check_templates(templates: list[str], label: str, s) -> None:
    if len(templates) > s.max_templates:
        raise HTTPException(422, f"templates: at most {s.max_templates} templates, got {len(templates)}")
    if any(t.count("{}") != 1 for t in templates):
        raise HTTPException(422, "templates: each needs a {} where the label goes, exactly one")
    if max(len(t) for t in templates) - 2 + len(label) > s.max_prompt_chars:
        raise HTTPException(422, f"label/templates: a filled prompt would be over {s.max_prompt_chars} characters")


def _run(engine: Engine, image, query, method: str, shifts: int, refine: str):
    with engine.model_lock:
        options = methods_for(engine.model)
        used = options[0] if method == "auto" else method
        if used not in options:
            raise ClipforgeError(f"method {used!r} is not available for this model; it has: {', '.join(options)}")
        maps = explain(engine.model, image, query, method=used, shifts=shifts, refine=refine, preprocess=engine.preprocess,
                       tokenizer=engine.tokenizer)
    return maps, used
