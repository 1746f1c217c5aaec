"""The Medical-Diff-VQA adapter on the synthetic world's files (and small edited copies of them)."""

import shutil
from datetime import date

import pandas as pd
import pytest

from common.readers import InputError
from datamodules.diffvqa import load_diffvqa
from datamodules.mimic import days_between, image_path, image_paths


@pytest.fixture
def world_copy(world, tmp_path):
    """An editable copy of the Diff-VQA tables (the images stay in the session world)."""
    copy = tmp_path / "medical-diff-vqa"
    shutil.copytree(world / "medical-diff-vqa", copy)
    return copy


def test_study_dates_give_signed_day_intervals():
    assert days_between(21500301, 21500226) == 3  # across February of a non-leap year
    assert days_between(21500226, 21500301) == -3


def test_image_paths_follow_the_mimic_cxr_jpg_layout(tmp_path):
    path = image_path(tmp_path, 10000032, 50414267, "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014")
    assert path == tmp_path / "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"


def test_difference_questions_get_the_prior_image_and_the_interval_from_study_dates(world):
    samples, _ = load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "train")
    studies = pd.read_csv(world / "medical-diff-vqa" / "mimic_all.csv").set_index("study_id")
    differences = [s for s in samples if s.task == "difference"]
    assert differences
    for sample in differences:
        current, prior = studies.loc[sample.study_id], studies.loc[sample.prior_study_id]
        expected = (date.fromisoformat(str(current.study_date)) - date.fromisoformat(str(prior.study_date))).days
        assert sample.interval_days == expected >= 0
        assert sample.prior_image.name == f"{prior.dicom_id}.jpg" and sample.prior_image.is_file()
        assert sample.image.is_file()


def test_diagnostic_questions_never_use_the_reference(world):
    samples, report = load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "train")
    diagnostic = [s for s in samples if s.task == "diagnostic"]
    assert {s.question_type for s in diagnostic} == {"abnormality", "presence", "view", "location", "level", "type"}
    assert all(not s.has_prior for s in diagnostic)
    assert report.loaded["diagnostic"] == len(diagnostic)


def test_sample_ids_point_at_the_csv_row(world):
    samples, _ = load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "val")
    rows = pd.read_csv(world / "medical-diff-vqa" / "mimic_pair_questions.csv")
    for sample in samples[:20]:
        row = rows.iloc[int(sample.sample_id.removeprefix("diffvqa-"))]
        assert (row.study_id, row.question) == (sample.study_id, sample.question)
        assert row.answer.strip() == sample.answer


def test_a_difference_row_whose_reference_is_later_is_skipped_and_counted(world, world_copy):
    table = pd.read_csv(world_copy / "mimic_pair_questions.csv")
    row = table.index[(table.question_type == "difference") & (table.split == "train")][0]
    study, reference = table.loc[row, "study_id"], table.loc[row, "ref_id"]
    table.loc[row, ["study_id", "ref_id"]] = [reference, study]  # now the reference is the later study
    table.to_csv(world_copy / "mimic_pair_questions.csv", index=False)
    samples, report = load_diffvqa(world_copy, world / "mimic-cxr-jpg", "train")
    assert report.skipped["ref_later"] == 1
    assert f"diffvqa-{row}" not in {s.sample_id for s in samples}


def test_duplicate_difference_rows_are_kept_once_and_counted(world, world_copy):
    table = pd.read_csv(world_copy / "mimic_pair_questions.csv")
    before, before_report = load_diffvqa(world_copy, world / "mimic-cxr-jpg", "train")
    row = table[(table.question_type == "difference") & (table.split == "train")].iloc[[0]]
    pd.concat([table, row, row]).to_csv(world_copy / "mimic_pair_questions.csv", index=False)
    after, after_report = load_diffvqa(world_copy, world / "mimic-cxr-jpg", "train")
    assert len(after) == len(before)
    assert after_report.skipped["duplicate"] == before_report.skipped["duplicate"] + 2


def test_answers_with_the_generators_trailing_space_are_stripped_and_still_deduplicated(world, world_copy):
    table = pd.read_csv(world_copy / "mimic_pair_questions.csv")
    before, before_report = load_diffvqa(world_copy, world / "mimic-cxr-jpg", "train")
    row = table[(table.question_type == "difference") & (table.split == "train")].iloc[[0]]
    table["answer"] = table["answer"] + " "  # as v1.0.1 writes many of its answers
    pd.concat([table, row]).to_csv(world_copy / "mimic_pair_questions.csv", index=False)
    after, after_report = load_diffvqa(world_copy, world / "mimic-cxr-jpg", "train")
    assert [s.answer for s in after] == [s.answer for s in before]
    assert after_report.skipped["duplicate"] == before_report.skipped["duplicate"] + 1


def test_without_prior_difference_questions_see_only_the_current_image(world):
    samples, _ = load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "train", use_prior=False)
    differences = [s for s in samples if s.task == "difference"]
    assert differences and all(not s.has_prior and s.interval_days is None for s in differences)


def test_unknown_split_is_an_error(world):
    with pytest.raises(ValueError, match=r"unknown Medical-Diff-VQA split 'validate'"):
        load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "validate")


def test_a_question_about_an_unknown_study_names_file_row_and_field(world, world_copy):
    table = pd.read_csv(world_copy / "mimic_pair_questions.csv")
    table.loc[3, "study_id"] = 59999999
    table.to_csv(world_copy / "mimic_pair_questions.csv", index=False)
    split = table.loc[3, "split"]
    with pytest.raises(InputError, match=r"mimic_pair_questions.csv line 5, field study_id: study 59999999 is not in "):
        load_diffvqa(world_copy, world / "mimic-cxr-jpg", split)


def test_a_table_without_a_required_column_is_named(world, world_copy):
    pd.read_csv(world_copy / "mimic_all.csv").drop(columns="study_date").to_csv(world_copy / "mimic_all.csv", index=False)
    with pytest.raises(ValueError, match=r"mimic_all.csv: missing columns \['study_date'\]"):
        load_diffvqa(world_copy, world / "mimic-cxr-jpg", "train")


def test_paper_test_policy_keeps_one_study_per_subject(world):
    every, every_report = load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "test")
    one, report = load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "test",
                               test_policy="one_study_per_subject")
    studies_per_subject = pd.Series({s.study_id: s.subject_id for s in one}).value_counts()
    assert studies_per_subject.max() == 1
    assert {s.subject_id for s in one} == {s.subject_id for s in every}
    # Every test row is counted once: loaded, or skipped for one reason (the policy is checked first).
    assert (len(one) + report.skipped["other_study_of_subject"] + report.skipped["duplicate"]
            == len(every) + every_report.skipped["duplicate"])
    assert report.skipped["other_study_of_subject"] > 0
    again, _ = load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "test",
                            test_policy="one_study_per_subject")
    assert [s.sample_id for s in again] == [s.sample_id for s in one]


def test_unknown_test_policy_is_a_clear_error(world):
    with pytest.raises(ValueError, match="test_policy='latest'"):
        load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "test", test_policy="latest")


@pytest.mark.parametrize("root", ["/data/mimic", "data/mimic/", "", ".", "./data//mimic"])
def test_image_paths_of_many_images_are_their_image_paths(root):
    ids = [(10000032, 50414267, "02aa804e-bde0afdd"), (9, 1, "x.y"), (123456789, 98765432, "a b")]
    paths = image_paths(root, *zip(*ids)).to_pylist()
    assert paths == [str(image_path(root, *image)) for image in ids]
