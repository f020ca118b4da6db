"""The trainer's checkpoints and end of run (``RunRecords``, a base of ``train.trainer.Trainer``):
writing a checkpoint every rank agrees on, restoring the optimisation state from one, validation,
and the final model with the run's summary. Split from the loop so that each file holds one
responsibility; the methods read the trainer's attributes (``cfg``, ``info``, ``state``, ``raw``,
``opt``, ``schedule``, ``scaler``, ...)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from clipforge.errors import CheckpointError
from clipforge.train import checkpointing as ckpt
from clipforge.train.distributed import barrier
from clipforge.train.freeze import set_locked_eval
from clipforge.train.logging import Progress
from clipforge.train.runtime import broadcast_object, gather_objects
from clipforge.train.state import resume_settings
from clipforge.train.validation import run_validation


class RunRecords:
    # -- checkpoints ---------------------------------------------------------------------
    def _save(self, t0: float) -> Path | None:
        st, info = self.state, self.info
        model_state, optim_state = self._full_states()
        rank_state = {"rng": ckpt.rng_state(), "skipped": dict(st.skipped)}
        ranks = gather_objects(rank_state, info)
        error, path = None, None
        if self.main:
            bad = [k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                error = f"refusing to checkpoint step {st.step}: non-finite weights in {bad[:3]}"
            else:
                train_state = {
                    **st.position(time.time() - t0), "optimizer": optim_state, "schedule": self.schedule.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "ranks": ranks, "compat": self._resume_settings(),
                }
                meta = {k: train_state[k] for k in ("step", "epoch", "batch", "samples_seen", "last_loss")}
                try:
                    path = ckpt.save_checkpoint(self.ckpt_root, st.step, model_state, self.raw,
                                                train_state, meta, self.cfg.keep_last)
                except CheckpointError as e:
                    error = str(e)
        error = broadcast_object(error, info)
        if error:
            raise CheckpointError(error)
        return path

    def _full_states(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ckpt.full_states(self.raw, self.opt, sharded=self.cfg.fsdp and self.info.world_size > 1)

    def _resume_settings(self) -> dict[str, Any]:
        return resume_settings(self.cfg.batch_size, self.cfg.grad_accum, self.info.world_size)

    def _restore_optimization(self, ts: dict[str, Any]) -> None:
        ckpt.load_optimizer_state(self.raw, self.opt, ts["optimizer"], sharded=self.cfg.fsdp and self.info.world_size > 1)
        self.schedule.load_state_dict(ts["schedule"])
        if self.scaler is not None and ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        self.pending_rng = ts["ranks"][self.info.rank]["rng"]  # set once the data iterator exists

    # -- evaluation, end of run ----------------------------------------------------------
    def _evaluate(self, bar: Progress) -> dict[str, Any] | None:
        """Validation on rank 0 (all ranks under FSDP, whose forward is collective)."""
        metrics = None
        if self.main or self.cfg.fsdp:
            rng = ckpt.rng_state()  # evaluation must not shift the training randomness (exact resume)
            metrics = run_validation(self.raw, self.cfg.val, self.device, self.precision)
            ckpt.set_rng_state(rng)
            self.raw.train()
            set_locked_eval(self.locked)
            if self.main:
                self.logger.log(self.state.step, metrics, prefix="val")
                shown = {k: round(v, 4) for k, v in metrics.items() if "@1" in k or "acc1" in k}
                bar.write(f"step {self.state.step} val: {shown}")
        barrier()
        self.last_eval = metrics
        return metrics

    def _finish(self, t0: float) -> dict[str, Any]:
        cfg, st, info = self.cfg, self.state, self.info
        if st.step > self.start_step or self.resume_dir is None:
            self._save(t0)
        if cfg.val is not None:
            self._evaluate(Progress(None, 0, False))
        model_state, _ = self._full_states()
        skipped = Counter()
        for counts in gather_objects(dict(st.skipped), info):
            skipped.update(counts)
        summary = None
        if self.main:
            final = ckpt.save_model_atomic(model_state, self.raw, self.run_dir / "final")
            wall = time.time() - t0
            summary = {
                "steps": st.step,
                "samples_seen": st.samples_seen,
                "final_loss": st.last_loss,
                "skipped": dict(sorted(skipped.items())),
                "skipped_total": sum(skipped.values()),
                "nan_skipped_steps": st.nan_skipped,
                "wall_time_s": round(st.elapsed + wall, 3),
                "session_wall_time_s": round(wall, 3),
                "resumed_from_step": self.start_step if self.resume_dir is not None else None,
                "world_size": info.world_size,
                "global_batch_size": self.global_batch,
                "precision": self.precision,
                "final_model": str(final),
                "eval": self.last_eval,
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return broadcast_object(summary, info)
