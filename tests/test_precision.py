"""The paper's precision recipe on CPU: FSDP2 on two processes with bf16 compute, fp32 gradient reduction
and fp32 master weights (trainer.precision=bf16-mixed model.fsdp.param_dtype=bfloat16, as experiment=lumen
runs on GPUs), against the same run in float32."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import PLAIN, WORLD_SUBJECTS

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# bf16 keeps 8 significant bits: each value it stores is off by up to a relative 2^-9. The loss is taken in
# float32 from the bf16 logits, so over a few steps it moves from the float32 run's by about the logits'
# rounding: one bf16 ulp, 2^-8, bounds it (measured on a 2-core x86 CPU: at most 7.7e-5 over 4 steps). A run
# that trains differently (another batch, a lost gradient) moves it by far more.
BF16_LOSS_TOLERANCE = 2.0 ** -8


class Dtypes(L.Callback):
    """Rank by rank, at every optimizer step: the dtypes of the weights and gradients the optimizer (and
    clipping, which runs after this hook) sees, and of the first decoder layer's output in the forward."""

    def __init__(self, directory: str):
        self.directory, self.steps, self.compute = Path(directory), [], set()

    def on_fit_start(self, trainer, pl_module):
        layer = pl_module.model.llm.get_decoder().layers[0]
        layer.register_forward_hook(lambda module, args, output: self.compute.add(
            str((output[0] if isinstance(output, tuple) else output).dtype)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        self.steps.append({"weights": sorted({str(p.dtype) for p in parameters}),
                           "gradients": sorted({str(p.grad.dtype) for p in parameters if p.grad is not None})})

    def on_train_end(self, trainer, pl_module):
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"steps": self.steps, "compute": sorted(self.compute)}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def two_process_run(run: Path, world, tiny_base, *overrides: str) -> list[float]:
    """``train.py`` with FSDP2 on two CPU processes for STEPS steps; the logged train/loss of each step."""
    command = [sys.executable, "train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
               f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", f"paths.output_dir={run}",
               f"paths.world_dir={world}", f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}",
               "prepare.tiny_base=null", *PLAIN, "data.batch_size=4", "data.limit.train=32", "data.limit.val=4",
               "+callbacks.dtypes._target_=tests.test_precision.Dtypes", f"+callbacks.dtypes.directory={run / 'dtypes'}",
               f"hydra.run.dir={run}", *overrides]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(next((run / "csv").glob("version_*/metrics.csv"))) as metrics:
        losses = {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(metrics) if row.get("train/loss")}
    return [losses[step] for step in sorted(losses)]


@pytest.fixture(scope="module")
def runs(world, tiny_base, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("precision")
    losses = {"float32": two_process_run(out / "float32", world, tiny_base),
              "bf16": two_process_run(out / "bf16", world, tiny_base, "trainer.precision=bf16-mixed",
                                      "model.fsdp.param_dtype=bfloat16")}
    return {"out": out, "losses": losses}


def test_the_bf16_loss_curve_stays_close_to_the_float32_one(runs):
    float32, bf16 = runs["losses"]["float32"], runs["losses"]["bf16"]
    assert len(float32) == len(bf16) == STEPS
    assert float32[-1] < float32[0]  # it trains
    assert bf16 == pytest.approx(float32, rel=BF16_LOSS_TOLERANCE)
    assert bf16 != float32  # and bf16 did compute in bf16: not bitwise the float32 run


@pytest.mark.parametrize("rank", [0, 1])
def test_bf16_computes_in_bf16_while_clipping_and_the_optimizer_see_float32(runs, rank):
    record = json.loads((runs["out"] / "bf16" / "dtypes" / f"rank{rank}.json").read_text())
    assert record["compute"] == [str(torch.bfloat16)]
    assert len(record["steps"]) == STEPS
    assert all(step == {"weights": [str(torch.float32)], "gradients": [str(torch.float32)]} for step in record["steps"])
    float32 = json.loads((runs["out"] / "float32" / "dtypes" / f"rank{rank}.json").read_text())
    assert float32["compute"] == [str(torch.float32)]
