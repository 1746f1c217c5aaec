"""Checkpoints and resume: the data position, checkpoints put in place whole, a 2-process FSDP2 run
killed mid-training and resumed (on 2 processes and on 1), and sharded checkpoints consolidated into
one file that evaluation and export read like the directory."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import get_cosine_schedule_with_warmup

from common.errors import ConfigError
from run.cli import compose_config
from datamodules.sampling import MixtureBatchSampler
from run.evaluate import evaluate
from models.checkpoints import CONSOLIDATED_KEYS, consolidate, export, load_checkpoint
from models.config import ModelConfig
from models.factory import build_model, input_spec
from models.callbacks.resumable_checkpoint import Trained, continue_on, publish
from tests.helpers import PLAIN, WORLD_SUBJECTS, checkpoints_cli
from tests.helpers import model_inputs as inputs
from run.train import instantiate_data, train

ROOT = Path(__file__).resolve().parents[1]
# The runs: 16 training samples in micro-batches of 2 = 8 global batches, 4 optimizer steps per epoch
# on 2 processes; a checkpoint every 3 steps, so the last one (step 4) is the end-of-training save.
EVERY = 3
DATA = [*PLAIN, "data.batch_size=2", "data.limit.train=16", "data.limit.val=4"]


def sampler(world_size=1, rank=0, sizes=(30, 12), weights=(1.0, 0.5), batch_size=2) -> MixtureBatchSampler:
    lengths = np.random.default_rng(0).integers(10, 200, size=sum(sizes))
    return MixtureBatchSampler(sizes, weights, lengths, batch_size, seed=5, rank=rank, world_size=world_size,
                               group_batches=4)


def test_a_position_names_the_same_global_batches_on_any_number_of_processes():
    everything = [batch.tolist() for batch in sampler().batches()]  # 18 global batches
    for world_size in (1, 2, 3, 4):
        ranks = [sampler(world_size, rank) for rank in range(world_size)]
        for rank in ranks:
            rank.load_state_dict({**rank.state_dict(), "position": 5})
        per_rank = [list(rank) for rank in ranks]
        rounds = [batch for round_ in zip(*per_rank) for batch in round_]
        left = (18 - 5) // world_size * world_size  # the rest of the epoch, less what does not make a round
        assert rounds == everything[5:5 + left]
        assert ranks[0].remaining() == len(per_rank[0]) and len(ranks[0]) == 18 // world_size


def test_a_new_epoch_starts_from_its_beginning():
    resumed = sampler()
    resumed.load_state_dict({**resumed.state_dict(), "position": 10})
    resumed.set_epoch(0)
    assert len(list(resumed)) == 8
    resumed.set_epoch(1)
    assert len(list(resumed)) == 18 and resumed.position == 0


@pytest.fixture(scope="module")
def data_config(world, tiny_base, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return compose_config("train", [f"paths.output_dir={cache}", f"paths.cache_dir={cache}", f"paths.world_dir={world}",
                                    f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}", *DATA])


def train_loader(cfg, **data_options):
    cfg = OmegaConf.merge(cfg, {"data": data_options})
    return instantiate_data(cfg, input_spec(ModelConfig(**cfg.model.net))).train_dataloader()


def test_the_loader_position_counts_batches_handed_out_not_those_workers_read_ahead(data_config):
    uninterrupted = [batch["sample_ids"] for batch in train_loader(data_config)]
    interrupted = train_loader(data_config, num_workers=2)
    batches = iter(interrupted)
    # Three batches handed out; by now the two workers have read ahead to batches 3 to 6 of the sampler.
    assert [next(batches)["sample_ids"] for _ in range(3)] == uninterrupted[:3]
    state = interrupted.state_dict()
    assert state["position"] == 3
    resumed = train_loader(data_config, num_workers=2)
    resumed.load_state_dict(state)
    assert [batch["sample_ids"] for batch in resumed] == uninterrupted[3:]


def test_each_pass_over_the_loader_is_the_next_epoch_and_holds_every_sample_once(data_config):
    """Lightning never calls set_epoch on a batch sampler: the loader turns the epoch itself."""
    loader = train_loader(data_config)
    passes = [[batch["sample_ids"] for batch in loader] for _ in range(3)]
    assert [len(batches) for batches in passes] == [8, 8, 8]
    samples = [sorted(sample for batch in batches for sample in batch) for batches in passes]
    assert samples[0] == samples[1] == samples[2] and len(set(samples[0])) == 16
    assert passes[0] != passes[1] and passes[1] != passes[2]  # each epoch its own order
    assert loader.state_dict()["epoch"] == 2


class EpochRecorder(L.Callback):
    """The samples of every training batch, per epoch."""

    def __init__(self):
        self.epochs: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).extend(batch["sample_ids"])


def test_a_run_of_three_epochs_trains_on_every_sample_in_each(demo_overrides):
    cfg = compose_config("train", demo_overrides + [
        "data.limit.train=8", "data.limit.val=4", "trainer.max_epochs=3",
        "+callbacks.recorder._target_=tests.test_resume.EpochRecorder"])
    trainer = train(cfg)
    epochs = next(c for c in trainer.callbacks if isinstance(c, EpochRecorder)).epochs
    assert sorted(epochs) == [0, 1, 2]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2]) and len(set(epochs[0])) == len(epochs[0]) > 4
    assert trainer.global_step == 3 * len(epochs[0]) // 4  # micro-batches of 4, no accumulation


@pytest.mark.parametrize("changed", [{"batch_size": 4}, {"group_batches": 2}, {"seed": 1}])
def test_a_position_in_another_sequence_of_batches_is_refused(data_config, changed):
    state = train_loader(data_config).state_dict()
    with pytest.raises(ValueError, match=r"is in another sequence of batches than this run's epoch 0 \(saved "
                                         r"\{'seed': 0, 'batch_size': 2, 'global_batches': 8\}.*resume with the same"):
        train_loader(data_config, **changed).load_state_dict(state)


def test_a_position_from_another_world_size_needs_the_trainer_counters_converted():
    state = sampler(world_size=2).state_dict()
    with pytest.raises(ValueError, match="saved by 2 processes and this run has 1: .*models.callbacks.resumable_checkpoint.ResumableCheckpoint"):
        sampler().load_state_dict(state)


def fit_loop_state(position, world_size, global_batches=8, completed_offset=1) -> dict:
    """A fit loop's state as Lightning saves it at the end of a training batch, with a loader position."""
    done = position // world_size
    counters = {"ready": done, "started": done, "processed": done, "completed": done - completed_offset}
    return {
        "epoch_loop.batch_progress": {"current": dict(counters), "total": {k: v + 20 for k, v in counters.items()},
                                      "is_last_batch": False},
        "state_dict": {"combined_loader": [{"epoch": 3, "position": position, "world_size": world_size, "seed": 0,
                                            "batch_size": 2, "global_batches": global_batches, "sequence": "00"}]},
    }


def test_resuming_on_one_process_counts_the_batches_two_processes_trained_as_one_process_would():
    state = fit_loop_state(position=6, world_size=2)
    continue_on(state, world_size=1)
    progress = state["epoch_loop.batch_progress"]
    # 6 of 8 global batches done: one process has 2 left of its 8, so it is at batch 6 (a multiple of
    # any accumulation that divides the 3 steps' 6 micro-batches).
    assert progress["current"] == {"ready": 6, "started": 6, "processed": 6, "completed": 5}
    assert progress["total"] == {"ready": 26, "started": 26, "processed": 26, "completed": 25}
    assert state["state_dict"]["combined_loader"][0]["world_size"] == 1
    continue_on(state, world_size=1)
    assert progress["current"]["ready"] == 6


def test_resuming_on_three_processes_ends_the_epoch_with_the_batches_left():
    state = fit_loop_state(position=6, world_size=2, global_batches=13)
    continue_on(state, world_size=3)
    # 7 global batches left: 2 per process (the last is not a round) of 4 per process in an epoch.
    assert state["epoch_loop.batch_progress"]["current"]["ready"] == 2


def test_a_checkpoint_after_an_epochs_last_batch_needs_no_conversion():
    state = fit_loop_state(position=8, world_size=2)
    continue_on(state, world_size=1)
    assert state["epoch_loop.batch_progress"]["current"]["ready"] == 4


def write_checkpoint_directory(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "__0_0.distcp").write_text(content)
    return path


def test_a_sharded_checkpoint_is_put_in_place_through_a_link_and_replaces_the_previous_one(tmp_path):
    last = tmp_path / "last.ckpt"
    first = write_checkpoint_directory(tmp_path / "last.ckpt.step2-aaaa", "step 2")
    publish(first, last)
    assert last.is_symlink() and (last / "__0_0.distcp").read_text() == "step 2"
    interrupted = write_checkpoint_directory(tmp_path / "last.ckpt.step4-bbbb", "half of step 4")
    second = write_checkpoint_directory(tmp_path / "last.ckpt.step6-cccc", "step 6")
    publish(second, last)
    assert (last / "__0_0.distcp").read_text() == "step 6"
    assert not first.exists() and not interrupted.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.step6-cccc"]


def test_a_checkpoint_file_is_put_in_place_by_rename(tmp_path):
    last = tmp_path / "last.ckpt"
    last.write_text("step 2")
    staging = tmp_path / "last.ckpt.step4-aaaa"
    staging.write_text("step 4")
    publish(staging, last)
    assert last.read_text() == "step 4" and not last.is_symlink() and not staging.exists()


def records(directory: Path) -> dict[int, list[dict]]:
    """Each rank's TrainingRecord events."""
    return {int(path.stem.removeprefix("rank")): [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted(directory.glob("rank*.jsonl"))}


def events(rank_records: list[dict], event: str) -> list[dict]:
    return [record for record in rank_records if record["event"] == event]


def moments_after(rank_records: list[dict], step: int) -> float:
    return next(record["moments"] for record in events(rank_records, "step") if record["step"] == step)


def in_global_order(per_rank: dict[int, list[dict]]) -> list[list[str]]:
    """The sample ids of the runs' micro-batches in the order of the epoch's global sequence (step j of
    rank r of W processes trains global batch j*W + r)."""
    batches = [events(rank_records, "batch") for _, rank_records in sorted(per_rank.items())]
    assert len({len(rank) for rank in batches}) == 1
    return [batch["sample_ids"] for round_ in zip(*batches) for batch in round_]


def scheduled_lrs(total_steps: int, lr: float = 1e-3, warmup_ratio: float = 0.03) -> list[float]:
    """The learning rate of each optimizer step under the module's schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


@pytest.fixture(scope="module")
def epoch(data_config) -> list[list[str]]:
    """The sample ids of the runs' epoch, batch by batch, as one uninterrupted run trains them."""
    loader = train_loader(data_config)
    return [[loader.dataset.samples[i].sample_id for i in batch] for batch in loader.batch_sampler.batches()]


def fsdp_run(run: Path, world, tiny_base, devices: int, *overrides: str) -> list[str]:
    return [
        sys.executable, "train.py", "trainer=fsdp", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        f"paths.output_dir={run}", f"hydra.run.dir={run}", f"paths.world_dir={world}", f"paths.tiny_base={tiny_base}",
        f"prepare.world.subjects={WORLD_SUBJECTS}", "prepare.tiny_base=null", *PLAIN, *DATA,
        f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
        "+callbacks.record._target_=tests.recording.TrainingRecord", f"+callbacks.record.directory={run / 'record'}",
        *overrides,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def kill_after_checkpoint(run: Path, world, tiny_base, devices: int, *overrides: str) -> Path:
    """Starts an FSDP2 run and kills it (SIGKILL to its process group) while it trains, after its
    checkpoint of step 3; it holds before its next batch, so it has trained exactly 3 steps."""
    run.mkdir(exist_ok=True)
    log = open(run / "train.log", "w")
    command = fsdp_run(run, world, tiny_base, devices, f"+callbacks.record.hold_at_step={EVERY}", *overrides)
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint, deadline = run / "checkpoints" / "last.ckpt", time.monotonic() + 600
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    log.close()
    assert checkpoint.exists(), (run / "train.log").read_text()[-3000:]
    assert process.returncode == -signal.SIGKILL
    return run


@pytest.fixture(scope="module")
def killed_run(world, tiny_base, tmp_path_factory) -> Path:
    return kill_after_checkpoint(tmp_path_factory.mktemp("killed"), world, tiny_base, 2)


def resume(earlier_run: Path, run: Path, world, tiny_base, devices: int, *overrides: str) -> Path:
    """Resumes an earlier run with ckpt_path=last and FSDP2, in a run directory holding a copy of its
    checkpoints; returns the checkpoint the resumed run names when it ends."""
    shutil.copytree(earlier_run / "checkpoints", run / "checkpoints", symlinks=True)
    command = fsdp_run(run, world, tiny_base, devices, "ckpt_path=last", *overrides)
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(next(line for line in result.stdout.splitlines() if line.startswith("checkpoint: ")).split(": ", 1)[1])


def test_a_killed_two_process_run_resumes_its_step_optimizer_schedule_and_data_position(
    killed_run, epoch, world, tiny_base, tmp_path
):
    killed = records(killed_run / "record")
    final = resume(killed_run, tmp_path, world, tiny_base, 2)
    resumed = records(tmp_path / "record")
    lrs = scheduled_lrs(4)
    for rank in (0, 1):
        assert [(s["step"], s["position"]) for s in events(killed[rank], "save")] == [(EVERY, 2 * EVERY)]
        assert [(s["step"], s["position"]) for s in events(resumed[rank], "save")] == [(4, 8)]
        start = events(resumed[rank], "start")[0]
        assert start["step"] == EVERY and start["adam_steps"] == EVERY
        assert start["moments"] == pytest.approx(moments_after(killed[rank], EVERY), rel=1e-6)
        assert [(b["step"], b["lr"]) for b in events(killed[rank], "batch")] == list(enumerate(lrs[:EVERY]))
        assert [(b["step"], b["lr"]) for b in events(resumed[rank], "batch")] == [(EVERY, lrs[EVERY])]
    # Every batch of the epoch, in order, each once: nothing seen twice, nothing skipped.
    assert in_global_order(killed) + in_global_order(resumed) == epoch
    # The resumed run saved at its end (step 4; the copy's other dirpath makes Lightning name it last-v1).
    assert torch.load(final / "meta.pt", weights_only=True)["global_step"] == 4


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_same_global_batch(
    killed_run, epoch, world, tiny_base, tmp_path
):
    killed = records(killed_run / "record")
    # One process accumulates two micro-batches per step, as two processes trained one each.
    resume(killed_run, tmp_path, world, tiny_base, 1, "+trainer.accumulate_grad_batches=2")
    resumed = records(tmp_path / "record")
    start = events(resumed[0], "start")[0]
    assert start["step"] == EVERY and start["adam_steps"] == EVERY and start["world_size"] == 1
    # Saved once, at the end, after the epoch's 8 global micro-batches: not after the first micro-batch
    # of step 4, although the step count (3) is still a multiple of every_n_train_steps then.
    assert [(s["step"], s["position"]) for s in events(resumed[0], "save")] == [(4, 8)]
    assert start["moments"] == pytest.approx(moments_after(killed[0], EVERY), rel=1e-6)
    assert [(b["step"], b["lr"]) for b in events(resumed[0], "batch")] == [(EVERY, scheduled_lrs(4)[EVERY])] * 2
    assert [step["step"] for step in events(resumed[0], "step")] == [4]
    assert in_global_order(killed) + in_global_order(resumed) == epoch


def single_process(run: Path, world, tiny_base, *overrides: str):
    """A one-process run with two micro-batches per optimizer step (the 2-process runs' global batch;
    4 steps an epoch) and a checkpoint every 2 steps."""
    return compose_config("train", [
        f"paths.output_dir={run}", f"paths.cache_dir={run / 'cache'}", f"paths.world_dir={world}",
        f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}", "prepare.tiny_base=null", *PLAIN,
        "logger=csv", *DATA, "+trainer.accumulate_grad_batches=2", "callbacks.model_checkpoint.every_n_train_steps=2",
        "+callbacks.record._target_=tests.recording.TrainingRecord", f"+callbacks.record.directory={run / 'record'}",
        *overrides,
    ])


@pytest.fixture(scope="module")
def crashed_run(world, tiny_base, tmp_path_factory) -> Path:
    """A one-process run that crashes in step 3, after its checkpoint (a file) of step 2."""
    run = tmp_path_factory.mktemp("crashed")
    with pytest.raises(RuntimeError, match="the test stops training after step 3"):
        train(single_process(run, world, tiny_base, "+callbacks.record.raise_at_step=3"))
    return run


def test_a_crashed_single_process_run_resumes_from_its_checkpoint_file(crashed_run, epoch, world, tiny_base,
                                                                       tmp_path):
    shutil.copytree(crashed_run / "checkpoints", tmp_path / "checkpoints")
    trainer = train(single_process(tmp_path, world, tiny_base, "ckpt_path=last"))
    assert trainer.global_step == 4 and Path(trainer.checkpoint_callback.last_model_path).is_file()
    crashed, resumed = records(crashed_run / "record")[0], records(tmp_path / "record")[0]
    assert [(s["step"], s["position"]) for s in events(crashed, "save")] == [(2, 4)]
    assert [(s["step"], s["position"]) for s in events(resumed, "save")] == [(4, 8)]
    start = events(resumed, "start")[0]
    assert start["step"] == 2 and start["adam_steps"] == 2
    assert start["moments"] == pytest.approx(moments_after(crashed, 2), rel=1e-6)
    lrs = scheduled_lrs(4)
    assert [(b["step"], b["lr"]) for b in events(resumed, "batch")] == [(2, lrs[2])] * 2 + [(3, lrs[3])] * 2
    saved = [record for record in crashed if record["event"] != "batch" or record["step"] < 2]
    assert in_global_order({0: saved}) + in_global_order({0: resumed}) == epoch


class BarRecorder(L.Callback):
    """What the drawn training bar shows before each batch and when training ends: per epoch it names,
    its count and its total."""

    def __init__(self):
        self.epochs: dict[int, list[tuple[int, int]]] = {}

    def record(self, trainer):
        bar = trainer.progress_bar_callback.train_progress_bar
        epoch = int(bar.desc.removeprefix("Epoch ").removesuffix(": "))
        self.epochs.setdefault(epoch, []).append((bar.n, bar.total))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record(trainer)

    def on_train_end(self, trainer, pl_module):
        self.record(trainer)


def short_run(run: Path, world, tiny_base, *overrides: str):
    """A one-process run of 8 steps an epoch (16 samples in micro-batches of 2) that logs every step."""
    return compose_config("train", [
        f"paths.output_dir={run}", f"paths.cache_dir={run / 'cache'}", f"paths.world_dir={world}",
        f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}", "prepare.tiny_base=null", *PLAIN,
        "logger=csv", "trainer.log_every_n_steps=1", *DATA,
        "+callbacks.bar._target_=tests.test_resume.BarRecorder", *overrides,
    ])


def extend(earlier_run: Path, run: Path, world, tiny_base, *overrides: str) -> L.Trainer:
    """Trains on from a copy of an earlier run's checkpoint (ckpt_path=last in its run directory)."""
    shutil.copytree(earlier_run, run)
    return train(short_run(run, world, tiny_base, "ckpt_path=last", *overrides))


def logged_steps(run: Path, version: int) -> dict[int, dict[str, str]]:
    """The CSV logger's rows of one run, merged per step."""
    rows = {}
    with open(run / "csv" / f"version_{version}" / "metrics.csv") as metrics:
        for row in csv.DictReader(metrics):
            rows.setdefault(int(row["step"]), {}).update({key: value for key, value in row.items() if value})
    return rows


def learning_rate(row: dict[str, str]) -> float:
    return float(next(value for key, value in row.items() if key.startswith("lr-")))


@pytest.fixture(scope="module")
def stopped_run(world, tiny_base, tmp_path_factory) -> Path:
    """A run that trainer.max_steps=3 stopped in its first epoch (with the default trainer.max_epochs=1)."""
    run = tmp_path_factory.mktemp("stopped")
    assert train(short_run(run, world, tiny_base, "trainer.max_steps=3")).global_step == 3
    return run


@pytest.fixture(scope="module")
def one_epoch_run(world, tiny_base, tmp_path_factory) -> Path:
    """A run of one whole epoch of 2 steps (4 samples), the default trainer.max_epochs=1."""
    run = tmp_path_factory.mktemp("one_epoch")
    assert train(short_run(run, world, tiny_base, "data.limit.train=4")).global_step == 2
    return run


def test_a_run_stopped_by_max_steps_is_extended_to_a_larger_max_steps_within_its_epoch(
    stopped_run, world, tiny_base, tmp_path
):
    assert Trained.read(stopped_run / "checkpoints" / "last.ckpt") == Trained(steps=3, epochs=0)
    trainer = extend(stopped_run, tmp_path / "run", world, tiny_base, "trainer.max_steps=6")
    assert trainer.global_step == 6
    logged = logged_steps(tmp_path / "run", version=1)
    assert sorted(logged) == [3, 4, 5] and {row["epoch"] for row in logged.values()} == {"0"}
    assert all("train/loss" in row for row in logged.values())
    # The learning rates of the 6-step schedule, from the first resumed step on.
    assert [learning_rate(logged[step]) for step in (3, 4, 5)] == pytest.approx(scheduled_lrs(6)[3:], rel=1e-6)
    bar = next(c for c in trainer.callbacks if isinstance(c, BarRecorder)).epochs
    assert bar == {0: [(3, 6), (4, 6), (5, 6), (6, 6)]}
    saved = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0] | {"sequence": None} == {
        "epoch": 0, "position": 6, "world_size": 1, "sequence": None, "seed": 0, "batch_size": 2, "global_batches": 8}


@pytest.mark.parametrize("limits", [["trainer.max_epochs=2"], ["trainer.max_steps=4", "trainer.max_epochs=-1"]],
                         ids=["max_epochs", "max_steps"])
def test_a_run_that_finished_its_epochs_is_extended_into_the_next_epoch(
    one_epoch_run, world, tiny_base, tmp_path, limits
):
    trainer = extend(one_epoch_run, tmp_path / "run", world, tiny_base, "data.limit.train=4", *limits)
    assert trainer.global_step == 4
    logged = logged_steps(tmp_path / "run", version=1)
    assert sorted(logged) == [2, 3] and {row["epoch"] for row in logged.values()} == {"1"}
    assert next(c for c in trainer.callbacks if isinstance(c, BarRecorder)).epochs == {1: [(0, 2), (1, 2), (2, 2)]}


def test_the_bars_in_a_log_file_are_lines_without_cursor_movements(world, tiny_base, tmp_path, capfd):
    train(short_run(tmp_path, world, tiny_base, "data.limit.train=4"))
    shown = capfd.readouterr().out
    assert "\x1b[" not in shown
    assert re.search(r"Epoch 0: 100%.*2/2", shown) and re.search(r"Validation.*100%", shown)


def test_extending_by_max_steps_past_a_reached_max_epochs_is_refused_naming_both(one_epoch_run, world, tiny_base):
    checkpoint = one_epoch_run / "checkpoints" / "last.ckpt"
    modified = checkpoint.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"has trained 2 steps and 1 epoch, which reaches trainer\.max_epochs=1: "
                                          r"resuming it would train nothing\. To train further, add "
                                          r"trainer\.max_epochs=-1 \(to train until trainer\.max_steps=4; or more than 1\)"):
        train(short_run(one_epoch_run, world, tiny_base, "data.limit.train=4", "ckpt_path=last", "trainer.max_steps=4"))
    assert checkpoint.stat().st_mtime_ns == modified


def test_a_resume_with_nothing_to_train_exits_with_code_2_naming_the_limit(stopped_run, world, tiny_base, tmp_path):
    # A copy: Hydra writes its .hydra/ into the run directory before the run is refused.
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    command = [sys.executable, "train.py", f"hydra.run.dir={run}", f"paths.world_dir={world}",
               f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}", "prepare.tiny_base=null", *PLAIN,
               *DATA, "trainer.max_steps=3", "ckpt_path=last"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (f"train.py: error: ckpt_path=last ({run / 'checkpoints' / 'last.ckpt'}) has trained 3 steps and "
            "0 epochs, which reaches trainer.max_steps=3: resuming it would train nothing. To train further, add "
            "trainer.max_steps=<more than 3>") in result.stderr
    assert sorted(path.name for path in (run / "csv").iterdir()) == ["version_0"]  # nothing was logged


@pytest.mark.slow
def test_a_one_process_sharded_checkpoint_resumes_on_two_processes(epoch, world, tiny_base, tmp_path):
    # One FSDP2 process accumulating two micro-batches per step, then two with one each.
    killed_run = kill_after_checkpoint(tmp_path / "killed", world, tiny_base, 1, "+trainer.accumulate_grad_batches=2")
    killed = records(killed_run / "record")
    resume(killed_run, tmp_path / "resumed", world, tiny_base, 2)
    resumed = records(tmp_path / "resumed" / "record")
    for rank in (0, 1):
        start = events(resumed[rank], "start")[0]
        assert start["step"] == EVERY and start["adam_steps"] == EVERY and start["world_size"] == 2
        assert start["moments"] == pytest.approx(moments_after(killed[0], EVERY), rel=1e-6)
        assert [(b["step"], b["lr"]) for b in events(resumed[rank], "batch")] == [(EVERY, scheduled_lrs(4)[EVERY])]
    assert in_global_order(killed) + in_global_order(resumed) == epoch


def test_a_single_process_checkpoint_file_is_refused_by_fsdp_with_the_fix(crashed_run, world, tiny_base):
    checkpoint = crashed_run / "checkpoints" / "last.ckpt"
    cfg = single_process(crashed_run, world, tiny_base, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                         f"ckpt_path={checkpoint}")
    with pytest.raises(ValueError, match=r"is a one-process checkpoint file \(.*\), which FSDP2 cannot resume .*: "
                                         r"resume it with a one-process trainer \(trainer=cpu or trainer=gpu\)"):
        train(cfg)


def test_a_sharded_checkpoint_is_refused_by_a_single_device_trainer_with_the_fix(killed_run, world, tiny_base):
    overrides = [f"paths.output_dir={killed_run}", f"paths.cache_dir={killed_run / 'cache'}",
                 f"paths.world_dir={world}", f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}",
                 "prepare.tiny_base=null", *PLAIN, *DATA, "ckpt_path=last"]
    with pytest.raises(ValueError, match=r"ckpt_path=last is a sharded checkpoint \(.*last.ckpt\), which only the "
                                         r"FSDP2 strategy reads: resume with trainer=fsdp"):
        train(compose_config("train", overrides))


@pytest.fixture(scope="module")
def sharded(killed_run) -> Path:
    return killed_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def consolidated(sharded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("consolidated") / "model.ckpt"
    checkpoints_cli("consolidate", sharded, out)
    return out


def test_consolidation_writes_the_sharded_weights_as_a_single_process_checkpoint(
    sharded, consolidated, trained_checkpoint, tmp_path
):
    checkpoint = torch.load(consolidated, map_location="cpu", weights_only=True)
    assert set(checkpoint) == set(CONSOLIDATED_KEYS) and checkpoint["global_step"] == EVERY
    dcp_to_torch_save(sharded, tmp_path / "reference.pt")  # torch's own converter, optimizer state and all
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)["state_dict"]
    assert checkpoint["state_dict"].keys() == reference.keys()
    assert all(torch.equal(checkpoint["state_dict"][key], reference[key]) for key in reference)
    single_process = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    assert {k: v.shape for k, v in checkpoint["state_dict"].items()} == {k: v.shape for k, v in single_process["state_dict"].items()}
    assert checkpoint["hyper_parameters"].keys() == single_process["hyper_parameters"].keys()
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == 2


def test_consolidation_refuses_what_is_not_a_sharded_checkpoint(consolidated, tmp_path):
    with pytest.raises(ValueError, match="is not a sharded checkpoint: expected a directory with .metadata"):
        consolidate(consolidated, tmp_path / "again.ckpt")


def test_the_sharded_directory_and_its_consolidated_file_load_the_same_trained_model(sharded, consolidated):
    from_shards, from_file = load_checkpoint(sharded), load_checkpoint(consolidated)
    batch = inputs(from_shards.model)
    with torch.no_grad():
        logits = from_shards.model(**batch).logits
        torch.testing.assert_close(from_file.model(**batch).logits, logits, rtol=0, atol=0)
        assert not torch.allclose(build_model(from_shards.config).eval()(**batch).logits, logits)
    assert from_file.prompt == from_shards.prompt and from_file.max_new_tokens == from_shards.max_new_tokens


def test_eval_predicts_the_same_from_the_sharded_directory_and_the_consolidated_file(sharded, consolidated, world,
                                                                                     tmp_path):
    def predictions(checkpoint: Path, out: Path) -> list[tuple[str, str]]:
        evaluate(compose_config("eval", [f"ckpt={checkpoint}", f"paths.output_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}",
                                         f"paths.world_dir={world}", f"prepare.world.subjects={WORLD_SUBJECTS}",
                                         "data.limit.test=6", "accelerator=cpu", "max_new_tokens=8"]))
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        return [(record["sample_id"], record["prediction"]) for record in records]

    from_shards = predictions(sharded, tmp_path / "shards")
    assert len(from_shards) == 6
    assert predictions(consolidated, tmp_path / "file") == from_shards


def test_export_reads_a_sharded_checkpoint(sharded, tmp_path):
    exported = load_checkpoint(export(sharded, tmp_path / "exported"))
    original = load_checkpoint(sharded)
    batch = inputs(original.model)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(**batch).logits, original.model(**batch).logits, rtol=0, atol=0)
