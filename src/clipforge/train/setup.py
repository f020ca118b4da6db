"""What a run starts from: the checkpoint it resumes (if any), and the model it trains (fresh,
fine-tuned or resumed) with its training options applied and its distributed wrapping."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch

from clipforge.config import ClipConfig
from clipforge.errors import CheckpointError, ClipforgeError
from clipforge.model.checkpoints import CONFIG_NAME
from clipforge.model import factory
from clipforge.model.clip import CLIP
from clipforge.model.hf_text import HFTextTower
from clipforge.model.registry import get_config
from clipforge.train.config import ConfigError, TrainConfig
from clipforge.train import checkpointing as ckpt
from clipforge.train.distributed import DistInfo
from clipforge.train.freeze import lock_tower, set_locked_eval
from clipforge.train.runtime import broadcast_object


def build_model(cfg: TrainConfig, resume_dir: Path | None, model: CLIP | None) -> CLIP:
    """The model to train: the checkpoint's architecture when resuming, else ``model``, a
    registered architecture (fresh init) or a checkpoint path (fine-tuning), its text tower
    swapped for ``cfg.text_model`` when given."""
    if resume_dir is not None:
        model = CLIP(ClipConfig.from_json(resume_dir / CONFIG_NAME))  # text tower as saved
    elif model is None and cfg.model in factory.list_models():
        arch = get_config(cfg.model)
        if cfg.loss == "siglip" or (cfg.loss == "auto" and arch.init_logit_bias is not None):
            # the SigLIP paper's initial temperature and bias (OpenCLIP's configs keep CLIP's temperature)
            arch = arch.replace(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
        if cfg.init_logit_scale is not None:
            arch = arch.replace(init_logit_scale=math.log(cfg.init_logit_scale))
        if cfg.text_model:
            arch = _with_text_model(arch, cfg.text_model)
        model = factory.create_model(arch)
    else:
        if model is None:  # a checkpoint path or pretrained weights by name (fine-tuning)
            try:
                model, _ = factory.load(cfg.model)
            except CheckpointError as e:
                if Path(cfg.model).exists():
                    raise
                raise ConfigError(f"model {cfg.model!r} is not a registered architecture "
                                  f"({', '.join(factory.list_models())}), and as weights: {e}") from None
        if cfg.text_model:
            model = swap_text_tower(model, cfg.text_model)
    if cfg.loss == "siglip" and model.logit_bias is None:  # fine-tuning a CLIP model with SigLIP
        with_bias = CLIP(model.config.replace(init_logit_bias=-10.0))
        missing, unexpected = with_bias.load_state_dict(model.state_dict(), strict=False)
        assert missing == ["logit_bias"] and not unexpected, (missing, unexpected)
        model = with_bias
    return model.float()


def resolve_loss(cfg: TrainConfig, model: CLIP) -> TrainConfig:
    """``loss='auto'``: SigLIP's sigmoid loss for a model with a logit bias (a SigLIP architecture or
    checkpoint), else CLIP's softmax loss."""
    if cfg.loss != "auto":
        return cfg
    return cfg.replace(loss="siglip" if model.logit_bias is not None else "clip")


def caption_weight(cfg: TrainConfig, model: CLIP) -> float:
    """The weight of CoCa's captioning loss: ``caption_loss_weight`` for a model with a decoder, else 0."""
    if model.config.decoder is None:
        return 0.0
    if cfg.grad_accum > 1 and cfg.caption_loss_weight:
        raise ConfigError("a CoCa model trains with grad_accum 1 (its captioning loss is not accumulated yet)")
    return cfg.caption_loss_weight


def plan_steps(cfg: TrainConfig, loader: Any, main: bool) -> tuple[int | None, TrainConfig]:
    """(optimizer steps the run takes, or None for a stream of unknown length; the config, its
    schedule made constant where the length is unknown)."""
    if cfg.steps is not None:
        return cfg.steps, cfg
    per_epoch = loader.num_batches_per_epoch
    if per_epoch is not None:
        return cfg.run_epochs * per_epoch // cfg.grad_accum, cfg
    if cfg.data.resampled:
        raise ConfigError("resampled shards never end: give the run length in steps")
    if cfg.schedule.kind != "constant":
        if main:
            print(f"warning: the {cfg.schedule.kind} schedule needs the run length, which shard streams do "
                  "not know: using a constant rate after warm-up (set steps for the schedule)", flush=True)
        cfg = cfg.replace(schedule=dataclasses.replace(cfg.schedule, kind="constant"))
    return None, cfg


def _with_text_model(arch: ClipConfig, text_model: str) -> ClipConfig:
    from clipforge.model.hf_source import with_text_model
    from clipforge.model.hf_text import hf_text_config

    try:
        if arch.text.hf_model is not None and arch.text.hf_proj != "matrix":
            # OpenCLIP's Hugging Face tower (xlm-roberta-*, nllb-clip-*, ...): its own pooling and
            # head, the encoder's config and pretrained weights read from this folder
            return with_text_model(arch, text_model)
        text = hf_text_config(text_model, context_length=arch.text.context_length)
    except ClipforgeError as e:
        raise ConfigError(f"text_model: {e}") from None
    return arch.replace(text=text, name=f"{arch.name}+{Path(text_model).name}")


def swap_text_tower(model: CLIP, text_model: str) -> CLIP:
    """``model`` with a pretrained Hugging Face text tower (and a new text projection); the
    image tower and the temperature keep their weights."""
    new = factory.create_model(_with_text_model(model.config, text_model))
    keep = {k: v for k, v in model.state_dict().items() if not k.startswith("text.")}
    missing, unexpected = new.load_state_dict(keep, strict=False)
    assert not unexpected and all(k.startswith("text.") for k in missing), (missing, unexpected)
    return new


def prepare_model(cfg: TrainConfig, raw: CLIP) -> list[torch.nn.Module]:
    """Apply patch dropout, checkpointing and tower locking; returns the locked modules."""
    if cfg.patch_dropout:
        if not hasattr(raw.visual, "patch_dropout"):
            raise ConfigError("patch dropout needs a ViT image tower")
        raw.visual.patch_dropout = cfg.patch_dropout
    if cfg.grad_checkpointing:
        raw.set_grad_checkpointing(True)
    locked = []
    try:
        if cfg.lock_image:
            locked += lock_tower(raw, "image", cfg.lock_unlocked_layers)
        if cfg.lock_text:
            locked += lock_tower(raw, "text", cfg.lock_unlocked_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    set_locked_eval(locked)
    if cfg.compile:
        raw.text.trim_padding = False  # static shapes: no data-dependent slicing
    return locked


def choose_resume(cfg: TrainConfig, run_dir: Path, ckpt_root: Path, info: DistInfo) -> Path | None:
    """The checkpoint to resume from, or None. Rank 0 checks the run directory and picks the
    checkpoint (or the error) for everyone, so no rank is left waiting alone in a collective."""
    main = info.rank == 0
    choice, error = None, None
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            error = f"cannot write to the output directory {run_dir}: {e.strerror or e}"
    if main and cfg.resume and error is None:
        if cfg.resume == "auto":
            choice = ckpt.latest_checkpoint(ckpt_root)
        else:
            choice = Path(cfg.resume)
            if not (choice / ckpt.MARKER).is_file():
                error = f"{choice}: not a complete training checkpoint (no {ckpt.MARKER} marker)"
    choice, error = broadcast_object((choice, error), info)
    if error:
        raise CheckpointError(error)
    return choice


def wrap_model(raw: CLIP, cfg: TrainConfig, info: DistInfo,
               device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The module the training step calls (FSDP-sharded, compiled, DDP-wrapped or ``raw`` itself),
    and the parameters FSDP leaves replicated, whose gradients the trainer averages by hand."""
    replicated: list[torch.nn.Parameter] = []
    if cfg.fsdp and info.world_size > 1:
        from torch.distributed.fsdp import fully_shard

        # Each block, then each tower, is one shard group. The scalar temperature (and
        # bias) cannot be sharded: they stay replicated, their gradients averaged by hand.
        for tower in (raw.visual, raw.text):
            blocks = tower.blocks() if isinstance(tower, HFTextTower) else \
                getattr(getattr(tower, "transformer", None), "resblocks", [])
            for block in blocks:
                fully_shard(block)
            fully_shard(tower)
        replicated = [p for p in (raw.logit_scale, raw.logit_bias) if p is not None and p.requires_grad]
    if cfg.compile:
        raw.compile()  # in place: parameter names and state-dict keys stay unchanged
    if info.world_size > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(raw, device_ids=ids), replicated
    return raw, replicated
