"""The data validation CLI: counts on a good copy, named errors and a non-zero exit on a bad one."""

import re
import shutil

import pandas as pd
import pytest

from datamodules.validate import main, validate
from tests import reference_validate


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


def test_the_column_wise_checks_report_what_the_sample_by_sample_checks_reported(world, data_copy, tmp_path):
    """The lines and problems of ``validate`` equal those of the checks it replaced
    (tests/reference_validate.py), on a copy with a problem of every kind the cross-checks find."""
    mimic, diffvqa_dir = data_copy / "mimic-cxr-jpg", data_copy / "medical-diff-vqa"
    questions = pd.read_csv(diffvqa_dir / "mimic_pair_questions.csv")
    studies = pd.read_csv(diffvqa_dir / "mimic_all.csv")
    metadata = pd.read_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", dtype={"dicom_id": str})
    splits = pd.read_csv(mimic / "mimic-cxr-2.0.0-split.csv.gz", dtype={"dicom_id": str})
    # An image moved to another split, one given to another study, one dated after its successor, one
    # removed from the metadata, two removed from disk.
    first, second, fourth = (studies.loc[i, "dicom_id"] for i in (3, 8, 20))
    reference = questions.loc[questions.question_type == "difference", "ref_id"].iloc[0]
    third = studies.set_index("study_id").loc[reference, "dicom_id"]
    splits.loc[splits.dicom_id == first, "split"] = "test" if questions.loc[0, "split"] != "test" else "train"
    metadata.loc[metadata.dicom_id == second, "study_id"] = 50000001
    metadata.loc[metadata.dicom_id == third, "StudyDate"] = 21991231
    metadata = metadata[metadata.dicom_id != fourth]
    metadata.to_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    splits.to_csv(mimic / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    for dicom_id in (studies.loc[30, "dicom_id"], studies.loc[31, "dicom_id"]):
        next((mimic / "files").rglob(f"{dicom_id}.jpg")).unlink()
    experts = (world / "experts" / "experts.csv").read_text().splitlines()
    (tmp_path / "experts.csv").write_text("\n".join(experts[:1] + experts[1::2]) + "\n")
    arguments = (mimic, diffvqa_dir, False, (), world / "prognostic" / "prognostic.jsonl", tmp_path / "experts.csv")
    new, old = validate(*arguments), reference_validate.validate(*arguments)
    assert new[0] == old[0]
    assert new[1] == [once_per_file(problem) for problem in old[1]]
    kinds = "\n".join(new[1])
    for kind in ("split differs from MIMIC's", "image of another study", "negative interval",
                 "image not in MIMIC metadata", "missing images", "question images without predictions"):
        assert kind in kinds


def once_per_file(problem: str) -> str:
    """The reference's image problems, each file named once: it checked a file again for each source
    whose samples use it (a Diff-VQA question and a prognostic question on the same image)."""
    head, _, rest = problem.partition(":\n    ")
    if not head.startswith("question images: "):
        return problem
    first: dict[str, str] = {}
    for example in rest.split("\n    "):
        first.setdefault(example.split(": ", 1)[0], example)
    count = len(first)
    head = re.sub(r"\d+ problems", f"{count} problems", head)
    return f"{head}:\n    " + "\n    ".join(first.values()) if count > 1 else next(iter(first.values()))


def test_questions_without_a_single_prior_image_are_checked(world, data_copy, capsys):
    path = data_copy / "medical-diff-vqa" / "mimic_pair_questions.csv"
    questions = pd.read_csv(path)
    questions[questions.question_type != "difference"].to_csv(path, index=False)
    arguments = (data_copy / "mimic-cxr-jpg", data_copy / "medical-diff-vqa")
    assert validate(*arguments) == reference_validate.validate(*arguments)
    assert validate(*arguments)[1] == []
