"""Model cards: every saved model directory has a Hugging Face-style README.md whose results table
`clipforge eval` fills, and `convert --to hf` carries it over."""

from __future__ import annotations

import re

import clipforge
from clipforge.cli import main
from clipforge.model.card import add_result, read_card_data, training_record, write_card


def front_matter(text: str) -> dict[str, list[str] | str]:
    block = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL).group(1)
    out: dict = {}
    key = None
    for line in block.splitlines():
        if line.startswith("- "):
            out[key].append(line[2:].strip('"'))
        else:
            key, _, value = line.partition(":")
            out[key] = value.strip() or []
    return out


def test_saved_model_has_a_card_that_keeps_results_and_training(tmp_path):
    model = clipforge.create_model("nano", seed=0)
    out = clipforge.save(model, tmp_path / "m")
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "clipforge" and "clip" in meta["tags"] and meta["license"] == "other"
    assert "## Intended use and limits" in card and "embedding width: 64" in card
    result = {"dataset": "test (shape)", "task": "zeroshot_classification", "metrics": {"acc1": 0.5, "acc5": 0.9}}
    add_result(out, model.config, result)
    add_result(out, model.config, {**result, "metrics": {"acc1": 0.75, "acc5": 1.0}})  # replaces the row
    training = training_record({"data": "world/train.csv", "lr": 0.001, "steps": 10}, {"final_loss": 2.5})
    write_card(out, model.config, training=training)
    card = (out / "README.md").read_text()
    assert "| test (shape) | zeroshot_classification | 0.7500 | 1.0000 |" in card and "0.5000" not in card
    assert front_matter(card)["datasets"] == ["world/train.csv"] and front_matter(card)["metrics"] == ["acc1", "acc5"]
    assert "| final_loss | 2.5000 |" in card
    clipforge.save(model, out)  # saved again in place: the record and results stay
    assert read_card_data(out)["results"][0]["metrics"]["acc1"] == 0.75

    assert main(["convert", "--model", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = (tmp_path / "hf" / "README.md").read_text()
    assert front_matter(hf)["library_name"] == "transformers" and "| test (shape) |" in hf


def test_a_readme_that_is_not_a_card_is_never_overwritten(tmp_path, caplog):
    import clipforge

    model = clipforge.create_model("nano", seed=0)
    out = tmp_path / "m"
    out.mkdir()
    (out / "README.md").write_text("# my notes\nkeep me\n")
    clipforge.save(model, out)
    write_card(out, model.config, training={"steps": 3})
    assert (out / "README.md").read_text() == "# my notes\nkeep me\n"
    assert "not a clipforge model card" in caplog.text
