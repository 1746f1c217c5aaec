"""The synthetic world writes the real MIMIC-CXR-JPG and Medical-Diff-VQA v1.0.1 formats, with
answers that follow from its ground truth."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from datamodules import synthetic
from datamodules.synthetic import __main__ as cli
from datamodules.synthetic import difference_answer, ensure_world, generate_world, simulate_population

SUBJECTS, SEED = 20, 0
WHOLE_IMAGE = "what has changed compared to the reference image?"
DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, SUBJECTS, SEED)
    return out


def study_path(root: Path, subject_id: int, study_id: int) -> Path:
    subject = str(subject_id)
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}"


def read_gz(world: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(world / "mimic-cxr-jpg" / f"mimic-cxr-2.0.0-{name}.csv.gz")


def questions(world: Path) -> pd.DataFrame:
    return pd.read_csv(world / "medical-diff-vqa" / "mimic_pair_questions.csv")


def differences(world: Path) -> pd.DataFrame:
    table = questions(world)
    return table[table.question_type == "difference"]


# ------------------------------------------------------------------ columns and layout

LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]
COLUMNS = {
    "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz": [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
        "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
    ],
    "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz": ["dicom_id", "study_id", "subject_id", "split"],
    "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv.gz": ["subject_id", "study_id", *LABELS],
    "medical-diff-vqa/mimic_pair_questions.csv": [
        "study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split",
    ],
    "medical-diff-vqa/mimic_all.csv": [
        "subject_id", "study_id", *LABELS, "dicom_id", "view", "split", "study_date", "study_order",
    ],
}


@pytest.mark.parametrize("relative", sorted(COLUMNS))
def test_tables_have_the_real_columns_in_order(world, relative):
    assert list(pd.read_csv(world / relative, nrows=1).columns) == COLUMNS[relative]


def test_truth_table_starts_with_ids_date_and_view_then_one_column_per_site(world):
    truth = pd.read_csv(world / "truth" / "studies.csv")
    assert list(truth.columns[:4]) == ["subject_id", "study_id", "study_date", "view"]
    assert "pleural_effusion_left" in truth.columns and "consolidation_right_lower" in truth.columns
    assert truth["pleural_effusion_left"].isin([0, 1, 2, 3]).all()
    assert truth["consolidation_right_lower"].isin([0, 1]).all()


def test_every_metadata_row_has_its_jpeg_at_the_mimic_path(world):
    for row in read_gz(world, "metadata").itertuples():
        path = study_path(world / "mimic-cxr-jpg", row.subject_id, row.study_id) / f"{row.dicom_id}.jpg"
        assert path.is_file(), path


def test_rows_and_columns_are_the_jpeg_height_and_width(world):
    metadata = read_gz(world, "metadata")
    for path in (world / "mimic-cxr-jpg" / "files").rglob("*.jpg"):
        row = metadata[metadata.dicom_id == path.stem].iloc[0]
        with Image.open(path) as image:
            assert image.mode == "L"
            assert image.size == (row.Columns, row.Rows)
    assert metadata.Rows.nunique() > 1 and (metadata.Rows != metadata.Columns).any()


def test_every_study_has_a_report_with_findings_and_impression(world):
    for row in read_gz(world, "chexpert").itertuples():
        text = study_path(world / "mimic-cxr-reports", row.subject_id, row.study_id).with_suffix(".txt").read_text()
        assert "FINDINGS:" in text and "IMPRESSION:" in text


def test_all_diseases_json_holds_one_key_info_record_per_study(world):
    records = json.loads((world / "medical-diff-vqa" / "all_diseases.json").read_text())
    studies = read_gz(world, "chexpert")
    assert sorted(int(record["study_id"]) for record in records) == sorted(studies.study_id)
    names = {name for record in records for name in record["entity"]}
    assert names == {"pleural effusion", "atelectasis", "cardiomegaly", "pneumothorax", "lung opacity", "consolidation"}


# ------------------------------------------------------------------ ids, dates, views, splits


def test_ids_have_mimic_formats_and_are_unique(world):
    metadata = read_gz(world, "metadata")
    assert metadata.subject_id.astype(str).str.fullmatch(r"1\d{7}").all()
    assert metadata.study_id.astype(str).str.fullmatch(r"5\d{7}").all()
    assert metadata.dicom_id.str.match(DICOM_ID).all()
    assert metadata.dicom_id.is_unique
    assert metadata.groupby("study_id").subject_id.nunique().max() == 1


def test_study_time_is_an_unpadded_float_and_study_date_a_21xx_date(world):
    with gzip.open(world / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv.gz", "rt") as file:
        raw = pd.read_csv(file, dtype=str)
    assert raw.StudyTime.str.fullmatch(r"(0|[1-9]\d{0,5})\.\d+").all()
    assert (raw.StudyTime.astype(float) < 240000).all()
    assert raw.StudyTime.str.len().min() < 10  # some times before 10:00, written without a leading zero
    for text in raw.StudyDate:
        assert 2100 <= date(int(text[:4]), int(text[4:6]), int(text[6:])).year <= 2200


def test_each_study_has_one_frontal_image_first_and_sometimes_a_lateral(world):
    metadata = read_gz(world, "metadata")
    views = metadata.groupby("study_id").ViewPosition.agg(list)
    assert all(v[0] in ("PA", "AP") and v[1:] in ([], ["LATERAL"]) for v in views)
    assert 0.2 < views.map(len).eq(2).mean() < 0.7
    meanings = dict(zip(metadata.ViewPosition, metadata.ViewCodeSequence_CodeMeaning))
    assert meanings == {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}


def test_mimic_split_says_validate_and_diffvqa_says_val(world):
    assert set(read_gz(world, "split").split) == {"train", "validate", "test"}
    assert set(questions(world).split) == {"train", "val", "test"}


def test_splits_are_by_subject_and_agree_across_files(world):
    mimic = read_gz(world, "split").groupby("subject_id").split.agg(set)
    assert mimic.map(len).eq(1).all()
    mimic = mimic.map(lambda splits: splits.pop().replace("validate", "val"))
    vqa = questions(world).groupby("subject_id").split.agg(set)
    assert vqa.map(len).eq(1).all()
    assert (vqa.map(lambda splits: splits.pop()) == mimic[vqa.index]).all()


def test_mimic_all_points_at_the_first_frontal_image_and_ranks_study_dates(world):
    studies = pd.read_csv(world / "medical-diff-vqa" / "mimic_all.csv")
    metadata = read_gz(world, "metadata").set_index("dicom_id")
    assert metadata.loc[studies.dicom_id, "ViewPosition"].isin(["PA", "AP"]).all()
    assert set(studies.view) == {"postero-anterior", "antero-posterior"}
    expected = studies.groupby("subject_id").study_date.rank(method="min")
    assert (studies.study_order == expected).all() and studies.study_order.min() == 1


# ------------------------------------------------------------------ Medical-Diff-VQA questions


def test_all_seven_question_types_occur(world):
    assert set(questions(world).question_type) == {
        "abnormality", "presence", "view", "location", "level", "type", "difference",
    }


def test_view_answers_match_the_frontal_view(world):
    table = questions(world)
    views = pd.read_csv(world / "truth" / "studies.csv").set_index("study_id").view
    which = table[table.question == "which view is this image taken?"]
    assert (which.answer == views[which.study_id].values + " view").all()


# A level word may itself hold "to" ("moderate to large"): the levels are read as the world's words.
LEVEL_WORD = "|".join(sorted({level for finding in synthetic.FINDINGS for level in finding.levels}, key=len, reverse=True))
LEVEL = rf"the level of ([a-z ]+) has changed from ({LEVEL_WORD}) to ({LEVEL_WORD})\."
ITEMS = r"( [a-z ]+|(?: [a-z ]+,)+ and [a-z ]+)"
ADDED = rf"the main image has (?:an additional finding|additional findings) of{ITEMS} than the reference image\."
MISSING = rf"the main image is missing the findings? of{ITEMS} than the reference image\."


def parse_difference(answer: str) -> tuple[list[tuple[str, ...]], list[str], list[str]]:
    """(level changes, added, missing) of an answer in the dataset's grammar: level-change
    sentences, then at most one added and one missing sentence, joined by single spaces."""
    if answer == "nothing has changed.":
        return [], [], []
    sentences = re.findall(r"[^.]+\.", answer)
    assert " ".join(sentence.strip() for sentence in sentences) == answer, answer
    levels, added, missing, kinds = [], [], [], []
    for sentence in (sentence.strip() for sentence in sentences):
        if match := re.fullmatch(LEVEL, sentence):
            levels.append(match.groups())
            kinds.append(0)
        else:
            match = re.fullmatch(ADDED, sentence) or re.fullmatch(MISSING, sentence)
            assert match, f"{sentence!r} in {answer!r}"
            items = [item.removeprefix("and ") for item in match[1].strip().split(", ")]
            (added if sentence.startswith("the main image has") else missing).extend(items)
            kinds.append(1 if sentence.startswith("the main image has") else 2)
    assert kinds == sorted(kinds) and kinds.count(1) <= 1 and kinds.count(2) <= 1, answer
    return levels, added, missing


def true_findings(world: Path) -> dict[int, dict[str, int]]:
    """study_id -> {finding: highest level over its sites}, for present findings, from truth/studies.csv."""
    manifest = json.loads((world / "world.json").read_text())
    truth = pd.read_csv(world / "truth" / "studies.csv").set_index("study_id")
    states = {}
    for study_id, row in truth.iterrows():
        state: dict[str, int] = {}
        for column, (finding, _) in manifest["truth_columns"].items():
            if finding in manifest["findings"] and row[column]:
                state[finding] = max(state.get(finding, 0), int(row[column]))
        states[study_id] = state
    return states


def test_difference_answers_parse_with_the_dataset_grammar(world):
    for answer in differences(world).answer:
        parse_difference(answer)


def test_whole_image_difference_answers_match_the_true_states(world):
    manifest = json.loads((world / "world.json").read_text())
    order = list(manifest["findings"])
    states = true_findings(world)
    rows = differences(world)
    rows = rows[rows.question == WHOLE_IMAGE]
    for row in rows.itertuples():
        before, now = states[row.ref_id], states[row.study_id]
        levels, added, missing = parse_difference(row.answer)
        # Added findings in the generator's shuffled order, missing ones in official order.
        assert sorted(added) == sorted(name for name in now if name not in before), row
        assert missing == [name for name in order if name in before and name not in now], row
        changed = {name for name in now if name in before and now[name] != before[name] and manifest["findings"][name]}
        assert {finding for finding, _, _ in levels} == changed, row
        for finding, level_before, level_after in levels:
            assert level_before == manifest["findings"][finding][before[finding] - 1]
            assert level_after == manifest["findings"][finding][now[finding] - 1]


def test_area_difference_answers_give_the_level_change_on_that_side(tmp_path):
    # Area questions are rare: simulate many subjects (no images needed) to get some.
    studies = simulate_population(300, SEED)
    table = synthetic.questions._pair_questions(studies, SEED)
    area = table[(table.question_type == "difference") & (table.question != WHOLE_IMAGE)]
    assert len(area) >= 5
    by_id = {study.study_id: study for study in studies}
    for row in area.itertuples():
        side = re.fullmatch(r"what has changed in the (left|right) lung area\?", row.question)[1]
        [(name, before, after)], added, missing = parse_difference(row.answer)
        assert not added and not missing
        finding = synthetic.FINDING_BY_NAME[name]
        assert finding.level_name(by_id[row.ref_id].level(finding, side)) == before
        assert finding.level_name(by_id[row.study_id].level(finding, side)) == after


def test_two_item_lists_read_with_a_comma_before_and(world):
    answers = differences(world).answer
    two = [a for a in answers if re.search(r"findings of [a-z ]+, and [a-z ]+ than", a)]
    assert two, "seed without a two-item answer: pick another SEED"
    assert "the main image" in two[0] and ", and " in two[0]
    assert not any(re.search(r"findings of [a-z ]+ and [a-z ]+ than", a) for a in answers)


def test_first_studies_get_diagnostic_rows_whose_reference_is_later(world):
    studies = pd.read_csv(world / "medical-diff-vqa" / "mimic_all.csv")
    dates = studies.set_index("study_id").study_date
    table = questions(world)
    rows = table[table.study_id.isin(studies.query("study_order == 1").study_id)]
    assert rows.study_id.nunique() == SUBJECTS
    assert "difference" not in set(rows.question_type)
    assert (dates[rows.ref_id].values > dates[rows.study_id].values).all()


def test_difference_rows_have_an_earlier_reference(world):
    rows = differences(world)
    dates = pd.read_csv(world / "medical-diff-vqa" / "mimic_all.csv").set_index("study_id").study_date
    assert (dates[rows.ref_id].values < dates[rows.study_id].values).all()


def test_a_few_difference_rows_are_exact_duplicates():
    # One row in fifty: simulate many subjects (no images needed) so that some occur for any seed.
    table = synthetic.questions._pair_questions(simulate_population(300, SEED), SEED)
    rows = table[table.question_type == "difference"]
    duplicated = rows.duplicated().sum()
    assert 1 <= duplicated <= 0.1 * len(rows)


def test_difference_answers_need_the_prior_image():
    """A finding present now is about as often new as persisting, and 'nothing has changed' is a minority."""
    rng = random.Random(SEED)
    visits: dict[int, list] = {}
    for study in simulate_population(400, SEED):
        visits.setdefault(study.subject_id, []).append(study)
    new = persisting = nothing = pairs = 0
    for main, earlier in ((v[i], v[:i]) for v in visits.values() for i in range(1, len(v))):
        reference = rng.choice(earlier)
        before = reference.findings
        for finding in main.findings:
            new, persisting = new + (finding not in before), persisting + (finding in before)
        nothing += difference_answer(reference, main, list(main.findings)) == "nothing has changed."
        pairs += 1
    assert 0.4 < new / (new + persisting) < 0.6
    assert 0.1 < nothing / pairs < 0.3


def test_presence_questions_answer_yes_about_as_often_as_no(world):
    answers = questions(world).query("question_type == 'presence'").answer
    assert 0.35 < (answers == "yes").mean() < 0.65


# ------------------------------------------------------------------ determinism and caching


def digests(world: Path) -> dict[str, str]:
    return {
        str(path.relative_to(world)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(world.rglob("*")) if path.is_file()
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_same_seed_writes_identical_bytes(world, tmp_path, workers):
    # The fixture's world was drawn with the default workers: one process or several, same bytes.
    generate_world(tmp_path, SUBJECTS, SEED, workers=workers)
    again, first = digests(tmp_path), digests(world)
    assert again == first
    assert any(name.endswith(".jpg") for name in first) and any(name.endswith(".csv.gz") for name in first)


def test_another_seed_writes_another_world(tmp_path):
    generate_world(tmp_path / "a", 3, 1)
    generate_world(tmp_path / "b", 3, 2)
    first, second = (read_gz(tmp_path / name, "metadata").dicom_id.tolist() for name in "ab")
    assert first != second


def test_generate_world_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_world(tmp_path, 3, SEED)


def test_ensure_world_reuses_a_complete_world(tmp_path):
    out = ensure_world(tmp_path / "world", 3, SEED)
    jpeg = next((out / "mimic-cxr-jpg" / "files").rglob("*.jpg"))
    stamps = (out / "world.json").stat().st_mtime_ns, jpeg.stat().st_mtime_ns
    assert ensure_world(out, 3, SEED) == out
    assert ((out / "world.json").stat().st_mtime_ns, jpeg.stat().st_mtime_ns) == stamps


def test_ensure_world_replaces_an_older_world_of_ours(tmp_path):
    ensure_world(tmp_path / "world", 3, SEED)
    ensure_world(tmp_path / "world", 4, SEED)
    assert json.loads((tmp_path / "world" / "world.json").read_text())["subjects"] == 4
    assert [path.name for path in tmp_path.iterdir()] == ["world"]


def test_ensure_world_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a synthetic world"):
        ensure_world(tmp_path, 3, SEED)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_an_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.writer, "render_image", fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_world(tmp_path / "world", 3, SEED, workers=1)  # drawn here, where the patch applies
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_counts_and_the_directory(tmp_path, capsys):
    cli.main(["--out", str(tmp_path / "world"), "--subjects", "3", "--seed", "1"])
    line = capsys.readouterr().out.strip()
    assert str(tmp_path / "world") in line and "3 subjects" in line and "\n" not in line
