"""Label columns of a scene and the zero-shot tasks defined on them.

Label rule: the single-object attributes (``colour``, ``shape``, ``size``, ``position``) are
filled only for images holding exactly one object, so each such label is the whole truth about
the image; they are empty for 2-3 objects. ``count`` (an integer) and ``count_class`` are
always filled. The ``relation`` of ``rel_a`` to ``rel_b`` is filled only for two-object images
whose objects differ in colour or shape and share a grid row or column, so exactly one of the
four relations holds. A task's label column holds its class names verbatim (so a generic tool
maps labels through the classes file), and its rows are those with that column non-empty.

A world with ``polysemy`` adds the ``sense`` column and task: which of the two things called
"diamond" a one-object image holds. Its classes carry their context ("diamond gemstone"), and its
``names`` hold the bare word for each class, identical for both: prompts built from ``names``
cannot tell the senses apart, prompts built from the classes can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipforge.data.synth.captions import POLYSEMOUS_WORD, SENSE_CONTEXTS, article
from clipforge.data.synth.ensembles import paper_templates
from clipforge.data.synth.world import (
    COLOURS, GEM, POSITIONS, RELATIONS, SHAPES, SIZES, Scene, SynthConfig, relations,
)

LABEL_COLUMNS = (
    "count", "count_class", "colour", "shape", "size", "position",
    "rel_a", "relation", "rel_b", "background", "objects",
)
COUNT_CLASSES = ("one shape", "two shapes", "three shapes")
RELATION_CLASSES = dict(zip(RELATIONS, ("to the left of", "to the right of", "above", "below")))
LABEL_RULE = (
    "colour, shape, size and position are filled only for images with exactly one object; count and "
    "count_class always; relation (of rel_a to rel_b) only for two different objects sharing a grid row or "
    "column; label columns hold the task's class names verbatim; objects lists every object as JSON"
)
# The sense task's classes: the polysemous name with one of its sense's context words.
SENSE_CLASSES = {shape: f"{POLYSEMOUS_WORD} {contexts[0]}" for shape, contexts in SENSE_CONTEXTS.items()}
SENSE_RULE = f"; sense (polysemy) only for one-object images of a shape called '{POLYSEMOUS_WORD}'"


def label_columns(cfg: SynthConfig) -> tuple[str, ...]:
    return LABEL_COLUMNS + ("sense",) if cfg.polysemy else LABEL_COLUMNS


def label_rule(cfg: SynthConfig) -> str:
    return LABEL_RULE + SENSE_RULE if cfg.polysemy else LABEL_RULE


def labels(scene: Scene, polysemy: bool = False) -> dict[str, Any]:
    """The structured label columns of one sample (``objects`` is a list; CSV stores it as JSON)."""
    row: dict[str, Any] = {c: "" for c in LABEL_COLUMNS + (("sense",) if polysemy else ())}
    row["count"] = scene.count
    row["count_class"] = COUNT_CLASSES[scene.count - 1]
    row["background"] = scene.background
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        row.update(colour=o.colour, shape=o.shape, size=o.size, position=o.position)
        if polysemy and o.shape in SENSE_CLASSES:
            row["sense"] = SENSE_CLASSES[o.shape]
    if len(objs) == 2 and objs[0].identity != objs[1].identity:
        rels = relations(objs[0], objs[1])
        if len(rels) == 1:
            a, b = (f"{o.colour} {o.shape}" for o in objs)
            row.update(rel_a=f"{article(a)} {a}", relation=RELATION_CLASSES[rels[0]], rel_b=f"{article(b)} {b}")
    row["objects"] = [
        {
            "colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position,
            "x": round(o.x, 4), "y": round(o.y, 4), "extent": round(o.extent, 4), "rotation": round(o.rotation, 1),
        }
        for o in objs
    ]
    return row


def _task(name: str, description: str, column: str, classes: list[str],
          template: str, templates: list[str], splits: list[str], plain: str = "{}",
          fields: dict[str, str] | None = None, names: list[str] | None = None) -> dict[str, Any]:
    usage = (f"clipforge eval zeroshot --data <world>/<split>.csv --label-key {column} "
             f"--classes <world>/tasks/{name}_classes.txt --templates <world>/tasks/{name}_templates.txt ...")
    task = {
        "name": name,
        "description": description,
        "label_column": column,  # CSV column (WebDataset: key of the sample's .json); holds class names
        "classes": classes,  # in label order; each goes into a template's "{}"
        "plain_template": plain,
        "template": template,  # the one good prompt
        "templates": templates,  # the ensemble; averaged class embeddings
        "fields": fields or {},  # extra named placeholders filled per row from these columns
        "splits": splits,
        "classes_file": f"{name}_classes.txt",
        "templates_file": f"{name}_templates.txt",
        "usage": "" if fields else usage,
    }
    if names is not None:  # only the sense task has them, so other task files keep their bytes
        task["names"] = names
    return task


def build_tasks(cfg: SynthConfig) -> dict[str, dict[str, Any]]:
    splits = [s for s, n in cfg.split_sizes().items() if s != "train" and n > 0]
    single = "images with exactly one object"
    shapes = list(SHAPES) + ([GEM] if cfg.polysemy else [])
    tasks = {
        "colour": _task(
            "colour", f"colour of the object ({single})", "colour", list(COLOURS),
            "a photo of a {} shape.",
            ["a photo of a {} shape.", "a {} object.", "a picture of a {} thing.", "a drawing of a {} shape.",
             "a {} shape on a background.", "an image of a {} object."],
            splits,
        ),
        "shape": _task(
            "shape", f"shape of the object ({single})", "shape", shapes,
            "a photo of a {}.",
            ["a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "an image of a {}.",
             "a {} on a background.", "a {} icon."],
            splits,
        ),
        "size": _task(
            "size", f"size class of the object ({single})", "size", list(SIZES),
            "a photo of a {} shape.",
            ["a photo of a {} shape.", "a {} object.", "a picture of a {} thing.", "a drawing of a {} shape."],
            splits,
        ),
        "position": _task(
            "position", f"3x3 grid cell of the object ({single})", "position", list(POSITIONS),
            "a photo of a shape in the {} of the image.",
            ["a photo of a shape in the {} of the image.", "a shape in the {}.", "an object in the {} of the picture.",
             "a picture of a thing in the {}."],
            splits,
        ),
    }
    if cfg.max_objects >= 2:
        n = cfg.max_objects
        tasks["count"] = _task(
            "count", "number of objects (all images)", "count_class", list(COUNT_CLASSES[:n]), "a photo of {}.",
            ["a photo of {}.", "a picture of {}.", "an image with {}.", "{} on a background."],
            splits,
        )
        tasks["relation"] = _task(
            "relation",
            "where rel_a is relative to rel_b (two-object images with one clear relation). Prompts are "
            "per image: replace '{}' with the class, then '{a}' and '{b}' with the row's rel_a and rel_b "
            "(the columns named in 'fields'), e.g. 'a photo of a red circle to the left of a blue star.'",
            "relation", list(RELATION_CLASSES.values()), "a photo of {a} {} {b}.",
            ["a photo of {a} {} {b}.", "{a} is {} {b}.", "a picture of {a} {} {b}.", "{a} {} {b} on a background."],
            splits, plain="{a} {} {b}", fields={"a": "rel_a", "b": "rel_b"},
        )
    if cfg.polysemy:
        senses = list(SENSE_CLASSES.values())
        tasks["sense"] = _task(
            "sense",
            f"which of the two things called '{POLYSEMOUS_WORD}' the object is ({single} of either). "
            f"'names' holds the bare name of each class, the same for both: a prompt from the names is "
            f"ambiguous, a prompt from the classes (which add a context word) is not",
            "sense", senses, "a photo of a {}.",
            ["a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "an image of a {}.",
             "a {} on a background.", "a {} icon."],
            splits, names=[POLYSEMOUS_WORD] * len(senses),
        )
    if cfg.template_set == "paper":
        for name, task in tasks.items():
            task["templates"] = paper_templates(name)
    return tasks


def write_tasks(tasks: dict[str, dict[str, Any]], task_dir: Path) -> dict[str, str]:
    """tasks/<name>.json, <name>_classes.txt and <name>_templates.txt (one entry a line);
    returns {name: json path relative to the world's root}."""
    task_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, task in tasks.items():
        (task_dir / f"{name}.json").write_text(json.dumps(task, indent=2) + "\n")
        (task_dir / task["classes_file"]).write_text("\n".join(task["classes"]) + "\n")
        (task_dir / task["templates_file"]).write_text("\n".join(task["templates"]) + "\n")
        out[name] = f"{task_dir.name}/{name}.json"
    return out
