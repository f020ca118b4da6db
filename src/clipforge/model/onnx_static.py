"""Static int8 quantisation of an ONNX export's towers (``clipforge convert --to onnx --quantize
int8-static --calibration PATH``): activation scales fixed once from a few dozen calibration inputs
instead of measured on every batch, through ONNX Runtime's ``quantize_static``.

What is quantised, and why: the MatMuls whose second input is a weight (per output channel, int8),
with uint8 activations calibrated by min/max, in QDQ form. The attention's activation-by-activation
MatMuls stay float (their int8 form measured slower and further from fp32), and no MatMul output is
quantised, so ONNX Runtime turns each quantised MatMul into ``MatMulIntegerToFloat`` (a float result,
no extra QuantizeLinear/DequantizeLinear pair after it). Convolutions stay float, as in the dynamic path.

The calibration set: a folder of images (searched recursively), or a CSV with an ``image`` column
(paths relative to the CSV) and an optional ``caption`` column. Images calibrate the image tower;
captions, when there are some, the text tower, which is otherwise quantised dynamically.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.config import PreprocessConfig
from clipforge.errors import ClipforgeError

CALIBRATION_LIMIT = 64  # a few dozen inputs fix the scales; more only lengthens the export
BATCH = 8
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Calibration:
    """Calibration inputs: images preprocessed as the export's eval transform does, and captions."""

    images: np.ndarray  # [N, 3, S, S] float32
    texts: tuple[str, ...] = ()
    source: str = ""
    method: str = "minmax"

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "images": int(len(self.images)), "texts": len(self.texts),
                "method": self.method}


def _spread(items: list, limit: int) -> list:
    """At most ``limit`` items spaced evenly through ``items`` (a sorted list: every part is seen)."""
    if len(items) <= limit:
        return items
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def read_calibration(path: str | Path, preprocess: PreprocessConfig, limit: int = CALIBRATION_LIMIT,
                     method: str = "minmax") -> Calibration:
    """Up to ``limit`` images (and captions) from a folder of images or an image/caption CSV."""
    from PIL import Image

    from clipforge.model.transforms import eval_transform

    if method not in METHODS:
        raise ClipforgeError(f"unknown calibration method {method!r}; the choices are {', '.join(METHODS)}")
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        texts: list[str] = []
    elif path.is_file() and path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "image" not in rows[0]:
            raise ClipforgeError(f"{path}: a calibration CSV needs an 'image' column (and may have 'caption')")
        files = [path.parent / r["image"] for r in rows]
        texts = [r["caption"] for r in rows if r.get("caption")]
    else:
        raise ClipforgeError(f"--calibration {path}: not a folder of images or a CSV file")
    transform = eval_transform(preprocess)
    images = []
    for p in _spread(files, limit):
        try:
            with Image.open(p) as im:
                images.append(transform(im).numpy())
        except OSError:  # an unreadable file is skipped: the rest still calibrate
            continue
    if len(images) < BATCH:
        raise ClipforgeError(f"--calibration {path}: {len(images)} readable images; static quantisation needs "
                             f"at least {BATCH} (a few dozen is best)")
    return Calibration(np.stack(images), tuple(_spread(texts, limit)), str(path), method)


def constant_inputs(model: Any) -> set[str]:
    """Names of a graph's weights: its initializers and Constant nodes' outputs."""
    return {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes of the graph at ``path`` whose second input is not a weight (the attention's)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = constant_inputs(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


def quantize_tower(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], method: str, external: bool) -> None:
    """``src`` quantised statically into ``dst``, its activation scales from ``feeds`` (graph inputs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._left = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._left, None)

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    quantize_static(src, dst, _Feeds(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=calibrate, nodes_to_exclude=activation_matmuls(src),
                    use_external_data_format=external,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})


def image_feeds(calibration: Calibration) -> list[dict[str, np.ndarray]]:
    x = calibration.images
    return [{"pixels": x[i : i + BATCH]} for i in range(0, len(x), BATCH)]


def text_feeds(calibration: Calibration, tokenize: Any, trim: Any) -> list[dict[str, np.ndarray]]:
    """Captions in batches, each cut as the runtime cuts it (``trim``: tokens -> columns kept)."""
    feeds = []
    for i in range(0, len(calibration.texts), BATCH):
        tokens = tokenize(list(calibration.texts[i : i + BATCH]))  # [b, context_length]
        feeds.append({"tokens": tokens[:, : trim(tokens)].numpy()})
    return feeds
