"""The benchmark helpers: alternating order, medians and ratios, percentiles, JSON records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[2] / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alternate_swaps_the_order_every_repetition(common):
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    times = common.alternate(fns, reps=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")  # warm-up, then A B C / C B A / A B C
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_alternate_times_each_call_with_the_clock(common):
    ticks = iter(range(100))
    times = common.alternate({"x": lambda: None, "y": lambda: None}, reps=2, warmup=0, clock=lambda: next(ticks))
    assert times == {"x": [1, 1], "y": [1, 1]}  # each call spans one tick of the fake clock


def test_summarize_ratios_medians_and_paired(common):
    times = {"ref": [2.0, 4.0, 3.0], "fast": [1.0, 1.0, 1.5]}
    s = common.summarize(times, reference="ref", work=6)
    assert s["median_s"] == {"ref": 3.0, "fast": 1.0}
    assert s["rate_per_s"] == {"ref": 2.0, "fast": 6.0}
    assert s["speedup_vs_ref"] == {"ref": 1.0, "fast": 3.0}
    assert s["paired_speedup_median"]["fast"] == 2.0  # median of 2/1, 4/1, 3/1.5
    assert s["reps"] == 3


def test_percentile_interpolates(common):
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    assert common.percentile([5], 99) == 5
    assert common.percentile(list(range(101)), 99) == 99
    with pytest.raises(ValueError):
        common.percentile([], 50)


def test_write_record_has_the_environment_and_the_figures(common, tmp_path):
    path = common.write_record("demo", {"results": {"x": 1}}, "cpu", tmp_path, code_paths=("src/clipforge/model",))
    rec = json.loads(path.read_text())
    assert path.name.startswith("demo-cpu-") and path.suffix == ".json"
    for key in ("benchmark", "date", "command", "device", "cpu_count", "torch", "torch_threads", "code"):
        assert key in rec, key
    assert rec["benchmark"] == "demo" and rec["results"] == {"x": 1}
    assert rec["device"].startswith("cpu (")


def test_print_table_aligns_columns(common, capsys):
    text = common.print_table([("a", 1), ("long name", 123)], ("side", "value"))
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert capsys.readouterr().out.strip() == text.strip()
