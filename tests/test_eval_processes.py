"""eval.py on several processes (trainer.devices=2 on CPU: Lightning's DDP over gloo): each process
generates its share of the batches and the first scores them all. The answers and the results are those
of one process, byte for byte (every process runs one thread, as the one process does, so every sum runs
in the same order), and a run killed mid-generation is finished by a rerun with another number of
processes, each sample answered once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import ConfigError
from evaluation.generation import PREDICTIONS, RankBatches, partial_paths
from tests.helpers import WORLD_SUBJECTS

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 16
# One sample a batch: an answer then does not depend on which samples share its batch, so the answers
# a resumed run generates for the samples left over are those of an uninterrupted run.
BATCH = 1
KILL_TIMEOUT_S = 300


def eval_command(checkpoint: Path, world: Path, run_dir: Path, processes: int) -> list[str]:
    return [sys.executable, "eval.py", f"ckpt={checkpoint}", "accelerator=cpu", f"trainer.devices={processes}",
            f"paths.world_dir={world}", f"prepare.world.subjects={WORLD_SUBJECTS}", f"data.limit.test={SAMPLES}",
            f"data.eval_batch_size={BATCH}", f"hydra.run.dir={run_dir}"]


def run_eval(checkpoint: Path, world: Path, run_dir: Path, processes: int,
             torchrun: bool = False) -> subprocess.CompletedProcess:
    command = eval_command(checkpoint, world, run_dir, processes)
    if torchrun:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def results_without_config(run_dir: Path) -> dict:
    """results.json but for the run's own config (its directory, its number of processes)."""
    results = json.loads((run_dir / "results.json").read_text())
    del results["config"]
    return results


@pytest.fixture(scope="module")
def one_process(trained_checkpoint, world, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "one"
    run_eval(trained_checkpoint, world, run_dir, processes=1)
    return run_dir


def batches_of(rank: int, size: int, count: int = 7, batch_size: int = 2) -> RankBatches:
    batches = RankBatches(count, batch_size)
    batches.rank, batches.size = rank, size
    return batches


def test_the_batches_of_one_process_are_dealt_out_in_turn():
    assert list(batches_of(0, 1)) == [[0, 1], [2, 3], [4, 5], [6]]
    assert list(batches_of(0, 2)) == [[0, 1], [4, 5]] and list(batches_of(1, 2)) == [[2, 3], [6]]
    assert list(batches_of(3, 4)) == [[6]] and len(batches_of(3, 4)) == 1 and not batches_of(3, 4).idle


def test_a_process_without_a_batch_of_its_own_is_given_one_sample_to_throw_away():
    assert list(batches_of(5, 8)) == [[0]] and batches_of(5, 8).idle


@pytest.mark.parametrize(("overrides", "world_size", "message"), [
    (["trainer.devices=0"], None, "trainer.devices=0: expected a whole number, 1 or more"),
    (["precision=bf16"], None, "precision='bf16': expected one of ('32-true', 'bf16-true', '16-true')"),
    (["trainer.devices=2"], "4", "4 processes were started but trainer.devices x trainer.num_nodes = 2"),
])
def test_processes_that_do_not_add_up_are_refused_naming_the_keys(overrides, world_size, message, monkeypatch):
    from run.cli import compose_config
    from run.evaluate import check_processes

    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_processes(compose_config("eval", ["ckpt=model.ckpt", *overrides]))


@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_two_processes_answer_and_score_as_one(one_process, trained_checkpoint, world, tmp_path, launcher):
    """Started by Lightning from one command (trainer.devices=2), or by torchrun."""
    two = tmp_path / "two"
    result = run_eval(trained_checkpoint, world, two, processes=2, torchrun=launcher == "torchrun")
    assert sorted(line.split("MEMBER: ")[1] for line in result.stderr.splitlines()
                  if "Initializing distributed" in line) == ["1/2", "2/2"]
    output = result.stdout + result.stderr
    assert f"generated {SAMPLES} answers in" in output and "on 2 processes" in output and "Warning" not in output
    assert (two / PREDICTIONS).read_bytes() == (one_process / PREDICTIONS).read_bytes()
    assert results_without_config(two) == results_without_config(one_process)
    assert result.stdout.count("results: ") == 1 and not partial_paths(two)  # the first process alone wrote them


def test_a_run_killed_mid_generation_is_finished_by_a_rerun_on_another_number_of_processes(
        one_process, trained_checkpoint, world, tmp_path):
    run_dir = tmp_path / "killed"
    started = subprocess.Popen(eval_command(trained_checkpoint, world, run_dir, processes=2), cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not any(path.stat().st_size for path in partial_paths(run_dir)):  # the first answer written
            assert started.poll() is None and time.monotonic() < deadline, "the run ended before answering"
            time.sleep(0.01)
        os.killpg(started.pid, signal.SIGKILL)  # every process, as a lost node or a cancelled job would
    finally:
        started.wait()
    assert not (run_dir / PREDICTIONS).exists()
    written = [json.loads(line)["sample_id"] for path in partial_paths(run_dir)
               for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 0 < len(written) < SAMPLES and len(set(written)) == len(written)

    resumed = run_eval(trained_checkpoint, world, run_dir, processes=1)
    output = resumed.stdout + resumed.stderr
    assert f"resuming {run_dir}: {len(written)} of {SAMPLES} answers already generated" in output
    assert f"generated {SAMPLES - len(written)} answer" in output
    assert (run_dir / PREDICTIONS).read_bytes() == (one_process / PREDICTIONS).read_bytes()
    assert not partial_paths(run_dir)


def test_a_finished_run_scored_again_on_two_processes_is_scored_once(one_process, trained_checkpoint, world, tmp_path):
    run_dir = tmp_path / "again"
    shutil.copytree(one_process, run_dir)
    result = run_eval(trained_checkpoint, world, run_dir, processes=2, torchrun=True)
    assert "answers in" not in result.stdout + result.stderr  # nothing left to generate
    assert result.stdout.count("results: ") == 1  # the first process alone scores and writes
    assert (run_dir / PREDICTIONS).read_bytes() == (one_process / PREDICTIONS).read_bytes()
