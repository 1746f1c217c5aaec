"""A person's mistakes, through the real entry points: one message on stderr without a traceback, exit
code 2, and nothing prepared (the synthetic world and the tiny base are built under LUMEN_CACHE, which
must stay empty). Unexpected exceptions keep their traceback."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from run.cli import compose_config, override_problem
from tests.helpers import PLAIN

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()


def run(script: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Runs ``python <script> <overrides>`` from the repository root with an empty cache and a run
    directory in ``tmp_path``."""
    env = {**os.environ, "LUMEN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, script, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_refused(result: subprocess.CompletedProcess, tmp_path: Path, script: str = "train.py") -> str:
    """The run ended with exit code 2 and one clean message, before anything was prepared; returns it."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and f"{script}: error: " in result.stderr
    assert not (tmp_path / "cache").exists()
    return result.stderr


def test_an_unknown_key_names_the_closest_keys_instead_of_adding_it(tmp_path):
    stderr = assert_refused(run("train.py", tmp_path, "data.batch_sise=4"), tmp_path)
    assert "data.batch_sise=4: the train config has no key data.batch_sise; did you mean data.batch_size" in stderr
    assert "+data.batch_sise" not in stderr


@pytest.mark.parametrize("overrides, messages", [
    (["model.net.fusion.mode=bogus", "data.image_resize=bogus", "data.batch_size=-4"],
     ["model.net.fusion.mode='bogus': expected one of ('concat', 'difference', 'fused')",
      "data.image_resize='bogus': expected one of ('pad', 'squash', 'crop')",
      "data.batch_size=-4: expected a positive whole number"]),
    (["model.net.projector=bogus"],
     ["model.net.projector='bogus': expected one of ('mlp_downsample', 'mlp_downsample_3x3_fix') or null"]),
    (["model.net.vision.type=bogus"], ["model.net.vision.type='bogus': expected one of ('hf', 'timm', 'open_clip')"]),
])
def test_invalid_values_are_refused_with_their_choices_before_anything_is_prepared(tmp_path, overrides, messages):
    stderr = assert_refused(run("train.py", tmp_path, *overrides), tmp_path)
    for message in messages:
        assert message in stderr


def test_eval_refuses_an_invalid_value_before_preparing_the_world(tmp_path):
    stderr = assert_refused(run("eval.py", tmp_path, "ckpt=model.ckpt", "data.image_resize=bogus"), tmp_path, "eval.py")
    assert "data.image_resize='bogus': expected one of ('pad', 'squash', 'crop')" in stderr


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without a GPU")
def test_the_gpu_trainer_without_a_gpu_names_the_cpu_trainer(tmp_path):
    stderr = assert_refused(run("train.py", tmp_path, "trainer=gpu"), tmp_path)
    assert "trainer.accelerator=gpu needs a GPU" in stderr and "trainer=cpu" in stderr


def test_every_missing_input_is_named_in_one_message(tmp_path):
    missing = tmp_path / "nowhere"
    result = run("train.py", tmp_path, "prepare=none", f"paths.world_dir={missing}", f"paths.tiny_base={missing}/base")
    stderr = assert_refused(result, tmp_path)
    assert "3 inputs of this run are missing" in stderr
    assert f"paths.mimic_cxr_jpg = {missing}/mimic-cxr-jpg does not exist" in stderr
    assert f"model.net.base = {missing}/base does not exist" in stderr
    assert f"paths.diffvqa = {missing}/medical-diff-vqa does not exist" in stderr  # the data source's own check


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom run.cli import entry_point\n\n"
                      "@entry_point('train')\ndef main(cfg):\n    raise RuntimeError('not a usage error')\n\nmain()\n")
    result = run(str(script), tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: not a usage error" in result.stderr


def problem(overrides: list[str]) -> str:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("train", overrides)
    return override_problem(error.value, "train", overrides)


def test_every_unknown_key_is_named_with_its_closest_keys():
    assert problem(["trainer.max_step=3", "seed=1", "model.net.fusoin.mode=concat"]).splitlines() == [
        "trainer.max_step=3: the train config has no key trainer.max_step; did you mean trainer.max_steps or "
        "trainer.max_epochs or trainer.num_sanity_val_steps?",
        "model.net.fusoin.mode=concat: the train config has no key model.net.fusoin.mode; did you mean "
        "model.net.fusion.mode or model.net.fusion or model.net.fusion.heads?",
    ]


def test_an_unknown_option_of_a_group_names_the_closest_and_all_options():
    assert problem(["experiment=lumn"]) == ("experiment=lumn: experiment has no option 'lumn'; did you mean "
                                            "experiment=lumen? Its options: demo, lumen, mmxu, nvila_ft")


def test_a_training_run_shows_its_model_and_progress_without_library_noise(world, tiny_base, tmp_path):
    result = run("train.py", tmp_path, "prepare=none", f"paths.world_dir={world}", f"paths.tiny_base={tiny_base}", *PLAIN,
                 "trainer.max_steps=2", "data.batch_size=4", "data.limit.val=4")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for component in ("vision", "projector", "fusion", "llm"):
        assert f"\n{component} " in output  # the parameter table by component
    assert "Epoch 0: 100%" in output and "train/loss=" in output
    for noise in ("Tip:", "LeafSpec", "v_num", "FLOPs |", "Total FLOPs"):
        assert noise not in output


def test_the_printed_evaluate_command_evaluates_the_trained_checkpoint(world, tiny_base, tmp_path):
    """python train.py, then the python eval.py command it prints, as a person types them."""
    paths = ["prepare=none", f"paths.world_dir={world}", f"paths.tiny_base={tiny_base}"]
    trained = run("train.py", tmp_path / "train", *paths, *PLAIN, "trainer.max_steps=2", "data.batch_size=4",
                  "data.limit.val=4")
    assert trained.returncode == 0, trained.stderr[-3000:]
    command = next(line for line in trained.stdout.splitlines() if line.startswith("evaluate with: "))
    script, checkpoint = command.removeprefix("evaluate with: python ").split()
    assert script == "eval.py" and checkpoint.startswith("ckpt=") and Path(checkpoint[5:]).is_file()
    evaluated = run("eval.py", tmp_path / "eval", checkpoint, *paths, "data.limit.test=6")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    run_dir = tmp_path / "eval" / "run"
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 6  # data.limit.test is per source
    assert "Scored 6 of" in evaluated.stdout and (run_dir / "results.md").read_text() in evaluated.stdout


@pytest.mark.parametrize("overrides, message", [
    ([], "ckpt is not set: evaluate with python eval.py ckpt=<"),
    (["ckpt=nowhere.ckpt"], "ckpt = nowhere.ckpt does not exist"),
])
def test_eval_without_a_checkpoint_says_so_before_preparing_anything(tmp_path, overrides, message):
    stderr = assert_refused(run("eval.py", tmp_path, *overrides), tmp_path, "eval.py")
    assert message in stderr


def test_a_broken_data_file_is_one_message_naming_its_line_not_a_traceback(world, tiny_base, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy, ignore=shutil.ignore_patterns("files"))
    for tree in ("mimic-cxr-jpg", "mimic-cxr-reports"):
        (copy / tree / "files").symlink_to(world / tree / "files")
    questions = copy / "medical-diff-vqa" / "mimic_pair_questions.csv"
    lines = questions.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b",", b",\xe9", 1)
    questions.write_bytes(b"\n".join(lines))
    result = run("train.py", tmp_path, "prepare=none", f"paths.world_dir={copy}", f"paths.tiny_base={tiny_base}",
                 "logger=none")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"train.py: error: {questions} line 4: byte 0xe9 at column" in result.stderr
