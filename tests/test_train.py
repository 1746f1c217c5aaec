"""End to end on CPU: training (one process and FSDP2 with two), then evaluation from the checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run.cli import compose_config
from run.evaluate import evaluate
from models.callbacks.resumable_checkpoint import Trained
from tests.helpers import PLAIN, WORLD_SUBJECTS
from run.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_fast_dev_run_trains_one_step_with_a_finite_loss(demo_overrides):
    cfg = compose_config("train", demo_overrides + ["+trainer.fast_dev_run=true"])
    trainer = train(cfg)
    assert trainer.state.finished
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_training_lowers_the_loss_and_logs_it(trained_checkpoint):
    metrics = (trained_checkpoint.parents[1] / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    column = header.index("train/loss")
    losses = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_checkpoint_loads_with_weights_only(trained_checkpoint):
    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    # The tower as configured: the one the base holds, at the layer it names (models.factory resolves both).
    assert checkpoint["hyper_parameters"]["net"]["vision"] == {"type": None, "layer": None}
    assert checkpoint["datamodule_hyper_parameters"]["image_resize"] == "pad"  # the tiny base prescribes none
    assert any(key.startswith("model.fusion.") for key in checkpoint["state_dict"])


def test_eval_writes_predictions_results_and_a_table(trained_checkpoint, world, tmp_path, capsys):
    out = tmp_path / "eval"
    cfg = compose_config("eval", [f"ckpt={trained_checkpoint}", f"paths.output_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}",
                                  f"paths.world_dir={world}", f"prepare.world.subjects={WORLD_SUBJECTS}",
                                  "data.limit.test=24", "accelerator=cpu"])
    results = evaluate(cfg)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 24
    assert {"sample_id", "question_type", "question", "prediction", "reference"} <= set(records[0])
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    assert table in capsys.readouterr().out
    assert "difference" in table or "diagnostic" in table


def test_fsdp_with_two_cpu_processes_trains_and_saves_a_sharded_checkpoint(world, tiny_base, tmp_path):
    run = tmp_path / "fsdp"
    command = [
        sys.executable, "train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_steps=3",
        f"paths.output_dir={run}", f"paths.world_dir={world}", f"paths.tiny_base={tiny_base}",
        f"prepare.world.subjects={WORLD_SUBJECTS}", "prepare.tiny_base=null", *PLAIN, "data.batch_size=2", "data.limit.train=16", "data.limit.val=4",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir(), f"expected a sharded (directory) checkpoint, found {list((run / 'checkpoints').iterdir())}"
    shards = sorted(path.name for path in checkpoint.iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards
    # Stopped by max_steps within its first epoch (4 steps of 2 micro-batches on 2 processes), and so saved.
    assert Trained.read(checkpoint) == Trained(steps=3, epochs=0)
