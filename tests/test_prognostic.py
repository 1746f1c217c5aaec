"""Prognostic instructions: templates, the rules backend, the LLM backend, the synthetic ground
truth and the loader."""

import json
from datetime import date, timedelta

import pytest

from common.readers import InputError
from datamodules.prognostic import RECORD_KEYS, load_prognostic
from datamodules.prognostic_builder import MAX_DAYS, TEMPLATES, ask, build_prognostic, draw_question, rules_answer
from datamodules.synthetic.population import FINDING_BY_NAME, SITES, Study, simulate_population
from datamodules.synthetic.prognostic_truth import prognosis
from tests.helpers import read_jsonl
from tests.test_llm import build_twice


def test_there_are_100_distinct_templates_each_asking_about_a_number_of_days():
    assert len(TEMPLATES) == len(set(TEMPLATES)) == 100
    assert all(template.count("{days}") == 1 for template in TEMPLATES)
    assert ask(0, 30) == "What changes can be expected in this patient's chest X-ray in 30 days?"
    assert ask(3, 1) == "What changes can be expected in this patient's chest X-ray in 1 day's time?"
    assert ask(3, 7) == "What changes can be expected in this patient's chest X-ray in 7 days' time?"


def test_a_rows_question_is_drawn_from_its_row_alone():
    assert draw_question(0, 17) == draw_question(0, 17)
    draws = [draw_question(0, row) for row in range(2000)]
    assert {template for template, _ in draws} == set(range(100))
    days = [days for _, days in draws]
    assert min(days) == 1 and max(days) <= MAX_DAYS and sum(d > 60 for d in days) > 400
    assert draw_question(1, 17) != draw_question(0, 17) or draw_question(1, 18) != draw_question(0, 18)


@pytest.mark.parametrize("difference, interval, days, expected", [
    ("nothing has changed.", 10, 30, "No change is expected in 30 days."),
    ("the level of pleural effusion has changed from small to moderate.", 20, 10,
     "In 10 days, the pleural effusion is expected to remain moderate."),
    ("the level of pleural effusion has changed from small to moderate.", 20, 40,
     "In 40 days, the pleural effusion is expected to keep increasing."),
    ("the level of cardiomegaly has changed from severe to mild.", 5, 6,
     "In 6 days, the cardiomegaly is expected to keep decreasing."),
    ("the main image has an additional finding of atelectasis than the reference image.", 3, 1,
     "In 1 day, the atelectasis is expected to persist."),
    ("the main image has additional findings of edema, and pneumonia than the reference image. "
     "the main image is missing the finding of atelectasis than the reference image.", 3, 90,
     "In 90 days, the edema is expected to resolve. The pneumonia is expected to resolve. "
     "The atelectasis is not expected to recur."),
    # A level sentence that reads two ways: its finding persists, then keeps rising as both readings do.
    ("the main image has an additional finding of atelectasis than the reference image. "
     "the level of edema has changed from mild to moderate to severe.", 3, 1,
     "In 1 day, the edema is expected to persist. The atelectasis is expected to persist."),
    ("the level of edema has changed from mild to moderate to severe.", 3, 100,
     "In 100 days, the edema is expected to keep increasing."),
])
def test_rules_carry_the_difference_forward(difference, interval, days, expected):
    assert rules_answer(difference, interval, days) == expected


def test_rules_refuse_an_answer_outside_the_difference_grammar():
    with pytest.raises(ValueError, match="grammar"):
        rules_answer("the effusion looks a bit bigger", 3, 10)


def test_the_rules_backend_names_the_question_row_it_cannot_answer(world, tmp_path):
    import shutil

    import pandas as pd

    shutil.copytree(world / "medical-diff-vqa", tmp_path / "dvqa")
    table = pd.read_csv(tmp_path / "dvqa" / "mimic_pair_questions.csv")
    row = int(table.index[(table["question_type"] == "difference") & (table["split"] == "train")][0])
    table.loc[row, "answer"] = "the effusion looks a bit bigger"
    table.to_csv(tmp_path / "dvqa" / "mimic_pair_questions.csv", index=False)
    with pytest.raises(InputError, match=rf"mimic_pair_questions.csv line {row + 2}, field answer: .*grammar"):
        build_prognostic(tmp_path / "dvqa", "rules")


def _study(day: int = 0, **levels) -> Study:
    named = {site: 0 for site in SITES}
    for (finding, site) in SITES:
        named[finding, site] = levels.get(f"{finding.name}/{site}", 0)
    return Study(1, 2, date(2100, 1, 1) + timedelta(days=day), 0.0, "PA", tuple(named[key] for key in SITES), (),
                 "train")


EFFUSION = {"pleural effusion/left": 2}


def test_the_synthetic_truth_reads_the_course_from_the_prior_study():
    now = _study(60, **EFFUSION)
    new, persisting = _study(0), _study(0, **EFFUSION)
    # Tomorrow nothing has changed either way.
    assert prognosis(now, 1, new) == prognosis(now, 1, persisting) == (
        "In 1 day, the pleural effusion is expected to remain moderate.")
    # A month on, a new (acute) effusion has resolved, a persisting (chronic) one has not.
    assert prognosis(now, 30, new) == "In 30 days, the pleural effusion is expected to resolve."
    assert prognosis(now, 30, persisting) == "In 30 days, the pleural effusion is expected to remain moderate."
    # A year on, even a chronic one has more likely gone.
    assert prognosis(now, 365, persisting) == "In 365 days, the pleural effusion is expected to resolve."
    assert prognosis(_study(60), 30, new) == "No change is expected in 30 days."
    assert FINDING_BY_NAME["pleural effusion"].levels[1] == "moderate"


def test_the_prior_study_changes_about_a_quarter_of_the_prognoses():
    """Without the prior (the best forecast from the current study alone), a model must be wrong on
    the questions where the course matters: the two-image model's room to be better."""
    studies = simulate_population(300, 0)
    pairs = [(prior, now) for prior, now in zip(studies, studies[1:]) if prior.subject_id == now.subject_id]
    changed = sum(prognosis(now, draw_question(0, row)[1], prior) != prognosis(now, draw_question(0, row)[1])
                  for row, (prior, now) in enumerate(pairs))
    assert 0.15 < changed / len(pairs) < 0.4


def test_the_world_writes_one_truth_record_per_difference_pair_with_the_builders_draws(world):
    truth = read_jsonl(world / "prognostic" / "prognostic.jsonl")
    built, reports = build_prognostic(world / "medical-diff-vqa", "rules")
    built.sort(key=lambda record: record["source_row"])
    assert [r["id"] for r in truth] == [r["id"] for r in built]
    assert sum(report.loaded["difference"] for report in reports.values()) == len(built)
    for t, b in zip(truth, built):
        assert list(t) == list(b) == list(RECORD_KEYS)
        same = ("source_row", "split", "study_id", "ref_id", "interval_days", "template_id", "days", "question")
        assert all(t[key] == b[key] for key in same)
    assert {r["backend"] for r in truth} == {"synthetic-truth"} and {r["backend"] for r in built} == {"rules"}


def test_the_llm_backend_asks_with_the_difference_and_both_intervals_and_resumes(world, tmp_path, monkeypatch):
    out = tmp_path / "prognostic.jsonl"
    asked, server = build_twice("prognostic", world, out, monkeypatch)
    records = read_jsonl(out)
    assert asked == len(records) == len(server.requests) > 0
    first = records[0]
    assert first["answer"] == (f"Days between the prior and the current study: {first['interval_days']:g}\n"
                               f"Change from the prior to the current study: {first['difference_answer']}\n"
                               f"Question: {first['question']}").upper()
    assert (first["model"], first["prompt_version"], first["split"]) == ("llama", "prognostic-v1", "test")


def test_the_loader_gives_two_image_samples_with_the_interval(world):
    samples, report = load_prognostic(world / "prognostic" / "prognostic.jsonl", world / "medical-diff-vqa",
                                      world / "mimic-cxr-jpg", "train")
    truth = {r["id"]: r for r in read_jsonl(world / "prognostic" / "prognostic.jsonl")}
    assert report.loaded["prognostic"] == len(samples) == sum(r["split"] == "train" for r in truth.values())
    for sample in samples:
        record = truth[sample.sample_id]
        assert sample.task == "prognostic" and sample.answer == record["answer"]
        assert sample.image.is_file() and sample.prior_image.is_file()
        assert sample.interval_days == record["interval_days"] > 0
        assert f"s{record['ref_id']}" in str(sample.prior_image)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("days"), r"line 2: missing field\(s\) \['days'\]"),
    (lambda r: r.update(split="validate"), "line 2, field split: unknown value 'validate'"),
    (lambda r: r.update(interval_days=r["interval_days"] + 1), "line 2, field interval_days"),
    (lambda r: r.update(ref_id=1), "line 2, field ref_id: study 1 is not in"),
])
def test_a_bad_record_is_named_by_line_and_field(world, tmp_path, change, message):
    records = [r for r in read_jsonl(world / "prognostic" / "prognostic.jsonl") if r["split"] == "train"][:3]
    change(records[1])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises((ValueError, KeyError), match=message):
        load_prognostic(path, world / "medical-diff-vqa", world / "mimic-cxr-jpg", "train")
