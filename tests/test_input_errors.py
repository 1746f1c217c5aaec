"""Broken and unusual input files: each problem is a named error (file, line as a person opens it,
field, what was found, what to do), never a traceback; ``validate`` reads on and reports them all,
cross-checks the tables against each other, and exits 1."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from common.errors import UsageError
from common.readers import InputError, Problems, read_csv
from datamodules.diffvqa import load_diffvqa
from datamodules.experts import load_experts
from datamodules.mimic import load_images
from datamodules.mmxu import load_mmxu
from datamodules.prognostic import load_prognostic
from datamodules.enhance import load_enhanced
from datamodules.validate import main

METADATA = "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz"
QUESTIONS = "medical-diff-vqa/mimic_pair_questions.csv"
STUDIES = "medical-diff-vqa/mimic_all.csv"
MMXU = "mmxu/MMXU-dev.jsonl"


@pytest.fixture
def copy(world, tmp_path) -> Path:
    """An editable copy of the world's files; the images are linked, not copied."""
    root = tmp_path / "world"
    shutil.copytree(world, root, ignore=shutil.ignore_patterns("*.jpg"))
    for image in (world / "mimic-cxr-jpg" / "files").rglob("*.jpg"):
        (root / image.relative_to(world)).symlink_to(image)
    return root


def validate(root: Path, capsys, *extra: str, diffvqa: bool = True) -> tuple[int, str, str]:
    args = ["--mimic-cxr-jpg", str(root / "mimic-cxr-jpg"), *extra]
    code = main(args + (["--diffvqa", str(root / "medical-diff-vqa")] if diffvqa else []))
    out = capsys.readouterr()
    return code, out.out, out.err


def edit_lines(path: Path, edit) -> None:
    """Rewrites a (gzipped) text file's lines as bytes: ``edit(lines)`` changes the list in place."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    edit(lines)
    with opener(path, "wb") as handle:
        handle.write(b"\n".join(lines))


def latin1(lines: list[bytes], index: int) -> None:
    """Puts a Latin-1 'é' (0xe9, not UTF-8) at the start of line ``index + 1``'s second field."""
    head, sep, tail = lines[index].partition(b",")
    lines[index] = head + sep + b"\xe9" + tail


def first_question_row(root: Path, split: str = "train") -> int:
    questions = pd.read_csv(root / QUESTIONS)
    return int(questions.index[questions["split"] == split][0])


# ---------------------------------------------------------------------------------------------
# The table, through the validation CLI


@pytest.mark.parametrize("cut", [8, 200], ids=["trailer", "body"])
def test_a_truncated_gzip_table_is_named_and_the_diffvqa_report_still_runs(copy, capsys, cut):
    path = copy / METADATA
    path.write_bytes(path.read_bytes()[:-cut])
    code, out, err = validate(copy, capsys)
    assert code == 1
    assert f"{path}: the gzip stream is truncated or corrupt" in err
    assert "download the file again" in err
    assert "MIMIC-CXR-JPG tables: not loaded" in out
    assert "Medical-Diff-VQA train: loaded" in out  # it does not need the metadata


def test_a_non_utf8_byte_in_the_questions_is_named_once_with_its_line_and_column(copy, capsys):
    edit_lines(copy / QUESTIONS, lambda lines: latin1(lines, 4))
    code, out, err = validate(copy, capsys)
    column = (copy / QUESTIONS).read_bytes().split(b"\n")[4].index(b"\xe9") + 1
    assert code == 1
    assert err.count("is not UTF-8") == 1
    assert f"{copy / QUESTIONS} line 5: byte 0xe9 at column {column} is not UTF-8; the file must be UTF-8" in err
    assert "Medical-Diff-VQA: not loaded" in out and "MIMIC-CXR-JPG: " in out


def test_a_non_utf8_byte_in_an_mmxu_line_names_the_line_and_the_rest_loads(copy, capsys):
    lines = (copy / MMXU).read_text().splitlines()
    edit_lines(copy / MMXU, lambda raw: raw.__setitem__(1, raw[1].replace(b"How", b"H\xe9w", 1)))
    code, out, err = validate(copy, capsys, "--mmxu", str(copy / MMXU), diffvqa=False)
    assert code == 1
    assert f"{copy / MMXU} line 2: byte 0xe9 at column" in err and "is not UTF-8" in err
    assert f"MMXU {copy / MMXU}: loaded {len(lines) - 1} mmxu" in out


@pytest.mark.parametrize("content", [b"", gzip.compress(b"")], ids=["zero-bytes", "empty-gzip"])
def test_an_empty_metadata_table_is_named(copy, capsys, content):
    (copy / METADATA).write_bytes(content)
    code, _, err = validate(copy, capsys)
    assert code == 1 and f"{copy / METADATA}: the file is empty: expected MIMIC-CXR-JPG's" in err


def test_an_empty_question_file_is_an_error(copy, capsys):
    (copy / QUESTIONS).write_bytes(b"")
    code, out, err = validate(copy, capsys)
    assert code == 1 and f"{copy / QUESTIONS}: the file is empty" in err
    assert "Medical-Diff-VQA: not loaded" in out


def test_a_question_file_with_a_header_and_no_rows_is_an_error(copy, capsys):
    (copy / QUESTIONS).write_text((copy / QUESTIONS).read_text().splitlines()[0] + "\n")
    code, _, err = validate(copy, capsys)
    assert code == 1 and f"{copy / QUESTIONS}: a header and no rows: expected Medical-Diff-VQA's" in err


def test_an_empty_mmxu_file_is_an_error(copy, capsys):
    (copy / MMXU).write_text("\n\n")
    code, _, err = validate(copy, capsys, "--mmxu", str(copy / MMXU), diffvqa=False)
    assert code == 1 and f"{copy / MMXU}: the file is empty: expected an MMXU JSONL file" in err


def test_an_empty_study_date_names_the_line_the_field_and_the_fix(copy, capsys):
    table = pd.read_csv(copy / METADATA, dtype={"dicom_id": str})
    table["StudyDate"] = table["StudyDate"].astype("Int64")
    table.loc[5, "StudyDate"] = pd.NA
    table.to_csv(copy / METADATA, index=False)
    code, out, err = validate(copy, capsys)
    assert code == 1
    assert (f"{copy / METADATA} line 7, field StudyDate: empty; restore the row from the original PhysioNet file"
            in err)
    assert f"MIMIC-CXR-JPG: {len(table) - 1} images" in out  # the other rows still load


def test_a_diffvqa_study_missing_from_the_mimic_metadata_is_found(copy, capsys):
    questions, studies = pd.read_csv(copy / QUESTIONS), pd.read_csv(copy / STUDIES, dtype={"dicom_id": str})
    row = first_question_row(copy)
    dicom_id = studies.set_index("study_id").loc[questions.loc[row, "study_id"], "dicom_id"]
    edit_lines(copy / METADATA, lambda lines: lines.__setitem__(
        slice(None), [line for line in lines if not line.startswith(dicom_id.encode())]))
    code, _, err = validate(copy, capsys)
    assert code == 1
    assert (f"{copy / QUESTIONS} line {row + 2}, field image: diffvqa-{row}: image {dicom_id} is not in the "
            "MIMIC-CXR-JPG metadata") in err


def test_a_question_in_another_split_than_mimics_is_found(copy, capsys):
    questions = pd.read_csv(copy / QUESTIONS)
    row = first_question_row(copy)
    questions.loc[row, "split"] = "test"
    questions.to_csv(copy / QUESTIONS, index=False)
    code, _, err = validate(copy, capsys)
    assert code == 1
    assert f"{copy / QUESTIONS} line {row + 2}, field image: diffvqa-{row}: a test question, but MIMIC-CXR-JPG " in err


def test_a_study_date_that_disagrees_with_mimic_is_found(copy, capsys):
    questions = pd.read_csv(copy / QUESTIONS)
    difference = questions[(questions["question_type"] == "difference") & (questions["split"] == "train")]
    row, study_id = int(difference.index[0]), int(difference["study_id"].iloc[0])
    studies = pd.read_csv(copy / STUDIES, dtype={"dicom_id": str})
    studies.loc[studies["study_id"] == study_id, "study_date"] += 1  # one day later than MIMIC says
    studies.to_csv(copy / STUDIES, index=False)
    code, _, err = validate(copy, capsys)
    assert code == 1
    assert f"line {row + 2}, field prior_image: diffvqa-{row}: interval " in err
    assert "but the MIMIC dates give" in err


def test_repeats_of_one_problem_are_counted_and_the_first_five_listed(copy, capsys):
    questions = pd.read_csv(copy / QUESTIONS)
    questions.loc[:11, "question_type"] = "colour"
    questions.to_csv(copy / QUESTIONS, index=False)
    code, _, err = validate(copy, capsys)
    assert code == 1
    assert f"{copy / QUESTIONS}: 12 problems with unknown question_type (the first 5 listed):" in err
    assert err.count("unknown value 'colour'") == 5
    assert f"{copy / QUESTIONS} line 2, field question_type: unknown value 'colour'" in err


def test_every_file_is_read_and_every_kind_of_problem_reported_in_one_run(copy, capsys):
    edit_lines(copy / METADATA, lambda lines: lines.__setitem__(3, lines[3].replace(b",", b",x", 1)))  # subject_id
    questions = pd.read_csv(copy / QUESTIONS)
    questions.loc[2, "split"] = "dev"
    questions.to_csv(copy / QUESTIONS, index=False)
    edit_lines(copy / "prognostic/prognostic.jsonl", lambda lines: lines.__setitem__(0, b"{not json"))
    edit_lines(copy / "experts/experts.csv", lambda lines: latin1(lines, 2))
    code, out, err = validate(copy, capsys, "--prognostic", str(copy / "prognostic/prognostic.jsonl"),
                              "--experts", str(copy / "experts/experts.csv"), "--mmxu", str(copy / MMXU))
    assert code == 1
    assert f"{copy / METADATA} line 4, field subject_id: 'x" in err and "is not a whole number" in err
    assert f"{copy / QUESTIONS} line 4, field split: unknown value 'dev'" in err
    assert f"{copy / 'prognostic/prognostic.jsonl'} line 1: not JSON" in err
    assert f"{copy / 'experts/experts.csv'} line 3: byte 0xe9" in err
    for loaded in ("MIMIC-CXR-JPG: ", "Medical-Diff-VQA train: loaded", "prognostic train: loaded", "MMXU "):
        assert loaded in out


def test_enhanced_answers_are_read_and_matched_against_the_questions(copy, capsys):
    from datamodules.build import main as build

    enhanced = copy / "enhanced.jsonl"
    build(["enhance", "--diffvqa", str(copy / "medical-diff-vqa"), "--out", str(enhanced)])
    code, out, err = validate(copy, capsys, "--enhanced", str(enhanced))
    assert code == 0, err
    records = enhanced.read_text().splitlines()
    first = json.loads(records[0])
    enhanced.write_text("\n".join([records[0], records[0], *records[2:]]) + "\n")
    code, out, err = validate(copy, capsys, "--enhanced", str(enhanced))
    assert code == 1
    assert f"{enhanced} line 2, field sample_id: {first['sample_id']} repeats line 1" in err
    assert "no answer for diffvqa-1" in err


def test_a_non_utf8_prior_report_is_named(copy, capsys):
    test_file = copy / "mmxu/MMXU-test.jsonl"  # the public schema: no prior_report, read from the reports tree
    prior = Path(json.loads(test_file.read_text().splitlines()[0])["prior_image_path"])
    report = copy / "mimic-cxr-reports/files" / prior.parent.parent.relative_to("files") / f"{prior.parent.name}.txt"
    report.write_bytes(report.read_bytes() + b"\n\xe9\n")
    code, _, err = validate(copy, capsys, "--mmxu", str(test_file), "--history", "global",
                            "--reports-root", str(copy / "mimic-cxr-reports"), diffvqa=False)
    lines = report.read_bytes().count(b"\n")
    assert code == 1 and f"{report} line {lines}: byte 0xe9 at column 1 is not UTF-8" in err


# ---------------------------------------------------------------------------------------------
# The loaders: the first problem raises a UsageError (no traceback from the entry points);
# with a Problems collector the row is left out and reading goes on


def test_loaders_raise_a_usage_error_naming_the_line_and_collect_when_asked(copy):
    table = pd.read_csv(copy / METADATA, dtype={"dicom_id": str})
    table["StudyTime"] = table["StudyTime"].astype(object)
    table.loc[[1, 4], "StudyTime"] = "noon"
    table.to_csv(copy / METADATA, index=False)
    with pytest.raises(UsageError, match=r"metadata.csv.gz line 3, field StudyTime: StudyTime 'noon' is not a number"):
        load_images(copy / "mimic-cxr-jpg")
    problems = Problems()
    images = load_images(copy / "mimic-cxr-jpg", problems)
    assert len(images) == len(table) - 2 and len(problems) == 2
    assert [error.line for error in problems.examples[(str(copy / METADATA), "malformed StudyTime")]] == [3, 6]


@pytest.mark.parametrize("loader", ["diffvqa", "prognostic", "mmxu", "experts", "enhanced"])
def test_every_reader_names_a_missing_file(copy, tmp_path, loader):
    absent = tmp_path / "absent"
    calls = {
        "diffvqa": lambda: load_diffvqa(absent, copy / "mimic-cxr-jpg", "train"),
        "prognostic": lambda: load_prognostic(absent / "p.jsonl", copy / "medical-diff-vqa", copy / "mimic-cxr-jpg",
                                              "train"),
        "mmxu": lambda: load_mmxu(absent / "m.jsonl", copy / "mimic-cxr-jpg"),
        "experts": lambda: load_experts(absent / "e.csv"),
        "enhanced": lambda: load_enhanced(absent / "e.jsonl"),
    }
    with pytest.raises(InputError, match=f"{absent}.*: not found: expected "):
        calls[loader]()


def test_csv_lines_are_the_lines_a_person_opens_even_with_multiline_values_and_blank_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('a,b\n1,"two\nlines"\n\n3,x\n4,y\n')
    table = read_csv(path, ["a", "b"], "a test table")
    assert table.frame["a"].tolist() == [1, 3, 4]
    assert [table.line(row) for row in range(3)] == [2, 5, 6]


def test_a_row_with_too_many_fields_is_named_by_its_line_even_after_a_multiline_value(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('a,b\n1,"two\nlines"\n3,4,5\n')
    with pytest.raises(InputError, match=r"t.csv line 4: malformed CSV \("):
        read_csv(path, ["a", "b"], "a test table")


def test_a_whitespace_only_line_is_not_a_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n   \n3,\n")
    table = read_csv(path, ["a", "b"], "a test table")
    assert len(table.frame) == 2 and table.line(1) == 4


# ---------------------------------------------------------------------------------------------
# The same classes of problem for every reader, through one validation run with every file

FILES = {
    "metadata": METADATA, "split": "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz", "studies": STUDIES,
    "questions": QUESTIONS, "prognostic": "prognostic/prognostic.jsonl", "experts": "experts/experts.csv",
    "mmxu": MMXU, "enhanced": "enhanced.jsonl",
}


def validate_everything(copy: Path, capsys) -> tuple[int, str, str]:
    if not (copy / FILES["enhanced"]).exists():
        from datamodules.build import main as build

        build(["enhance", "--diffvqa", str(copy / "medical-diff-vqa"), "--out", str(copy / FILES["enhanced"])])
    return validate(copy, capsys, *(f"--{name}={copy / FILES[name]}" for name in ("prognostic", "experts", "mmxu",
                                                                                  "enhanced")))


def test_the_untouched_copy_has_no_problem(copy, capsys):
    code, _, err = validate_everything(copy, capsys)
    assert code == 0, err


@pytest.mark.parametrize("name", list(FILES))
def test_a_non_utf8_byte_is_named_in_every_reader(copy, capsys, name):
    validate_everything(copy, capsys)  # builds the enhanced file first
    edit_lines(copy / FILES[name], lambda lines: lines.__setitem__(2, lines[2][:5] + b"\xe9" + lines[2][5:]))
    code, _, err = validate_everything(copy, capsys)
    assert code == 1 and f"{copy / FILES[name]} line 3: byte 0xe9 at column 6 is not UTF-8" in err


@pytest.mark.parametrize("name", list(FILES))
def test_an_empty_file_is_named_in_every_reader(copy, capsys, name):
    validate_everything(copy, capsys)
    path = copy / FILES[name]
    path.write_bytes(gzip.compress(b"") if path.suffix == ".gz" else b"")
    code, _, err = validate_everything(copy, capsys)
    assert code == 1 and f"{path}: the file is empty" in err


@pytest.mark.parametrize("name", ["metadata", "split"])
def test_a_corrupt_gzip_stream_is_named(copy, capsys, name):
    path = copy / FILES[name]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the deflate stream
    path.write_bytes(bytes(data))
    code, _, err = validate_everything(copy, capsys)
    assert code == 1 and f"{path}: the gzip stream is truncated or corrupt" in err


@pytest.mark.parametrize(("name", "column"), [
    ("metadata", "study_id"), ("split", "split"), ("studies", "study_date"), ("questions", "answer"),
    ("experts", "Effusion"),
])
def test_an_empty_required_value_is_named_by_line_and_field(copy, capsys, name, column):
    path = copy / FILES[name]
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[1, column] = ""
    table.to_csv(path, index=False)
    code, _, err = validate_everything(copy, capsys)
    assert code == 1 and f"{path} line 3, field {column}: " in err
    if name != "experts":  # the expert CSV says what a probability must be
        assert f"{path} line 3, field {column}: empty" in err


def test_a_problem_met_once_per_split_is_reported_once(copy, capsys):
    edit_lines(copy / FILES["prognostic"], lambda lines: lines.__setitem__(0, b"{not json"))
    code, _, err = validate(copy, capsys, "--prognostic", str(copy / FILES["prognostic"]))
    assert code == 1 and err.count("line 1: not JSON") == 1


def test_each_file_is_read_when_another_cannot_be(copy, capsys):
    (copy / METADATA).write_bytes(b"")
    (copy / STUDIES).write_bytes(b"")
    edit_lines(copy / FILES["split"], lambda lines: latin1(lines, 2))
    edit_lines(copy / QUESTIONS, lambda lines: latin1(lines, 3))
    edit_lines(copy / MMXU, lambda lines: lines.__setitem__(1, b"{not json"))
    code, out, err = validate(copy, capsys, "--mmxu", str(copy / MMXU), "--prognostic", str(copy / FILES["prognostic"]))
    assert code == 1
    for path, problem in ((METADATA, ": the file is empty"), (STUDIES, ": the file is empty"),
                          (FILES["split"], " line 3: byte 0xe9"), (QUESTIONS, " line 4: byte 0xe9"),
                          (MMXU, " line 2: not JSON")):
        assert f"{copy / path}{problem}" in err
    assert "lines well-formed; images and intervals not checked" in out
    assert "prognostic" in out and "not checked: its studies are looked up in mimic_all.csv" in out


def test_a_rejected_metadata_row_is_reported_once_not_as_missing_images(copy, capsys):
    table = pd.read_csv(copy / METADATA, dtype={"dicom_id": str})
    questions, studies = pd.read_csv(copy / QUESTIONS), pd.read_csv(copy / STUDIES, dtype={"dicom_id": str})
    dicom_id = studies.set_index("study_id").loc[questions.loc[first_question_row(copy), "study_id"], "dicom_id"]
    table["StudyTime"] = table["StudyTime"].astype(object)
    table.loc[table["dicom_id"] == dicom_id, "StudyTime"] = "noon"
    table.to_csv(copy / METADATA, index=False)
    code, _, err = validate(copy, capsys, "--mmxu", str(copy / MMXU))
    assert code == 1 and "field StudyTime: StudyTime 'noon'" in err
    assert f"image {dicom_id} is not in the MIMIC-CXR-JPG metadata" not in err


@pytest.mark.parametrize(("change", "field", "problem"), [
    ({"cur_image_path": None}, "cur_image_path", "None is not a non-empty string"),
    ({"answer": ["A"]}, "answer", "['A'] is not a letter"),
    ({"question": 5}, "question", "5 is not a non-empty string"),
    ({"id": None}, "id", "None is not a number or a non-empty string"),
    ({"prior_report": [1]}, "prior_report", "expected a report or a list of reports"),
])
def test_an_mmxu_value_of_the_wrong_type_is_named(copy, change, field, problem):
    rows = [json.loads(line) for line in (copy / MMXU).read_text().splitlines()]
    rows[1] |= change
    (copy / MMXU).write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InputError, match=re.escape(f"line 2, field {field}: {problem}")):
        load_mmxu(copy / MMXU, copy / "mimic-cxr-jpg")


def test_a_repeated_mmxu_id_is_an_error(copy):
    lines = (copy / MMXU).read_text().splitlines()
    (copy / MMXU).write_text("\n".join([lines[0], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(InputError, match="line 2, field id: .* repeats line 1"):
        load_mmxu(copy / MMXU, copy / "mimic-cxr-jpg")


@pytest.mark.parametrize(("change", "field", "problem"), [
    ({"study_id": [1]}, "study_id", "[1] is not a whole number"),
    ({"question": None}, "question", "None is not a non-empty string"),
    ({"answer": ""}, "answer", "'' is not a non-empty string"),
])
def test_a_prognostic_value_of_the_wrong_type_is_named(copy, change, field, problem):
    path = copy / FILES["prognostic"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0] |= change
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InputError, match=re.escape(f"line 1, field {field}: {problem}")):
        load_prognostic(path, copy / "medical-diff-vqa", copy / "mimic-cxr-jpg", rows[0]["split"])


def test_an_empty_prior_report_is_an_error(copy):
    rows = [json.loads(line) for line in (copy / MMXU).read_text().splitlines()]
    rows[0]["prior_report"] = "" if isinstance(rows[0].get("prior_report"), str) else [""] * len(
        rows[0]["prior_image_path"])
    (copy / MMXU).write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InputError, match="line 1, field prior_report: empty"):
        load_mmxu(copy / MMXU, copy / "mimic-cxr-jpg", history="global")


def test_a_question_whose_subject_is_not_its_studys_is_named(copy, capsys):
    questions = pd.read_csv(copy / QUESTIONS)
    questions.loc[2, "subject_id"] = 19999999
    questions.to_csv(copy / QUESTIONS, index=False)
    code, _, err = validate(copy, capsys)
    assert code == 1 and f"{copy / QUESTIONS} line 4, field subject_id: 19999999, but " in err
