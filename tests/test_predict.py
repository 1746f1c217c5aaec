"""predict.py: a person's own studies asked about as eval.py asks a dataset's samples: presets in the
training data's words, the interval from the dates, the checks a radiologist would make, one pair or a
resumable manifest, and nothing of the patient's identity in what it prints or writes."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from datamodules.pairs import make_pair, read_manifest
from datamodules.presets import AskError, resolve_question
from common.errors import ConfigError
from common.readers import InputError, Problems
from datamodules.dicom import read_study_file
from evaluation.generation import FINGERPRINT, PARTIAL
from run.cli import compose_config
from run.evaluate import evaluate
from run.predict import ROWS, Predictor, predict
from tests.helpers import WORLD_SUBJECTS, read_jsonl
from tests.test_experts import weights_dir  # noqa: F401  (random TorchXRayVision weights, a fixture)

ROOT = Path(__file__).resolve().parents[1]
TEST_SAMPLES = 8  # of each task


# --- presets: the questions in the training data's own words ----------------------------------------------------


def test_the_difference_preset_is_medical_diff_vqas_question():
    asked = resolve_question("difference", has_prior=True)
    assert (asked.text, asked.task, asked.question_type) == (
        "what has changed compared to the reference image?", "difference", "difference")


def test_the_prognosis_preset_asks_about_the_days_given_in_the_builders_words():
    asked = resolve_question("prognosis", has_prior=True, days=30)
    assert (asked.text, asked.task) == ("What changes can be expected in this patient's chest X-ray in 30 days?",
                                        "prognostic")
    assert resolve_question("prognosis", has_prior=True, days=1).text.endswith("in 1 day?")


@pytest.mark.parametrize("days", [None, 0, 366, "30"])
def test_the_prognosis_preset_needs_whole_days_the_model_was_trained_on(days):
    with pytest.raises(AskError, match="days=<whole days ahead, 1 to 365>") as error:
        resolve_question("prognosis", has_prior=True, days=days)
    assert error.value.field == "days"


@pytest.mark.parametrize(("preset", "question"), [
    ("presence", "is there pleural effusion?"), ("location", "where is the pleural effusion?"),
    ("level", "what level is the pleural effusion?"), ("type", "what type is the pleural effusion?"),
])
def test_a_finding_preset_names_the_finding_in_lower_case(preset, question):
    asked = resolve_question(preset, has_prior=False, finding="Pleural Effusion")
    assert (asked.text, asked.task, asked.question_type) == (question, "diagnostic", preset)


def test_a_finding_preset_without_a_finding_says_to_add_one():
    with pytest.raises(AskError, match="add finding="):
        resolve_question("presence", has_prior=False)


def test_a_two_study_preset_without_a_prior_is_refused():
    with pytest.raises(AskError, match="give a prior study too"):
        resolve_question("difference", has_prior=False)


def test_any_other_text_is_a_free_question_of_the_task_the_studies_make():
    assert resolve_question("is the heart bigger?", has_prior=True).task == "difference"
    assert resolve_question("is the heart big?", has_prior=False).task == "diagnostic"


def test_options_make_a_single_choice_question_lettered_from_a():
    asked = resolve_question("How has the left lung changed?", has_prior=True, options=["worse", "better", "same"])
    assert (asked.task, asked.options) == ("mmxu", {"A": "worse", "B": "better", "C": "same"})
    with pytest.raises(AskError, match="2 to 4"):
        resolve_question("Which?", has_prior=True, options=["one"])


def test_options_ask_about_two_visits_as_mmxu_does():
    with pytest.raises(AskError, match="about two visits, as MMXU asks them: give a prior study too"):
        resolve_question("How has the left lung changed?", has_prior=False, options=["worse", "better"])


# --- one pair from image files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_pair(world):
    """A current and prior JPEG of one subject of the world, with the days between them."""
    from datamodules.mimic import load_images

    images = load_images(world / "mimic-cxr-jpg")
    followed = images.groupby("subject_id").filter(lambda rows: rows["study_id"].nunique() > 1)
    studies = followed[followed["subject_id"] == followed["subject_id"].iloc[0]]
    first, second = studies.sort_values("study_datetime").drop_duplicates("study_id").iloc[:2].itertuples()
    return Path(second.path), Path(first.path), (second.study_datetime.date() - first.study_datetime.date()).days


def test_images_take_their_interval_from_the_dates_given(jpeg_pair):
    current, prior, _ = jpeg_pair
    pair = make_pair("p", read_study_file(current), read_study_file(prior), "difference",
                     current_date="2026-03-01", prior_date="20260115")
    assert (pair.interval.days, pair.interval.source) == (45.0, "current_date and prior_date")
    assert pair.sample.interval_days == 45.0 and pair.sample.prior_image == prior


def test_images_without_dates_ask_for_them_or_for_the_interval(jpeg_pair):
    current, prior, _ = jpeg_pair
    with pytest.raises(AskError, match=r"give current_date=YYYY-MM-DD, or interval_days="):
        make_pair("p", read_study_file(current), read_study_file(prior), "difference")
    pair = make_pair("p", read_study_file(current), read_study_file(prior), "difference", interval_days=12)
    assert (pair.interval.days, pair.interval.source) == (12.0, "interval_days as given")


def test_a_prior_dated_after_the_current_study_is_refused_without_showing_the_dates(jpeg_pair):
    current, prior, _ = jpeg_pair
    with pytest.raises(AskError, match="the prior study is 10 days after the current one") as error:
        make_pair("p", read_study_file(current), read_study_file(prior), "difference",
                  current_date="2026-01-01", prior_date="2026-01-11")
    assert "2026" not in str(error.value) and error.value.kind == "prior after current"


def test_interval_days_and_dates_together_are_refused(jpeg_pair):
    current, prior, _ = jpeg_pair
    with pytest.raises(AskError, match="not both"):
        make_pair("p", read_study_file(current), read_study_file(prior), "difference", interval_days=3,
                  current_date="2026-01-01")


def test_without_a_prior_the_question_is_about_one_image(jpeg_pair):
    pair = make_pair("p", read_study_file(jpeg_pair[0]), None, "view")
    assert not pair.sample.has_prior and pair.interval is None and pair.sample.question_type == "view"


# --- predict.py answers as eval.py does ------------------------------------------------------------------------


def test_a_diagnostic_preset_is_asked_of_the_current_image_alone_and_says_so(jpeg_pair):
    current, prior, days = jpeg_pair
    pair = make_pair("p", read_study_file(current), read_study_file(prior), "abnormality", interval_days=days)
    assert (pair.sample.has_prior, pair.sample.interval_days, pair.interval) == (False, None, None)
    assert pair.warnings == ("question=abnormality is answered from the current study alone, as the model was trained "
                             "to answer it: the prior study is not shown to it",)


def test_fewer_than_four_options_are_asked_and_warned_about(jpeg_pair):
    current, prior, days = jpeg_pair
    pair = make_pair("p", read_study_file(current), read_study_file(prior), "How is the effusion?",
                     options=["worse", "better", "same"], interval_days=days)
    assert pair.sample.options == {"A": "worse", "B": "better", "C": "same"}
    assert pair.warnings == ("3 options: MMXU's questions, which the model was trained on, have 4",)


def test_a_prior_that_is_the_current_file_is_warned_about(jpeg_pair):
    current, _, _ = jpeg_pair
    pair = make_pair("p", read_study_file(current), read_study_file(current), "difference", interval_days=0)
    assert pair.warnings == (f"current and prior are the same file ({current.name}): the model is asked to compare a "
                             "study with itself",)


@pytest.fixture(scope="module")
def evaluated(trained_checkpoint, world, tmp_path_factory):
    """eval.py's records for the first test samples of each task (the diagnostic questions come first in
    the split, so they are evaluated apart from the difference ones), and those samples."""
    from datamodules.diffvqa import load_diffvqa

    records = {}
    for task in ("diagnostic", "difference"):
        out = tmp_path_factory.mktemp("eval") / task
        evaluate(compose_config("eval", [
            f"ckpt={trained_checkpoint}", f"paths.output_dir={out}", f"paths.cache_dir={out}-cache",
            f"paths.world_dir={world}", f"prepare.world.subjects={WORLD_SUBJECTS}", f"data.limit.test={TEST_SAMPLES}",
            f"data.sources.diffvqa.tasks=[{task}]", "accelerator=cpu", "data.eval_batch_size=4",
        ]))
        records |= {record["sample_id"]: record for record in read_jsonl(out / "predictions.jsonl")}
    samples = [sample for sample in load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "test")[0]
               if sample.sample_id in records]
    assert {sample.task for sample in samples} == {"diagnostic", "difference"}
    return records, samples


def write_manifest(path: Path, samples, extra_rows=()) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "current", "prior", "question", "interval_days"])
        for sample in samples:
            writer.writerow([sample.sample_id, sample.image, sample.prior_image or "", sample.question,
                             "" if sample.interval_days is None else sample.interval_days])
        writer.writerows(extra_rows)
    return path


def predict_config(checkpoint, *overrides):
    return compose_config("predict", [f"ckpt={checkpoint}", "accelerator=cpu", *overrides])


def test_a_manifest_of_evals_samples_gets_evals_answers(evaluated, trained_checkpoint, tmp_path):
    records, samples = evaluated
    manifest = write_manifest(tmp_path / "pairs.csv", samples)
    predicted = predict(predict_config(trained_checkpoint, f"manifest={manifest}", "batch_size=4"))
    assert [r["sample_id"] for r in predicted] == [s.sample_id for s in samples]
    assert {r["sample_id"]: r["prediction"] for r in predicted} == {
        sample_id: record["prediction"] for sample_id, record in records.items()}
    written = read_jsonl(tmp_path / "pairs-predictions" / "predictions.jsonl")
    assert written == predicted and all(record["reference"] is None for record in written)
    assert set(written[0]) >= {"sample_id", "task", "question_type", "question", "has_prior", "interval_days",
                               "prediction", "reference"}


def test_one_pair_is_prompted_with_evals_tokens_and_gets_evals_answer(evaluated, trained_checkpoint):
    records, samples = evaluated
    predictor = Predictor(trained_checkpoint, accelerator="cpu")
    for sample in [s for s in samples if not s.has_prior][:2] + [s for s in samples if s.has_prior][:2]:
        pair = make_pair(sample.sample_id, read_study_file(sample.image),
                         read_study_file(sample.prior_image) if sample.has_prior else None, sample.question,
                         interval_days=sample.interval_days)
        answer = predictor.ask(pair)
        assert predictor.collator.tokenize(answer.sample) == predictor.collator.tokenize(sample)
        assert answer.prediction == records[sample.sample_id]["prediction"]


def test_a_bad_row_is_named_by_line_and_the_others_are_answered(evaluated, trained_checkpoint, tmp_path):
    _, samples = evaluated
    good = samples[:2]
    manifest = write_manifest(tmp_path / "pairs.csv", good, extra_rows=[
        ["missing", "no-such-image.jpg", "", "view", ""],
        ["later", good[0].image, good[0].image, "difference", "-3"],
    ])
    problems = Problems()
    read = read_manifest(manifest, problems)
    assert [pair.sample.sample_id for pair in read.pairs] == [s.sample_id for s in good] and read.rows == 4
    messages = "\n".join(problems.lines())
    assert f"{manifest} line 4, field current" in messages and "not found" in messages
    assert f"{manifest} line 5, field interval_days" in messages
    with pytest.raises(InputError, match="2 of 4 rows could not be asked"):
        predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    assert len(read_jsonl(tmp_path / "pairs-predictions" / "predictions.jsonl")) == 2


def test_an_interrupted_manifest_run_generates_only_the_missing_rows(evaluated, trained_checkpoint, tmp_path):
    _, samples = evaluated
    manifest = write_manifest(tmp_path / "pairs.csv", samples[:6])
    out = tmp_path / "answers"
    first = predict(predict_config(trained_checkpoint, f"manifest={manifest}", f"out={out}"))
    kept = [record | {"prediction": "ANSWER FROM BEFORE THE KILL"} for record in first[:3]]
    (out / "predictions.jsonl").unlink()
    (out / PARTIAL).write_text("".join(json.dumps(record) + "\n" for record in kept))
    assert (out / FINGERPRINT).is_file()
    again = predict(predict_config(trained_checkpoint, f"manifest={manifest}", f"out={out}"))
    assert [r["prediction"] for r in again] == ["ANSWER FROM BEFORE THE KILL"] * 3 + [r["prediction"] for r in first[3:]]
    assert not (out / PARTIAL).exists()


def test_every_preset_with_a_prior_prompts_as_the_datasets_one_image_question(evaluated, trained_checkpoint,
                                                                             jpeg_pair):
    from datamodules.presets import PRESETS

    _, samples = evaluated
    predictor = Predictor(trained_checkpoint, accelerator="cpu")
    asked = 0
    for sample in (sample for sample in samples if sample.task == "diagnostic"):
        for name, preset in PRESETS.items():
            pattern = re.escape(preset.template).replace(re.escape("{finding}"), "(.+)")
            match = re.fullmatch(pattern, sample.question) if preset.template else None
            if match is None:
                continue
            pair = make_pair(sample.sample_id, read_study_file(sample.image), read_study_file(jpeg_pair[1]), name,
                             finding=match.group(1) if preset.needs_finding else None, interval_days=3)
            assert predictor.collator.tokenize(predictor.as_trained(pair)[0]) == predictor.collator.tokenize(sample)
            asked += 1
    assert asked >= 3


def test_a_manifest_column_it_does_not_know_is_refused(tmp_path, jpeg_pair):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"ID,current,question\n1,{jpeg_pair[0]},view\n")
    with pytest.raises(InputError, match=r"pairs.csv line 1: unknown column 'ID'; the columns are current, question"):
        read_manifest(manifest)


def test_every_bad_row_is_listed_by_its_line(trained_checkpoint, tmp_path, capsys):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("current,question\n" + "".join(f"missing-{n}.jpg,view\n" for n in range(7)))
    with pytest.raises(InputError, match="7 of 7 rows could not be asked"):
        predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    printed = capsys.readouterr().out
    assert all(f"pairs.csv line {line}, field current: {tmp_path / f'missing-{line - 2}.jpg'}: not found" in printed
               for line in range(2, 9))


def test_one_pair_settings_beside_a_manifest_are_refused(trained_checkpoint, tmp_path):
    manifest = write_manifest(tmp_path / "pairs.csv", [])
    with pytest.raises(ConfigError, match="question, days describe one pair, and manifest= many"):
        predict(predict_config(trained_checkpoint, f"manifest={manifest}", "question=prognosis", "days=30"))


def test_a_row_that_cannot_be_asked_again_keeps_its_answer(evaluated, trained_checkpoint, tmp_path, capsys):
    _, samples = evaluated
    copies = tmp_path / "studies"
    copies.mkdir()
    distinct = list({sample.image: sample for sample in reversed(samples)}.values())[:2]  # two images
    moved = [replace(sample, image=copies / sample.image.name) for sample in distinct]
    for sample, copy in zip(distinct, moved):
        copy.image.write_bytes(sample.image.read_bytes())
    manifest = write_manifest(tmp_path / "pairs.csv", moved)
    first = predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    moved[1].image.unlink()  # its drive is not mounted, say
    with pytest.raises(InputError, match="1 of 2 rows could not be asked"):
        predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    assert read_jsonl(tmp_path / "pairs-predictions" / "predictions.jsonl") == first
    assert f"kept the earlier answer of line 3 ({moved[1].sample_id}), which could not be asked again" in \
        capsys.readouterr().out
    for sample in moved:
        sample.image.unlink(missing_ok=True)
    with pytest.raises(InputError, match="2 of 2 rows could not be asked"):
        predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    assert read_jsonl(tmp_path / "pairs-predictions" / "predictions.jsonl") == first


def test_a_row_whose_files_changed_is_refused_before_anything_is_generated(evaluated, trained_checkpoint, tmp_path,
                                                                           monkeypatch):
    _, samples = evaluated
    with_prior = [sample for sample in samples if sample.has_prior]
    manifest = write_manifest(tmp_path / "pairs.csv", with_prior[:1])
    predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    out = tmp_path / "pairs-predictions"
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    swapped = replace(with_prior[0], image=with_prior[0].prior_image, prior_image=with_prior[0].image)
    write_manifest(manifest, [swapped, with_prior[1]])  # a new row too, which would be generated
    monkeypatch.setattr("run.predict.Predictor", None)  # nothing may be loaded, let alone generated
    with pytest.raises(ConfigError, match=f"holds answers for {swapped.sample_id} but their manifest rows "
                                          r"\(question, interval, choices or files\) changed since"):
        predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_other_generation_settings_are_refused_before_the_rows_are_recorded(evaluated, trained_checkpoint, tmp_path):
    _, samples = evaluated
    manifest = write_manifest(tmp_path / "pairs.csv", samples[:2])
    predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    out = tmp_path / "pairs-predictions"
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    write_manifest(manifest, samples[:3])
    with pytest.raises(ConfigError, match="holds answers generated with other settings"):
        predict(predict_config(trained_checkpoint, f"manifest={manifest}", "max_new_tokens=3"))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_a_model_trained_on_one_image_answers_a_manifest_again_from_its_answers(evaluated, trained_checkpoint,
                                                                               tmp_path, capsys):
    import torch

    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["use_prior"] = False
    one_image = tmp_path / "one-image.ckpt"
    torch.save(checkpoint, one_image)
    _, samples = evaluated
    manifest = write_manifest(tmp_path / "pairs.csv", [sample for sample in samples if sample.has_prior][:2])
    first = predict(predict_config(one_image, f"manifest={manifest}"))
    assert [record["has_prior"] for record in first] == [False, False]
    assert "use_prior=false): the prior study is not shown to it" in capsys.readouterr().out
    assert predict(predict_config(one_image, f"manifest={manifest}")) == first


def test_answers_of_rows_taken_out_of_the_manifest_are_dropped_and_said_so(evaluated, trained_checkpoint, tmp_path,
                                                                         capsys):
    _, samples = evaluated
    manifest = write_manifest(tmp_path / "pairs.csv", samples[:3])
    predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    write_manifest(manifest, samples[1:3])
    again = predict(predict_config(trained_checkpoint, f"manifest={manifest}"))
    assert [record["sample_id"] for record in again] == [sample.sample_id for sample in samples[1:3]]
    assert f"dropped the earlier answers of 1 rows no longer in the manifest ({samples[0].sample_id})" in \
        capsys.readouterr().out
    assert set(json.loads((tmp_path / "pairs-predictions" / ROWS).read_text())) == {s.sample_id for s in samples[1:3]}


def test_a_prior_report_is_shown_as_the_models_mmxu_questions_showed_it(trained_checkpoint, jpeg_pair):
    current, prior, days = jpeg_pair
    report = "FINDINGS: Small left pleural effusion. The heart is normal.\nIMPRESSION: Left effusion."
    pair = make_pair("p", read_study_file(current), read_study_file(prior), "How has the left lung changed?",
                     options=["worse", "better", "same", "cannot tell"], interval_days=days, prior_report=report)
    predictor = Predictor(trained_checkpoint, accelerator="cpu")
    assert "history" not in predictor.settings  # trained without MMXU
    sample, warnings = predictor.as_trained(pair)
    assert sample.history is None and warnings[-1] == ("this model was trained without MMXU questions: the prior "
                                                       "report is not shown to it")
    predictor.settings["history"] = "global"
    sample, _ = predictor.as_trained(pair)
    assert sample.history == ("Report of the previous image: Small left pleural effusion. The heart is normal. "
                              "Left effusion.")
    assert sample.history in predictor.prompt(sample)
    difference = make_pair("p", read_study_file(current), read_study_file(prior), "difference", interval_days=days,
                           prior_report=report)
    sample, warnings = predictor.as_trained(difference)
    assert sample.history is None and warnings[-1].startswith("only MMXU's single-choice questions were trained with "
                                                              "the prior report")


def test_json_output_and_out_are_refused_in_the_mode_they_do_not_belong_to(trained_checkpoint, jpeg_pair, tmp_path):
    manifest = write_manifest(tmp_path / "pairs.csv", [])
    with pytest.raises(ConfigError, match="output=json is for one pair"):
        predict(predict_config(trained_checkpoint, f"manifest={manifest}", "output=json"))
    with pytest.raises(ConfigError, match="out= is where a manifest's answers go"):
        predict(predict_config(trained_checkpoint, f"current={jpeg_pair[0]}", "question=view", f"out={tmp_path}"))


# --- the command line -----------------------------------------------------------------------------------------


def run_predict(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "predict.py", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_missing_inputs_are_named_together_with_exit_code_2(tmp_path, trained_checkpoint):
    result = run_predict(f"ckpt={trained_checkpoint}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing current=<the current study's DICOM or image file> and question=" in result.stderr


def test_one_pair_prints_the_answer_the_interval_and_the_settings_and_json_on_request(jpeg_pair, trained_checkpoint,
                                                                                     tmp_path):
    current, prior, days = jpeg_pair
    args = [f"ckpt={trained_checkpoint}", f"current={current}", f"prior={prior}", "question=difference",
            f"interval_days={days}", "accelerator=cpu"]
    text = run_predict(*args)
    assert text.returncode == 0, text.stderr
    assert f"interval: {days} days (interval_days as given)" in text.stdout
    assert ("prompt settings (from the checkpoint): fusion_mode=difference, use_prior=True, interval_in_prompt=True, "
            "image_resize=pad, experts_in_prompt=False\n") in text.stdout
    assert "question: what has changed compared to the reference image?" in text.stdout
    answer = text.stdout.split("answer: ", 1)[1].strip()
    as_json = run_predict(*args, "output=json")
    assert as_json.returncode == 0, as_json.stderr
    parsed = json.loads(as_json.stdout)  # the whole output: log lines go to standard error
    assert parsed["answer"] == answer and parsed["interval"] == {"days": float(days), "source": "interval_days as given"}
    assert parsed["prompt_settings"]["fusion_mode"] == "difference"


# --- DICOM pairs --------------------------------------------------------------------------------------------------

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "MRN-0042-XYZ"


@pytest.fixture(scope="module")
def dicom_pair(jpeg_pair, tmp_path_factory):
    """The JPEG pair written as a 16-bit JPEG 2000 MONOCHROME1 current and an uncompressed MONOCHROME2 prior
    (no extension), 40 days apart by StudyDate, of one (made-up) patient."""
    from PIL import Image

    from datamodules.synthetic.dicoms import write_dicom

    directory = tmp_path_factory.mktemp("dicoms")
    current, prior, _ = jpeg_pair
    with Image.open(current) as image:
        write_dicom(image, directory / "current.dcm", study_date="20260310", patient_id=PATIENT_ID,
                    patient_name=PATIENT_NAME, photometric="MONOCHROME1", bits_stored=16,
                    compression="jpeg2000-lossless")
    with Image.open(prior) as image:
        write_dicom(image, directory / "prior", study_date="20260129", patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    return directory / "current.dcm", directory / "prior"


def test_dicoms_take_their_interval_from_their_study_dates(dicom_pair):
    pair = make_pair("p", *map(read_study_file, dicom_pair), "difference")
    assert (pair.interval.days, pair.interval.source) == (40.0, "StudyDate of both studies")
    assert pair.warnings == ()


def test_a_manifest_names_an_unreadable_dicom_and_a_prior_after_the_current_by_their_dates(dicom_pair, tmp_path):
    current, prior = dicom_pair
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(64))  # a tag longer than the file
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"current,prior,question\n{current},{prior},difference\n{broken},,view\n"
                        f"{prior},{current},difference\n")
    problems = Problems()
    read = read_manifest(manifest, problems)
    assert [pair.sample.sample_id for pair in read.pairs] == ["line-2"] and read.failed == {"line-3": 3, "line-4": 4}
    messages = "\n".join(problems.lines())
    assert f"{manifest} line 3, field current: {broken}: not a readable DICOM file" in messages
    assert (f"{manifest} line 4, field prior: the prior study is 40 days after the current one (by StudyDate): swap "
            "current and prior") in messages


def test_a_dicom_without_study_date_falls_back_to_its_acquisition_date_and_says_so(jpeg_pair, dicom_pair, tmp_path):
    from PIL import Image

    from datamodules.synthetic.dicoms import write_dicom

    with Image.open(jpeg_pair[0]) as image:
        current = write_dicom(image, tmp_path / "current.dcm", acquisition_date="20260301", patient_id=PATIENT_ID)
    pair = make_pair("p", read_study_file(current), read_study_file(dicom_pair[1]), "difference")
    assert (pair.interval.days, pair.interval.source) == (31.0, "AcquisitionDate and StudyDate")


def test_dicoms_of_different_patients_are_refused_unless_allowed(jpeg_pair, dicom_pair, tmp_path):
    from PIL import Image

    from datamodules.synthetic.dicoms import write_dicom

    with Image.open(jpeg_pair[1]) as image:
        other = write_dicom(image, tmp_path / "other.dcm", study_date="20260101", patient_id="MRN-9999")
    current, other = read_study_file(dicom_pair[0]), read_study_file(other)
    with pytest.raises(AskError, match="different PatientIDs") as error:
        make_pair("p", current, other, "difference")
    assert "MRN" not in str(error.value)
    assert make_pair("p", current, other, "difference", allow_different_patients=True).interval.days == 68.0


def test_a_lateral_view_is_warned_about(jpeg_pair, tmp_path):
    from PIL import Image

    from datamodules.synthetic.dicoms import write_dicom

    with Image.open(jpeg_pair[0]) as image:
        lateral = write_dicom(image, tmp_path / "lateral.dcm", study_date="20260101", view="LL")
    (warning,) = make_pair("p", read_study_file(lateral), None, "view").warnings
    assert "lateral view (ViewPosition LL)" in warning


def test_no_identifier_or_study_date_of_the_patient_is_printed_or_written(dicom_pair, trained_checkpoint, tmp_path):
    current, prior = dicom_pair
    one = run_predict(f"ckpt={trained_checkpoint}", f"current={current}", f"prior={prior}", "question=difference",
                      "accelerator=cpu")
    assert one.returncode == 0, one.stderr
    assert "interval: 40 days (StudyDate of both studies)" in one.stdout
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"current,prior,question\n{current},{prior},difference\n{current},,view\n")
    many = run_predict(f"ckpt={trained_checkpoint}", f"manifest={manifest}", "accelerator=cpu")
    assert many.returncode == 0, many.stderr
    written = "".join(path.read_text() for path in (tmp_path / "pairs-predictions").iterdir())
    for text in (one.stdout, one.stderr, many.stdout, many.stderr, written):
        for secret in ("Doe", "Jane", PATIENT_ID, "0042", "20260310", "20260129", "2026-03-10", "2026-01-29"):
            assert secret not in text
    assert sorted(path.name for path in (tmp_path / "pairs-predictions").iterdir()) == [
        FINGERPRINT, ROWS, "predictions.jsonl"]


# --- expert predictions ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def experts_checkpoint(trained_checkpoint, tmp_path_factory):
    """The trained checkpoint, saying it was trained with expert predictions in its prompts."""
    import torch

    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["experts_in_prompt"] = True
    path = tmp_path_factory.mktemp("experts-ckpt") / "last.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_model_trained_with_expert_predictions_is_refused_without_their_weights(experts_checkpoint):
    with pytest.raises(ConfigError, match=r"set experts.weights_dir=<the directory of TorchXRayVision's weight files>"):
        Predictor(experts_checkpoint, accelerator="cpu")


# The weights fixture writes the riken age network as TorchScript, as xrv ships it (torch marks that deprecated).
@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_a_model_trained_with_expert_predictions_gets_them_computed_from_the_image(experts_checkpoint, weights_dir,
                                                                                 dicom_pair):
    predictor = Predictor(experts_checkpoint, accelerator="cpu", experts_weights_dir=weights_dir)
    answer = predictor.ask(make_pair("p", *map(read_study_file, dicom_pair), "difference"))
    assert answer.sample.expert.startswith("Expert models' findings on the current image: atelectasis: ")
    assert answer.sample.expert in answer.prompt and "Estimated age:" in answer.sample.expert
