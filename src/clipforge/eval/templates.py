"""Class names and prompt templates: built-in sets (``imagenet``, ``cifar10``, ``cifar100``) or files.

A classes file holds one class name per line; a templates file one template per line, with
exactly one ``{}`` where the class name goes (other braces, e.g. a task's ``{a}`` fields, are
kept as they are). Blank lines are ignored. A filled prompt is at most ``MAX_PROMPT_CHARS``
characters: a text encoder reads 77 tokens at most, and a longer prompt only costs tokenizing.
The built-in sets are the paper's (see ``clipforge/assets/templates/README.md``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from clipforge.errors import DataError

__all__ = [
    "BUILTIN_SETS", "DEFAULT_TEMPLATES", "MAX_PROMPT_CHARS", "list_builtin", "load_classnames", "load_templates",
    "load_task", "fill", "check_template",
]

BUILTIN_SETS = ("imagenet", "cifar10", "cifar100")
# A single plain prompt, used when no templates are given.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# Longest filled prompt (characters). 77 tokens of English are ~300-400 characters; the limit is
# generous for any real class name and template, and bounds the work one prompt can cause.
MAX_PROMPT_CHARS = 2000


def check_template(template: str) -> str:
    """The template, if it has exactly one ``{}``; else a ``DataError`` naming it."""
    n = template.count("{}")
    if n != 1:
        what = "no {} placeholder" if n == 0 else f"{n} {{}} placeholders"
        raise DataError(f"template needs exactly one {{}} for the class name, it has {what}: {template[:80]!r}")
    return template


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
    for t in templates:
        try:
            check_template(t)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
    return templates


def fill(template: str, classname: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The prompt for one class. Only ``{}`` is replaced (exactly one), so other braces in a
    template are kept. A prompt over ``max_chars`` characters is a ``DataError``."""
    prompt = check_template(template).replace("{}", classname)
    if len(prompt) > max_chars:
        raise DataError(f"prompt of {len(prompt)} characters, over the limit of {max_chars}: {prompt[:60]!r}...")
    return prompt


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
    for t in task["templates"]:
        try:
            check_template(t)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    return task
