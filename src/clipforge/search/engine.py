"""The service's model-side work (``Engine``: decoding uploads, embedding, search, zero-shot
classification, thumbnails, one model pass at a time in arrival order) and its settings
(``ServeSettings``). ``service.create_app`` puts HTTP in front of it."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from PIL import Image

import clipforge.imageio as imageio
from clipforge.errors import ClipforgeError
from clipforge.eval.templates import fill
from clipforge.eval.zeroshot import ensemble_prompts
from clipforge.model.factory import tokenizer_for
from clipforge.search import decode
from clipforge.search.layout import model_fingerprint
from clipforge.search.searcher import SearchIndex

log = logging.getLogger("clipforge.search")

DEFAULT_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
    "a close-up photo of a {}.", "art of the {}.",
)  # fmt: skip


_TEXT_BATCH = 32  # prompts per model pass while a classifier is built; others' requests go between


@dataclass(frozen=True)
class ServeSettings:
    max_request_bytes: int = 16 * 2**20
    # Uploads with more pixels (by their header) are refused before decoding: 4096 x 4096, 64 MiB
    # decoded as RGBA (a 154 KB PNG can claim 40 M pixels: 300 MB to decode and resize).
    max_image_pixels: int = 2**24
    max_thumbnail_pixels: int = 2**25  # indexed images larger than this get no thumbnail (404)
    max_decodes: int = 2  # images decoded at once (uploads and thumbnails); the others wait
    decode_wait_s: float = 30.0  # ... at most this long, then 503
    max_k: int = 200
    max_labels: int = 100
    max_templates: int = 32
    max_text_chars: int = 1000
    max_prompt_chars: int = 300  # a filled /classify prompt (template + label); 77 tokens are ~300 characters
    max_texts: int = 64  # per /embed/text request
    max_explain_shifts: int = 2  # /explain's shifted passes per axis (each a forward, and a backward for gradients)
    api_key: str | None = None  # required on every endpoint but /health and the page's static files
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    thumbnail_size: int = 256
    # Host names served besides localhost names and the address a request came to ("*": any).
    trusted_hosts: tuple[str, ...] = ()
    # Serve with a model whose weights differ from the index's (its results then mean little):
    # refused unless asked for, and logged when it is.
    allow_model_mismatch: bool = False
    # clip-retrieval's API (knn_compat.py): the name /indices-list gives (default: the index
    # directory's name), the most ids one /knn-service answer lists (clip-front asks for 3,000),
    # whether image_url may make the server fetch a URL (a request to any address it can reach),
    # and the web origins (clip-front's page) allowed to call those routes from a browser.
    index_name: str | None = None
    max_result_ids: int = 3000
    allow_image_url: bool = False
    cors_origins: tuple[str, ...] = ()


class _FairLock:
    """A lock granted in the order it was asked for (a ticket lock): a request that waits for the
    model goes before the next batch of a long job that asked after it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class Engine:
    """The model-side work, run in worker threads: one model pass at a time, in arrival order."""

    def __init__(self, index: SearchIndex, model, preprocess, settings: ServeSettings) -> None:
        self.index, self.model, self.preprocess, self.settings = index, model.eval(), preprocess, settings
        param = next(model.parameters(), None)  # an ONNX export has none: it runs on the CPU
        self.device = param.device if param is not None else torch.device("cpu")
        self.runtime = getattr(model, "runtime", "torch")
        self.precision = getattr(model, "precision", None) if self.runtime == "onnx" else _dtype_name(param)
        self.dim = index.dim
        self.image_size = model.config.preprocess.image_size
        self._lock = _FairLock()  # the model
        self._cache_lock = threading.Lock()  # the two caches below
        self._decodes = threading.BoundedSemaphore(max(1, settings.max_decodes))
        self.tokenizer = tokenizer_for(model)  # CLIP's BPE, or a Hugging Face text tower's own
        self._classifiers: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        expected = index.info.get("model", {}).get("model_fingerprint")
        self.model_matches = expected is None or expected == model_fingerprint(model)
        if not self.model_matches:
            what = (f"the model's weights (fingerprint {model_fingerprint(model)}) are not those the index was "
                    f"built with ({expected})")
            if not settings.allow_model_mismatch:
                raise ClipforgeError(f"{what}: its query embeddings would not match the indexed ones; serve the "
                                     "model the embeddings were made with, or allow the mismatch explicitly")
            log.warning("%s; serving anyway (allow_model_mismatch)", what)
        if model.config.embed_dim != index.dim:
            raise ClipforgeError(f"the model embeds into {model.config.embed_dim} dims but the index holds {index.dim}")

    def health(self) -> dict:
        return {
            "status": "ok", "items": len(self.index), "dim": self.dim, "index": self.index.kind,
            "model": self.model.config.name, "model_matches_index": self.model_matches,
            "runtime": self.runtime, "precision": self.precision,
            "auth": self.settings.api_key is not None, "limits": _limits(self.settings),
        }  # fmt: skip

    # -- decoding ------------------------------------------------------------------------------
    async def _decode_slot(self, fn, *args):
        """``fn(*args)`` in a worker thread once one of the ``max_decodes`` slots is free. Waiting
        happens here in the event loop (polling), not in a thread: queued uploads hold no worker
        thread that a ``/search`` would need. The slot is released only when ``fn`` has returned
        (a cancelled request still waits for its thread)."""
        import anyio

        deadline = time.monotonic() + self.settings.decode_wait_s
        while not self._decodes.acquire(blocking=False):
            if time.monotonic() > deadline:
                raise HTTPException(503, f"busy: {self.settings.max_decodes} images are being decoded; try again")
            await anyio.sleep(0.005)
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            self._decodes.release()

    async def decoded(self, data: bytes) -> torch.Tensor:
        """An uploaded image as the model's input [3, S, S], decoded in a decode slot."""
        return await self._decode_slot(self._pixels, data)

    def _pixels(self, data: bytes) -> torch.Tensor:
        return self.preprocess(self._open(data))  # [3, S, S]

    async def decoded_image(self, data: bytes) -> Image.Image:
        """An uploaded image decoded to RGB (reduced to about twice the model's input size)."""
        return await self._decode_slot(self._open, data)

    async def indexed_image(self, item_id: int) -> Image.Image:
        """An indexed item's image, decoded as an upload is (404 when the id or its file is not there)."""
        items = await run_in_threadpool(self.index.items, [item_id]) if 0 <= item_id < 2**63 else {}
        if item_id not in items:
            raise HTTPException(404, f"no indexed item with id {item_id}")
        item = items[item_id]
        try:
            data = await run_in_threadpool(decode.read_bytes, item["path"], item.get("tar_offset"), item.get("nbytes"))
        except (decode.UnreadableImage, OSError) as e:
            raise HTTPException(404, f"image of item {item_id} is not readable: {e}") from None
        return await self.decoded_image(data)

    @property
    def model_lock(self) -> _FairLock:
        """Held for every model pass; an explanation holds it for its forward and backward passes."""
        return self._lock

    def _open(self, data: bytes) -> Image.Image:
        if not data:
            raise HTTPException(422, "image: the uploaded file is empty")
        try:
            return _decode_rgb(decode.open_image(data, self.settings.max_image_pixels), self.image_size)
        except decode.UnreadableImage as e:
            code = 413 if "too many pixels" in str(e) else 422
            raise HTTPException(code, f"image: {e}") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as e:
            raise HTTPException(422, f"image: cannot decode ({e})") from None

    # -- encoders ------------------------------------------------------------------------------
    @torch.no_grad()
    def pixels_vector(self, pixels: torch.Tensor) -> np.ndarray:
        x = pixels.unsqueeze(0).to(self.device)  # [1, 3, S, S]
        with self._lock:
            feats = self.model.encode_image(x)  # [1, E]
        return F.normalize(feats.float(), dim=-1)[0].cpu().numpy()

    @torch.no_grad()
    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Unit embeddings [N, E], ``_TEXT_BATCH`` texts per model pass, tokenized outside the lock."""
        feats = []
        for s in range(0, len(texts), _TEXT_BATCH):
            tokens = self.tokenizer(texts[s : s + _TEXT_BATCH]).to(self.device)  # [B, context_length]
            with self._lock:
                feats.append(self.model.encode_text(tokens).float())  # [B, E]
        return F.normalize(torch.cat(feats), dim=-1).cpu().numpy()

    # -- endpoints' work -----------------------------------------------------------------------
    def unit_query(self, vec, field: str = "embedding") -> np.ndarray:
        """A query vector as [1, d] float32 of unit norm; 422 naming ``field`` when it has the wrong
        size, is not finite or is all zeros."""
        q = np.asarray(vec, np.float32).reshape(1, -1)  # [1, d]
        if q.shape[1] != self.dim:
            raise HTTPException(422, f"{field}: expected {self.dim} numbers, got {q.shape[1]}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0:
            raise HTTPException(422, f"{field}: must be finite and not all zeros")
        return q / norm

    def search_vector(self, vec, k: int, flt: dict | None) -> list[dict]:
        return self.index.search(self.unit_query(vec), k, flt)[0]

    def search_text(self, text: str, k: int, flt: dict | None) -> list[dict]:
        return self.search_vector(self.text_vectors([text])[0], k, flt)

    def search_pixels(self, pixels: torch.Tensor, k: int, flt: dict | None) -> list[dict]:
        return self.search_vector(self.pixels_vector(pixels), k, flt)

    @torch.no_grad()
    def classifier(self, labels: list[str], templates: list[str]) -> torch.Tensor:
        """Zero-shot weights [E, C] (unit columns, float32, CPU), as ``build_zeroshot_classifier``
        computes them, but in batches of ``_TEXT_BATCH`` prompts, each tokenized outside the
        model lock and encoded holding it: other requests get the model between two batches."""
        key = (tuple(labels), tuple(templates))
        with self._cache_lock:
            if key in self._classifiers:
                self._classifiers.move_to_end(key)
                return self._classifiers[key]
        prompts = [fill(t, c) for t in templates for c in labels]  # template-major
        feats = []
        for s in range(0, len(prompts), _TEXT_BATCH):
            tokens = self.tokenizer(prompts[s : s + _TEXT_BATCH]).to(self.device)  # [B, L]
            with self._lock:
                feats.append(self.model.encode_text(tokens).float().cpu())  # [B, E]
        emb = F.normalize(torch.cat(feats), dim=-1).reshape(len(templates), len(labels), -1)  # [T, C, E]
        weights = ensemble_prompts(emb)  # [E, C]
        with self._cache_lock:
            self._classifiers[key] = weights
            if len(self._classifiers) > 64:
                self._classifiers.popitem(last=False)
        return weights

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor, labels: list[str], templates: list[str]) -> dict:
        img = torch.from_numpy(self.pixels_vector(pixels))  # [E]
        weights = self.classifier(labels, templates)  # [E, C]
        scale = float(self.model.scale())
        cos = img @ weights.float().cpu()  # [C]
        probs = torch.softmax(scale * cos, dim=-1)  # [C]
        order = torch.argsort(probs, descending=True).tolist()
        results = [{"label": labels[i], "probability": float(probs[i]), "score": float(cos[i])} for i in order]
        return {"results": results, "templates": templates}

    async def thumbnail(self, item_id: int) -> bytes:
        if not 0 <= item_id < 2**63:  # ids are SQLite integers; larger ones cannot even be looked up
            raise HTTPException(404, f"no indexed item with id {item_id}")
        size = self.settings.thumbnail_size
        with self._cache_lock:
            cached = self._thumbs.get((item_id, size))
        if cached is not None:
            return cached
        items = await run_in_threadpool(self.index.items, [item_id])
        if item_id not in items:
            raise HTTPException(404, f"no indexed item with id {item_id}")
        out = await self._decode_slot(self._thumbnail, item_id, items[item_id], size)
        with self._cache_lock:
            self._thumbs[(item_id, size)] = out
            if len(self._thumbs) > 512:
                self._thumbs.popitem(last=False)
        return out

    def _thumbnail(self, item_id: int, item: dict, size: int) -> bytes:
        try:
            data = decode.read_bytes(item["path"], item.get("tar_offset"), item.get("nbytes"))
            im = _decode_rgb(decode.open_image(data, self.settings.max_thumbnail_pixels), size)
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
        except (decode.UnreadableImage, OSError, ValueError, SyntaxError, MemoryError) as e:
            raise HTTPException(404, f"image of item {item_id} is not readable: {e}") from None
        return buf.getvalue()


def _decode_rgb(im: Image.Image, size: int) -> Image.Image:
    """A header-parsed image decoded to RGB as the embedder decodes it (``decode.prepare``: a
    large JPEG in draft mode, scaled by 1/2..1/8 while decoding with both sides kept >= ``size``;
    then ``clipforge.imageio.as_rgb``: the first frame, EXIF orientation, ``to_rgb``). An image
    whose short side is still 4x ``size`` or more is first reduced (box filter) to at least 2x
    it, between the orientation and ``to_rgb``, so neither ``to_rgb`` nor the resize runs at
    full size. Only where averaging first gives what ``to_rgb`` then gives at full size (up to
    rounding): 8-bit modes without a colour key (transparency is averaged premultiplied, so
    compositing on white after is the same). Palette indices cannot be averaged and 16/32-bit
    greys are rescaled by their maximum, which averaging would change: those go at full size."""
    if im.format == "JPEG":
        im.draft("RGB", (size, size))  # as decode.prepare does (a second draft would undo it)
    factor = min(im.size) // (2 * size)
    if factor < 2 or im.mode not in _REDUCIBLE or "transparency" in im.info:
        return decode.prepare(im)
    im.load()
    return imageio.to_rgb(imageio.upright(im).reduce(factor))


def _dtype_name(param: torch.Tensor | None) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(param.dtype, str(param.dtype)) if param is not None else "fp32"


_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


def _limits(s: ServeSettings) -> dict:
    return {
        "max_request_bytes": s.max_request_bytes, "max_image_pixels": s.max_image_pixels, "max_k": s.max_k,
        "max_labels": s.max_labels, "max_templates": s.max_templates, "max_text_chars": s.max_text_chars,
        "max_prompt_chars": s.max_prompt_chars, "max_explain_shifts": s.max_explain_shifts,
    }  # fmt: skip
