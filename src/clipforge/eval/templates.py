"""Class names and prompt templates: built-in sets (``imagenet``, ``cifar10``, ``cifar100``) or files.

A classes file holds one class name per line; a templates file one template per line, with
``{}`` where the class name goes. Blank lines are ignored. The built-in sets are the paper's
(see ``clipforge/assets/templates/README.md``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from clipforge.errors import DataError

__all__ = [
    "BUILTIN_SETS", "DEFAULT_TEMPLATES", "list_builtin", "load_classnames", "load_templates", "load_task", "fill",
]

BUILTIN_SETS = ("imagenet", "cifar10", "cifar100")
# A single plain prompt, used when no templates are given.
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def list_builtin() -> list[str]:
    return list(BUILTIN_SETS)


def _read_lines(source: str | Path, kind: str) -> list[str]:
    name = str(source)
    if name in BUILTIN_SETS and not Path(name).exists():
        text = resources.files("clipforge").joinpath("assets", "templates", f"{name}_{kind}.txt").read_text("utf-8")
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: no such {kind} file (built-in sets: {', '.join(BUILTIN_SETS)})")
        text = path.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{name}: the {kind} file is empty")
    return lines


def load_classnames(source: str | Path) -> list[str]:
    """Class names from a built-in set's name or a file with one name per line."""
    return _read_lines(source, "classes")


def load_templates(source: str | Path) -> list[str]:
    """Prompt templates from a built-in set's name or a file with one template per line."""
    templates = _read_lines(source, "templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DataError(f"{source}: template without a {{}} placeholder for the class name: {bad[0]!r}")
    return templates


def fill(template: str, classname: str) -> str:
    """The prompt for one class. Only ``{}`` is replaced, so other braces in a template are kept."""
    if "{}" not in template:
        raise DataError(f"template without a {{}} placeholder for the class name: {template!r}")
    return template.replace("{}", classname)


def load_task(path: str | Path) -> dict:
    """A zero-shot task file (JSON) of the built-in data world: ``label_column``, ``classes``, ``templates``.

    Tasks whose prompts need per-image fields (``fields``) are not plain zero-shot classification
    and are refused.
    """
    import json

    path = Path(path)
    try:
        task = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the task file ({e})") from e
    missing = [k for k in ("label_column", "classes", "templates") if k not in task]
    if missing:
        raise DataError(f"{path}: not a task file (no {', '.join(missing)})")
    if task.get("fields"):
        raise DataError(f"{path}: prompts need per-image fields {sorted(task['fields'])}; not supported here")
    bad = [t for t in task["templates"] if "{}" not in t]
    if bad:
        raise DataError(f"{path}: template without a {{}} placeholder for the class name: {bad[0]!r}")
    return task
