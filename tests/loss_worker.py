"""One process of tests/test_loss_normalization.py's two-process step (run by torchrun: 2 processes, gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/loss_worker.py WORLD BASE OUT STRATEGY

Trains one optimizer step of ``model.loss_normalization=global_tokens`` under ``STRATEGY`` (``fsdp``: lumen's
``FSDP2Strategy``, as ``trainer=fsdp``; ``ddp``: Lightning's ``DDPStrategy``, as ``trainer=ddp``), rank r on
the test's micro-batches of rank r accumulated, and writes the step's whole gradient and logged ``train/loss``
to ``OUT/rank<r>.pt`` for the test to compare with the global batch as one batch in one process.
"""

import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from models.parallel import FSDP2Strategy
from tests.test_loss_normalization import micro_batches, module, training_samples

RANKS = 2


def main() -> None:
    world, base, out = map(Path, sys.argv[1:4])
    strategy = {"fsdp": FSDP2Strategy, "ddp": DDPStrategy}[sys.argv[4]]()
    trainer = L.Trainer(accelerator="cpu", devices=RANKS, strategy=strategy, max_steps=1,
                        accumulate_grad_batches=2, gradient_clip_val=None, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False)
    batches = micro_batches(base, training_samples(world), 4)[trainer.global_rank * 2:trainer.global_rank * 2 + 2]
    lumen = module(base, "global_tokens", build=False)  # seeded: rank 0 builds the fresh parts in fit
    trainer.fit(lumen, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))
    gradients = {name: grad.full_tensor() if isinstance(grad, DTensor) else grad  # FSDP2 shards, DDP replicates
                 for name, grad in ((name, parameter.grad) for name, parameter in lumen.model.named_parameters())
                 if grad is not None}
    torch.save({"gradients": gradients, "loss": float(trainer.logged_metrics["train/loss"])},
               out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main()
