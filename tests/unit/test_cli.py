"""Every command answers --help, and misuse gets a one-line error rather than a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from clipforge.cli import build_parser, main


def command_paths() -> list[list[str]]:
    """All (sub)command paths, e.g. ['train'], ['data', 'synth'], ['eval', 'zeroshot']."""
    paths: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    paths.append(prefix + [name])
                    walk(child, prefix + [name])

    walk(build_parser(), [])
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p))
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(path + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: clipforge" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow  # builds every native architecture on the meta device: ~4 s
def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-32" in out and "151.28" in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["ViT-B-32"].rstrip().endswith("clip x12")
    assert "conv stem |x|" in rows["tiny-bow"] and rows["tiny-bow"].rstrip().endswith("bag of words")
    assert "conv stem" in rows["tiny-conv"] and "|x|" not in rows["tiny-conv"]


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "clipforge", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "models" in done.stdout


def test_out_of_memory_is_one_line_not_a_traceback(monkeypatch, capsys):
    import clipforge.cli.models as models

    def explode(args):
        raise MemoryError

    monkeypatch.setattr(models, "run", explode)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err
