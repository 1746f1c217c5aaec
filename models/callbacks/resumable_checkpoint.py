"""Checkpoints a training run can resume from: written every N optimizer steps and at the end, never
seen half-written, and resumable on another number of processes.

A sharded (FSDP2) checkpoint is a directory that torch.distributed.checkpoint fills shard by shard;
Lightning would overwrite ``last.ckpt`` in place, so a run killed while saving would leave neither the
old checkpoint nor the new one. Here every checkpoint is written beside its name and then put in place
in one step: a file by rename, a directory by replacing the symbolic link ``last.ckpt`` that points to
it (``last.ckpt -> last.ckpt.step40-1a2b3c4d``).
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.optim.lr_scheduler import LambdaLR

from common.errors import ConfigError, MissingInputs
from models.checkpoints import SHARDED_METADATA


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with seven changes:

    - ``save_last`` also saves when training ends (Lightning's saves at the end only if nothing was
      saved before, so with ``every_n_train_steps`` the steps after the last multiple were lost);
    - a checkpoint saved when ``trainer.max_steps`` (or ``max_time``) ends training within an epoch
      records that epoch as in progress (``mark_epoch_in_progress``): a run extended from it continues it;
    - a run extended by ``max_steps`` from a checkpoint taken at an epoch's end starts the next epoch
      as a new one (see ``on_train_start``);
    - every checkpoint is written beside its name and then put in place (``publish``);
    - resuming on another number of processes converts the trainer's per-process batch counters to
      this run's (``continue_on``), so that the epoch ends and gradients accumulate where they should;
    - the training loader's saved position is restored even though ``configure_optimizers`` asks for
      ``trainer.estimated_stepping_batches`` (which makes Lightning 2.6 skip it, see ``on_train_start``);
    - a run extended to a larger ``max_steps`` or ``max_epochs`` trains its first step at the learning
      rate of its schedule, which spans the new total, not at the checkpoint's (see ``on_train_start``).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A resumed run starts from a saved step. Lightning's callback does not know that, and with
        # gradient accumulation it would save again after the first micro-batch (the step count is
        # still a multiple of N then), in the middle of an accumulation window.
        self._last_global_step_saved = trainer.global_step
        # Lightning hands a loader its saved state only when the loader is created after the
        # checkpoint is restored; estimated_stepping_batches creates it before, and the state stays
        # pending (Lightning-AI/pytorch-lightning#20550). Loading it here is still before the first
        # batch: the loader reads its sampler only then. A no-op when nothing is pending.
        trainer.fit_loop._load_combined_loader_states()
        # With max_steps set, Lightning restarts even from a checkpoint whose epoch was over
        # (FitLoop.restarting), and then takes that epoch's batch counters for the next one's: it skips
        # the next epoch's first batch as one already validated and logs every step one too high.
        epochs = trainer.fit_loop.epoch_progress.current
        if trainer.fit_loop.restarting and epochs.ready == epochs.started == epochs.processed == epochs.completed:
            _Loop.restarting.fset(trainer.fit_loop, False)
        # The optimizer's learning rates are the checkpoint's, set by the schedule the checkpoint's run
        # was built with, until the scheduler's next step; an extended run's schedule spans the new
        # total (the same rates when nothing changed).
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR):
                for group, base_lr, rate in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                                scheduler.lr_lambdas):
                    group["lr"] = base_lr * rate(scheduler.last_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        fit_loop = checkpoint.get("loops", {}).get("fit_loop")
        if fit_loop is not None and mark_epoch_in_progress(fit_loop):
            checkpoint["epoch"] -= 1

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop")
        if fit_loop is not None:
            continue_on(fit_loop, trainer.world_size)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        path = Path(filepath)
        # Every rank writes its shards into the same new directory: rank 0 names it.
        token = trainer.strategy.broadcast(uuid.uuid4().hex[:8])
        staging = path.with_name(f"{path.name}.step{trainer.global_step}-{token}")
        trainer.save_checkpoint(staging, self.save_weights_only)
        if trainer.is_global_zero:
            publish(staging, path)
        trainer.strategy.barrier("ResumableCheckpoint.publish")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        path = Path(filepath)
        if not path.is_symlink():
            super()._remove_checkpoint(trainer, filepath)
        elif trainer.is_global_zero:
            shutil.rmtree(path.resolve(), ignore_errors=True)
            path.unlink()


def publish(staging: Path, path: Path) -> None:
    """Puts the finished checkpoint ``staging`` at ``path`` in one step, then removes the checkpoint it
    replaces and whatever an interrupted save left beside it (``<name>.step*``).

    A file is renamed onto ``path``; for a directory ``path`` becomes a symbolic link to it, replaced
    by rename (a directory cannot replace a directory in one step)."""
    if staging.is_dir():
        link = path.with_name(f"{staging.name}.link")
        link.symlink_to(staging.name)
        if path.is_dir() and not path.is_symlink():  # a sharded checkpoint written in place (older runs)
            shutil.rmtree(path)
        os.replace(link, path)
    else:
        os.replace(staging, path)
    for leftover in path.parent.glob(f"{glob.escape(path.name)}.step*"):
        if leftover == staging:
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def continue_on(fit_loop: dict[str, Any], world_size: int) -> None:
    """Converts a checkpoint's fit-loop state, in place, to a run on ``world_size`` processes.

    The data position (``datamodules.sampling``) counts the epoch's global batches: ``position`` of
    ``global_batches`` were trained on by ``world_size_then`` processes. The trainer counts batches
    per process, ends the epoch when the count reaches ``len(loader)`` (``global_batches //
    world_size``), and steps the optimizer when it reaches a multiple of ``accumulate_grad_batches``.
    On ``world_size`` processes each has ``(global_batches - position) // world_size`` batches left,
    so its count so far must be ``global_batches // world_size`` less that. At an optimizer step with
    ``data.global_batch_size`` set, that count is a whole number of the new run's accumulation windows.
    A checkpoint taken after the old run's last batch of an epoch needs nothing: the next epoch starts
    afresh on any number of processes. Converting twice changes nothing.
    """
    loaders = fit_loop.get("state_dict", {}).get("combined_loader") or []
    if len(loaders) != 1 or "position" not in loaders[0] or loaders[0]["world_size"] == world_size:
        return
    data = loaders[0]
    total, position, world_size_then = data["global_batches"], data["position"], data["world_size"]
    data["world_size"] = world_size
    if total - position < world_size_then:
        return
    remaining = (total - position) // world_size
    progress = fit_loop["epoch_loop.batch_progress"]
    shift = total // world_size - remaining - progress["current"]["ready"]
    for counters in (progress["current"], progress["total"]):
        for key in counters:
            counters[key] += shift
    progress["is_last_batch"] = remaining == 0


def mark_epoch_in_progress(fit_loop: dict[str, Any]) -> bool:
    """Marks, in place, the epoch of a checkpoint's fit-loop state as in progress when training ended
    before the epoch's last batch; says whether it did.

    Lightning counts the epoch it stops in (at ``max_steps``, or ``max_time``) as done: a run resumed
    from a checkpoint saved then would number its epochs one too high and, with ``max_epochs``
    reached, train nothing. Counted as in progress, the resumed run continues the epoch at its batch
    (Lightning's restart from a checkpoint taken mid-epoch) and the data at its position."""
    epochs = fit_loop["epoch_progress"]
    ended = 0 < epochs["current"]["processed"] == epochs["current"]["ready"]
    if not ended or fit_loop["epoch_loop.batch_progress"]["is_last_batch"]:
        return False
    for counters in (epochs["current"], epochs["total"]):
        counters["processed"] = counters["completed"] = counters["processed"] - 1
    return True


@dataclass(frozen=True)
class Trained:
    """How far a checkpoint's run has trained, counted as the trainer's limits count it."""

    steps: int
    epochs: int

    @classmethod
    def read(cls, path: Path) -> Trained | None:
        """From a checkpoint file (its tensors are not read) or a sharded directory's metadata; None for a
        checkpoint without the loops' state (saved with weights only)."""
        checkpoint = torch.load(path / SHARDED_METADATA if path.is_dir() else path, map_location="cpu",
                                weights_only=True, mmap=True)
        fit_loop = checkpoint.get("loops", {}).get("fit_loop")
        if fit_loop is None:
            return None
        epochs = fit_loop["epoch_progress"]["current"]
        # Saved after an epoch's last batch (every N steps) and before Lightning counted the epoch: the
        # resumed run counts it before anything else.
        last_batch = fit_loop["epoch_loop.batch_progress"]["is_last_batch"]
        counted_on_resume = epochs["processed"] < epochs["ready"] and last_batch
        return cls(checkpoint["global_step"], epochs["processed"] + int(counted_on_resume))

    def limits_reached(self, max_steps: int, max_epochs: int) -> list[str]:
        """The trainer limits (Lightning's values: -1 for none) that leave nothing to train."""
        reached = []
        if max_steps != -1 and self.steps >= max_steps:
            reached.append(f"trainer.max_steps={max_steps}")
        if max_epochs != -1 and self.epochs >= max_epochs:
            reached.append(f"trainer.max_epochs={max_epochs}")
        return reached

    def extension(self, max_steps: int, max_epochs: int) -> str:
        """The overrides that let the run train further, for each limit it has reached."""
        overrides = []
        if max_steps != -1 and self.steps >= max_steps:
            overrides.append(f"trainer.max_steps=<more than {self.steps}>")
        if max_epochs != -1 and self.epochs >= max_epochs:
            if max_steps == -1:
                overrides.append(f"trainer.max_epochs=<more than {self.epochs}>")
            elif overrides:
                overrides.append(f"trainer.max_epochs=-1 (or more than {self.epochs})")
            else:
                overrides.append(f"trainer.max_epochs=-1 (to train until trainer.max_steps={max_steps}; or more "
                                 f"than {self.epochs})")
        return " ".join(overrides)


def require_resumable(trainer: L.Trainer, ckpt_path: str | None) -> None:
    """Fails, saying what to do, when the checkpoint to resume from (``ckpt_path``; ``last`` found as
    Lightning finds it) is one the trainer's strategy cannot resume: a sharded directory under a
    strategy that reads files, or a one-process file under FSDP2 (Lightning 2.6 maps its optimizer
    state, which is in the order of the parameter groups, to parameters in the model's order); or
    when it has reached ``trainer.max_steps`` or ``trainer.max_epochs``, so that resuming would train
    nothing."""
    if ckpt_path is None or ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry"):
        return  # Lightning's own names, which it resolves and checks itself
    path = Path(ckpt_path)
    if ckpt_path == "last":
        found = [last for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)
                 and callback.dirpath for last in Path(callback.dirpath).glob("last*.ckpt") if last.exists()]
        if not found:
            return
        path = max(found, key=lambda last: last.stat().st_mtime)
    if not path.exists():
        raise MissingInputs(f"ckpt_path={ckpt_path} does not exist: set it to a checkpoint of train.py (a .ckpt "
                            "file or a sharded directory), or ckpt_path=last with hydra.run.dir=<the run directory>")
    sharded = isinstance(trainer.strategy, ModelParallelStrategy)
    if path.is_dir() and not sharded:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a sharded checkpoint ({path}), which only the FSDP2 strategy reads: resume "
            "with trainer=fsdp (on any number of devices; trainer.devices=1 for one), or consolidate it "
            "(python -m models.checkpoints consolidate) to use its weights elsewhere"
        )
    if path.is_file() and sharded:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a one-process checkpoint file ({path}), which FSDP2 cannot resume (its "
            "optimizer state would be matched to the wrong parameters): resume it with a one-process trainer "
            "(trainer=cpu or trainer=gpu), or start FSDP2 from its weights (python -m models.checkpoints export "
            "CKPT DIR, then model.net.base=DIR). Runs that may change their number of processes train with "
            "trainer=fsdp from the start (trainer.devices=1 on one), whose sharded checkpoints resume on any number"
        )
    trained = Trained.read(path)
    reached = trained.limits_reached(trainer.max_steps, trainer.max_epochs) if trained else []
    if reached:
        raise ConfigError(
            f"ckpt_path={ckpt_path} ({path}) has trained {plural(trained.steps, 'step')} and "
            f"{plural(trained.epochs, 'epoch')}, which reaches {' and '.join(reached)}: resuming it would train "
            f"nothing. To train further, add {trained.extension(trainer.max_steps, trainer.max_epochs)}"
        )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
