"""A CLIP model's two towers as ONNX graphs (``clipforge convert --to onnx``), and int8 weights for
an export through ONNX Runtime's quantisation. ``onnx_runtime`` runs what this writes.

Both graphs come from ``torch.onnx.export``'s ``torch.export`` path with symbolic shapes: a dynamic
batch for both, and a dynamic sequence length for the text graph, which holds the tower's code
without its host-side trimming (``onnx_runtime.keep_length`` trims before the graph, as the PyTorch
tower does inside ``forward``). Every export is checked before it is kept: both graphs run in ONNX
Runtime on probe images and texts (batches of 1 and 4, texts of several lengths) against the
PyTorch model, and the cosines and largest difference are recorded in ``onnx.json``.

int8 (``quantize_export``): MatMul weights per output channel, activations quantised per batch at
run time (``quantize_dynamic``), or with scales calibrated once on a calibration set
(``onnx_static``, ``int8-static``). Convolutions stay float: ONNX Runtime's integer convolution runs
slower than its float one on the patch embedding. CoCa's captioning decoder is not exported: the
graphs are its contrastive towers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from clipforge.errors import CheckpointError, ClipforgeError
from clipforge.model import onnx_runtime as rt
from clipforge.model import onnx_static
from clipforge.model.clip import CLIP
from clipforge.model.hf_text import HFTextTower
from clipforge.model.identity import model_fingerprint

PROBE_TEXTS = ("a photo of a cat", "x", "a diagram of a red bicycle leaning on a white wall by the sea at sunset, "
               "two dogs and a small boat in the distance")
FP32_MIN_COSINE = 0.99999  # the graphs compute what PyTorch computes, up to float rounding
INT8_MIN_COSINE = 0.99
EXTERNAL_DATA_BYTES = 3 << 29  # larger towers keep their weights beside the graph (protobuf's 2 GB limit)
QUANTIZED_OPS = ["MatMul"]


def _needs(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ClipforgeError(f"ONNX export needs {', '.join(missing)}, which is not installed "
                             "(pip install 'clipforge[onnx]')")


class _Tower(nn.Module):
    """One tower of ``model`` as a module of one input, what the exporter traces: [B, ...] -> [B, E]."""

    def __init__(self, model: CLIP, which: Literal["image", "text"]) -> None:
        super().__init__()
        self.model = model
        self.encode = model.encode_image if which == "image" else model.encode_text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


def trim_rule(model: CLIP) -> dict[str, Any]:
    """How the host trims a batch of token ids before the text graph (``onnx_runtime.keep_length``):
    the rule the PyTorch tower applies inside its ``forward``."""
    tower, cfg = model.text, model.config.text
    if isinstance(tower, HFTextTower):
        return {"kind": "nonpad", "pad_token_id": tower.pad_token_id}
    if not cfg.causal_mask or cfg.embed_cls or cfg.pool == "last":  # padding is attended to, or fixes positions
        return {"kind": "none"}
    if cfg.pool == "first":
        return {"kind": "first"}
    return {"kind": "eot", "eot_token_id": cfg.eot_token_id, "argmax_fallback": cfg.eot_token_id == cfg.vocab_size - 1}


@contextlib.contextmanager
def _untrimmed(model: CLIP) -> Iterator[None]:
    """The text tower without its data-dependent trimming, while it is exported."""
    before = model.text.trim_padding
    model.text.trim_padding = False
    try:
        yield
    finally:
        model.text.trim_padding = before


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines and the quantiser's advice go nowhere: a command prints its own."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _export_tower(module: nn.Module, args: tuple[torch.Tensor], path: Path, what: str, name: str,
                  dynamic: dict[int, Any], n_bytes: int) -> None:
    """One tower to ``path``; a failure is a one-line CheckpointError naming the tower and why."""
    in_name = "pixels" if what == "image" else "tokens"
    try:
        with torch.no_grad(), _quiet():
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=[in_name], output_names=["features"],
                              dynamic_shapes=(dynamic,), optimize=True, external_data=n_bytes > EXTERNAL_DATA_BYTES)
    except Exception as e:  # torch.export and the translator raise many types; all mean "cannot export"
        raise CheckpointError(f"cannot export the {what} tower of {name} to ONNX ({_first_line(e)})") from None


def _tower_bytes(module: nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def export_onnx(model: CLIP, out: str | Path, quantize: Literal["int8", "int8-static"] | None = None,
                check: bool = True, calibration: onnx_static.Calibration | None = None) -> Path:
    """Write ``model``'s towers as ``out/image.onnx`` and ``out/text.onnx`` with ``onnx.json``,
    ``config.json`` and the tokenizer's files, so ``out`` alone embeds images and texts
    (``clipforge.load(out)``). ``quantize='int8'`` then quantises both graphs' weights
    (``quantize_export``); ``'int8-static'`` with ``calibration``'s activation scales.
    ``model`` is made float32 and put in eval mode in place."""
    _needs("onnx", "onnxscript")
    if quantize not in (None, "int8", "int8-static"):
        raise ClipforgeError(f"unknown quantization {quantize!r}; the choices are int8, int8-static")
    if (quantize == "int8-static") != (calibration is not None):
        raise ClipforgeError("int8-static quantisation needs calibration inputs, and only it takes them")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    cfg, name = model.config, model.config.name or "the model"
    _write_assets(model, out)
    size = cfg.preprocess.image_size
    pixels = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    _export_tower(_Tower(model, "image"), (pixels,), out / rt.IMAGE_FILE, "image", name, {0: batch},
                  _tower_bytes(model.visual))
    tokens = _tokenizer(model)(list(PROBE_TEXTS[:2]))  # [2, context_length]
    seq = torch.export.Dim("seq", min=1, max=cfg.text.context_length)
    with _untrimmed(model):
        _export_tower(_Tower(model, "text"), (tokens,), out / rt.TEXT_FILE, "text", name, {0: batch, 1: seq},
                      _tower_bytes(model.text))
    _write_manifest(out, _manifest(model))
    if check:
        _record_check(out, model, FP32_MIN_COSINE)
    if quantize:
        quantize_export(out, out, calibration=calibration)
    return out


def _tokenizer(model: CLIP | rt.OnnxCLIP) -> Any:
    from clipforge.model.factory import tokenizer_for

    return tokenizer_for(model)


def _write_assets(model: CLIP, out: Path) -> None:
    """config.json and the tokenizer's files: a Hugging Face tower's in text_model/ (as a model
    directory keeps them), a family tokenizer's in tokenizer/, CLIP's BPE vocabulary in tokenizer/."""
    from clipforge.model.checkpoints import write_config

    write_config(model, out)
    cfg = model.config
    tok_dir = out / rt.TOKENIZER_DIR
    if cfg.text.hf_model is None and cfg.text.hf_tokenizer_name is not None:
        _tokenizer(model).tokenizer.save_pretrained(tok_dir)
        local = dataclasses.replace(cfg.text, hf_tokenizer_name=rt.TOKENIZER_DIR)  # relative: the folder moves whole
        cfg.replace(text=local).to_json(out / rt.CONFIG_FILE)
    elif cfg.text.hf_model is None:
        from clipforge.model import tokenizer as bpe

        tok_dir.mkdir(exist_ok=True)
        assets = Path(bpe.__file__).resolve().parents[1] / "assets"
        for f in ("bpe_simple_vocab_16e6.txt.gz", "LICENSE-openai-clip.txt"):
            shutil.copyfile(assets / f, tok_dir / f)


def _manifest(model: CLIP) -> dict[str, Any]:
    cfg = model.config
    return {
        "format": rt.FORMAT, "precision": "fp32", "quantization": None,
        "image": {"file": rt.IMAGE_FILE, "input": "pixels", "output": "features",
                  "shape": [None, 3, cfg.preprocess.image_size, cfg.preprocess.image_size]},
        "text": {"file": rt.TEXT_FILE, "input": "tokens", "output": "features",
                 "max_length": cfg.text.context_length, "trim": trim_rule(model)},
        "embed_dim": cfg.embed_dim, "logit_scale": float(model.scale().detach()),
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "source": {"model": cfg.name, "model_fingerprint": model_fingerprint(model), "params": model.num_params()},
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "not_exported": ["captioning decoder"] if cfg.decoder is not None else [],
    }


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / (rt.MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / rt.MANIFEST)


def _probe(model: CLIP | rt.OnnxCLIP) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = model.config.preprocess.image_size
    images = [torch.randn(n, 3, size, size, generator=g) for n in (1, 4)]
    return images, _tokenizer(model)(list(PROBE_TEXTS))


@torch.no_grad()
def compare(onnx_model: rt.OnnxCLIP, model: CLIP) -> dict[str, float]:
    """Smallest cosine and largest absolute difference between the export's features and
    ``model``'s, on probe images (batches of 1 and 4) and texts of three lengths, one by one and together."""
    images, tokens = _probe(model)
    pairs = [(onnx_model.encode_image(x), model.encode_image(x)) for x in images]
    pairs += [(onnx_model.encode_text(t), model.encode_text(t)) for t in (tokens, tokens[1:2], tokens[2:])]
    cos = [float((rt.unit_rows(a.numpy()) * rt.unit_rows(b.numpy())).sum(1).min()) for a, b in pairs]
    diff = [float((a - b).abs().max()) for a, b in pairs]
    return {"image_cosine_min": round(min(cos[:2]), 7), "text_cosine_min": round(min(cos[2:]), 7),
            "max_abs_diff": float(f"{max(diff):.3g}")}


def _record_check(out: Path, model: CLIP, min_cosine: float) -> None:
    manifest = rt.read_manifest(out)
    result = compare(rt.OnnxCLIP(out, threads=1), model)
    manifest["check"] = {**result, "graphs": "fp32", "against": "PyTorch, the exported weights",
                         "min_cosine": min_cosine}
    _write_manifest(out, manifest)
    worst = min(result["image_cosine_min"], result["text_cosine_min"])
    if worst < min_cosine:
        raise CheckpointError(f"the ONNX export in {out} differs from the PyTorch model (cosine {worst:.6f} < "
                              f"{min_cosine}; max abs diff {result['max_abs_diff']}); it is kept for inspection")


def quantize_export(src: str | Path, out: str | Path, min_cosine: float = INT8_MIN_COSINE,
                    calibration: onnx_static.Calibration | None = None) -> Path:
    """An export with int8 MatMul weights (per output channel) in ``out`` (``src`` itself when the
    same); the other files copied. Activations are quantised per batch at run time, or, given
    ``calibration``, with scales fixed from it (the text tower only where it has captions). Each
    tower's int8 graph is compared with its fp32 graph on the probe inputs (and the calibration
    inputs) and kept where the smallest cosine reaches ``min_cosine``; a tower that falls short stays
    fp32 (``onnx.json`` records each tower's precision, method and cosine), and an error says so when
    both do. Returns ``out``."""
    _needs("onnx")
    src, out = Path(src), Path(out)
    manifest = rt.read_manifest(src)
    if manifest.get("precision") != "fp32":
        raise ClipforgeError(f"{src} is already quantised ({manifest.get('precision')})")
    reference = rt.OnnxCLIP(src, threads=1)
    work = out / ".int8"  # int8 graphs under their final names (a weights file beside one is named after it)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    methods = {"image": "static" if calibration is not None else "dynamic",
               "text": "static" if calibration is not None and calibration.texts else "dynamic"}
    cosines = {what: _quantize_tower(src, work, f, what, reference, calibration if methods[what] == "static" else None)
               for what, f in _TOWERS.items()}
    kept = [what for what, cos in cosines.items() if cos >= min_cosine]
    if not kept:
        shutil.rmtree(work)
        raise CheckpointError(f"int8 weights change {src}'s features too much (smallest cosine to fp32: image "
                              f"{cosines['image']:.4f}, text {cosines['text']:.4f} < {min_cosine}); "
                              "keep the fp32 export")
    if out != src:
        shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".int8"))
    for what in kept:
        (out / f"{_TOWERS[what]}.data").unlink(missing_ok=True)
        for p in work.glob(f"{_TOWERS[what]}*"):
            p.replace(out / p.name)
    shutil.rmtree(work)
    for what in _TOWERS:
        manifest[what]["precision"] = "int8" if what in kept else "fp32"
        manifest[what]["quantization"] = methods[what] if what in kept else None
    manifest["precision"] = "int8" if len(kept) == 2 else f"int8-{kept[0]}"  # e.g. int8-image: text stays fp32
    manifest["quantization"] = {"method": "static" if calibration is not None else "dynamic",
                                "weights": "int8 per output channel", "ops": QUANTIZED_OPS, "min_cosine": min_cosine,
                                "activations": {w: ACTIVATIONS[m] for w, m in methods.items() if w in kept},
                                "cosine_min_vs_fp32": {k: round(v, 5) for k, v in cosines.items()}}
    if calibration is not None:
        manifest["quantization"]["calibration"] = calibration.describe()
    _write_manifest(out, manifest)
    return out


_TOWERS = {"image": rt.IMAGE_FILE, "text": rt.TEXT_FILE}
ACTIVATIONS = {"dynamic": "uint8 per batch", "static": "uint8 per tensor, calibrated (QDQ)"}


@torch.no_grad()
def _quantize_tower(src: Path, work: Path, name: str, what: str, reference: rt.OnnxCLIP,
                    calibration: onnx_static.Calibration | None = None) -> float:
    """``src/name`` quantised into ``work/name`` (statically given ``calibration``); the smallest
    cosine of its features to the fp32 graph's, on the probes and the calibration inputs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # after _needs: onnxruntime's own error

    external = (src / f"{name}.data").exists()
    images, tokens = _probe(reference)

    def trim(tokens: torch.Tensor) -> int:
        return rt.keep_length(tokens, reference.manifest["text"]["trim"])

    feeds = []
    if calibration is not None:
        feeds = (onnx_static.image_feeds(calibration) if what == "image" else
                 onnx_static.text_feeds(calibration, _tokenizer(reference), trim))
    with _quiet():
        if calibration is None:
            quantize_dynamic(src / name, work / name, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=external)
        else:
            onnx_static.quantize_tower(src / name, work / name, feeds, calibration.method, external)
    session = rt.session(work / name, threads=1)
    if what == "image":
        inputs = [x.numpy() for x in images] + [f["pixels"] for f in feeds]
        pairs = [(session.run(None, {"pixels": x})[0], reference.encode_image(torch.from_numpy(x)).numpy())
                 for x in inputs]
    else:
        inputs = [t[:, : trim(t)].numpy() for t in (tokens, tokens[1:2])] + [f["tokens"] for f in feeds]
        pairs = [(session.run(None, {"tokens": t})[0], reference.encode_text(torch.from_numpy(t)).numpy())
                 for t in inputs]
    return min(float((rt.unit_rows(a) * rt.unit_rows(b)).sum(1).min()) for a, b in pairs)
