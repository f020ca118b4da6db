"""An evaluation's inputs on disk: which labels, class names and prompts an image set uses.

A labelled image set is a class-folder tree or a table. :class:`LabelOptions` says where its
labels come from: a label column, a class-names source, a templates source and, for a data
world (``clipforge data synth``), a task file that supplies all three (explicit options win).
:func:`resolve_labels` reads the task once; the resulting :class:`Labelling` loads sets and
names them for reports. Also here: :func:`load_baselines`, the effective-robustness baseline file.

    labels = resolve_labels(LabelOptions(task="shape"), Path("world/test.csv"))
    test = labels.load(Path("world/test.csv"))      # named 'test (shape)'
    evaluate_zeroshot(model, test, test.classnames, labels.templates())
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from clipforge.errors import DataError
from clipforge.eval.datasets import LabelledImages, load_labelled
from clipforge.eval.robustness import BaselineFit, fit_baseline
from clipforge.eval.templates import BUILTIN_SETS, DEFAULT_TEMPLATES, load_classnames, load_task, load_templates

__all__ = ["LabelOptions", "Labelling", "find_task", "resolve_labels", "unique_names", "load_baselines"]

DEFAULT_LABEL_KEY = "label"


@dataclass(frozen=True)
class LabelOptions:
    """Where an image set's labels, class names and prompt templates come from."""

    classes: str | Path | None = None  # a file (one name per line) or a built-in set; folders need none
    label_key: str | None = None  # a table's label column; None: the task's, else "label"
    image_key: str = "image"  # a table's image-path column
    task: str | Path | None = None  # a task JSON file, or a task name looked up in tasks/ beside the data
    templates: str | Path | None = None  # a file (one per line, {} for the class name) or a built-in set


def find_task(task: str | Path, data: str | Path) -> Path:
    """A task file: ``task`` itself when it is a file, else ``tasks/<task>.json`` beside the data."""
    path = Path(task)
    if path.is_file():
        return path
    data = Path(data)
    return (data if data.is_dir() else data.parent) / "tasks" / f"{task}.json"


@dataclass(frozen=True)
class Labelling:
    """:class:`LabelOptions` resolved against the data: the label column and the task's contents."""

    options: LabelOptions
    label_key: str
    task: dict[str, Any] | None = None

    def classnames(self) -> list[str] | None:
        """Class names from the classes source, else the task's; None: the data's own."""
        if self.options.classes:
            return load_classnames(self.options.classes)
        return list(self.task["classes"]) if self.task else None

    def templates(self) -> list[str]:
        """The templates source's, else the task's, else a built-in class set's, else the default."""
        classes = self.options.classes
        if self.options.templates:
            return load_templates(self.options.templates)
        if self.task:
            return list(self.task["templates"])
        if classes is not None and str(classes) in BUILTIN_SETS and not Path(classes).exists():
            return load_templates(str(classes))
        return list(DEFAULT_TEMPLATES)

    def dataset_name(self, path: str | Path) -> str:
        """The file or folder name plus the task or label column, e.g. 'test (shape)'."""
        path = Path(path)
        name = path.name if path.is_dir() else path.stem
        if self.task:
            name += f" ({self.task.get('name', self.label_key)})"
        elif not path.is_dir() and self.label_key != DEFAULT_LABEL_KEY:
            name += f" ({self.label_key})"
        return name

    def load(
        self, path: str | Path, classnames: Sequence[str] | None = None, name: str | None = None
    ) -> LabelledImages:
        """The labelled set at ``path``, named :meth:`dataset_name` unless ``name`` is given."""
        return load_labelled(path, classnames, image_key=self.options.image_key, label_key=self.label_key,
                             name=name or self.dataset_name(path))


def resolve_labels(options: LabelOptions, data: str | Path) -> Labelling:
    """Read the task file (if any) and fix the label column: the explicit one, the task's, or 'label'."""
    task = load_task(find_task(options.task, data)) if options.task else None
    label_key = options.label_key or (task["label_column"] if task else None) or DEFAULT_LABEL_KEY
    return Labelling(options, label_key, task)


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """Dataset names from paths: the stem, or parent/stem where stems collide (split/labels.csv)."""
    paths = [Path(p) for p in paths]
    stems = [p.stem if p.is_file() else p.name for p in paths]
    return [f"{p.parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def load_baselines(path: str | Path) -> dict[str, BaselineFit]:
    """Baseline fits per shifted set from JSON: ``{name: [[ref_acc, shifted_acc], ...]}`` (points
    to fit) or ``{name: {"slope": s, "intercept": b}}`` (a fit in logit space)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return {name: BaselineFit(float(v["slope"]), float(v["intercept"])) if isinstance(v, dict)
                else fit_baseline([(float(r), float(s)) for r, s in v]) for name, v in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise DataError(
            f"{path}: not a baseline file ({{name: [[ref, shifted], ...] or {{slope, intercept}}}}): {e}"
        ) from e
