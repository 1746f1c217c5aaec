"""The data validation CLI: counts on a good copy, named errors and a non-zero exit on a bad one."""

import shutil

import pandas as pd
import pytest

from datamodules.validate import main


@pytest.fixture
def data_copy(world, tmp_path):
    """An editable copy of the world's tables and images."""
    shutil.copytree(world / "mimic-cxr-jpg", tmp_path / "mimic-cxr-jpg")
    shutil.copytree(world / "medical-diff-vqa", tmp_path / "medical-diff-vqa")
    return tmp_path


def run(root, capsys, *extra) -> tuple[int, str, str]:
    code = main(["--mimic-cxr-jpg", str(root / "mimic-cxr-jpg"), "--diffvqa", str(root / "medical-diff-vqa"), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_good_copy_passes_with_counts_per_split_and_type(world, capsys):
    code, out, err = run(world, capsys, "--read-images")
    assert code == 0 and err == ""
    assert "MIMIC-CXR-JPG:" in out and "Medical-Diff-VQA val: loaded" in out and "views: " in out
    assert "difference/difference" in out and "diagnostic/presence" in out
    assert "same-day pairs" in out and out.rstrip().endswith("no problems")


def test_a_missing_image_is_an_error_naming_sample_field_and_path(data_copy, capsys):
    questions = pd.read_csv(data_copy / "medical-diff-vqa" / "mimic_pair_questions.csv")
    studies = pd.read_csv(data_copy / "medical-diff-vqa" / "mimic_all.csv").set_index("study_id")
    row = questions.index[questions["split"] == "train"][0]
    study = studies.loc[questions.loc[row, "study_id"]]
    victim = next((data_copy / "mimic-cxr-jpg" / "files").rglob(f"{study.dicom_id}.jpg"))
    victim.unlink()
    code, _, err = run(data_copy, capsys)
    assert code == 1
    assert f"{victim}: missing (image of diffvqa-{row})" in err


def test_a_corrupt_image_is_found_when_reading_images(data_copy, capsys):
    victim = next((data_copy / "mimic-cxr-jpg" / "files").rglob("*.jpg"))
    victim.write_bytes(b"\xff\xd8 not really a jpeg")
    assert run(data_copy, capsys)[0] == 0  # it exists
    code, _, err = run(data_copy, capsys, "--read-images")
    assert code == 1 and "unreadable" in err and str(victim) in err


def test_a_malformed_row_is_an_error_naming_file_row_and_field(data_copy, capsys):
    path = data_copy / "medical-diff-vqa" / "mimic_pair_questions.csv"
    questions = pd.read_csv(path)
    questions.loc[3, "question_type"] = "colour"
    questions.to_csv(path, index=False)
    code, _, err = run(data_copy, capsys)
    assert code == 1
    assert f"{path} line 5, field question_type: unknown value 'colour'" in err


def test_prognostic_questions_and_expert_coverage_are_checked(world, capsys):
    code, out, err = run(world, capsys, "--prognostic", str(world / "prognostic" / "prognostic.jsonl"),
                         "--experts", str(world / "experts" / "experts.csv"))
    assert code == 0 and err == ""
    assert "prognostic train: loaded" in out and "experts " in out


def test_question_images_without_expert_predictions_are_an_error(data_copy, world, capsys):
    lines = (world / "experts" / "experts.csv").read_text().splitlines()
    partial = data_copy / "experts.csv"
    partial.write_text("\n".join(lines[:-3]) + "\n")
    code, _, err = run(data_copy, capsys, "--experts", str(partial))
    assert code == 1 and "question images without predictions" in err


def test_prognostic_needs_diffvqa(world, capsys):
    with pytest.raises(SystemExit):
        main(["--mimic-cxr-jpg", str(world / "mimic-cxr-jpg"), "--mmxu", str(world / "mmxu" / "MMXU-test.jsonl"),
              "--prognostic", str(world / "prognostic" / "prognostic.jsonl")])
    assert "--prognostic needs --diffvqa" in capsys.readouterr().err
