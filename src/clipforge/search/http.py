"""Request/response models, body-size limit, Host/Origin guard and OpenAPI bodies of the search service."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from clipforge.errors import DataError
from clipforge.search.store import filter_sql


def validation_message(errors: list[dict]) -> str:
    """Pydantic's error list as one readable line: ``k: Input should be ...; text: ...``."""
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, ge=1, description="number of results")
    filter: dict[str, Any] | None = Field(
        None, description='metadata filter: field equals value (a list means any of), e.g. {"label": ["cat", "dog"]}'
    )

    @classmethod
    def checked(cls, raw: Any, settings):
        """Validated, within the server's limits; else a 422 naming the field."""
        if not isinstance(raw, dict):
            raise HTTPException(422, "body: expected a JSON object")
        try:
            req = cls.model_validate(raw)
        except ValidationError as e:
            raise HTTPException(422, validation_message(e.errors())) from None
        if req.k > settings.max_k:
            raise HTTPException(422, f"k: at most {settings.max_k}, got {req.k}")
        if getattr(req, "text", None) is not None and len(req.text) > settings.max_text_chars:
            raise HTTPException(422, f"text: at most {settings.max_text_chars} characters")
        if req.filter is not None:
            try:
                filter_sql(req.filter)
            except DataError as e:
                raise HTTPException(422, f"filter: {e}") from None
        return req


class SearchRequest(SearchOptions):
    """Exactly one of ``text`` or ``embedding`` (or, as multipart, an ``image`` file)."""

    text: str | None = Field(None, min_length=1, description="query text")
    embedding: list[float] | None = Field(None, description="query vector (normalised by the server)")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.text is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'text' or 'embedding' (or upload an 'image')")
        return self


class Hit(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    path: str
    score: float = Field(description="cosine similarity to the query")


class SearchResponse(BaseModel):
    results: list[Hit]


class LabelProbability(BaseModel):
    label: str
    probability: float
    score: float = Field(description="cosine similarity of the image to the prompt-ensembled label")


class ClassifyResponse(BaseModel):
    results: list[LabelProbability]
    templates: list[str]


class EmbedTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1)

    def check(self, settings) -> None:
        if len(self.texts) > settings.max_texts:
            raise HTTPException(422, f"texts: at most {settings.max_texts} per request, got {len(self.texts)}")
        if any(len(t) > settings.max_text_chars for t in self.texts):
            raise HTTPException(422, f"texts: each at most {settings.max_text_chars} characters")


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    items: int
    dim: int
    index: str
    model: str
    model_matches_index: bool
    auth: bool
    runtime: str = "torch"  # torch, or onnx (an ONNX export in ONNX Runtime)
    precision: str | None = None  # fp32/bf16/fp16 (torch), fp32/int8 (onnx)


def form_list(values: list[Any]) -> list[str]:
    """Labels/templates from a form: repeated fields, or one field holding a JSON array,
    several lines, or comma-separated values."""
    values = [v for v in values if isinstance(v, str)]
    if len(values) == 1:
        v = values[0].strip()
        if v.startswith("["):
            try:
                parsed = json.loads(v)
            except json.JSONDecodeError:
                raise HTTPException(422, "labels/templates: not a valid JSON array") from None
            if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                raise HTTPException(422, "labels/templates: the JSON array must hold strings")
            values = parsed
        else:
            values = v.splitlines() if "\n" in v else v.split(",")
    return [v.strip() for v in values if v.strip()]


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by Content-Length or while streaming."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send) -> None:
        await _reply(send, 413, f"request body over the limit of {self.limit} bytes")


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORT = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header's name (lowercase, IPv6 without brackets) and port: '[::1]:80' -> ('::1', 80)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, ""
    return name.rstrip("."), int(port) if port.isdigit() else None


class HostGuard:
    """ASGI middleware against DNS rebinding and cross-site requests.

    Host: a request is served only when its ``Host`` names this server: a localhost name
    (``localhost``, ``*.localhost``, ``127.0.0.1``, ``::1``), the address the connection came to
    (the bound address; the ASGI ``server``), or one of ``trusted`` (``"*"``: any name). A web
    page on an attacker's name that resolves to this machine (DNS rebinding) gets a 400.

    Origin: on every path but ``open_paths``/``open_prefixes`` (the page and its static files), a
    request whose ``Origin`` is not this server's own (scheme, name and port of the Host) gets a
    403, and so does one a browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site`` (another
    port of localhost is same-site). Clients that are not browsers send neither header."""

    def __init__(self, app, trusted: tuple[str, ...] = (), open_paths: tuple[str, ...] = ("/",),
                 open_prefixes: tuple[str, ...] = ("/static/",)) -> None:  # fmt: skip
        self.app = app
        self.any_host = "*" in trusted
        self.trusted = frozenset(split_host(t)[0] for t in trusted if t != "*")
        self.open_paths, self.open_prefixes = frozenset(open_paths), tuple(open_prefixes)

    def host_trusted(self, name: str, scope) -> bool:
        if self.any_host or name in LOCAL_NAMES or name.endswith(".localhost") or name in self.trusted:
            return True
        server = scope.get("server")
        return bool(server) and name == str(server[0]).lower().strip("[]")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        raw_host = headers.get(b"host")
        if raw_host is not None:
            host = raw_host.decode("latin-1")
            name, _ = split_host(host)
            if not self.host_trusted(name, scope):
                detail = (f"Host {host[:100]!r} is not a name of this server "
                          f"(start it with --trusted-host {name[:100]} to serve that name)")  # fmt: skip
                return await _reply(send, 400, detail)
        path = scope.get("path", "")
        if path not in self.open_paths and not path.startswith(self.open_prefixes):
            origin = headers.get(b"origin")
            if origin is not None and not self._same_origin(origin.decode("latin-1"), raw_host, scope):
                shown = origin.decode("latin-1")[:100]
                return await _reply(send, 403, f"cross-origin request refused (Origin {shown!r} is not this server)")
            site = headers.get(b"sec-fetch-site")
            if site in (b"cross-site", b"same-site"):
                return await _reply(send, 403, f"cross-origin request refused (Sec-Fetch-Site: {site.decode()})")
        await self.app(scope, receive, send)

    @staticmethod
    def _same_origin(origin: str, raw_host: bytes | None, scope) -> bool:
        if raw_host is None or origin.strip().lower() == "null":
            return False
        scheme = scope.get("scheme", "http")
        try:
            o = urlsplit(origin.strip().lower())
            o_port = o.port or _DEFAULT_PORT.get(o.scheme)
        except ValueError:
            return False
        name, port = split_host(raw_host.decode("latin-1"))
        return (o.scheme, (o.hostname or "").rstrip("."), o_port) == (scheme, name, port or _DEFAULT_PORT.get(scheme))


def _multipart(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required}


_IMAGE = {"type": "string", "format": "binary", "description": "image file (JPEG, PNG, WebP, ...)"}


def search_body_schema() -> dict:
    form = _multipart({
        "image": _IMAGE, "k": {"type": "integer", "default": 10},
        "filter": {"type": "string", "description": "metadata filter as a JSON object"},
    }, ["image"])  # fmt: skip
    content = {"application/json": {"schema": SearchRequest.model_json_schema()}, "multipart/form-data": {"schema": form}}
    return {"requestBody": {"required": True, "content": content}}


def classify_body_schema() -> dict:
    form = _multipart({
        "image": _IMAGE,
        "labels": {"type": "array", "items": {"type": "string"},
                   "description": "repeated field, JSON array or comma-separated"},
        "templates": {"type": "array", "items": {"type": "string"},
                      "description": "prompt templates with {} for the label"},
    }, ["image", "labels"])  # fmt: skip
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


def image_body_schema() -> dict:
    form = _multipart({"image": _IMAGE}, ["image"])
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}
