"""The training loop: ``train(cfg)`` on one CPU or many GPUs, with exact resume.

One process per device (``torchrun``); each reads its own shard of the data and computes
the loss over the features of all ranks. Rank 0 logs and writes checkpoints. A step
(``train.step.TrainStep``, the one step everything in clipforge trains with) is

    K micro-batches -> forward/backward (GradCache when K > 1) -> unscale -> clip
    -> one all-reduce of [loss, non-finite flags, stop flag] (the step's only host sync)
    -> optimizer step, or skip/stop on a non-finite loss (nan_policy)

Exact resume: the checkpoint holds everything that decides the next steps (weights,
optimizer, schedule step, scaler, every rank's RNG, and the data position as (epoch,
micro-batches consumed)); the data loader replays an epoch deterministically from any
position, so a killed-and-resumed CPU run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import gc
import math
import random
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from clipforge.errors import ClipforgeError
from clipforge.model.checkpoints import load_state_strict
from clipforge.model.clip import CLIP
from clipforge.model.factory import get_preprocess, tokenizer_for
from clipforge.train import checkpointing as ckpt
from clipforge.train.config import ConfigError, TrainConfig, dump_config
from clipforge.train.distributed import (
    DistInfo,
    all_reduce_sum,
    cleanup,
    init_distributed,
)
from clipforge.train.logging import MetricsLogger, Progress
from clipforge.train.loss import ContrastiveLoss
from clipforge.train.optim import LrSchedule, build_optimizer
from clipforge.train.run_records import RunRecords
from clipforge.train.runtime import (
    configure_threads,
    install_sigterm_handler,
    resolve_precision,
    reuse_freed_memory,
)
from clipforge.train.setup import (
    build_model,
    caption_weight,
    choose_resume,
    plan_steps,
    prepare_model,
    resolve_loss,
    wrap_model,
)
from clipforge.train.state import TrainState, check_resume_settings
from clipforge.train.step import TrainStep, clip_gradients
from clipforge.train.swap_negatives import swap_negatives_for
from clipforge.utils import resolve_device


class NonFiniteLossError(ClipforgeError):
    """The loss or the gradients became NaN/Inf and the policy is to stop."""


def train(cfg: TrainConfig, model: CLIP | None = None, progress: bool = True) -> dict[str, Any]:
    """Train as ``cfg`` says and return the summary (also written to ``<out>/summary.json``).

    ``model`` replaces ``cfg.model`` (ignored when resuming: the checkpoint's model is used).
    Launched by torchrun (or srun), the processes form one data-parallel job.
    """
    owns_group = not (dist.is_available() and dist.is_initialized())
    threads = torch.get_num_threads()
    info = init_distributed(backend="gloo" if cfg.device == "cpu" else None)
    trainer: Trainer | None = None
    try:
        trainer = Trainer(cfg, info, model, progress)
        return trainer.run()
    finally:
        torch.set_num_threads(threads)  # the caller's setting, not ours
        # Free the trainer (and its DDP wrapper) before the process group: reference cycles would
        # keep it alive past the group's destruction, and torchrun runs could then abort at exit.
        del trainer
        gc.collect()
        if owns_group:
            cleanup()


class Trainer(RunRecords):
    def __init__(self, cfg: TrainConfig, info: DistInfo, model: CLIP | None, progress: bool) -> None:
        if cfg.data is None:
            raise ConfigError("no training data given (data.path)")
        self.info, self.main = info, info.rank == 0
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda requested, but CUDA is not available")
        if cfg.time_budget_s is not None and info.world_size > 1:
            # Each rank's clock would plan its own end; ranks must stop at the same step.
            raise ConfigError("time_budget_s is for single-process runs (not yet with torchrun)")
        self.device = info.device if cfg.device in ("auto", "cuda") else resolve_device(cfg.device)
        configure_threads(self.device, cfg.workers)
        if self.device.type == "cpu":
            reuse_freed_memory()
        self.precision = resolve_precision(cfg.precision, self.device)
        self.cfg = cfg = cfg.replace(precision=self.precision)
        self.run_dir = Path(cfg.out)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.state = TrainState()
        self.resume_dir = choose_resume(cfg, self.run_dir, self.ckpt_root, info)

        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        raw = build_model(self.cfg, self.resume_dir, model)
        self.cfg = cfg = resolve_loss(cfg, raw)
        train_state = None
        if self.resume_dir is not None:
            model_state, train_state = ckpt.load_checkpoint(self.resume_dir)
            load_state_strict(raw, model_state, source=str(self.resume_dir))
            check_resume_settings(train_state, self._resume_settings(), self.resume_dir)
            self.state.restore(train_state, info.rank)
        self.raw = raw.to(self.device).train()
        self.locked = prepare_model(self.cfg, self.raw)
        self.make_negatives = swap_negatives_for(cfg, raw, info.world_size)
        self.model, self.replicated = wrap_model(self.raw, cfg, info, self.device)
        self.opt = build_optimizer(self.raw, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.loss_fn = ContrastiveLoss(cfg.loss, cfg.loss_tile, info.world_size, info.rank)
        self.train_step = TrainStep(self.model, self.opt, self.loss_fn, grad_clip=cfg.optim.grad_clip,
                                    precision=self.precision, device=self.device, scaler=self.scaler,
                                    replicated=self.replicated, world_size=info.world_size,
                                    clip=lambda: self._clip_grads(), caption_weight=caption_weight(cfg, raw),
                                    pad_id=raw.config.text.pad_token_id)

        self.loader = self._build_loader()
        self.total_steps, self.cfg = plan_steps(self.cfg, self.loader, self.main)
        self.schedule = LrSchedule(self.opt, self.cfg.schedule, self.total_steps)
        self.pending_rng = None
        if train_state is not None:
            self._restore_optimization(train_state)
        else:  # distinct randomness per rank (patch dropout) from here on
            torch.manual_seed(cfg.seed + info.rank)
            random.seed(cfg.seed + info.rank)
            np.random.seed(cfg.seed + info.rank)
        self.start_step = self.state.step
        self.show_progress = progress and self.main
        self._signalled = False  # set by SIGTERM on this rank (see _request_stop)
        self._stop = False  # agreed by all ranks (through the per-step all-reduce)
        self.last_eval: dict[str, float] | None = None

    def _request_stop(self) -> None:
        self._signalled = True

    # -- setup ---------------------------------------------------------------------------
    def _build_loader(self) -> Any:
        from clipforge.data.loader import build_train_loader

        cfg = self.cfg
        return build_train_loader(
            cfg.data, get_preprocess(self.raw, train=True, crop_scale=cfg.crop_scale),
            tokenizer_for(self.raw),
            batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
            rank=self.info.rank, world_size=self.info.world_size,
            start_epoch=self.state.epoch, start_batch=self.state.batch,
            pin_memory=self.device.type == "cuda", drop_last=True,
        )

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.info.world_size

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.time()
        if self.main:
            dump_config(cfg, self.run_dir / "config.yaml")
        # From the resumed step, or from 0 for a fresh start: a run killed before its first checkpoint
        # and started again must not leave the killed attempt's records in the metrics file.
        self.logger = MetricsLogger(self.run_dir, self.main, cfg.tensorboard, resume_step=self.start_step)
        bar = Progress(self.total_steps, self.start_step, self.show_progress)
        if self.resume_dir is not None and self.main:
            bar.write(f"resuming from {self.resume_dir} (step {self.start_step})")
        old_handlers = install_sigterm_handler(self._request_stop)
        try:
            self._loop(bar, t0)
            if self._stop:
                bar.write(f"stop requested: checkpoint saved at step {self.state.step}")
                return {"steps": self.state.step, "stopped_early": True}
            return self._finish(t0)
        finally:
            bar.close()
            self.logger.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)

    def _loop(self, bar: Progress, t0: float) -> None:
        cfg, st = self.cfg, self.state
        batches = self._micro_batches()
        window_t, window_losses, window_steps, paused = time.time(), [], 0, 0.0
        loop_t0 = time.time()
        while self.total_steps is None or st.step < self.total_steps:
            micro = []
            for _ in range(cfg.grad_accum):
                nxt = next(batches, None)
                if nxt is None:
                    break
                micro.append(nxt)
            if not self._all_have_data(len(micro) == cfg.grad_accum):
                break  # the data ran out (epochs done, or a stream ended)
            st.epoch, st.batch = micro[-1][0], micro[-1][1]
            for *_, b in micro:
                st.skipped.update(b.skipped)
            loss, gnorm = self._step([b for *_, b in micro])
            lr = self.opt.param_groups[0]["lr"]  # the rate this step used
            st.step += 1
            st.samples_seen += self.global_batch
            if cfg.time_budget_s is not None:
                self._follow_clock(time.time() - loop_t0, bar)
            self.schedule.set_step(st.step)
            window_losses.append(loss)
            window_steps += 1
            elapsed = time.time() - window_t - paused  # checkpoints and evaluations excluded
            rate = window_steps * self.global_batch / max(elapsed, 1e-9)
            bar.update(1, loss=loss, lr=lr, samples_s=rate)
            if st.step % cfg.log_every == 0 or st.step == self.total_steps:
                finite = [x for x in window_losses if math.isfinite(x)]
                self.logger.log(st.step, {
                    "loss": sum(finite) / len(finite) if finite else float("nan"), "lr": lr,
                    "grad_norm": gnorm, "logit_scale": float(self.raw.scale().detach()), "samples_per_s": rate,
                    "epoch": st.epoch, "samples_seen": st.samples_seen, "nan_skipped": st.nan_skipped,
                })
                window_t, window_losses, window_steps, paused = time.time(), [], 0, 0.0
            last = st.step == self.total_steps
            t_pause = time.time()
            if self._stop or (cfg.save_every and st.step % cfg.save_every == 0 and not last):
                self._save(t0)
                if self._stop:
                    return
            if cfg.val is not None and cfg.val.every and st.step % cfg.val.every == 0 and not last:
                self._evaluate(bar)
            paused += time.time() - t_pause
        if st.step == self.start_step and self.resume_dir is None:
            raise ClipforgeError(
                f"the training data yielded no full batch of {cfg.batch_size} per process "
                f"x {cfg.grad_accum} micro-batches: lower batch_size or add data")

    def _follow_clock(self, elapsed: float, bar: Progress) -> None:
        """Re-plan the run's length after each step so that it ends when the time budget does:
        the steps done plus what the time left holds at the mean pace so far, capped at
        ``steps``. The schedule (a function of step and length) then anneals to that end, so a
        host that slows down or speeds up mid-run moves the last step, not the deadline."""
        st = self.state
        left = self.cfg.time_budget_s - elapsed
        pace = elapsed / max(1, st.step - self.start_step)  # seconds per step, checkpoints included
        planned = st.step + int(left / pace) if left > 0 else st.step
        planned = max(st.step, min(self.cfg.steps, planned))
        if planned != self.total_steps:
            self.total_steps = self.schedule.total_steps = planned
            bar.set_total(planned)

    def _micro_batches(self) -> Iterator[tuple[int, int, Any]]:
        """(epoch, micro-batches of that epoch consumed, Batch), continuing across epochs."""
        epoch, pos = self.state.epoch, self.state.batch
        max_epochs = self.cfg.run_epochs
        it = iter(self.loader.epoch_iter(epoch, start_batch=pos))
        if self.pending_rng is not None:  # after the loader's setup, as in the uninterrupted run
            ckpt.set_rng_state(self.pending_rng)
            self.pending_rng = None
        while True:
            yielded = False
            for batch in it:
                pos += 1
                yielded = True
                yield epoch, pos, batch
            if not yielded and pos == 0:
                return  # an epoch with no full batch: stop rather than loop forever
            epoch, pos = epoch + 1, 0
            if max_epochs is not None and epoch >= max_epochs:
                return
            it = iter(self.loader.epoch_iter(epoch))

    def _all_have_data(self, have: bool) -> bool:
        """Ranks stop together: a rank whose stream ended must not leave the others in a collective."""
        if self.info.world_size == 1 or self.loader.num_batches_per_epoch is not None:
            return have
        flag = all_reduce_sum(torch.tensor([0.0 if have else 1.0], device=self.device))
        return flag.item() == 0

    def _step(self, micro: list[Any]) -> tuple[float, float]:
        dev = self.device
        pairs = [(b.images.to(dev, non_blocking=True), b.tokens.to(dev, non_blocking=True)) for b in micro]
        negatives = None
        if self.make_negatives is not None:
            negatives = tuple(t.to(dev, non_blocking=True) for t in self.make_negatives(micro[0].tokens))
        result = self.train_step.step(pairs, stop=self._signalled, negatives=negatives)
        self._stop = result.stop
        if result.applied:
            self.state.last_loss = result.loss
        else:
            self._non_finite(result.loss, result.grad_norm)
        return result.loss, result.grad_norm

    def _clip_grads(self) -> torch.Tensor:
        """The step's gradient clipping, between its backward and its update: a method of the
        trainer so that fault-injection tests can stop a run at that point."""
        return clip_gradients(self.opt, self.cfg.optim.grad_clip, self.device)

    def _non_finite(self, loss: float, gnorm: float) -> None:
        step = self.state.step + 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {gnorm}"
        if self.cfg.nan_policy == "stop":
            last = ckpt.latest_checkpoint(self.ckpt_root)
            where = f"; the last checkpoint is {last}" if last else ""
            raise NonFiniteLossError(f"non-finite {what} at step {step}: stopping (nothing saved){where}. "
                                     "Lower optim.lr, use precision fp32 or bf16, or nan_policy 'skip'")
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        self.state.nan_skipped += 1
        if self.main:
            print(f"warning: non-finite {what} at step {step}: update skipped (nan_policy 'skip')", flush=True)
