"""What a training run shows on the console: a progress bar that counts to the batches the run will train,
and the model's parameters by component.

Lightning's bar counts an epoch ended early by ``trainer.max_steps`` only when ``max_epochs=-1``, then
in optimizer steps (a step is ``accumulate_grad_batches`` batches) and from the resumed step on,
while the batches it counts start at the epoch's beginning: a run resumed at step 3 and extended to
``max_steps=6`` showed "6/3". It also shows the logger's version number as a metric (``v_num``). Its
model summary has one row for the whole model and a FLOPs column that stays 0 without an example input
(``models.callbacks.throughput_monitor`` logs the real FLOPs).
"""

from __future__ import annotations

import logging
import sys

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger(__name__)


def trained_batches(trainer: L.Trainer) -> int:
    """The batches of the current epoch trained so far: before this run, when it resumed mid-epoch."""
    epochs = trainer.fit_loop.epoch_progress.current
    # When an epoch starts (on_train_epoch_start) the batch counter still holds the last epoch's.
    return 0 if epochs.ready > epochs.started else trainer.fit_loop.epoch_loop.batch_progress.current.ready


def train_batches(trainer: L.Trainer) -> int | float:
    """The batches of the current epoch the run trains, counted from the epoch's beginning: all of them,
    or, when ``max_steps`` ends the run first, those trained up to the last optimizer step (before this
    run, when it resumed mid-epoch) and those its remaining steps take."""
    batches = trainer.num_training_batches
    if trainer.max_steps == -1:
        return batches
    trained = trained_batches(trainer)
    accumulate = trainer.accumulate_grad_batches
    stepped = trained - trained % accumulate
    return min(batches, stepped + (trainer.max_steps - trainer.global_step) * accumulate)


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (tqdm rather than Rich, whose bar reaches a log file or a SLURM job's output only
    when the epoch ends), counting to ``train_batches``, without ``v_num``."""

    @property
    def total_train_batches(self) -> int | float:
        return train_batches(self.trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning sets the total and the epoch when an epoch starts, which a run resumed mid-epoch does not
        # see; it starts from the batches trained before it.
        bar = self.train_progress_bar
        bar.total = convert_inf(self.total_train_batches)
        bar.initial = bar.n = trained_batches(trainer)
        bar.set_description(f"Epoch {trainer.current_epoch}")

    def init_validation_tqdm(self) -> Tqdm:
        """Lightning's, except in a log file (stdout not a terminal): there a bar below the training bar
        is drawn with cursor movements, which a log keeps as escape codes; it is drawn in place of the
        training bar instead and left as a line."""
        if sys.stdout.isatty():
            return super().init_validation_tqdm()
        return Tqdm(desc=self.validation_description, position=0, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, bar_format=self.BAR_FORMAT)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ComponentSummary(Callback):
    """Logs the model's parameters by component (vision tower, projector, fusion, LLM), trained and frozen,
    when training starts: what Lightning's one-row summary leaves out."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        rows = [(name, list(component.parameters())) for name, component in pl_module.model.named_children()]
        rows.append(("total", list(pl_module.model.parameters())))
        lines = [f"{'component':<10} {'parameters':>10} {'trained':>10}"]
        for name, parameters in rows:
            total = sum(p.numel() for p in parameters)
            trained = sum(p.numel() for p in parameters if p.requires_grad)
            lines.append(f"{name:<10} {get_human_readable_count(total):>10} {get_human_readable_count(trained):>10}")
        log.info("the model:\n%s", "\n".join(lines))
