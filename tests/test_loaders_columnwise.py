"""The column-wise loaders and the index cache against the row-by-row loaders they replaced
(tests/reference_loaders.py): the same samples, in the same order, with the same counts, and the same
problems reported for the same bad rows."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

import datamodules.sources
import datamodules.table
from common.readers import InputError, Problems
from datamodules import diffvqa, prognostic
from datamodules.datamodule import CHARS_PER_TOKEN, LumenDataModule
from datamodules.experts import expert_text, load_experts
from datamodules.index_cache import IndexCache
from datamodules.sources import DiffVQASource, PrognosticSource
from models.config import ModelConfig
from models.factory import input_spec
from tests import reference_loaders as reference


@pytest.fixture
def planted(world, tmp_path) -> Path:
    """The world's Diff-VQA tables with what the policies skip: a reference later than its study,
    repeated difference rows, answers with the generator's trailing space."""
    copy = tmp_path / "medical-diff-vqa"
    shutil.copytree(world / "medical-diff-vqa", copy)
    table = pd.read_csv(copy / "mimic_pair_questions.csv")
    for split in ("train", "test"):
        row = table.index[(table.question_type == "difference") & (table.split == split)][1]
        table.loc[row, ["study_id", "ref_id"]] = table.loc[row, ["ref_id", "study_id"]].to_numpy()
    repeats = pd.concat([table[(table.question_type == "difference") & (table.split == split)].iloc[[0, 0]]
                         for split in ("train", "test")])
    table["answer"] = table["answer"].where(table.index % 3 != 0, table["answer"] + " ")
    pd.concat([table, repeats]).to_csv(copy / "mimic_pair_questions.csv", index=False)
    return copy


def both(diffvqa_dir, mimic, split, **options):
    new, new_report = diffvqa.load_diffvqa(diffvqa_dir, mimic, split, **options)
    old, old_report = reference.load_diffvqa(diffvqa_dir, mimic, split, **options)
    return list(new), new_report, old, old_report


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("options", [{}, {"tasks": ("difference",)}, {"tasks": ("diagnostic",)}, {"use_prior": False},
                                     {"test_policy": "one_study_per_subject", "seed": 3}])
def test_diffvqa_samples_and_counts_are_those_of_the_row_by_row_loader(world, planted, split, options):
    new, new_report, old, old_report = both(planted, world / "mimic-cxr-jpg", split, **options)
    assert new == old and len(new) > 0
    assert new_report == old_report
    if split != "val" and "diagnostic" not in options.get("tasks", ()) and "test_policy" not in options:
        assert new_report.skipped["ref_later"] == 1 and new_report.skipped["duplicate"] >= 2


def test_rows_with_problems_are_reported_as_the_row_by_row_loader_reports_them(world, planted):
    studies = pd.read_csv(planted / "mimic_all.csv")
    studies.loc[2, "study_date"] = 21501345  # no such month
    studies = pd.concat([studies, studies.iloc[[5]]])  # a repeated study
    studies.to_csv(planted / "mimic_all.csv", index=False)
    questions = pd.read_csv(planted / "mimic_pair_questions.csv")
    questions.loc[4, "split"] = "validate"
    questions.loc[7, "subject_id"] = 1
    questions.loc[9, "study_id"] = 59999999
    questions.loc[11, "split"] = None  # empty cells: null under pandas 3, "nan" text under pandas 2
    questions.loc[13, "question_type"] = None
    questions.to_csv(planted / "mimic_pair_questions.csv", index=False)
    found = {}
    for name, loader in (("new", diffvqa.load_diffvqa), ("old", reference.load_diffvqa)):
        problems = Problems(listed=None)
        samples, report = loader(planted, world / "mimic-cxr-jpg", "train", problems=problems)
        found[name] = (list(samples), report, problems.lines())
        with pytest.raises(InputError) as raised:
            loader(planted, world / "mimic-cxr-jpg", "train")
        found[name] += (str(raised.value),)
    assert found["new"] == found["old"]
    assert len(found["new"][2]) >= 6


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_prognostic_samples_and_counts_are_those_of_the_row_by_row_loader(world, split):
    args = (world / "prognostic" / "prognostic.jsonl", world / "medical-diff-vqa", world / "mimic-cxr-jpg", split)
    new, new_report = prognostic.load_prognostic(*args)
    old, old_report = reference.load_prognostic(*args)
    assert list(new) == old and len(old) > 0
    assert new_report == old_report


def lumen_sources(world: Path) -> dict:
    diffvqa_dir, mimic = str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg")
    return {"diagnostic": DiffVQASource(diffvqa_dir, mimic, tasks=("diagnostic",)),
            "difference": DiffVQASource(diffvqa_dir, mimic, tasks=("difference",), test_policy="one_study_per_subject"),
            "prognostic": PrognosticSource(str(world / "prognostic" / "prognostic.jsonl"), diffvqa_dir, mimic,
                                           weight=0.5)}


def make_datamodule(world: Path, tiny_base: Path, **options) -> LumenDataModule:
    spec = input_spec(ModelConfig(base=str(tiny_base), vision={"type": "hf", "layer": -1}))
    return LumenDataModule(sources=lumen_sources(world), tokenizer_dir=str(tiny_base / "llm"), input_spec=spec,
                           experts=str(world / "experts" / "experts.csv"), **options)


def old_samples(world: Path, split: str, limit: int | None) -> tuple[list, dict]:
    """What the DataModule built before, and its counts: each source's row-by-row samples, limited,
    with expert text."""
    predictions = load_experts(world / "experts" / "experts.csv")
    diffvqa_dir, mimic = world / "medical-diff-vqa", world / "mimic-cxr-jpg"
    parts = {"diagnostic": reference.load_diffvqa(diffvqa_dir, mimic, split, tasks=("diagnostic",))[0],
             "difference": reference.load_diffvqa(diffvqa_dir, mimic, split, tasks=("difference",),
                                                  test_policy="one_study_per_subject")[0],
             "prognostic": reference.load_prognostic(world / "prognostic" / "prognostic.jsonl", diffvqa_dir, mimic,
                                                     split)[0]}
    samples = [replace(sample, expert=expert_text(predictions[sample.image.stem])) for part in parts.values()
               for sample in part[:limit]]
    return samples, {name: {"loaded": len(part), "kept": len(part[:limit])} for name, part in parts.items()}


@pytest.mark.parametrize("cache", [False, True])
def test_the_datamodule_gives_the_samples_order_lengths_and_counts_it_gave_before(world, tiny_base, tmp_path, cache):
    limit = {"train": None, "val": 7, "test": None}
    options = {"limit": limit, "index_cache": str(tmp_path / "index") if cache else None}
    data = make_datamodule(world, tiny_base, **options)
    for split in ("train", "val", "test"):
        expected, counts = old_samples(world, split, limit[split])
        assert data.samples(split) == expected
        assert data.sample_counts[split] == counts
        images = [data.image_slots if sample.has_prior else 1 for sample in expected]
        chars = [sum(len(part or "") for part in (s.question, s.answer, s.history, s.expert)) for s in expected]
        lengths = [n * data.tokens_per_image + c // CHARS_PER_TOKEN for n, c in zip(images, chars)]
        table = datamodules.table.SampleTable.concat(data.source_tables(split))
        assert data.lengths(table).tolist() == lengths
    assert data.sample_counts["val"]["diagnostic"] == {"loaded": data.sample_counts["val"]["diagnostic"]["loaded"],
                                                       "kept": 7}


def test_a_warm_launch_maps_the_cached_tables_without_reading_the_dataset(world, tiny_base, tmp_path, monkeypatch,
                                                                       caplog):
    options = {"limit": {"train": None, "val": 5}, "index_cache": str(tmp_path / "index")}
    cold = make_datamodule(world, tiny_base, **options)
    cold.prepare_data()
    expected = {split: cold.samples(split) for split in ("train", "val")}
    counts = cold.sample_counts

    def unread(*args, **kwargs):
        raise AssertionError("the dataset was read on a warm launch")

    monkeypatch.setattr(datamodules.sources, "read_diffvqa", unread)
    monkeypatch.setattr(datamodules.sources, "read_studies", unread)
    warm = make_datamodule(world, tiny_base, **options)
    with caplog.at_level("INFO", logger="datamodules.datamodule"):
        assert {split: warm.samples(split) for split in ("train", "val")} == expected
    assert warm.sample_counts == counts
    cached_lines = [record.getMessage() for record in caplog.records if "[index cache]" in record.getMessage()]
    assert len(cached_lines) == 6 and all("kept" in line for line in cached_lines)


def test_a_changed_input_file_or_setting_builds_the_table_again(world, tiny_base, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world / "medical-diff-vqa", copy / "medical-diff-vqa")
    shutil.copytree(world / "experts", copy / "experts")
    shutil.copytree(world / "prognostic", copy / "prognostic")
    (copy / "mimic-cxr-jpg").symlink_to(world / "mimic-cxr-jpg")
    index = tmp_path / "index"
    first = make_datamodule(copy, tiny_base, index_cache=str(index)).samples("val")
    questions = pd.read_csv(copy / "medical-diff-vqa" / "mimic_pair_questions.csv")
    row = questions.index[questions.split == "val"][0]
    questions.loc[row, "question"] = "is this a changed question?"
    questions.to_csv(copy / "medical-diff-vqa" / "mimic_pair_questions.csv", index=False)
    changed = make_datamodule(copy, tiny_base, index_cache=str(index)).samples("val")
    assert [s.question for s in changed if s.sample_id == f"diffvqa-{row}"] == ["is this a changed question?"]
    assert len(changed) == len(first)
    without_demographics = make_datamodule(copy, tiny_base, index_cache=str(index), expert_demographics=False)
    assert "Estimated age" not in without_demographics.samples("val")[0].expert
    # 3 tables, then the 2 Diff-VQA ones again (the prognostic source does not read the questions), then
    # 3 with other expert text.
    assert len(list(index.glob("*.arrow"))) == 3 + 2 + 3


def test_the_sample_table_is_columns_not_objects(world, tiny_base, tmp_path):
    data = make_datamodule(world, tiny_base, index_cache=str(tmp_path / "index"))
    table = datamodules.table.SampleTable.concat(data.source_tables("train"))
    assert len(table) == sum(data.sample_counts["train"][name]["kept"] for name in data.sources)
    expert = table.column("expert")
    # Every sample's expert text is stored once per image, not once per sample.
    assert sum(len(chunk.dictionary) for chunk in expert.chunks) < len(table)
    assert data.table_bytes("train") == table.nbytes


def test_prognostic_lines_with_problems_are_reported_as_the_row_by_row_loader_reports_them(world, tmp_path):
    lines = (world / "prognostic" / "prognostic.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[:40]]
    records[3]["interval_days"] += 1
    records[5]["study_id"] = 59999999
    records[8]["id"] = records[7]["id"]
    records[11]["split"] = "validate"
    del records[13]["answer"]
    path = tmp_path / "prognostic.jsonl"
    path.write_text("\n".join([json.dumps(record) for record in records] + ["not json"]) + "\n")
    found = {}
    for name, loader in (("new", prognostic.load_prognostic), ("old", reference.load_prognostic)):
        problems = Problems(listed=None)
        samples, report = loader(path, world / "medical-diff-vqa", world / "mimic-cxr-jpg", "train", problems=problems)
        found[name] = (list(samples), report, problems.lines())
    assert found["new"] == found["old"]
    assert len(found["new"][2]) == 6 and found["new"][0]


def test_a_missing_input_file_is_named_as_without_the_cache(world, tiny_base, tmp_path):
    copy = tmp_path / "world"
    for part in ("medical-diff-vqa", "experts", "prognostic"):
        shutil.copytree(world / part, copy / part)
    (copy / "mimic-cxr-jpg").symlink_to(world / "mimic-cxr-jpg")
    (copy / "medical-diff-vqa" / "mimic_all.csv").unlink()
    with pytest.raises(InputError, match=r"mimic_all.csv: not found: expected Medical-Diff-VQA's mimic_all.csv"):
        make_datamodule(copy, tiny_base, index_cache=str(tmp_path / "index")).samples("val")


def test_a_damaged_cache_entry_is_built_again(world, tiny_base, tmp_path):
    index = tmp_path / "index"
    expected = make_datamodule(world, tiny_base, index_cache=str(index)).samples("val")
    tables, records = sorted(index.glob("*.arrow")), sorted(index.glob("*.json"))
    tables[0].write_bytes(tables[0].read_bytes()[:100])  # cut short
    records[1].write_text("{}")  # no counts
    assert make_datamodule(world, tiny_base, index_cache=str(index)).samples("val") == expected


def test_a_changed_expert_csv_builds_the_tables_with_its_text(world, tiny_base, tmp_path):
    copy = tmp_path / "world"
    for part in ("medical-diff-vqa", "experts", "prognostic"):
        shutil.copytree(world / part, copy / part)
    (copy / "mimic-cxr-jpg").symlink_to(world / "mimic-cxr-jpg")
    index = tmp_path / "index"
    before = make_datamodule(copy, tiny_base, index_cache=str(index)).samples("val")
    experts = pd.read_csv(copy / "experts" / "experts.csv", dtype={"dicom_id": str, "subject_id": str,
                                                                    "study_id": str})
    experts["Atelectasis"] = 0.9
    experts.to_csv(copy / "experts" / "experts.csv", index=False)
    after = make_datamodule(copy, tiny_base, index_cache=str(index)).samples("val")
    assert all("atelectasis: yes" in sample.expert for sample in after)
    assert any("atelectasis: yes" not in sample.expert for sample in before)


def test_a_mapped_table_travels_to_a_spawned_worker_as_its_files(world, tiny_base, tmp_path):
    data = make_datamodule(world, tiny_base, index_cache=str(tmp_path / "index"))
    table = datamodules.table.SampleTable.concat(data.source_tables("train"))
    assert table.files is not None and len(table.files) == 3
    pickled = pickle.dumps(table)
    assert len(pickled) < 4096 < table.nbytes  # the file names, not the columns
    assert pickle.loads(pickled) == table
    copied = table[:10]  # not the files' whole content: pickled as its columns
    assert copied.files is None and list(pickle.loads(pickle.dumps(copied))) == list(copied)


def test_an_entry_another_process_published_first_is_kept(world, tmp_path):
    cache = IndexCache(tmp_path / "index")
    first = prognostic.load_prognostic(world / "prognostic" / "prognostic.jsonl", world / "medical-diff-vqa",
                                       world / "mimic-cxr-jpg", "val")[0]
    second = first[:3]
    cache.store("key", first, {"source": "p", "split": "val", "loaded": len(first), "report": {}})
    cache.store("key", second, {"source": "p", "split": "val", "loaded": 3, "report": {}})
    table, record = cache.load("key")
    assert table == first and record["loaded"] == len(first)
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == ["key.arrow", "key.json"]
