"""The whole resolved run config, sent to every logger once."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class LogConfig(Callback):
    """Logs the whole resolved config as plain values to every logger, once the strategy knows each
    process's rank (loggers write from rank 0 only). The module and the datamodule leave theirs to it."""

    def __init__(self, config: dict):
        self.config = config

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
