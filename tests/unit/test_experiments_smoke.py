"""Every ``clipforge experiment`` entry point runs end to end at the smoke scale, writes its JSON
record, plot and verdict, reuses its cached models on a rerun, and lands in REPORT.md."""

from __future__ import annotations

import json

import pytest

from clipforge.cli import main
from clipforge.experiments import FINDINGS

VERDICTS = {"reproduced", "partly", "not reproduced", "not learnt"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    out, work = root / "results", root / "work"
    assert main(["experiment", "all", "--scale", "smoke", "--out", str(out), "--work", str(work),
                 "--device", "cpu", "--no-progress"]) == 0
    return root, out, work


@pytest.mark.slow
@pytest.mark.parametrize("finding", FINDINGS)
def test_finding_writes_record_and_plot(smoke, finding):
    _, out, _ = smoke
    rec = json.loads((out / f"{finding}.json").read_text())  # strict JSON: no NaN
    assert rec["finding"] == finding
    assert rec["verdict"]["verdict"] in VERDICTS and rec["verdict"]["criterion"]
    assert "learnt" in rec["verdict"]["criterion"] and rec["verdict"]["learnt"]["not_learnt"] is not None
    assert rec["scale"]["name"] == "smoke" and rec["seeds"] == [0]
    assert rec["command"].startswith("clipforge experiment")
    assert rec["summary"] and rec["environment"]["torch"]
    assert (out / f"{finding}.png").stat().st_size > 1000


@pytest.mark.slow
def test_report_covers_every_finding(smoke):
    root, _, _ = smoke
    report = (root / "REPORT.md").read_text()
    for title in ("Contrastive vs. predictive", "prompt engineering", "few-shot", "supervised baseline",
                  "distribution shift", "Scaling", "natural category"):
        assert title in report
    assert "not run yet" not in report
    assert report.count("**Verdict:") == len(FINDINGS)
    assert report.count("**Learnt.**") == len(FINDINGS)


@pytest.mark.slow
def test_rerun_reuses_cached_models(smoke):
    _, out, work = smoke
    stamps = {p: p.stat().st_mtime_ns for p in (work / "smoke").glob("*/*/*") if p.is_file()}
    assert any(p.name == "summary.json" for p in stamps)  # trainer runs
    assert main(["experiment", "probe", "--scale", "smoke", "--out", str(out), "--work", str(work),
                 "--device", "cpu", "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained or re-extracted


def test_missing_results_are_reported_as_not_run(tmp_path):
    from clipforge.experiments import write_report

    report = write_report(tmp_path / "results", tmp_path / "REPORT.md").read_text()
    assert report.count("not run yet") == len(FINDINGS)


def test_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert main(["experiment", "prompts", "--scale", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown scale" in capsys.readouterr().err
