"""Running an ONNX export (``onnx_export``) with ONNX Runtime: ``OnnxCLIP`` answers as ``CLIP``
does where embedding, search and evaluation call it (``encode_image``, ``encode_text``, ``config``,
``context_length``, ``scale``, ``eval``/``to``), so those code paths run either model unchanged.

An export directory:

    DIR/image.onnx    pixels [B, 3, S, S] float32 -> features [B, E] (unnormalised, as encode_image)
    DIR/text.onnx     tokens [B, L] int64, L <= context length -> features [B, E]
    DIR/onnx.json     format, precision, the text trimming rule, logit scale/bias, source fingerprint
    DIR/config.json   the ClipConfig (preprocessing, tokenizer, embedding size)
    DIR/tokenizer/ or DIR/text_model/   the tokenizer's files

The text graph takes sequences of any length: a causal tower's batch is cut after the last pooled
position before the graph runs, as the PyTorch tower trims it (``TextTransformer.forward``), and a
Hugging Face tower's after the last non-padding column. onnxruntime is imported only here, on
first use, so the package imports without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ClipConfig
from clipforge.errors import CheckpointError, ClipforgeError
from clipforge.model.hf_tokenizer import with_local_tokenizer
from clipforge.model.text import eot_positions

FORMAT = "clipforge-onnx/1"
MANIFEST = "onnx.json"
IMAGE_FILE, TEXT_FILE = "image.onnx", "text.onnx"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def onnxruntime() -> Any:
    """The onnxruntime module, or a one-line error saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ClipforgeError("the ONNX runtime needs onnxruntime, which is not installed "
                             "(pip install 'clipforge[onnx]')") from None
    return ort


def is_onnx_export(path: str | Path) -> bool:
    """``path`` is a directory that ``export_onnx`` wrote (its manifest and both graphs)."""
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in (MANIFEST, IMAGE_FILE, TEXT_FILE))


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: not readable as JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST}: unknown ONNX export format {manifest.get('format')!r} "
                              f"(this clipforge reads {FORMAT})")
    return manifest


def keep_length(tokens: torch.Tensor, rule: dict[str, Any]) -> int:
    """How many leading columns of ``tokens`` [B, L] the text graph needs: the PyTorch tower's own
    trimming (``rule`` from the manifest). 'eot': up to the furthest pooled position; 'nonpad': up
    to the last column with a non-padding token; 'none': every column."""
    kind = rule["kind"]
    if kind == "none" or tokens.shape[1] == 0:
        return tokens.shape[1]
    if kind == "first":
        return 1
    if kind == "eot":
        pos = eot_positions(tokens, rule["eot_token_id"], fallback_argmax=rule["argmax_fallback"])  # [B]
        return int(pos.max()) + 1
    if kind == "nonpad":
        used = (tokens != rule["pad_token_id"]).any(dim=0).nonzero()  # columns holding a token
        return int(used[-1]) + 1 if len(used) else 1
    raise CheckpointError(f"unknown text trimming rule {kind!r} in the ONNX manifest")


def session(path: Path, threads: int) -> Any:
    """An ONNX Runtime session on the CPU with ``threads`` intra-op threads, every graph optimisation on."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # one graph at a time: parallelism is inside the operators
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({first})") from None


class OnnxCLIP(nn.Module):
    """Both towers of an ONNX export in ONNX Runtime sessions, on the CPU.

    A ``Module`` without parameters, so callers written for ``CLIP`` (``eval()``, ``to("cpu")``,
    ``parameters()``, ``state_dict()``) work as they are; its one buffer identifies the export
    (source weights and precision) for caches keyed on the state dict."""

    runtime = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        cfg = ClipConfig.from_json(self.path / CONFIG_FILE)
        self.config = with_local_tokenizer(cfg, self.path / TOKENIZER_DIR)
        self.precision: str = self.manifest.get("precision", "fp32")
        self.source_fingerprint: str = self.manifest["source"]["model_fingerprint"]
        self.threads = threads or torch.get_num_threads()
        self.image_session = self._session(IMAGE_FILE)
        self.text_session = self._session(TEXT_FILE)
        ident = f"{self.source_fingerprint}:{self.precision}:{json.dumps(self.manifest.get('quantization'))}"
        self.register_buffer("export_id", torch.frombuffer(bytearray(ident.encode()), dtype=torch.uint8))
        self.logit_bias = None if self.manifest.get("logit_bias") is None else torch.tensor(self.manifest["logit_bias"])

    def _session(self, name: str) -> Any:
        return session(self.path / name, self.threads)

    # -- what CLIP offers ----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def to(self, *args: Any, **kwargs: Any) -> "OnnxCLIP":
        """Only the CPU and float32 (the sessions run there); anything else is a one-line error."""
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, torch.dtype) and arg != torch.float32:
                raise ClipforgeError(f"an ONNX export runs in its own precision ({self.precision}), not {arg}")
            if isinstance(arg, (str, torch.device)) and torch.device(arg).type != "cpu":
                raise ClipforgeError(f"an ONNX export runs on the CPU here, not {arg}")
        return self

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) as ``CLIP.scale`` gives it (recorded at export)."""
        return torch.tensor(float(self.manifest["logit_scale"]))

    def encode_image(self, image: torch.Tensor, normalize: bool = False, project: bool = True) -> torch.Tensor:
        """Image features [B, E] of images [B, 3, S, S] (the export's one precision)."""
        _projected_only(project)
        pixels = image.detach().to("cpu", torch.float32).contiguous().numpy()  # [B, 3, S, S]
        out = torch.from_numpy(self.image_session.run(None, {"pixels": pixels})[0])  # [B, E]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False, project: bool = True) -> torch.Tensor:
        """Text features [B, E] from token ids [B, <= context_length], trimmed as the tower trims."""
        _projected_only(project)
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"expected token ids of shape [batch, <= {self.context_length}], "
                             f"got {tuple(tokens.shape)}")
        tokens = tokens[:, : keep_length(tokens, self.manifest["text"]["trim"])]
        ids = tokens.detach().to("cpu", torch.int64).contiguous().numpy()  # [B, L]
        out = torch.from_numpy(self.text_session.run(None, {"tokens": ids})[0])  # [B, E]
        return F.normalize(out, dim=-1) if normalize else out

    @torch.no_grad()
    def logits(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text) as ``CLIP.logits`` gives them."""
        per_image = self.scale() * self.encode_image(image, normalize=True) @ self.encode_text(text, normalize=True).t()
        if self.logit_bias is not None:
            per_image = per_image + self.logit_bias
        return per_image, per_image.t()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image, normalize=True), self.encode_text(text, normalize=True)

    def num_params(self) -> int:
        return int(self.manifest.get("source", {}).get("params", 0))

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, precision={self.precision}, threads={self.threads}"


def _projected_only(project: bool) -> None:
    if not project:
        raise ClipforgeError("an ONNX export computes projected features only; pre-projection features "
                             "(linear probes on 'pre' features) need the PyTorch model")


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxCLIP:
    """An ONNX export directory as an ``OnnxCLIP`` (``threads``: ONNX Runtime's intra-op threads,
    default torch's thread count, so ``torch.set_num_threads`` governs both runtimes)."""
    p = Path(path)
    if not is_onnx_export(p):
        raise CheckpointError(f"{p}: not an ONNX export (needs {MANIFEST}, {IMAGE_FILE} and {TEXT_FILE}, "
                              "as `clipforge convert --to onnx` writes them)")
    return OnnxCLIP(p, threads)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), for cosines between runtimes."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
