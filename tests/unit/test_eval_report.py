"""Result JSON records and the aggregated Markdown/CSV/HTML report."""

from __future__ import annotations

import csv
import json

from clipforge.eval.report import load_results, main_metric, make_result, plot_few_shot, write_report, write_result

PNG = b"\x89PNG"


def test_result_record_has_clip_benchmark_fields_and_valid_json(tmp_path):
    r = make_result("zeroshot_classification", "m1", "cifar", {"acc1": 0.5, "acc5": float("nan")},
                    {"per_template": [{"template": "a {}", "acc1": 0.4}]}, {"batch_size": 8}, ["clipforge", "eval"])
    path = write_result(r, tmp_path / "r.json")
    loaded = json.loads(path.read_text())  # strict JSON: NaN became null
    assert {"dataset", "model", "task", "metrics", "details", "options", "command", "versions"} <= set(loaded)
    assert loaded["metrics"] == {"acc1": 0.5, "acc5": None}
    assert loaded["command"] == "clipforge eval" and "torch" in loaded["versions"]
    assert "NaN" not in path.read_text()


def test_report_aggregates_tables_csv_html_and_plots(tmp_path):
    res = tmp_path / "results"
    for model, acc in (("small", 0.4), ("big", 0.7)):
        per_template = [{"template": "a {}", "acc1": acc}, {"template": "b {}", "acc1": 0.1}]
        metrics = {"acc1": acc, "mean_per_class_recall": acc}
        write_result(make_result("zeroshot_classification", model, "digits", metrics, {"per_template": per_template}),
                     res / f"{model}_zs.json")
    write_result(make_result("zeroshot_retrieval", "big", "caps", {"image_retrieval_recall@1": 0.25,
                                                                   "text_retrieval_recall@1": 0.5}), res / "ret.json")
    shots = [{"k": k, "acc1_mean": 0.2 * i + 0.3, "acc1_std": 0.05} for i, k in enumerate((1, 2, 4))]
    write_result(make_result("few_shot", "big", "digits", {"acc1_1shot": 0.3, "acc1_4shot": 0.7}, {"shots": shots}),
                 res / "fs.json")
    (res / "other.json").write_text('{"not": "a result"}')
    assert len(load_results(res)) == 4

    paths = write_report(res, tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "## zeroshot_classification" in md and "| big | digits | 0.7000 |" in md
    assert "## zeroshot_retrieval" in md and "## few_shot" in md
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {"model": "small", "dataset": "digits", "task": "zeroshot_classification", "metric": "acc1",
            "value": "0.4"} in rows
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") >= 4  # bars per task, templates x2, few-shot curve
    pngs = sorted(p.name for p in paths["plots"].iterdir())
    assert "few_shot_0.png" in pngs and "zeroshot_classification.png" in pngs
    assert (paths["plots"] / "few_shot_0.png").read_bytes().startswith(PNG)


def test_main_metric_for_few_shot_is_the_largest_k():
    r = {"task": "few_shot", "metrics": {"acc1_2shot": 0.4, "acc1_16shot": 0.8, "acc1_16shot_std": 0.1}}
    assert main_metric(r) == ("acc1_16shot", 0.8)


def test_plot_few_shot_png(tmp_path):
    png = plot_few_shot([{"k": 1, "acc1_mean": 0.3, "acc1_std": 0.1}], 0.5, tmp_path / "p.png", "title")
    assert png.startswith(PNG) and (tmp_path / "p.png").read_bytes() == png
