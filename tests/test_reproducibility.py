"""Runs that can be repeated: the same config and seed give the same log and weights, loader workers change
nothing, and a run that crashed and resumed ends where an uninterrupted one does."""

import csv
import shutil

import lightning as L
import pytest
import torch

from tests.test_resume import short_run, single_process
from run.train import train


class SampleIds(L.Callback):
    """The sample ids of every training batch, in order."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(list(batch["sample_ids"]))


def run(path, world, tiny_base, *overrides: str) -> tuple[L.Trainer, list[list[str]]]:
    trainer = train(short_run(path, world, tiny_base, "trainer.max_steps=6", "data.limit.train=12",
                              "+callbacks.ids._target_=tests.test_reproducibility.SampleIds", *overrides))
    return trainer, next(c for c in trainer.callbacks if isinstance(c, SampleIds)).batches


def weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in trainer.lightning_module.model.state_dict().items()}


def logged_values(trainer: L.Trainer) -> list[dict[str, str]]:
    """The CSV log without the columns that measure wall time (throughput/*: time, and rates per second)."""
    with open(trainer.loggers[0].experiment.metrics_file_path) as file:
        return [{key: value for key, value in row.items() if not key.startswith("throughput/")}
                for row in csv.DictReader(file)]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights that differ: {different}"


@pytest.fixture(scope="module")
def first(world, tiny_base, tmp_path_factory):
    trainer, batches = run(tmp_path_factory.mktemp("first"), world, tiny_base)
    return trainer, batches, weights(trainer)


def test_the_same_config_and_seed_give_the_same_log_and_weights(first, world, tiny_base, tmp_path):
    trainer, batches = run(tmp_path, world, tiny_base)
    assert batches == first[1]
    assert logged_values(trainer) == logged_values(first[0])
    assert len(logged_values(trainer)) >= 6  # a row per step at least: the comparison compares something
    assert_same_weights(weights(trainer), first[2])


def test_another_seed_gives_other_batches_and_weights(first, world, tiny_base, tmp_path):
    """The control: the comparisons above can fail."""
    trainer, batches = run(tmp_path, world, tiny_base, "seed=1")
    assert batches != first[1]
    assert any(not torch.equal(a, b) for a, b in zip(weights(trainer).values(), first[2].values()))


def test_loader_workers_change_neither_the_batches_nor_the_weights(first, world, tiny_base, tmp_path):
    trainer, batches = run(tmp_path, world, tiny_base, "data.num_workers=2")
    assert batches == first[1]
    assert_same_weights(weights(trainer), first[2])


def test_a_crashed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(world, tiny_base, tmp_path):
    """Bitwise: the checkpoint restores the weights, AdamW's moments and step, the schedule and the data
    position exactly, and nothing in a training step draws random numbers."""
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="the test stops training after step 3"):
        train(single_process(crashed, world, tiny_base, "+callbacks.record.raise_at_step=3"))
    resumed = tmp_path / "resumed"
    shutil.copytree(crashed / "checkpoints", resumed / "checkpoints")
    finished = train(single_process(resumed, world, tiny_base, "ckpt_path=last"))
    uninterrupted = train(single_process(tmp_path / "uninterrupted", world, tiny_base))
    assert finished.global_step == uninterrupted.global_step == 4
    assert_same_weights(weights(finished), weights(uninterrupted))
