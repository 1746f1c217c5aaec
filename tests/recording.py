"""A callback the resume tests add to training runs (``+callbacks.record=...``): it writes what each
process trains on, so that a killed and resumed run can be compared with an uninterrupted one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor


def optimizer_moments(optimizer: torch.optim.Optimizer) -> float:
    """The sum of |first moment| over all parameters (whole tensors, also when sharded): a fingerprint
    of Adam's state that the same run has on any number of processes."""
    total = 0.0
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            moment = optimizer.state.get(parameter, {}).get("exp_avg")
            if moment is not None:
                total += float((moment.full_tensor() if isinstance(moment, DTensor) else moment).abs().sum())
    return total


class TrainingRecord(L.Callback):
    """One JSON line per event in ``<directory>/rank<r>.jsonl``:

    - ``start``: the optimizer steps done and Adam's step count and moments when training starts;
    - ``batch``: each micro-batch's sample ids, the optimizer steps done before it and its learning rate;
    - ``step``: Adam's moments after each optimizer step;
    - ``save``: the step and data position of each checkpoint saved.

    Before the first micro-batch after ``hold_at_step`` optimizer steps (so after that step's
    checkpoint is saved) it waits for ten minutes, long enough to be killed mid-training; after
    ``raise_at_step`` it raises, a crash in a run the test process runs itself.
    """

    def __init__(self, directory: str, hold_at_step: int | None = None, raise_at_step: int | None = None):
        self.directory, self.hold_at_step, self.raise_at_step = Path(directory), hold_at_step, raise_at_step
        self.steps_recorded = 0

    def _write(self, trainer: L.Trainer, record: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"rank{trainer.global_rank}.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer, self.steps_recorded = trainer.optimizers[0], trainer.global_step
        adam_steps = [float(state["step"]) for state in optimizer.state.values() if "step" in state]
        self._write(trainer, {"event": "start", "step": trainer.global_step, "world_size": trainer.world_size,
                              "adam_steps": max(adam_steps, default=0.0), "moments": optimizer_moments(optimizer)})

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if self.hold_at_step is not None and trainer.global_step >= self.hold_at_step:
            time.sleep(600)
        if self.raise_at_step is not None and trainer.global_step >= self.raise_at_step:
            raise RuntimeError(f"the test stops training after step {self.raise_at_step}")
        self._write(trainer, {"event": "batch", "step": trainer.global_step, "sample_ids": batch["sample_ids"],
                              "lr": trainer.optimizers[0].param_groups[0]["lr"]})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict,
                           batch_idx: int) -> None:
        if trainer.global_step != self.steps_recorded:  # this micro-batch ended with an optimizer step
            self.steps_recorded = trainer.global_step
            self._write(trainer, {"event": "step", "step": trainer.global_step,
                                  "moments": optimizer_moments(trainer.optimizers[0])})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        self._write(trainer, {"event": "save", "step": checkpoint["global_step"], "epoch": loader["epoch"],
                              "position": loader["position"]})
