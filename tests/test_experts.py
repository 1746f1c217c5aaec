"""Expert-model predictions: the four-level words, the prompt text, the CSV and its errors, running
TorchXRayVision's real model classes (random weights saved in xrv's own files) resumably, and the
synthetic world's expert CSV."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import torchxrayvision as xrv
from PIL import Image, ImageOps
from torch import nn

from common.readers import InputError
from datamodules.build import main as build_main
from datamodules.experts_builder import (
    USER_IMAGE_ID, WEIGHT_URLS, ExpertRun, load_expert_models, partial_path, predict_experts, preprocess,
    preprocess_image, run_experts, weight_file,
)
from datamodules.experts import (
    COLUMNS, PATHOLOGIES, RACE_COLUMNS, RACES, ExpertPrediction, expert_text, level, load_experts,
)
from datamodules.mimic import load_images
from datamodules.synthetic import simulate_population
from datamodules.synthetic.experts import PATHOLOGY_OF_FINDING, expert_table
from tests.helpers import WORLD_SUBJECTS

IMAGES = 4  # two batches of two: a run can be interrupted in its second
BATCH = 2
# The riken age weights are TorchScript, which torch now marks deprecated: xrv gives no other format.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


class TinyAgeNetwork(nn.Module):
    """Stands in for the riken age network (a TorchScript file too): ages around 60."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(3 * 4 * 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))  # (B, 3, 320, 320) -> (B, 1)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """Random weights for each model, saved as xrv saves them and under xrv's file names; the
    output layers are scaled so that probabilities spread over (0, 1) instead of saturating."""
    directory = tmp_path_factory.mktemp("xrv-weights")
    torch.manual_seed(0)
    pathology = xrv.models.DenseNet(weights=None)
    nn.init.normal_(pathology.classifier.weight, std=5e-5)
    nn.init.constant_(pathology.classifier.bias, -3.0)
    torch.save(pathology, weight_file(directory, "pathology"))  # xrv keeps the whole pickled module
    age = TinyAgeNetwork()
    age.fc.weight.data *= 10
    nn.init.constant_(age.fc.bias, 60.0)
    torch.jit.save(torch.jit.script(age), weight_file(directory, "age"))
    race = torchvision.models.resnet34(weights=None)
    race.fc = nn.Sequential(nn.Linear(512, len(RACES)), nn.LogSoftmax(dim=1))
    race.fc[0].weight.data *= 0.1
    torch.save(nn.DataParallel(race).state_dict(), weight_file(directory, "race"))  # keys start with module.
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weight_file(directory, "view"))
    return directory


@pytest.fixture(scope="module")
def models(weights_dir):
    return load_expert_models(weights_dir)


@pytest.fixture(scope="module")
def images(world):
    return load_images(world / "mimic-cxr-jpg").head(IMAGES)


@pytest.fixture(scope="module")
def clean_csv(models, images, tmp_path_factory):
    """The expert CSV of an uninterrupted run."""
    out = tmp_path_factory.mktemp("clean") / "experts.csv"
    assert run_experts(images, models, out, batch_size=BATCH) == ExpertRun(images=IMAGES, computed=IMAGES, resumed=0)
    return out


def xrv_preprocessing(path) -> tuple[np.ndarray, np.ndarray]:
    """xrv's own reading of an image file, centre-cropped and resized to 224 and 320 px."""
    square = xrv.datasets.XRayCenterCrop()(xrv.utils.load_image(str(path)))
    return xrv.datasets.XRayResizer(224)(square), xrv.datasets.XRayResizer(320)(square)


def gray_image(path) -> Image.Image:
    """The image file read as the data module reads it: Pillow's 8-bit grayscale."""
    with Image.open(path) as file:
        return file.convert("L")


def prediction(probability: float = 0.1, **fields) -> ExpertPrediction:
    values = {"dicom_id": "d1", "subject_id": 10000001, "study_id": 50000001,
              "probabilities": (probability,) * len(PATHOLOGIES), "age_years": 63.4, "race": "White",
              "race_probabilities": (0.1, 0.1, 0.8), "view": "Frontal"} | fields
    return ExpertPrediction(**values)


def test_levels_split_at_a_quarter_half_and_three_quarters():
    assert [level(p) for p in (0.0, 0.2499, 0.25, 0.4999, 0.5, 0.7499, 0.75, 1.0)] == [
        "no", "no", "maybe no", "maybe no", "maybe yes", "maybe yes", "yes", "yes"]


def test_a_level_outside_zero_to_one_is_an_error():
    with pytest.raises(ValueError, match="1.2 is not in"):
        level(1.2)


def test_text_lists_all_18_pathologies_in_xrv_order_then_age_race_and_view_once():
    probabilities = (0.8, 0.3) + (0.1,) * 15 + (0.6,)
    text = expert_text(prediction(probabilities=probabilities))
    assert text == (
        "Expert models' findings on the current image: atelectasis: yes; consolidation: maybe no; "
        "infiltration: no; pneumothorax: no; edema: no; emphysema: no; fibrosis: no; effusion: no; pneumonia: no; "
        "pleural thickening: no; cardiomegaly: no; nodule: no; mass: no; hernia: no; lung lesion: no; "
        "fracture: no; lung opacity: no; enlarged cardiomediastinum: maybe yes. "
        "Estimated age: 63 years; race: White; view: frontal.")


def test_text_without_demographics_stops_after_the_findings():
    text = expert_text(prediction(), demographics=False)
    assert text.endswith("enlarged cardiomediastinum: no.")
    assert not re.search(r"\b(age|race|view)\b", text, re.IGNORECASE)


def test_loaded_csv_maps_each_dicom_id_to_its_row(world):
    predictions = load_experts(world / "experts" / "experts.csv")
    table = pd.read_csv(world / "experts" / "experts.csv", dtype={"dicom_id": str})
    first = table.iloc[0]
    loaded = predictions[first["dicom_id"]]
    assert len(predictions) == len(table)
    assert loaded.subject_id == first["subject_id"] and loaded.study_id == first["study_id"]
    assert loaded.probabilities == tuple(first[list(PATHOLOGIES)])
    assert loaded.race_probabilities == tuple(first[list(RACE_COLUMNS)])
    assert (loaded.age_years, loaded.race, loaded.view) == (first["age_years"], first["race"], first["view"])


def test_a_malformed_value_is_an_error_naming_file_line_and_field(world, tmp_path):
    table = pd.read_csv(world / "experts" / "experts.csv", dtype=str)
    table.loc[2, "Effusion"] = "high"
    table.to_csv(tmp_path / "experts.csv", index=False)
    expected = r"experts\.csv line 4, field Effusion: 'high' is not a number in \[0.0, 1.0\]"
    with pytest.raises(ValueError, match=expected):
        load_experts(tmp_path / "experts.csv")


def test_an_unknown_view_is_an_error_naming_the_choices(world, tmp_path):
    table = pd.read_csv(world / "experts" / "experts.csv", dtype=str)
    table.loc[0, "view"] = "PA"
    table.to_csv(tmp_path / "experts.csv", index=False)
    with pytest.raises(ValueError, match=r"line 2, field view: 'PA' is not one of \['Frontal', 'Lateral'\]"):
        load_experts(tmp_path / "experts.csv")


def test_a_missing_column_is_an_error_naming_it(world, tmp_path):
    pd.read_csv(world / "experts" / "experts.csv", dtype=str).drop(columns="age_years").to_csv(
        tmp_path / "experts.csv", index=False)
    with pytest.raises(ValueError, match=r"missing columns \['age_years'\]"):
        load_experts(tmp_path / "experts.csv")


def test_a_repeated_dicom_id_is_an_error(world, tmp_path):
    table = pd.read_csv(world / "experts" / "experts.csv", dtype=str)
    pd.concat([table.head(2), table.head(1)]).to_csv(tmp_path / "experts.csv", index=False)
    with pytest.raises(InputError, match=f"line 4, field dicom_id: {table.loc[0, 'dicom_id']} repeats line 2"):
        load_experts(tmp_path / "experts.csv")


def test_synthetic_world_has_one_expert_row_per_image_in_the_schema(world):
    table = pd.read_csv(world / "experts" / "experts.csv", dtype={"dicom_id": str})
    manifest = json.loads((world / "world.json").read_text())
    assert tuple(table.columns) == COLUMNS
    assert manifest["counts"]["expert_rows"] == manifest["counts"]["images"] == len(table)
    assert set(table["dicom_id"]) == set(load_images(world / "mimic-cxr-jpg")["dicom_id"])


def test_synthetic_levels_agree_with_the_true_findings(world):
    predictions = load_experts(world / "experts" / "experts.csv")
    said_yes = {True: [], False: []}  # finding present? -> whether the level was yes or maybe yes, each time
    for study in simulate_population(WORLD_SUBJECTS, seed=0):
        present = {PATHOLOGY_OF_FINDING[finding.name] for finding in study.findings}
        for image in study.images:
            levels = dict(zip(PATHOLOGIES, map(level, predictions[image.dicom_id].probabilities)))
            for pathology in PATHOLOGY_OF_FINDING.values():
                said_yes[pathology in present].append(levels[pathology] in ("maybe yes", "yes"))
            assert predictions[image.dicom_id].view == ("Lateral" if image.view == "LATERAL" else "Frontal")
    assert len(said_yes[True]) >= 20
    assert np.mean(said_yes[True]) >= 0.8 and 1 - np.mean(said_yes[False]) >= 0.8


def test_synthetic_ages_grow_with_the_study_dates():
    studies = simulate_population(200, seed=0)
    table = expert_table(studies, seed=0)
    frontal = table.groupby("study_id", sort=False)["age_years"].first()
    first, last = {}, {}
    for study in studies:
        first.setdefault(study.subject_id, (study.date, frontal[study.study_id]))
        last[study.subject_id] = (study.date, frontal[study.study_id])
    years = np.array([(last[s][0] - first[s][0]).days / 365.25 for s in first])
    growth = np.array([last[s][1] - first[s][1] for s in first])
    # Each estimate has the age model's few years of noise; across subjects a year apart is a year older.
    assert np.polyfit(years, growth, 1)[0] == pytest.approx(1.0, abs=0.4)


def test_synthetic_table_is_the_same_for_the_same_seed():
    studies = simulate_population(4, seed=3)
    pd.testing.assert_frame_equal(expert_table(studies, seed=3), expert_table(studies, seed=3))
    assert not expert_table(studies, seed=3).equals(expert_table(studies, seed=4))


def test_a_missing_weight_file_is_an_error_naming_it_its_directory_and_its_url(weights_dir, tmp_path):
    for model in ("pathology", "age", "view"):
        shutil.copy(weight_file(weights_dir, model), tmp_path)
    expected = weight_file(tmp_path, "race")
    with pytest.raises(FileNotFoundError) as error:
        load_expert_models(tmp_path)
    assert str(expected) in str(error.value) and f"into {tmp_path}" in str(error.value)
    assert WEIGHT_URLS["race"] in str(error.value) and "the view model's" not in str(error.value)


def test_rows_equal_xrvs_own_models_on_xrvs_own_preprocessing(weights_dir, clean_csv, images, tmp_path,
                                                              monkeypatch):
    # xrv's baseline models read only ~/.torchxrayvision/models_data: point ~ at our weights.
    (tmp_path / ".torchxrayvision").mkdir()
    (tmp_path / ".torchxrayvision" / "models_data").symlink_to(weights_dir)
    monkeypatch.setenv("HOME", str(tmp_path))
    pathology = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=str(weights_dir))
    age, race = xrv.baseline_models.riken.AgeModel(), xrv.baseline_models.emory_hiti.RaceModel()
    view = xrv.baseline_models.xinario.ViewModel()
    rows = pd.read_csv(clean_csv, dtype={"dicom_id": str})
    assert list(rows["dicom_id"]) == list(images["dicom_id"])
    for path, (_, row) in zip(images["path"], rows.iterrows()):
        image_224, image_320 = (torch.from_numpy(image)[None] for image in xrv_preprocessing(path))
        with torch.inference_mode():
            np.testing.assert_allclose(row[list(PATHOLOGIES)].to_numpy(float), pathology(image_224)[0], atol=1e-5)
            assert row["age_years"] == pytest.approx(age(image_320)[0, 0].item(), abs=0.006)
            race_probabilities = race(image_320)[0].exp()
            np.testing.assert_allclose(row[list(RACE_COLUMNS)].to_numpy(float), race_probabilities, atol=1e-5)
            assert row["race"] == RACES[race_probabilities.argmax()]
            assert row["view"] == view.targets[view(image_224)[0].argmax()]
    assert rows[list(PATHOLOGIES)].to_numpy().std() > 0.05  # not saturated: the comparison means something


def test_an_interrupted_run_resumes_where_it_stopped_and_gives_the_same_csv(models, images, clean_csv, tmp_path):
    out = tmp_path / "experts.csv"
    broken = images.copy()
    broken.loc[2, "path"] = str(tmp_path / "gone.jpg")
    with pytest.raises(FileNotFoundError, match="gone.jpg: image not found"):
        run_experts(broken, models, out, batch_size=BATCH)
    assert not out.exists()
    assert len(partial_path(out).read_text().splitlines()) == 1 + 2  # header + the first batch

    assert run_experts(images, models, out, batch_size=BATCH) == ExpertRun(images=IMAGES, computed=2, resumed=2)
    assert out.read_text() == clean_csv.read_text()
    assert not partial_path(out).exists()


def test_a_torn_last_line_is_dropped_and_its_image_done_again(models, images, clean_csv, tmp_path):
    out = tmp_path / "experts.csv"
    header, first, second, third, _ = clean_csv.read_text().splitlines(keepends=True)
    partial_path(out).write_text(header + first + second + third[:40])
    assert run_experts(images, models, out, batch_size=BATCH) == ExpertRun(images=IMAGES, computed=2, resumed=2)
    assert out.read_text() == clean_csv.read_text()


def test_a_side_file_with_another_header_is_refused(models, images, tmp_path):
    out = tmp_path / "experts.csv"
    partial_path(out).write_text("dicom_id,probability\n")
    with pytest.raises(ValueError, match="experts.csv.partial: its header is not that of expert CSV schema 1"):
        run_experts(images, models, out)


@pytest.mark.filterwarnings("error")  # imageio warned of its legacy DICOM plugin when xrv probed the file
def test_an_unreadable_image_is_an_error_naming_it(tmp_path):
    (tmp_path / "damaged.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="damaged.jpg: unreadable image"):
        preprocess(tmp_path / "damaged.jpg")


# A world image saved again as another kind of file, from its grayscale pixels.
RESAVED = {
    "grayscale PNG": lambda gray: gray,
    # The channels differ so that taking the first (as xrv does) is told apart from converting to gray.
    "RGB PNG": lambda gray: Image.merge("RGB", (ImageOps.invert(gray), gray, gray)),
    "palette PNG": lambda gray: gray.quantize(64),
}


@pytest.mark.parametrize("kind", ["grayscale JPEG", *RESAVED])
def test_a_file_is_preprocessed_bit_for_bit_as_xrvs_load_image_reads_it(kind, images, tmp_path):
    path = images["path"].iloc[0]
    if kind in RESAVED:
        path = tmp_path / "image.png"
        RESAVED[kind](gray_image(images["path"].iloc[0])).save(path)
    for ours, xrvs in zip(preprocess(path), xrv_preprocessing(path)):
        assert ours.dtype == xrvs.dtype == np.float32
        np.testing.assert_array_equal(ours, xrvs)


def test_an_l_image_in_memory_is_preprocessed_bit_for_bit_as_its_file(images):
    for path in images["path"].head(2):
        for in_memory, from_file in zip(preprocess_image(gray_image(path)), xrv_preprocessing(path)):
            assert in_memory.shape in ((1, 224, 224), (1, 320, 320))
            np.testing.assert_array_equal(in_memory, from_file)


def test_an_image_of_more_than_8_bits_is_refused_naming_the_file(tmp_path):
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png: mode I.*: the expert models take 8-bit images"):
        preprocess(tmp_path / "deep.png")


def test_predictions_in_memory_are_the_rows_load_experts_reads_from_the_csv(models, images, clean_csv):
    first_batch = images.head(BATCH)  # the images of the CSV's first batch, so the models' sums round alike
    predicted = predict_experts(models, {image.dicom_id: gray_image(image.path) for image in first_batch.itertuples()})
    loaded = load_experts(clean_csv)
    assert list(predicted) == list(first_batch["dicom_id"])
    for dicom_id, prediction in predicted.items():
        assert expert_text(prediction) == expert_text(loaded[dicom_id])
        assert prediction == dataclasses.replace(loaded[dicom_id], subject_id=USER_IMAGE_ID, study_id=USER_IMAGE_ID)


def test_no_images_give_no_predictions(models):
    assert predict_experts(models, {}) == {}


def test_a_missing_weights_directory_is_an_error_naming_every_weight_file(tmp_path):
    absent = tmp_path / "xrv-weights"
    with pytest.raises(FileNotFoundError) as error:
        load_expert_models(absent)
    assert all(str(weight_file(absent, model)) in str(error.value) for model in WEIGHT_URLS)
    assert f"into {absent}" in str(error.value)


def test_build_experts_writes_the_csv_and_prints_counts(world, weights_dir, tmp_path, capsys):
    out = tmp_path / "experts.csv"
    build_main(["experts", "--mimic-cxr-jpg", str(world / "mimic-cxr-jpg"), "--weights-dir", str(weights_dir),
                "--out", str(out), "--limit", "2", "--workers", "0"])
    assert len(load_experts(out)) == 2
    assert re.match(r"2 images -> .*experts\.csv: 2 computed, 0 resumed from .*experts\.csv\.partial, in [\d.]+ s",
                    capsys.readouterr().out)
