"""The training progress bar: Lightning's (Rich when installed, else tqdm), counting to the batches of the
epoch the run will train.

Lightning's bar counts an epoch ended early by ``trainer.max_steps`` only when ``max_epochs=-1``, then
in optimizer steps (a step is ``accumulate_grad_batches`` batches) and from the resumed step on,
while the batches it shows count from the epoch's beginning: a run resumed at step 3 and extended to
``max_steps=6`` showed "6/3". It also labels every epoch "Epoch N/-2" when ``max_epochs=-1``.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def train_batches(trainer: L.Trainer) -> int | float:
    """The batches of the current epoch the run trains, counted from the epoch's beginning: all of them,
    or, when ``max_steps`` ends the run first, those trained up to the last optimizer step (before this
    run, when it resumed mid-epoch) and those its remaining steps take."""
    batches = trainer.num_training_batches
    if trainer.max_steps == -1:
        return batches
    epochs = trainer.fit_loop.epoch_progress.current
    # When an epoch starts (on_train_epoch_start) the batch counter still holds the last epoch's.
    trained = 0 if epochs.ready > epochs.started else trainer.fit_loop.epoch_loop.batch_progress.current.ready
    accumulate = trainer.accumulate_grad_batches
    stepped = trained - trained % accumulate
    return min(batches, stepped + (trainer.max_steps - trainer.global_step) * accumulate)


class RichBar(RichProgressBar):
    @property
    def total_train_batches(self) -> int | float:
        return train_batches(self.trainer)

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        # Padded as Lightning's, so that the bar does not move when validation's starts.
        return f"Epoch {current_epoch}".ljust(len(self.validation_description))


class TQDMBar(TQDMProgressBar):
    @property
    def total_train_batches(self) -> int | float:
        return train_batches(self.trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning sets the total when an epoch starts, which a run resumed mid-epoch does not see.
        self.train_progress_bar.total = convert_inf(self.total_train_batches)


def progress_bar() -> ProgressBar:
    """The bar Lightning would choose, counting as ``train_batches``."""
    return RichBar() if _RICH_AVAILABLE else TQDMBar()
