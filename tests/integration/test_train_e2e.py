"""End-to-end training on CPU with the `nano` model and tiny solid-colour datasets.

Each data source trains until the loss falls; bad samples are skipped and counted exactly;
a non-finite loss is stopped or skipped by policy and never checkpointed; a checkpoint that
cannot be written (full disk) is a clear error that leaves the previous one intact.
"""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.errors import CheckpointError
from clipforge.train import checkpointing as ckpt
from clipforge.train import trainer as trainer_mod
from clipforge.train.config import TrainConfig
from clipforge.train.logging import read_metrics
from clipforge.train.loss import ContrastiveLoss
from support.datasets import write_csv, write_folder, write_parquet, write_shards
from support.images import NAMES
from support.models import nano_config, save_nano

# Tests share two cores with other work: one compute thread avoids OpenMP spin-waiting.
pytestmark = pytest.mark.usefixtures("one_omp_thread")


def assert_loss_fell(run_dir: Path) -> None:
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) >= 8
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses


@pytest.mark.slow
@pytest.mark.parametrize("source", ["csv", "parquet", "folder", "wds"])
def test_each_source_trains_and_the_loss_falls(source, tmp_path):
    writer = {"csv": write_csv, "parquet": write_parquet, "folder": write_folder, "wds": write_shards}[source]
    data = writer(tmp_path / "data")
    over = {"image_key": "pixels", "caption_key": "text"} if source == "parquet" else {}
    if source == "csv":
        over["workers"] = 2  # decoding in worker processes
    summary = trainer_mod.train(nano_config(str(data), tmp_path / "run", **over), progress=False)

    run = tmp_path / "run"
    assert summary["steps"] == 10 and summary["samples_seen"] == 10 * 8 and summary["skipped"] == {}
    assert_loss_fell(run)
    assert json.loads((run / "summary.json").read_text()) == summary
    model, _ = clipforge.load(run / "final")
    assert model.config.name == "nano" and all(torch.isfinite(p).all() for p in model.parameters())
    assert TrainConfig.load(run / "config.yaml").data.path == str(data)  # resolved config, reloadable


@pytest.mark.slow
def test_cli_run_counts_skipped_samples_exactly(tmp_path, capsys):
    """One epoch over 40 good rows and 8 bad ones (batch 8: every row is visited once)."""
    bad = {"not_an_image": 3, "missing_file": 2, "empty_file": 1, "corrupt_image": 2}
    data = write_csv(tmp_path / "data", n=40, bad=bad)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--model", "nano", "--out", str(out), "--epochs", "1",
               "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--save-every", "3", "--seed", "1",
               "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["samples_seen"] == 48
    assert summary["skipped"] == bad and summary["skipped_total"] == 8
    assert isinstance(summary["final_loss"], float) and summary["wall_time_s"] > 0
    assert (out / "tensorboard").is_dir() and list((out / "tensorboard").iterdir())
    assert [int(d.name.split("_")[1]) for _, d in ckpt.list_checkpoints(out / "checkpoints")] == [3, 6]
    assert '"steps": 6' in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing.csv"), "--model", "nano", "--out", str(tmp_path / "r"),
               "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.csv" in err and "Traceback" not in err


class _NanOnThirdCall(ContrastiveLoss):
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        loss = super().forward(*args, **kwargs)
        return loss * float("nan") if type(self).calls == 3 else loss


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_policy(policy, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "ContrastiveLoss", _NanOnThirdCall)
    _NanOnThirdCall.calls = 0
    data = write_csv(tmp_path / "data", n=16)
    cfg = nano_config(str(data), tmp_path / "run", steps=4, save_every=1 if policy == "stop" else 0, nan_policy=policy)
    if policy == "stop":
        with pytest.raises(trainer_mod.NonFiniteLossError, match="step 3"):
            trainer_mod.train(cfg, progress=False)
        steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
        assert steps == [1, 2]  # the bad step was never written
        assert not (tmp_path / "run" / "final").exists()
        return
    summary = trainer_mod.train(cfg, progress=False)
    assert summary["steps"] == 4 and summary["nan_skipped_steps"] == 1
    state, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.slow
def test_unwritable_checkpoint_is_a_clear_error_and_keeps_the_previous_one(tmp_path, monkeypatch):
    data = write_csv(tmp_path / "data", n=16)
    real_save, calls = torch.save, []

    def disk_full(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: write a little, then fail like a full disk
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*step_00000002 is intact"):
        trainer_mod.train(nano_config(str(data), tmp_path / "run", steps=4, save_every=2), progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind
    model, _ = clipforge.load(root / "step_00000002")  # a checkpoint is a loadable model
    assert model.config.name == "nano"


def test_resume_ignores_incomplete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_00000004", "step_00000008", ".tmp-step_00000012-99"):
        (root / name).mkdir(parents=True)
    (root / "step_00000004" / ckpt.MARKER).write_text("4\n")
    (root / ".tmp-step_00000012-99" / ckpt.MARKER).write_text("12\n")
    assert ckpt.latest_checkpoint(root) == root / "step_00000004"
    with pytest.raises(CheckpointError, match="not a complete"):
        ckpt.load_checkpoint(root / "step_00000008")


@pytest.mark.slow
def test_lit_finetune_with_accumulation_siglip_and_memory_options(tmp_path):
    """Fine-tune a saved model with the text tower locked except its last block, SigLIP loss in
    tiles, 2 accumulated micro-batches, patch dropout, gradient checkpointing and bf16."""
    start = save_nano(tmp_path / "start", seed=3)
    data = write_csv(tmp_path / "data", n=16)
    cfg = nano_config(str(data), tmp_path / "run", model=str(start), steps=3, batch_size=4, grad_accum=2,
                      loss="siglip", loss_tile=4, lock_text=True, lock_unlocked_layers=1, patch_dropout=0.5,
                      grad_checkpointing=True, precision="bf16")
    summary = trainer_mod.train(cfg, progress=False)
    assert summary["steps"] == 3 and summary["global_batch_size"] == 8 and summary["precision"] == "bf16"
    before = clipforge.load(start)[0].state_dict()
    after = clipforge.load(tmp_path / "run" / "final")[0].state_dict()
    assert "logit_bias" in after and "logit_bias" not in before  # SigLIP adds its bias when fine-tuning
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "text.token_embedding.weight" not in changed and "text.transformer.resblocks.0.mlp.c_fc.weight" not in changed
    assert {"text.transformer.resblocks.1.mlp.c_fc.weight", "text.text_projection", "visual.conv1.weight"} <= changed


@pytest.mark.slow
def test_periodic_validation_reports_retrieval_and_zero_shot(tmp_path):
    data = write_csv(tmp_path / "data", n=16)
    rows = list(csv.DictReader(data.open()))
    val = tmp_path / "data" / "val.csv"
    with val.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label"])
        w.writerows([(r["image"], r["caption"], r["caption"].split()[1]) for r in rows[:8]])
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    cfg = nano_config(str(data), tmp_path / "run", steps=4, val_data=str(val), eval_every=2,
                      val_classnames=str(classes), val_templates=None)
    summary = trainer_mod.train(cfg, progress=False)
    evals = read_metrics(tmp_path / "run", kind="val")
    assert [r["step"] for r in evals] == [2, 4]
    for key in ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@10", "zeroshot_acc1"):
        assert 0.0 <= summary["eval"][key] <= 1.0, key
    assert summary["eval"]["image_retrieval_recall@10"] == 1.0  # 8 images: every caption finds its image in 10


def test_sparse_embeddings_train_checkpoint_and_resume(tmp_path):
    """--sparse-embeddings: the token table trains at its batch's rows, and a run stopped at a
    checkpoint resumes to the same weights as one that ran straight through."""
    data = write_csv(tmp_path / "data", n=16)
    straight = trainer_mod.train(nano_config(str(data), tmp_path / "a", steps=4, sparse_embeddings=True),
                                 progress=False)
    assert straight["steps"] == 4
    first = trainer_mod.train(nano_config(str(data), tmp_path / "b", steps=2, sparse_embeddings=True,
                                          save_every=2), progress=False)
    assert first["steps"] == 2
    resumed = trainer_mod.train(nano_config(str(data), tmp_path / "b", steps=4, sparse_embeddings=True,
                                            resume="auto"), progress=False)
    assert resumed["steps"] == 4
    a, b = (clipforge.load(tmp_path / d / "final")[0].state_dict() for d in ("a", "b"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_swap_negatives_train_and_resume_exactly(tmp_path):
    """--swap-negatives: a run trains on its captions' swapped copies (other weights than without
    them), and one stopped at a checkpoint draws the same copies as one that ran straight through."""
    data = write_csv(tmp_path / "data", n=16)
    words = tmp_path / "words.json"
    words.write_text(json.dumps({"colour": [[c] for c in NAMES]}))
    swap = dict(swap_negatives=3, swap_words=str(words), init_logit_scale=100.0)
    for out, kw in (("plain", {"init_logit_scale": 100.0}), ("a", swap), ("b", {**swap, "save_every": 2})):
        trainer_mod.train(nano_config(str(data), tmp_path / out, steps=2 if out == "b" else 4, **kw), progress=False)
    trainer_mod.train(nano_config(str(data), tmp_path / "b", steps=4, resume="auto", **swap), progress=False)
    plain, a, b = (clipforge.load(tmp_path / d / "final")[0].state_dict() for d in ("plain", "a", "b"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert not torch.equal(plain["visual.proj"], a["visual.proj"])
