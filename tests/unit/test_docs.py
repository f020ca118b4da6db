"""The reference pages in docs/ agree with the code, so they cannot drift.

- docs/CLI.md: every command of the real argparse parser (``clipforge.cli.build_parser``),
  nested ones included, has a heading; every flag of a command has a row in the flag table of
  that command's section, and its positional arguments and every choice it offers appear there;
  the page names no flag that does not exist, and a flag in a command's table belongs to it.
- docs/CONFIG.md: every ``TrainConfig`` field, recursively through its nested configs, has a row
  in the table of its config class's section; every ``clipforge train`` setting flag is named.
- docs/GUARANTEES.md names only tests that exist; README.md's command table names every command;
  README.md, docs/ and the benchmark pages link only files that exist in the repository.

To start the section of a new command, print its skeleton from the parser:
``.venv/bin/python tests/unit/test_docs.py train`` (or ``eval zeroshot``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path

import pytest

from clipforge.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLI_DOC = ROOT / "docs" / "CLI.md"
CONFIG_DOC = ROOT / "docs" / "CONFIG.md"

# A command heading: `## `clipforge eval zeroshot`` (any level). Other headings inside a command's
# section (none today) would belong to it.
_COMMAND_HEADING = re.compile(r"^#{1,6} `(clipforge(?: [a-z][a-z-]*)*)`\s*$", re.MULTILINE)
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")
# Flags the pages may name beyond the commands' own: argparse's --help, and torchrun's.
_FOREIGN_FLAGS = {"--help", "--nproc_per_node", "--nnodes", "--node_rank"}


# -- the parser ---------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands(parser: argparse.ArgumentParser | None = None,
             path: str = "clipforge") -> dict[str, argparse.ArgumentParser]:
    """Every command below the root, by its full name ('clipforge eval zeroshot'), groups included."""
    parser = parser or build_parser()
    found: dict[str, argparse.ArgumentParser] = {}
    for name, sub in _subcommands(parser).items():
        full = f"{path} {name}"
        found[full] = sub
        found.update(commands(sub, full))
    return found


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in _arguments(parser) for s in a.option_strings if s.startswith("--")}


# -- the page -----------------------------------------------------------------------------------


def sections(text: str) -> dict[str, str]:
    """Command name -> the text from its heading to the next command heading."""
    marks = list(_COMMAND_HEADING.finditer(text))
    out: dict[str, str] = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        assert m.group(1) not in out, f"two headings for {m.group(1)}"
        out[m.group(1)] = text[m.end():end]
    return out


def mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def table_flags(section: str) -> set[str]:
    """Flags in the first cell of the section's table rows (the flags it documents)."""
    flags: set[str] = set()
    for line in section.splitlines():
        if line.startswith("|"):
            flags |= set(_FLAG.findall(line.split("|")[1]))
    return flags


def cli_problems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """Every way ``text`` (a CLI reference page) disagrees with ``parser``; empty when in sync."""
    cmds = commands(parser)
    secs = sections(text)
    problems = [f"no heading `{c}`" for c in cmds if c not in secs]
    problems += [f"heading `{c}` is not a command" for c in secs if c not in cmds]
    every_flag = set().union(*(option_strings(p) for p in cmds.values()))
    for name, p in cmds.items():
        sec = secs.get(name)
        if sec is None:
            continue
        own, listed = option_strings(p), table_flags(sec)
        problems += [f"{name}: {flag} is not documented" for flag in sorted(own - listed)]
        problems += [f"{name}: the table lists {flag}, which {name} does not take"
                     for flag in sorted(listed - own)]
        for a in _arguments(p):
            if not a.option_strings:
                label = a.metavar or a.dest
                if not re.search(rf"\b{re.escape(str(label))}\b", sec, re.IGNORECASE):
                    problems.append(f"{name}: positional {label} is not documented")
            for choice in a.choices or ():
                if not re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", sec):
                    where = a.option_strings[0] if a.option_strings else a.dest
                    problems.append(f"{name}: {where} choice {choice!r} is not documented")
    stale = sorted(set(_FLAG.findall(text)) - every_flag - _FOREIGN_FLAGS)
    problems += [f"{flag} is named but no command takes it" for flag in stale]
    return problems


# -- tests: CLI.md --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def test_parser_walk_sees_nested_commands_and_their_flags(parser):
    cmds = commands(parser)
    for name in ("clipforge train", "clipforge models", "clipforge experiment", "clipforge data synth",
                 "clipforge data pack", "clipforge eval zeroshot", "clipforge eval report"):
        assert name in cmds
    assert {"--tensorboard", "--no-tensorboard", "--wd", "--weight-decay"} <= option_strings(cmds["clipforge train"])
    assert "--help" not in option_strings(cmds["clipforge train"])


def test_cli_reference_matches_the_parser(parser):
    problems = cli_problems(CLI_DOC.read_text(), parser)
    assert not problems, "docs/CLI.md is out of date:\n  " + "\n  ".join(problems)


def _without_line(text: str, needle: str) -> str:
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if needle in line]
    assert len(hits) == 1, needle
    return "".join(lines[: hits[0]] + lines[hits[0] + 1:])


def _with_row_after(text: str, needle: str, row: str) -> str:
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if needle in line]
    assert len(hits) == 1, needle
    return "".join(lines[: hits[0] + 1] + [row + "\n"] + lines[hits[0] + 1:])


def test_the_check_fails_on_drift(parser):
    """The checker itself: each kind of drift on a copy of the page is reported."""
    text = CLI_DOC.read_text()
    # a flag whose row was deleted (a flag added to the parser and not documented reads the same)
    assert "clipforge dedup: --neighbours is not documented" in cli_problems(
        _without_line(text, "| `--neighbours` N |"), parser)
    # a flag that does not exist (one removed from the parser and left in the page reads the same)
    bogus = _with_row_after(text, "| `--drop` | off |", "| `--fuzzy` | off | nothing |")
    assert {"--fuzzy is named but no command takes it",
            "clipforge dedup: the table lists --fuzzy, which clipforge dedup does not take",
            } <= set(cli_problems(bogus, parser))
    # a flag documented under the wrong command
    moved = _with_row_after(text, "| `--drop` | off |", "| `--lock-text` | off | wrong place |")
    wrong = "clipforge dedup: the table lists --lock-text, which clipforge dedup does not take"
    assert wrong in cli_problems(moved, parser)
    # a command without its heading, and a heading of no command
    renamed = text.replace("### `clipforge eval retrieval`", "### `clipforge eval retrieve`", 1)
    problems = cli_problems(renamed, parser)
    assert "no heading `clipforge eval retrieval`" in problems
    assert "heading `clipforge eval retrieve` is not a command" in problems
    # a choice the page does not know
    assert any("'ivfpqr' is not documented" in p
               for p in cli_problems(text.replace("ivfpqr", "ivf-pq-r"), parser))


def test_readme_lists_every_command(parser):
    readme = (ROOT / "README.md").read_text()
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `clipforge "))
    leaves = [name for name, p in commands(parser).items() if not _subcommands(p)]
    assert [name for name in leaves if f"`{name}`" not in table] == [], "README.md's command table misses these"


# -- tests: CONFIG.md -----------------------------------------------------------------------------


def _config_classes(cls: type, seen: dict[str, type] | None = None) -> dict[str, type]:
    """``cls`` and every dataclass reachable through its fields' types, by class name."""
    seen = {} if seen is None else seen
    seen[cls.__name__] = cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        for t in (hints[f.name], *typing.get_args(hints[f.name])):
            if dataclasses.is_dataclass(t) and t.__name__ not in seen:
                _config_classes(t, seen)
    return seen


def config_problems(text: str) -> list[str]:
    from clipforge.train.config import TrainConfig

    # A class's section: from a heading that starts with its name in backticks to the next heading.
    heads = list(re.finditer(r"^#{1,6} (`(\w+)`)?.*$", text, re.MULTILINE))
    secs = {m.group(2): text[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
            for i, m in enumerate(heads) if m.group(2)}
    problems = []
    for name, cls in _config_classes(TrainConfig).items():
        sec = secs.get(name)
        if sec is None:
            problems.append(f"no section for {name}")
            continue
        rows = {line.split("|")[1].strip() for line in sec.splitlines() if line.startswith("|")}
        problems += [f"{name}.{f.name} has no row in the {name} table" for f in dataclasses.fields(cls)
                     if f"`{f.name}`" not in rows]
    train = commands()["clipforge train"]
    problems += [f"clipforge train {flag} is not named" for flag in sorted(option_strings(train) - {"--no-progress"})
                 if not mentions(text, flag)]
    every_flag = set().union(*(option_strings(p) for p in commands().values()))
    problems += [f"{flag} is named but no command takes it"
                 for flag in sorted(set(_FLAG.findall(text)) - every_flag - _FOREIGN_FLAGS)]
    return problems


def test_config_reference_names_every_field():
    from clipforge.train.config import TrainConfig

    nested = {"TrainConfig", "DataConfig", "OptimConfig", "ScheduleConfig", "ValConfig"}
    assert nested <= set(_config_classes(TrainConfig))
    problems = config_problems(CONFIG_DOC.read_text())
    assert not problems, "docs/CONFIG.md is out of date:\n  " + "\n  ".join(problems)
    missing = config_problems(CONFIG_DOC.read_text().replace("| `min_lr_ratio` |", "| `min-lr` |"))
    assert "ScheduleConfig.min_lr_ratio has no row in the ScheduleConfig table" in missing


# -- tests: links ---------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md", "benchmarks/demo/RESULTS.md",
                                  *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_point_into_the_repository(page):
    path = ROOT / page
    text = path.read_text()
    assert "shared/" not in text, f"{page} refers to ../shared/, which is not part of the repository"
    broken = [t for t in _LINK.findall(text)
              if "://" not in t and not t.startswith("mailto:") and not (path.parent / t).exists()]
    assert not broken, f"{page} links files that do not exist: {broken}"


def test_guarantees_name_tests_that_exist():
    """docs/GUARANTEES.md proves each guarantee by naming tests: they must exist."""
    text = (ROOT / "docs" / "GUARANTEES.md").read_text()
    named = set(re.findall(r"::(test_\w+)", text)) | set(re.findall(r"`(test_\w+)`", text))
    files = set(re.findall(r"`(tests/[\w/]+\.py)", text))
    defined = {name for path in (ROOT / "tests").rglob("test_*.py")
               for name in re.findall(r"^\s*def (test_\w+)", path.read_text(), re.MULTILINE)}
    assert sorted(named - defined) == [], "GUARANTEES.md names tests that do not exist"
    assert sorted(f for f in files if not (ROOT / f).is_file()) == [], "GUARANTEES.md names missing test files"
    assert len(named) > 20


# -- a skeleton for a new section -----------------------------------------------------------------


def skeleton(name: str) -> str:
    """A starting section for command ``name`` ('train', 'eval zeroshot'), from the parser."""
    full = f"clipforge {name}".strip()
    p = commands()[full]
    level = "#" * (full.count(" ") + 1)
    rows = []
    for a in _arguments(p):
        cell = ", ".join(f"`{s}`" for s in a.option_strings) or f"{(a.metavar or a.dest).upper()} (positional)"
        if a.option_strings and a.nargs != 0 and not isinstance(a, argparse.BooleanOptionalAction):
            cell += " " + ("{" + ",".join(map(str, a.choices)) + "}" if a.choices else str(a.metavar or a.dest.upper()))
        default = "required" if a.required else "" if a.default in (None, False, argparse.SUPPRESS) else a.default
        help_ = p._get_formatter()._expand_help(a) if a.help else ""
        rows.append(f"| {cell} | {default} | {help_} |")
    body = "\n".join(["| flag | default | meaning |", "| --- | --- | --- |", *rows]) if rows else ""
    return f"{level} `{full}`\n\n{(p.description or '').strip()}\n\n{body}\n"


if __name__ == "__main__":
    print(skeleton(" ".join(sys.argv[1:])))


def test_readme_family_table_matches_the_registry():
    """README's "Model families" table covers every registered name, and each of its name patterns
    matches at least one registered architecture."""
    import fnmatch

    from clipforge.model.registry import list_models

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Model families"):]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
    patterns = [p for row in rows for p in re.findall(r"`([^`]+)`", row.rsplit("|", 2)[-2])]
    names = list_models()
    assert patterns
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    assert not unmatched, f"README patterns that match no registered architecture: {unmatched}"
    uncovered = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    assert not uncovered, f"registered architectures missing from README's family table: {uncovered}"
