"""Model cards: the README.md of every model directory clipforge writes, in the Hugging Face
model-card format (YAML front matter: library, tags, license, datasets, metrics; then Markdown).

The card is rendered from the model's config, what its training run recorded (``training``: the
run's settings and summary) and its evaluation results. Those two travel inside the card as one
JSON comment, so ``clipforge eval`` can add a result and render the card again without the run
directory, and a copied card (``convert --to hf``) keeps them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
log = logging.getLogger(__name__)
_TAGS = ("clip", "clipforge", "zero-shot-image-classification", "image-text-retrieval")
_DATA = re.compile(r"<!-- clipforge-card (\{.*?\}) -->", re.DOTALL)
_TRAINING_KEYS = ("data", "model", "steps", "batch_size", "lr", "weight_decay", "warmup", "loss", "precision",
                  "seed", "samples_seen", "final_loss", "wall_time_s", "world_size", "global_batch_size")  # fmt: skip


def read_card_data(model_dir: str | Path) -> dict[str, Any]:
    """The training record and results kept in a model directory's card ({} when it has none)."""
    path = Path(model_dir) / CARD_NAME
    try:
        found = _DATA.search(path.read_text(encoding="utf-8"))
        data = json.loads(found.group(1)) if found else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_card(model_dir: str | Path, config: Any, training: dict[str, Any] | None = None,
               results: list[dict[str, Any]] | None = None, license: str = "other",
               library: str = "clipforge") -> Path:  # fmt: skip
    """(Re)write ``model_dir/README.md``; ``training``/``results`` left None keep the card's own. A
    README.md that is not a clipforge card is left untouched (a warning says so).
    ``library``: what reads the directory (``transformers`` for a Hugging Face export)."""
    out = Path(model_dir)
    if _foreign(out / CARD_NAME):  # someone's own README (a hub repo's card, notes): never overwritten
        log.warning("%s is not a clipforge model card; left as it is (no card written)", out / CARD_NAME)
        return out / CARD_NAME
    kept = read_card_data(out)
    data = {"training": training if training is not None else kept.get("training"),
            "results": results if results is not None else kept.get("results", [])}  # fmt: skip
    tmp = out / f".{CARD_NAME}.tmp{os.getpid()}"
    tmp.write_text(render(config, data, license, library), encoding="utf-8")
    tmp.replace(out / CARD_NAME)
    return out / CARD_NAME


def _foreign(path: Path) -> bool:
    """A README.md that this module did not write (no card data in it)."""
    try:
        return path.exists() and _DATA.search(path.read_text(encoding="utf-8", errors="replace")) is None
    except OSError:
        return False


def add_result(model_dir: str | Path, config: Any, result: dict[str, Any]) -> Path:
    """Put one evaluation result (``clipforge eval``'s record) in the card's table, replacing an
    earlier one for the same dataset and task."""
    row = {"dataset": result["dataset"], "task": result["task"],
           "metrics": {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float)) and v is not None}}
    results = [r for r in read_card_data(model_dir).get("results", [])
               if (r.get("dataset"), r.get("task")) != (row["dataset"], row["task"])]  # fmt: skip
    return write_card(model_dir, config, results=[*results, row])


def training_record(settings: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What a card tells of a training run: the main settings and the summary's figures."""
    merged = {**{k: v for k, v in settings.items() if k in _TRAINING_KEYS}, **summary}
    return {k: merged[k] for k in _TRAINING_KEYS if merged.get(k) is not None}


def render(config: Any, data: dict[str, Any], license: str = "other", library: str = "clipforge") -> str:
    training, results = data.get("training") or {}, data.get("results") or []
    datasets = [str(training["data"])] if training.get("data") else []
    metrics = sorted({k for r in results for k in r["metrics"]})
    front = ["---", f"library_name: {library}", f"license: {license}",
             "tags:", *(f"- {t}" for t in _TAGS),
             "pipeline_tag: zero-shot-image-classification"]  # fmt: skip
    if datasets:
        front += ["datasets:", *(f"- {_yaml(d)}" for d in datasets)]
    if metrics:
        front += ["metrics:", *(f"- {_yaml(m)}" for m in metrics)]
    v, t = config.vision, config.text
    lines = [*front, "---", "", f"# {config.name or 'CLIP model'} (clipforge)", "",
             "A CLIP dual encoder: an image tower and a text tower trained contrastively to embed images and "
             "their captions in one space.", "", "## Architecture", "",
             f"- embedding width: {config.embed_dim}",
             f"- image tower: {getattr(v, 'arch', 'vit')}, {v.layers} layers, width {v.width}, "
             f"{v.image_size} px input" + (f", patch {v.patch_size}" if getattr(v, "patch_size", None) else ""),
             f"- text tower: {t.layers} layers, width {t.width}, context {t.context_length} tokens"
             + (f" ({t.hf_model})" if getattr(t, "hf_model", None) else ""),
             "", "Load it with `clipforge.load(DIR)`; `clipforge convert` writes it for OpenCLIP, "
             "Hugging Face or OpenAI's code.", "", "## Training", ""]  # fmt: skip
    if training:
        lines += ["| setting | value |", "| --- | --- |", *(f"| {k} | {_cell(training[k])} |" for k in training)]
    else:
        lines.append("Not recorded: this directory was not written by `clipforge train` "
                     "(converted, or saved from Python).")
    lines += ["", "## Evaluation results", ""]
    if results:
        cols = [m for m in metrics if not m.startswith("num_")][:8]
        lines += ["| dataset | task | " + " | ".join(cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
        for r in results:
            cells = [_cell(r["metrics"].get(c)) for c in cols]
            lines.append(f"| {_cell(r['dataset'])} | {r['task']} | " + " | ".join(cells) + " |")
    else:
        lines.append("None yet: `clipforge eval ... --model DIR` adds its results here.")
    lines += ["", "## Intended use and limits", "",
              "Research on image-text models: zero-shot classification, retrieval and search over the kind of "
              "images and captions it was trained on. Its accuracy elsewhere is unmeasured until evaluated there; "
              "zero-shot results change with the class names and prompts chosen. CLIP models carry the biases of "
              "their training captions and should not be used to judge people or for surveillance.", "",
              f"<!-- clipforge-card {json.dumps(data, sort_keys=True)} -->", ""]  # fmt: skip
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")


def _yaml(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar, quoted whatever it holds
