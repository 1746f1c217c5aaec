"""MMXU: the loader on hand-written rows of both schemas, the synthetic files, the prompt's history
lines, single-choice scoring and the validation CLI."""

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from common.readers import InputError
from datamodules.collate import user_prompt
from datamodules.mimic import load_images
from datamodules.mmxu import REGIONS, load_mmxu, region_sentences, report_findings
from datamodules.synthetic.mmxu import CHANGES, write_mmxu
from datamodules.synthetic.population import simulate_population
from datamodules.validate import main as validate_main
from evaluation.metrics import extract_choice, score_sample
from tests.helpers import read_jsonl

OPTIONS = {"A": "It has increased", "B": "It is unchanged", "C": "It has resolved", "D": "It is new since the previous image"}
PRIOR_REPORT = (
    " FINDINGS: \n \n Small left pleural effusion. Patchy lung opacity in the right upper lung. "
    "The heart size is normal.\n \n IMPRESSION: \n \n Small left pleural effusion; right upper lung opacity.\n"
)


@pytest.fixture(scope="module")
def subject(world):
    """The frontal images (relative paths) and studies of the first subject with three or more studies."""
    images = load_images(world / "mimic-cxr-jpg")
    frontal = images[images["view"].isin(["PA", "AP"])].sort_values("study_datetime")
    for _, studies in frontal.groupby("subject_id"):
        if len(studies) >= 3:
            studies = studies.assign(relative=[str(Path(p).relative_to(world / "mimic-cxr-jpg")) for p in studies["path"]])
            return studies.reset_index(drop=True)
    raise AssertionError("the test world has no subject with three studies")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def mmxu_row(subject, **changes):
    """A public-test-schema row asking about the change from study 1 to study 2 of ``subject``."""
    row = {"id": 7, "content_type": "worsen",
           "question": "How has the pleural effusion at the left costophrenic angle changed compared with the previous image?",
           "options": OPTIONS, "answer": "A", "cur_image_path": subject.relative[2], "prior_image_path": subject.relative[1]}
    return row | changes


def days(subject, later, earlier):
    return float((subject.study_datetime[later].date() - subject.study_datetime[earlier].date()).days)


# ---------------------------------------------------------------------------------------------
# The loader on both schemas


def test_a_test_schema_row_is_a_two_image_sample_with_the_interval_from_the_metadata(world, subject, tmp_path):
    path = write_rows(tmp_path / "MMXU-test.jsonl", [mmxu_row(subject)])
    (sample,), report = load_mmxu(path, world / "mimic-cxr-jpg")
    assert report.loaded["mmxu"] == 1
    assert sample.sample_id == "MMXU-test-7" and sample.task == "mmxu" and sample.question_type == "worsen"
    assert sample.image == Path(subject.path[2]) and sample.prior_image == Path(subject.path[1])
    assert sample.interval_days == days(subject, 2, 1)
    assert (sample.study_id, sample.prior_study_id) == (subject.study_id[2], subject.study_id[1])
    assert sample.options == OPTIONS and sample.answer == "A" and sample.history is None


def test_a_dev_schema_list_of_priors_uses_the_most_recent_prior_and_its_report(world, subject, tmp_path):
    row = mmxu_row(subject) | {
        "related_region_name": "left costophrenic angle", "explanation": "It grew.", "cur_report": "x",
        "cur_region_report": "x", "cur_image_bboxs": {"left lung": [1, 2, 3, 4]},
        "prior_image_path": [subject.relative[1], subject.relative[0]],  # not in date order
        "prior_report": ["Study 1 report. Small left pleural effusion.", "Study 0 report."],
        "prior_image_bboxs": {"left lung": [1, 2, 3, 4]},
    }
    path = write_rows(tmp_path / "MMXU-dev.jsonl", [row])
    (sample,), _ = load_mmxu(path, world / "mimic-cxr-jpg", history="global")
    assert sample.prior_image == Path(subject.path[1]) and sample.interval_days == days(subject, 2, 1)
    assert sample.history == "Report of the previous image: Study 1 report. Small left pleural effusion."


def test_a_prior_taken_after_the_current_image_is_skipped_and_counted(world, subject, tmp_path):
    row = mmxu_row(subject, cur_image_path=subject.relative[0])
    samples, report = load_mmxu(write_rows(tmp_path / "f.jsonl", [row]), world / "mimic-cxr-jpg")
    assert samples == [] and report.skipped["prior_later"] == 1


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"answer": None}, "answer", "None is not a letter of the options"),
    ({"answer": "E"}, "answer", "'E' is not a letter of the options"),
    ({"options": {"A": "x", "B": "y", "C": "z"}}, "options", "exactly the keys A, B, C, D, found ['A', 'B', 'C']"),
    ({"options": {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}}, "options", "exactly the keys A, B, C, D"),
    ({"cur_image_path": "files/p10/p10000000/s50000000/00000000-00000000-00000000-00000000-00000000.jpg"},
     "cur_image_path", "is not in"),
    ({"prior_image_path": []}, "prior_image_path", "a path or a non-empty list"),
    ({"content_type": "better"}, "content_type", "unknown value 'better'"),
])
def test_a_malformed_row_is_an_error_naming_file_line_and_field(world, subject, tmp_path, change, field, message):
    path = write_rows(tmp_path / "bad.jsonl", [mmxu_row(subject), mmxu_row(subject, **({"id": 8} | change))])
    with pytest.raises(ValueError, match=f"line 2, field {field}: .*{message}".replace("[", r"\[").replace("(", r"\(")):
        load_mmxu(path, world / "mimic-cxr-jpg")


def test_a_missing_key_is_an_error_naming_it(world, subject, tmp_path):
    row = mmxu_row(subject)
    del row["prior_image_path"]
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.jsonl'} line 1, field prior_image_path: missing"):
        load_mmxu(write_rows(tmp_path / "bad.jsonl", [row]), world / "mimic-cxr-jpg")


# ---------------------------------------------------------------------------------------------
# History modes, as the collator lays them out


def prompt(sample) -> str:
    return user_prompt(sample, "<image>", interval_in_prompt=True, fusion_mode="concat")


def test_the_three_history_modes_in_the_prompt(world, subject, tmp_path):
    path = write_rows(tmp_path / "MMXU-dev.jsonl", [mmxu_row(subject, prior_report=PRIOR_REPORT)])
    prompts = {mode: prompt(load_mmxu(path, world / "mimic-cxr-jpg", history=mode)[0][0])
               for mode in ("none", "global", "regional")}
    head = ("Image-1 (prior study): <image>\nImage-2 (current study): <image>\n"
            f"The prior study was taken {days(subject, 2, 1):g} days earlier.\n")
    tail = ("How has the pleural effusion at the left costophrenic angle changed compared with the previous image?\n"
            "A. It has increased\nB. It is unchanged\nC. It has resolved\nD. It is new since the previous image\n"
            "Answer with the option's letter from the given choices directly.")
    assert prompts["none"] == head + tail
    assert prompts["global"] == head + (
        "Report of the previous image: Small left pleural effusion. Patchy lung opacity in the right upper lung. "
        "The heart size is normal. Small left pleural effusion; right upper lung opacity.\n") + tail
    assert prompts["regional"] == head + (
        "What the report of the previous image says about the left costophrenic angle: Small left pleural effusion. "
        "Small left pleural effusion; right upper lung opacity.\n") + tail


def test_regional_history_says_when_the_report_is_silent_about_the_region(world, subject, tmp_path):
    row = mmxu_row(subject, prior_report="FINDINGS: The heart size is normal.",
                   question="How has the atelectasis in the right lower lung zone changed?")
    (sample,), _ = load_mmxu(write_rows(tmp_path / "f.jsonl", [row]), world / "mimic-cxr-jpg", history="regional")
    assert sample.history == "The report of the previous image says nothing about the right lower lung zone."


@pytest.mark.parametrize("question", [
    "How has the endotracheal tube changed compared with the previous image?",
    "How has the opacity in the right and left lungs changed compared with the previous image?",
])
def test_a_question_naming_no_region_falls_back_to_the_global_record_and_is_counted(world, subject, tmp_path, question):
    rows = [mmxu_row(subject, prior_report=PRIOR_REPORT), mmxu_row(subject, id=8, question=question,
                                                                    prior_report=PRIOR_REPORT)]
    (named, unnamed), report = load_mmxu(write_rows(tmp_path / "MMXU-dev.jsonl", rows), world / "mimic-cxr-jpg",
                                         history="regional")
    assert named.history.startswith("What the report of the previous image says about the left costophrenic angle")
    assert unnamed.history == ("Report of the previous image: Small left pleural effusion. Patchy lung opacity in the "
                               "right upper lung. The heart size is normal. Small left pleural effusion; right upper "
                               "lung opacity.")
    assert report.loaded["mmxu"] == 2
    assert report.fell_back == {"regional history to global (the question names no region)": 1}
    assert str(report).endswith("; 1 fell back: regional history to global (the question names no region)")


def test_a_related_region_name_that_is_not_a_chest_imagenome_region_is_an_error(world, subject, tmp_path):
    row = mmxu_row(subject, prior_report=PRIOR_REPORT, related_region_name="left elbow")
    with pytest.raises(InputError, match="line 1, field related_region_name: unknown region 'left elbow'"):
        load_mmxu(write_rows(tmp_path / "MMXU-dev.jsonl", [row]), world / "mimic-cxr-jpg", history="regional")


def test_without_prior_report_the_history_comes_from_the_mimic_reports_tree(world, subject, tmp_path):
    path = write_rows(tmp_path / "MMXU-test.jsonl", [mmxu_row(subject)])
    (sample,), _ = load_mmxu(path, world / "mimic-cxr-jpg", history="global", reports_root=world / "mimic-cxr-reports")
    subject_id, study_id = subject.subject_id[1], subject.study_id[1]
    report = (world / f"mimic-cxr-reports/files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}.txt").read_text()
    assert sample.history == f"Report of the previous image: {report_findings(report)}"
    assert "FINDINGS" not in sample.history and "INDICATION" not in sample.history
    with pytest.raises(ValueError, match="line 1, field prior_report: absent, and no reports_root"):
        load_mmxu(path, world / "mimic-cxr-jpg", history="global")


def test_report_sentences_are_chosen_by_region_side_and_anatomy():
    report = ("FINDINGS: Small left pleural effusion, increased. Moderate right pleural effusion. "
              "Patchy lung opacity in the left upper lung. No pneumothorax. Mild cardiomegaly.\nIMPRESSION: Effusions.")
    assert region_sentences(report, "left costophrenic angle") == [
        "Small left pleural effusion, increased.", "Effusions."]
    assert region_sentences(report, "left upper lung zone") == ["Patchy lung opacity in the left upper lung."]
    assert region_sentences(report, "cardiac silhouette") == ["Mild cardiomegaly."]
    assert len(REGIONS) == 29 and len(set(REGIONS)) == 29


# ---------------------------------------------------------------------------------------------
# The synthetic files


@pytest.fixture(scope="module")
def synthetic(world):
    return {name: read_jsonl(world / "mmxu" / f"{name}.jsonl") for name in ("MMXU-test", "MMXU-dev", "MMXU-val")}


def test_the_synthetic_test_file_has_the_public_keys_in_order_and_only_test_subjects(world, synthetic):
    splits = pd.read_csv(world / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-split.csv.gz").set_index("dicom_id")["split"]
    assert synthetic["MMXU-test"]
    for row in synthetic["MMXU-test"]:
        assert list(row) == ["id", "content_type", "question", "options", "answer", "cur_image_path", "prior_image_path"]
        assert isinstance(row["prior_image_path"], str)
        assert {splits[row[key].rsplit("/", 1)[1].removesuffix(".jpg")] for key in ("cur_image_path", "prior_image_path")} == {"test"}
    for name, split in (("MMXU-dev", "train"), ("MMXU-val", "validate")):
        assert {splits[row["cur_image_path"].rsplit("/", 1)[1].removesuffix(".jpg")] for row in synthetic[name]} == {split}
        assert all(isinstance(row["prior_image_path"], list) and "related_region_name" in row for row in synthetic[name])
    counts = json.loads((world / "world.json").read_text())["counts"]
    assert [counts[key] for key in ("mmxu_test", "mmxu_dev", "mmxu_val")] == [len(rows) for rows in synthetic.values()]


def test_answer_letters_are_dealt_evenly_and_content_types_roughly_balanced(synthetic):
    for rows in synthetic.values():
        letters = Counter(row["answer"] for row in rows)
        assert max(letters.values()) - min(letters[letter] for letter in "ABCD") <= 1
    types = Counter(row["content_type"] for row in synthetic["MMXU-dev"])
    assert set(types) == {"worsen", "improved", "no change"} and max(types.values()) <= 1.5 * min(types.values())


def test_the_correct_option_follows_the_true_levels(world, synthetic):
    truth = pd.read_csv(world / "truth" / "studies.csv").set_index("study_id")
    changes = Counter()
    for rows in synthetic.values():
        for row in rows:
            prior = row["prior_image_path"][0] if isinstance(row["prior_image_path"], list) else row["prior_image_path"]
            study, prior_study = (int(path.split("/")[3].removeprefix("s")) for path in (row["cur_image_path"], prior))
            question = row["question"]
            finding = next(name for name in ("pleural effusion", "atelectasis", "pneumothorax", "lung opacity",
                                              "consolidation", "cardiac silhouette") if name in question)
            column = {"cardiac silhouette": "cardiomegaly"}.get(finding, finding).replace(" ", "_")
            side = next((s for s in ("left", "right") if s in question), None)
            zone = next((z for z in ("upper", "lower") if f"{side} {z} lung zone" in question), None)
            if side:
                column += f"_{side}" + (f"_{zone}" if finding in ("lung opacity", "consolidation") else "")
            before, now = truth.loc[prior_study, column], truth.loc[study, column]
            expected = ("new" if before == 0 else "resolved" if now == 0 else
                        "increased" if now > before else "decreased" if now < before else "unchanged")
            assert row["options"][row["answer"]] == CHANGES[expected], (row["id"], question, before, now)
            assert len(set(row["options"].values())) == 4
            changes[expected] += 1
    assert set(changes) == set(CHANGES)


def test_dev_rows_carry_region_reports_and_boxes_inside_the_image(world, synthetic):
    sizes = load_images(world / "mimic-cxr-jpg").set_index("dicom_id")
    metadata = pd.read_csv(world / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv.gz").set_index("dicom_id")
    for row in synthetic["MMXU-dev"][:20]:
        assert row["related_region_name"] in REGIONS and row["related_region_name"] in row["question"]
        for sentence in region_sentences(row["cur_report"], row["related_region_name"]):
            assert sentence in row["cur_region_report"]
        dicom = row["cur_image_path"].rsplit("/", 1)[1].removesuffix(".jpg")
        assert dicom in sizes.index
        rows, columns = metadata.loc[dicom, ["Rows", "Columns"]]
        boxes = row["cur_image_bboxs"]
        for x1, y1, x2, y2 in boxes.values():
            assert 0 <= x1 < x2 < columns and 0 <= y1 < y2 < rows
        # The patient's left lung is on the image's right; the angle is the lung's lateral lower corner.
        assert boxes["right lung"][2] < boxes["left lung"][0]
        angle, lung = boxes["left costophrenic angle"], boxes["left lung"]
        assert angle[2] == lung[2] and angle[3] == lung[3] and angle[0] > lung[0]


def test_the_synthetic_files_are_the_same_for_the_same_seed(tmp_path):
    studies = simulate_population(12, seed=3)
    first, second = write_mmxu(tmp_path / "a", studies, 3), write_mmxu(tmp_path / "b", studies, 3)
    assert first == second
    for name in ("MMXU-test.jsonl", "MMXU-dev.jsonl", "MMXU-val.jsonl"):
        assert (tmp_path / "a" / "mmxu" / name).read_bytes() == (tmp_path / "b" / "mmxu" / name).read_bytes()


def test_the_synthetic_files_load_with_regional_history(world):
    for name in ("MMXU-test", "MMXU-dev", "MMXU-val"):
        samples, report = load_mmxu(world / "mmxu" / f"{name}.jsonl", world / "mimic-cxr-jpg", history="regional",
                                    reports_root=world / "mimic-cxr-reports")
        assert report.loaded["mmxu"] == len(samples) > 0 and not report.skipped
        assert all(sample.history and sample.image.is_file() and sample.prior_image.is_file() for sample in samples)


# ---------------------------------------------------------------------------------------------
# Scoring and validation


# Every phrasing with the reading it must get against OPTIONS: (letter, how), or (None, "unparsed")
# wherever a letter would be a guess.
CHOICE_READINGS = [
    ("B", "B", "letter"), ("B.", "B", "letter"), ("(B)", "B", "letter"), ("B)", "B", "letter"),
    ("B:", "B", "letter"), (" c ", "C", "letter"), ("b", "B", "letter"), ("a", "A", "letter"),
    ("A.", "A", "letter"),
    ("Answer: B", "B", "mention"), ("The answer is B.", "B", "mention"),
    ("The answer is (C) worsened.", "C", "mention"), ("Option D", "D", "mention"),
    ("B: improved", "B", "mention"), ("The correct option is (b).", "B", "mention"),
    ("I would pick B here", "B", "mention"), ("The answer is 'B'.", "B", "mention"), ("**C**", "C", "mention"),
    ("A small effusion, so C", "C", "mention"), ("A CT would help; the answer is C.", "C", "mention"),
    ("The answer is A.", "A", "mention"), ("Option A is correct.", "A", "mention"),
    ("A is correct.", "A", "mention"), ("The answer is A because it grew.", "A", "mention"),
    ("It is B, not A.", "B", "mention"), ("Not A; the answer is C.", "C", "mention"),
    ("B rather than A", None, "unparsed"), ("C is wrong; the answer is D.", "D", "mention"),
    ("Neither A nor B; it is D.", "D", "mention"),
    ("D. It is new since the previous image", "D", "mention"), ("A) It has increased", "A", "mention"),
    ("It has resolved.", "C", "text"), ("it has increased", "A", "text"),
    ("It is new since the previous image.", "D", "text"),
    ("It is not unchanged; it has increased.", "A", "text"),
    ("The answer is a small effusion.", None, "unparsed"),
    ("The best option is a follow-up CT.", None, "unparsed"),
    ("answer is B or C", None, "unparsed"), ("B or C", None, "unparsed"), ("A or B", None, "unparsed"),
    ("B and C are both possible", None, "unparsed"), ("Option A, no wait, the answer is D", None, "unparsed"),
    ("not A", None, "unparsed"), ("(A) is not correct.", None, "unparsed"), ("A) is wrong", None, "unparsed"),
    ("It is not A or B.", None, "unparsed"), ("Not A, B.", None, "unparsed"),
    ("A small effusion is present.", None, "unparsed"), ("There is a small effusion.", None, "unparsed"),
    ("(C) It has increased", None, "unparsed"), ("It has increased or it is unchanged", None, "unparsed"),
    ("It has not increased.", None, "unparsed"), ("The B-lines suggest edema", None, "unparsed"),
    ("A chest CT is advised", None, "unparsed"), ("E", None, "unparsed"),
    ("The effusion got bigger", None, "unparsed"), ("", None, "unparsed"),
    ("There is a type B aortic dissection", None, "unparsed"), ("Hepatitis C history", None, "unparsed"),
    ("Answer: A\nExplanation: the effusion grew.", "A", "mention"), ("A, B or C", None, "unparsed"),
    ("B and C are likely; D is not", None, "unparsed"),
]
# Short option texts, as models echo them: a text counts as whole words and not after a negation.
SHORT_OPTIONS = {"A": "improved", "B": "worsened", "C": "no change", "D": "new"}
SHORT_TEXT_READINGS = [
    ("The region has improved", "A", "text"), ("There is no change.", "C", "text"),
    ("It has not worsened; it has improved.", "A", "text"), ("No new opacity; improved.", "A", "text"),
    ("The opacity is new.", "D", "text"), ("It has not worsened.", None, "unparsed"),
    ("Improved or worsened", None, "unparsed"), ("It is renewed", None, "unparsed"),
]


@pytest.mark.parametrize(("answer", "letter", "how"), CHOICE_READINGS,
                         ids=[answer or "<empty>" for answer, _, _ in CHOICE_READINGS])
def test_the_chosen_letter_is_read_without_guessing(answer, letter, how):
    assert extract_choice(answer, OPTIONS) == (letter, how)


@pytest.mark.parametrize(("answer", "letter", "how"), SHORT_TEXT_READINGS,
                         ids=[answer for answer, _, _ in SHORT_TEXT_READINGS])
def test_an_option_is_chosen_by_its_own_text_only_when_exactly_one_is_named(answer, letter, how):
    assert extract_choice(answer, SHORT_OPTIONS) == (letter, how)


def test_without_options_only_letters_are_read():
    assert extract_choice("It has resolved.") == (None, "unparsed")
    assert extract_choice("The answer is C.") == ("C", "mention")


def test_mmxu_records_are_scored_by_choice_accuracy_with_unreadable_answers_wrong():
    record = {"sample_id": "MMXU-test-0", "task": "mmxu", "question_type": "worsen", "question": "q",
              "reference": "A", "options": OPTIONS}
    assert score_sample(record | {"prediction": "A."}) == {"choice_accuracy": 1, "choice_parsed": 1}
    assert score_sample(record | {"prediction": "It has increased"}) == {"choice_accuracy": 1, "choice_parsed": 1}
    assert score_sample(record | {"prediction": "D"}) == {"choice_accuracy": 0, "choice_parsed": 1}
    assert score_sample(record | {"prediction": "bigger"}) == {"choice_accuracy": 0, "choice_parsed": 0}


def test_the_validation_cli_counts_mmxu_types_and_letters_and_names_bad_rows(world, subject, tmp_path, capsys):
    files = [str(world / "mmxu" / name) for name in ("MMXU-test.jsonl", "MMXU-dev.jsonl")]
    assert validate_main(["--mimic-cxr-jpg", str(world / "mimic-cxr-jpg"), "--mmxu", *files, "--read-images"]) == 0
    out = capsys.readouterr().out
    rows = read_jsonl(world / "mmxu" / "MMXU-dev.jsonl")
    letters, types = Counter(row["answer"] for row in rows), Counter(row["content_type"] for row in rows)
    assert f"MMXU {files[1]}: loaded {len(rows)} mmxu; skipped none" in out
    assert (f"content types: {types['improved']} improved, {types['no change']} no change, {types['worsen']} worsen; "
            f"answers: {letters['A']} A, {letters['B']} B, {letters['C']} C, {letters['D']} D") in out
    bad = write_rows(tmp_path / "bad.jsonl", [mmxu_row(subject, answer="E")])
    assert validate_main(["--mimic-cxr-jpg", str(world / "mimic-cxr-jpg"), "--mmxu", str(bad)]) == 1
    assert f"{bad} line 1, field answer" in capsys.readouterr().err
