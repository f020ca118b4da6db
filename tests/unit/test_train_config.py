"""Training configuration: defaults <- YAML/TOML file <- flags, validation, round trip."""

from __future__ import annotations

import pytest

from clipforge.cli import build_parser
from clipforge.cli.train import overrides_from_args
from clipforge.data.config import DataConfig
from clipforge.train.config import ConfigError, TrainConfig, dump_config


def _cfg_from_cli(argv: list[str]) -> TrainConfig:
    args = build_parser().parse_args(["train", *argv])
    return TrainConfig.load(getattr(args, "config", None), overrides_from_args(args))


def test_issue_flags_land_in_typed_fields(tmp_path):
    cfg = _cfg_from_cli([
        "--data", "pairs.csv", "--model", "nano", "--out", str(tmp_path), "--steps", "7", "--batch-size", "4",
        "--lr", "0.002", "--warmup", "3", "--precision", "bf16", "--workers", "0", "--seed", "5",
        "--save-every", "2", "--resume", "auto", "--image-key", "img", "--caption-key", "txt", "--cache-mb", "256",
        "--grad-accum", "2", "--loss", "siglip", "--loss-tile", "16", "--grad-checkpointing", "--compile",
        "--patch-dropout", "0.5", "--crop-scale", "0.5", "1", "--lock-image", "--lock-unlocked-layers", "1", "--fsdp", "--nan-policy", "skip",
        "--val-data", "val.csv", "--eval-every", "3", "--no-tensorboard",
    ])
    assert cfg.data == DataConfig(path="pairs.csv", image_key="img", caption_key="txt", cache_mb=256)
    assert (cfg.model, cfg.out, cfg.steps, cfg.epochs, cfg.batch_size) == ("nano", str(tmp_path), 7, None, 4)
    assert (cfg.optim.lr, cfg.schedule.warmup_steps, cfg.precision, cfg.workers, cfg.seed) == (0.002, 3, "bf16", 0, 5)
    assert (cfg.save_every, cfg.resume, cfg.grad_accum, cfg.loss, cfg.loss_tile) == (2, "auto", 2, "siglip", 16)
    assert cfg.grad_checkpointing and cfg.compile and cfg.lock_image and cfg.fsdp and not cfg.lock_text
    assert (cfg.patch_dropout, cfg.lock_unlocked_layers, cfg.nan_policy) == (0.5, 1, "skip")
    assert cfg.crop_scale == (0.5, 1.0)
    assert cfg.val.path == "val.csv" and cfg.val.every == 3 and cfg.tensorboard is False


def test_crop_scale_is_checked_and_read_from_files():
    assert TrainConfig.from_dict({"crop_scale": [1, 1]}).crop_scale == (1.0, 1.0)
    assert TrainConfig().crop_scale == (0.9, 1.0)
    for bad in ((0.0, 1.0), (0.9, 0.5), (0.5, 1.5), (1.0,), "ab"):
        with pytest.raises(ConfigError, match="crop_scale"):
            TrainConfig(crop_scale=bad)


def test_defaults():
    cfg = TrainConfig(data=DataConfig(path="x.csv"))
    assert cfg.data.image_key == "image" and cfg.data.caption_key == "caption"
    assert cfg.workers == 2 and cfg.run_epochs == 1 and cfg.val is None and cfg.nan_policy == "stop"
    assert TrainConfig(steps=5).run_epochs is None


def test_yaml_file_then_flags_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(
        "data: {path: a.csv, caption_key: text}\nlr: 0.01\nbatch-size: 16\nepochs: 3\n"
        "optim: {weight_decay: 0.05}\nschedule: {kind: constant}\n"
    )
    cfg = _cfg_from_cli(["--config", str(f), "--lr", "0.5", "--steps", "9"])
    assert cfg.optim.lr == 0.5 and cfg.optim.weight_decay == 0.05 and cfg.batch_size == 16
    assert cfg.data.path == "a.csv" and cfg.data.caption_key == "text" and cfg.schedule.kind == "constant"
    assert cfg.steps == 9 and cfg.epochs is None  # --steps replaces the file's epochs
    cfg = _cfg_from_cli(["--config", str(f), "--data", "b.csv"])
    assert cfg.data.path == "b.csv" and cfg.data.caption_key == "text" and cfg.epochs == 3


def test_toml_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('model = "nano"\nsteps = 4\n[optim]\nlr = 0.003\n[data]\npath = "x.parquet"\n')
    cfg = TrainConfig.load(f)
    assert (cfg.model, cfg.steps, cfg.optim.lr, cfg.data.path) == ("nano", 4, 0.003, "x.parquet")


def test_resolved_config_round_trips(tmp_path):
    cfg = _cfg_from_cli(["--data", "d.csv", "--steps", "3", "--val-data", "v.csv", "--lr", "1e-3"])
    path = dump_config(cfg, tmp_path / "config.yaml")
    assert TrainConfig.load(path) == cfg


@pytest.mark.parametrize("bad, match", [
    ({"lr2": 1}, "lr2"),
    ({"optim": {"learning_rate": 1}}, "learning_rate"),
    ({"steps": 3, "epochs": 2}, "either steps or epochs"),
    ({"precision": "fp8"}, "precision"),
    ({"batch_size": 0}, "batch_size"),
    ({"patch_dropout": 1.0}, "patch_dropout"),
    ({"eval_every": 5}, "val_data"),
    ({"lock_image": True, "lock_text": True}, "nothing to train"),
])
def test_invalid_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.load(None, bad)


def test_unreadable_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.load(bad)
