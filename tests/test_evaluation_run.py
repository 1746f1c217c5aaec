"""eval.py as a run: answers written as they are generated, resumed after an interruption, plots,
and the table and plots sent to W&B (offline)."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import wandb
from PIL import Image

from run.cli import compose_config
from run.evaluate import evaluate
from evaluation.generation import FINGERPRINT, PARTIAL
from tests.helpers import WORLD_SUBJECTS, read_jsonl


def eval_config(checkpoint, world, out: Path, *extra):
    return compose_config("eval", [f"ckpt={checkpoint}", f"paths.output_dir={out}", f"paths.cache_dir={out}-cache",
                                   f"paths.world_dir={world}",
                                   f"prepare.world.subjects={WORLD_SUBJECTS}", "data.limit.test=20",
                                   "accelerator=cpu", *extra])


@pytest.fixture(scope="module")
def finished(trained_checkpoint, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    evaluate(eval_config(trained_checkpoint, world, out))
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    """An editable copy of a run directory: evaluate writes into the run it is given, and the module's
    finished run must stay as its first evaluation left it for the other tests."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_finished_run_leaves_predictions_results_plots_and_no_partial_file(finished):
    assert len(read_jsonl(finished / "predictions.jsonl")) == 20
    assert not (finished / PARTIAL).exists() and (finished / FINGERPRINT).is_file()
    plots = sorted(path.name for path in finished.glob("*.png"))
    assert plots == ["score_distributions.png", "scores_diagnostic.png", "scores_difference.png"]
    with Image.open(finished / "scores_diagnostic.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_the_results_say_how_many_of_how_many_samples_were_scored(finished):
    samples = json.loads((finished / "results.json").read_text())["samples"]
    loaded = samples["sources"]["diffvqa"]["loaded"]
    assert samples == {"split": "test", "limit": 20, "sources": {"diffvqa": {"loaded": loaded, "scored": 20}}}
    assert loaded > 20
    assert (finished / "results.md").read_text().startswith(
        f"Scored 20 of {loaded} test samples (data.limit.test=20 per source; diffvqa: 20 of {loaded}).")


def test_an_interrupted_run_generates_only_what_is_missing(finished, trained_checkpoint, world, tmp_path):
    records = read_jsonl(finished / "predictions.jsonl")
    run = tmp_path / "run"
    run.mkdir()
    (run / FINGERPRINT).write_text((finished / FINGERPRINT).read_text())
    kept = [{key: r[key] for key in ("sample_id", "task", "question_type", "question", "has_prior", "reference")}
            | {"prediction": "ANSWER FROM BEFORE THE CRASH"} for r in records[:5]]
    torn = json.dumps(kept[0] | {"sample_id": records[5]["sample_id"]})[:40]  # a crash mid-write
    (run / PARTIAL).write_text("".join(json.dumps(r) + "\n" for r in kept) + torn)
    evaluate(eval_config(trained_checkpoint, world, run))
    resumed = read_jsonl(run / "predictions.jsonl")
    assert [r["sample_id"] for r in resumed] == [r["sample_id"] for r in records]
    assert [r["prediction"] for r in resumed[:5]] == ["ANSWER FROM BEFORE THE CRASH"] * 5  # not generated again
    assert [r["prediction"] for r in resumed[5:]] == [r["prediction"] for r in records[5:]]  # the torn one too
    assert not (run / PARTIAL).exists()


def test_a_finished_run_is_scored_again_without_generating(finished, trained_checkpoint, world, tmp_path):
    run = copy_of(finished, tmp_path)
    before = (run / "predictions.jsonl").read_text()
    lines = before.splitlines()
    edited = json.loads(lines[0]) | {"prediction": "EDITED"}
    (run / "predictions.jsonl").write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    evaluate(eval_config(trained_checkpoint, world, run))
    assert read_jsonl(run / "predictions.jsonl")[0]["prediction"] == "EDITED"


def test_answers_from_other_settings_are_not_mixed_in(finished, trained_checkpoint, world):
    with pytest.raises(ValueError, match="generated with other settings"):
        evaluate(eval_config(trained_checkpoint, world, finished, "data.use_prior=false"))


def test_answers_of_an_earlier_model_at_the_same_path_are_not_mixed_in(trained_checkpoint, world, tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    shutil.copyfile(trained_checkpoint, checkpoint)
    evaluate(eval_config(checkpoint, world, tmp_path / "run", "data.limit.test=4"))
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # trained again into the same path
    with pytest.raises(ValueError, match="generated with other settings"):
        evaluate(eval_config(checkpoint, world, tmp_path / "run", "data.limit.test=4"))


def test_with_the_wandb_logger_the_table_goes_to_an_offline_run_and_the_plots_only_when_asked(
        trained_checkpoint, world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for run, extra in (("table", []), ("plots", ["upload_plots=true"])):
        evaluate(eval_config(trained_checkpoint, world, tmp_path / run, "logger=wandb", *extra))
        assert wandb.run is None  # finished
    tables = list((tmp_path / "table" / "wandb").rglob("*.table.json"))
    assert len(tables) == 1 and not list((tmp_path / "table" / "wandb").rglob("*.png"))
    assert json.loads(tables[0].read_text())["columns"][:2] == ["Task", "Question type"]
    assert len(list((tmp_path / "plots" / "wandb").rglob("*.png"))) >= 2


def test_the_judge_scores_open_answers_and_its_summary_goes_into_the_results(finished, trained_checkpoint, world,
                                                                             tmp_path, monkeypatch):
    from tests.test_llm import FakeEndpoint
    monkeypatch.setenv("LUMEN_TEST_KEY", "k")
    run = copy_of(finished, tmp_path)
    server = FakeEndpoint(answer=lambda messages: "Close to the reference.\nRating: [[7]]")
    try:
        results = evaluate(eval_config(trained_checkpoint, world, run, "judge=openai", "judge.model=llama",
                                       f"judge.base_url={server.url}", "judge.api_key_env=LUMEN_TEST_KEY"))
    finally:
        server.close()
    records = read_jsonl(run / "predictions.jsonl")
    judged = [r for r in records if "judge_score" in r]
    assert judged and 0 < len(server.requests) <= len(judged)  # the same conversation is asked once
    assert all(r["judge_score"] == 7.0 for r in judged) and not any(r["reference"] in ("yes", "no") for r in judged)
    assert results["judge"]["model"] == "llama" and results["overall"]["judge_score"]["mean"] == 7.0
    assert "| Judge (1-10) |" in (run / "results.md").read_text()


def test_a_judge_outage_keeps_the_answers_and_the_next_run_judges_them(finished, trained_checkpoint, world, tmp_path,
                                                                      monkeypatch):
    from tests.test_llm import FakeEndpoint
    monkeypatch.setenv("LUMEN_TEST_KEY", "k")
    run = copy_of(finished, tmp_path)
    answers = [record["prediction"] for record in read_jsonl(run / "predictions.jsonl")]
    judge = ["judge=openai", "judge.model=llama", "judge.api_key_env=LUMEN_TEST_KEY", "judge.max_retries=0"]
    with socket.socket() as down:  # bound and held, never listening: every connection is refused
        down.bind(("127.0.0.1", 0))
        results = evaluate(eval_config(trained_checkpoint, world, run, *judge,
                                       f"judge.base_url=http://127.0.0.1:{down.getsockname()[1]}/v1"))
    assert [record["prediction"] for record in read_jsonl(run / "predictions.jsonl")] == answers
    assert results["judge"]["n_request_failures"] == results["judge"]["n"] > 0 and results["judge"]["mean"] is None
    server = FakeEndpoint(answer=lambda messages: "Close to the reference.\nRating: [[7]]")
    try:
        results = evaluate(eval_config(trained_checkpoint, world, run, *judge, f"judge.base_url={server.url}"))
    finally:
        server.close()
    assert results["judge"]["n_request_failures"] == 0 and results["judge"]["mean"] == 7.0
    assert [record["prediction"] for record in read_jsonl(run / "predictions.jsonl")] == answers
