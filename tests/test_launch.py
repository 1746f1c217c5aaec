"""The README's multi-process launches, on CPU with two processes: scripts/slurm/lumen.sbatch under an
srun that starts its tasks here with the variables SLURM sets, and torchrun on one node."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# srun for one node: SLURM_NTASKS_PER_NODE copies of the command, each with the rank variables srun sets.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS_PER_NODE; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_NTASKS=$SLURM_NTASKS_PER_NODE "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The sbatch script takes MASTER_PORT from its environment, as SLURM jobs do: the port is found free here and
# bound by rank 0's store later, so another process may take it in between. Only that failure is retried.
PORT_TAKEN = "address already in use"
PORT_TRIES = 3


# Overrides that turn the paper's recipe (its data and base paths given) into a few CPU steps.
CPU_RUN = ["trainer.accelerator=cpu", "model.net.attn_implementation=sdpa", "model.fsdp.param_dtype=null", "logger=csv",
           "data.batch_size=2", "data.num_workers=0", "data.limit.train=16", "data.limit.val=4", "trainer.max_steps=2"]


def started_ranks(output: str) -> list[str]:
    """Lightning's "Initializing distributed: GLOBAL_RANK: r, MEMBER: m/n" line of every process."""
    return sorted(line.split("MEMBER: ")[1].strip() for line in output.splitlines() if "Initializing distributed" in line)


def submit(script: str, tmp_path: Path, variables: dict[str, str], *overrides: str) -> tuple[int, str, str]:
    """``scripts/slurm/<script>`` run as sbatch would, under an srun that starts two tasks on this node:
    (exit code, stdout, stdout and stderr). A launch whose MASTER_PORT another process took first is
    retried with another port."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODELIST": "127.0.0.1",
           "SLURM_SUBMIT_DIR": str(ROOT), **variables}
    for _ in range(PORT_TRIES):
        result = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script), *overrides], cwd=tmp_path,
                                env=env | {"MASTER_PORT": str(free_port())}, capture_output=True, text=True,
                                timeout=900)
        output = result.stdout + result.stderr
        if result.returncode == 0 or PORT_TAKEN not in output.lower():
            break
    return result.returncode, result.stdout, output


def world_data(world: Path) -> dict[str, str]:
    return {"MIMIC_CXR_JPG": str(world / "mimic-cxr-jpg"), "DIFFVQA": str(world / "medical-diff-vqa"),
            "PROGNOSTIC": str(world / "prognostic" / "prognostic.jsonl")}


@pytest.mark.slow
def test_the_slurm_script_runs_one_process_per_task_in_one_run_directory(world, tiny_base, tmp_path):
    run = tmp_path / "run"
    code, stdout, output = submit("lumen.sbatch", tmp_path, {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lumen", "RUN_DIR": str(run), **world_data(world),
        "EXPERTS": str(world / "experts" / "experts.csv"), "NVILA_8B": str(tiny_base)}, *CPU_RUN)
    assert code == 0, output[-3000:]
    assert started_ranks(output) == ["1/2", "2/2"]  # two tasks, one process group; nothing re-launched
    assert stdout.count("checkpoint: ") == 1  # rank 0 reports
    assert (run / "checkpoints").is_dir() and (run / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_the_slurm_eval_script_answers_on_one_process_per_task_and_scores_once(world, trained_checkpoint, tmp_path):
    run = tmp_path / "run"
    code, stdout, output = submit("eval.sbatch", tmp_path, {
        "SLURM_JOB_ID": "4243", "SLURM_JOB_NAME": "lumen-eval", "RUN_DIR": str(run), "CKPT": str(trained_checkpoint),
        **world_data(world)}, "accelerator=cpu", "data.limit.test=4")
    assert code == 0, output[-3000:]
    assert started_ranks(output) == ["1/2", "2/2"]
    assert stdout.count("results: ") == 1  # the first process scores and writes
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 12  # 4 per source of data=lumen


def test_the_slurm_script_names_a_missing_path_before_starting_anything(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("MIMIC_CXR_JPG", "DIFFVQA", "PROGNOSTIC", "EXPERTS", "NVILA_8B")}
    env |= {"SLURM_JOB_ID": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "4", "SLURM_SUBMIT_DIR": str(ROOT)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "lumen.sbatch")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "export MIMIC_CXR_JPG=" in result.stderr


def test_torchrun_on_one_node_runs_fsdp2_in_one_run_directory(world, tiny_base, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py",
               "experiment=lumen", "trainer.devices=2", f"paths.mimic_cxr_jpg={world / 'mimic-cxr-jpg'}",
               f"paths.diffvqa={world / 'medical-diff-vqa'}",
               f"paths.prognostic={world / 'prognostic' / 'prognostic.jsonl'}",
               f"paths.experts={world / 'experts' / 'experts.csv'}", f"model.net.base={tiny_base}",
               *CPU_RUN, f"hydra.run.dir={run}"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert started_ranks(output) == ["1/2", "2/2"]
    assert result.stdout.count("checkpoint: ") == 1
    assert (run / "checkpoints").is_dir()
