"""TorchXRayVision's expert models run over chest X-ray images, offline and resumably, into the
expert CSV of ``datamodules.experts`` (``run_experts``), or over images in memory into the
predictions that CSV would hold for them (``predict_experts``: a person's own studies).

Weights are read only from a local directory holding xrv's files under xrv's own names (a copy of
``~/.torchxrayvision/models_data/`` will do); nothing is downloaded. Each image is 8-bit and is
scaled as xrv's ``load_image`` scales an image file (first channel, ``(2x/255 - 1)·1024``), to the
same float32 values, centre-cropped to a square and resized to each model's native resolution:
224 px for the pathology and view models, 320 px for the age and race models (given 224 px they
would upsample it).

Resuming: rows are appended batch by batch to ``<out>.partial`` (flushed and fsynced). A rerun cuts
that file back to its last whole line and skips the images it holds. When every image is done the
rows are written to ``out`` in image order at once (a temporary file renamed into place) and the
side file is removed, so ``out`` is never half-written. A missing or unreadable image stops the run
with an error naming the file; the rows finished before it are kept for the rerun.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
import torchxrayvision as xrv
from PIL import Image
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from common.files import whole_lines, write_text_atomic
from datamodules.experts import COLUMNS, RACES, SCHEMA_VERSION, VIEWS, ExpertPrediction

PATHOLOGY_WEIGHTS = "densenet121-res224-all"
_RELEASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1"
# Where xrv 1.5 downloads each model's weights from; the file keeps the URL's last part as its name.
WEIGHT_URLS = {
    "pathology": xrv.models.model_urls[PATHOLOGY_WEIGHTS]["weights_url"],
    "age": f"{_RELEASE}/baseline_models_riken_xray_age_every_model_age_senet154_v2_tl_26_ft_7_fp32.pt",
    "race": f"{_RELEASE}/resnet_race_detection_val-loss_0.157_mimic_public.pt",
    "view": f"{_RELEASE}/xinario_chestViewSplit_resnet-50.pt",
}
PATHOLOGY_RESOLUTION = 224  # also the view model's
DEMOGRAPHY_RESOLUTION = 320  # the age and race models'
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROBABILITY_DECIMALS, AGE_DECIMALS = 6, 2  # what the CSV keeps, and so what a prompt is made from
USER_IMAGE_ID = 0  # the subject_id and study_id of an image that is not MIMIC's (whose ids are 8 digits)


def weight_file(weights_dir: str | Path, model: str) -> Path:
    """The file xrv keeps ``model``'s weights in, under ``weights_dir``."""
    return Path(weights_dir) / WEIGHT_URLS[model].rsplit("/", 1)[1]


class ExpertModels(nn.Module):
    """The four xrv models, run together on one batch of images."""

    def __init__(self, pathology: nn.Module, age: nn.Module, race: nn.Module, view: nn.Module):
        super().__init__()
        self.pathology, self.age, self.race, self.view = pathology, age, race, view

    def forward(self, image_224: torch.Tensor, image_320: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1, 224, 224) and (B, 1, 320, 320), scaled to [-1024, 1024]."""
        return {
            "pathology": self.pathology(image_224),  # (B, 18) calibrated probabilities
            "age": self.age(image_320)[:, 0],  # (B,) years
            "race": self.race(image_320).exp(),  # (B, 3): the model gives log-probabilities
            "view": self.view(image_224).argmax(dim=1),  # (B,) index into VIEWS
        }


def _baseline_model(cls: type[nn.Module], network: nn.Module) -> nn.Module:
    """An instance of xrv's ``cls`` (its forward: resize, rescale, normalise, run ``network``)
    around a network whose weights are already loaded. Its constructor is skipped because it
    downloads into ~/.torchxrayvision whenever the file is not there, with no way to name another
    directory; the two attributes forward uses are set as that constructor sets them."""
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    model.model = network
    model.norm = torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return model.eval()


def load_expert_models(weights_dir: str | Path) -> ExpertModels:
    """The pathology, age, race and view models from the weight files in ``weights_dir``, on the CPU."""
    missing = [f"{weight_file(weights_dir, model)} (the {model} model's; from {url})"
               for model, url in WEIGHT_URLS.items() if not weight_file(weights_dir, model).is_file()]
    if missing:
        raise FileNotFoundError(
            f"missing weight files: {'; '.join(missing)}. Put them into {Path(weights_dir)}: copy them from "
            "~/.torchxrayvision/models_data/ or download them from the URLs named")
    # With the file present, xrv's own constructor loads it (and sets the calibration) without downloading.
    pathology = xrv.models.DenseNet(weights=PATHOLOGY_WEIGHTS, cache_dir=str(weights_dir))
    with warnings.catch_warnings():
        # The riken age weights are a TorchScript file, which torch now marks deprecated; xrv ships no other format.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        age = torch.jit.load(weight_file(weights_dir, "age"), map_location="cpu")  # the whole network
    race = torchvision.models.resnet34(weights=None)
    race.fc = nn.Sequential(nn.Linear(race.fc.in_features, len(RACES)), nn.LogSoftmax(dim=1))
    race_state = torch.load(weight_file(weights_dir, "race"), map_location="cpu", weights_only=True)
    consume_prefix_in_state_dict_if_present(race_state, "module.")  # saved from nn.DataParallel
    race.load_state_dict(race_state)
    view = torchvision.models.resnet50(weights=None)
    view.load_state_dict(torch.load(weight_file(weights_dir, "view"), map_location="cpu", weights_only=True))
    return ExpertModels(
        pathology.eval(),
        _baseline_model(xrv.baseline_models.riken.AgeModel, age),
        _baseline_model(xrv.baseline_models.emory_hiti.RaceModel, race),
        _baseline_model(xrv.baseline_models.xinario.ViewModel, view),
    )


def preprocess_image(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit image as xrv's ``load_image`` reads an image file (its first channel, a palette
    applied first, scaled to [-1024, 1024]), centre-cropped: (1, 224, 224) and (1, 320, 320) float32.
    For a grayscale JPEG or PNG file, its ``L`` image gives the arrays ``load_image`` gives for the file."""
    if image.mode == "P":
        image = image.convert(image.palette.mode)  # imageio applies the palette when xrv reads the file
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise ValueError(f"mode {image.mode}: the expert models take 8-bit images (Pillow's L, RGB or RGBA)")
    if pixels.ndim == 3:
        pixels = pixels[:, :, 0]  # xrv's choice of channel, not a conversion to gray
    scaled = xrv.utils.normalize(pixels, 255)[None]  # (H, W) -> (1, H, W)
    square = xrv.datasets.XRayCenterCrop()(scaled)
    return (xrv.datasets.XRayResizer(PATHOLOGY_RESOLUTION)(square),
            xrv.datasets.XRayResizer(DEMOGRAPHY_RESOLUTION)(square))


def preprocess(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit image file at ``path`` (JPEG, PNG), as ``preprocess_image``. It is read with Pillow,
    which decodes it as xrv's reader (imageio's Pillow plugin) does, without the format probing that
    makes imageio warn about its legacy DICOM plugin."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found; check the MIMIC-CXR-JPG root or restore the file")
    try:
        with Image.open(path) as file:
            image = file.copy()  # decodes now, so that a damaged file fails here; outlives the closed file
    except Exception as error:  # Pillow raises many types for a damaged file
        raise ValueError(f"{path}: unreadable image ({error}); download it again") from error
    try:
        return preprocess_image(image)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


class _Images(Dataset):
    def __init__(self, paths: list[str | Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return preprocess(self.paths[index])


def _csv_lines(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


HEADER = _csv_lines([list(COLUMNS)])


def partial_path(out: str | Path) -> Path:
    """The side file an unfinished run keeps its rows in."""
    return Path(f"{out}.partial")


def _finished_rows(partial: Path) -> dict[str, str]:
    """dicom_id -> its line, from an interrupted run's side file (created with its header when
    there is none). A torn last line (the run stopped mid-write) is cut off, so appends start on a
    line boundary and that image is done again."""
    whole = whole_lines(partial)
    if not whole:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(HEADER, encoding="utf-8")
        return {}
    header, *lines = whole.decode("utf-8").splitlines(keepends=True)
    if header != HEADER:
        raise ValueError(f"{partial}: its header is not that of expert CSV schema {SCHEMA_VERSION} "
                         f"({HEADER.strip()}); delete it to start over")
    return {next(csv.reader([line]))[0]: line for line in lines}


def _as_kept(value: float, decimals: int) -> float:
    """``value`` as the CSV keeps it and ``load_experts`` reads it back."""
    return float(f"{value:.{decimals}f}")


def _predict(models: ExpertModels, image_224: torch.Tensor, image_320: torch.Tensor, device: str,
             identifiers: list[tuple[str, int, int]]) -> list[ExpertPrediction]:
    """One batch's predictions, rounded as the CSV keeps them; ``identifiers``: each image's dicom_id,
    subject_id and study_id."""
    with torch.inference_mode():
        outputs = models(image_224.to(device), image_320.to(device))
    outputs = {name: value.cpu().tolist() for name, value in outputs.items()}
    return [
        ExpertPrediction(
            dicom_id=dicom_id, subject_id=subject_id, study_id=study_id,
            probabilities=tuple(_as_kept(probability, PROBABILITY_DECIMALS)
                                for probability in outputs["pathology"][index]),
            age_years=_as_kept(outputs["age"][index], AGE_DECIMALS),
            race=RACES[int(np.argmax(outputs["race"][index]))],
            race_probabilities=tuple(_as_kept(probability, PROBABILITY_DECIMALS)
                                     for probability in outputs["race"][index]),
            view=VIEWS[outputs["view"][index]],
        )
        for index, (dicom_id, subject_id, study_id) in enumerate(identifiers)
    ]


def _csv_row(prediction: ExpertPrediction) -> list:
    """The CSV's fields; a kept value formatted again gives back the digits it was kept from."""
    return [
        prediction.dicom_id, prediction.subject_id, prediction.study_id,
        *(f"{probability:.{PROBABILITY_DECIMALS}f}" for probability in prediction.probabilities),
        f"{prediction.age_years:.{AGE_DECIMALS}f}",
        prediction.race, *(f"{probability:.{PROBABILITY_DECIMALS}f}" for probability in prediction.race_probabilities),
        prediction.view,
    ]


def predict_experts(models: ExpertModels, images: dict[str, Image.Image],
                    device: str = "cpu") -> dict[str, ExpertPrediction]:
    """name -> the predictions for the image, in one batch: what ``load_experts`` reads from the CSV
    ``run_experts`` writes for the image's file (the name as its dicom_id), but with subject_id and
    study_id ``USER_IMAGE_ID``, for a person's own image belongs to no MIMIC subject or study. Each
    image is 8-bit, as ``preprocess_image`` takes it.

    Run in a batch of other images or on another device, the models' sums round differently, which
    can move a probability's last kept digit (as between runs of ``run_experts`` with other batch
    sizes); the prompt text changes only if that crosses a level's bound."""
    if not images:
        return {}
    # Batched as run_experts' DataLoader batches: (B, 1, 224, 224) and (B, 1, 320, 320).
    image_224, image_320 = default_collate([preprocess_image(image) for image in images.values()])
    identifiers = [(name, USER_IMAGE_ID, USER_IMAGE_ID) for name in images]
    predictions = _predict(models.to(device).eval(), image_224, image_320, device, identifiers)
    return {prediction.dicom_id: prediction for prediction in predictions}


@dataclass(frozen=True)
class ExpertRun:
    images: int
    computed: int
    resumed: int  # rows taken from an interrupted run's side file


def run_experts(images: pd.DataFrame, models: ExpertModels, out: str | Path, batch_size: int = 16,
                device: str = "cpu", workers: int = 0) -> ExpertRun:
    """Write the expert CSV ``out`` for every row of ``images`` (columns dicom_id, subject_id,
    study_id, path; as ``datamodules.mimic.load_images`` gives them), in that order, resuming an
    interrupted run from ``<out>.partial``. ``workers`` processes read and resize the images."""
    repeated = images["dicom_id"][images["dicom_id"].duplicated()]
    if len(repeated):
        raise ValueError(f"dicom_id {repeated.iloc[0]} is listed twice: each image gets one row")
    out = Path(out)
    partial = partial_path(out)
    lines = _finished_rows(partial)
    finished = images["dicom_id"].isin(set(lines))
    pending = images[~finished]
    models = models.to(device).eval()
    loader = DataLoader(_Images(list(pending["path"])), batch_size=batch_size, num_workers=workers)
    with partial.open("a", encoding="utf-8", newline="") as side, \
            tqdm(total=len(images), initial=int(finished.sum()), unit="image", desc="experts") as progress:
        for start, (image_224, image_320) in zip(range(0, len(pending), batch_size), loader):
            identifiers = list(pending[["dicom_id", "subject_id", "study_id"]].iloc[start:start + batch_size]
                               .itertuples(index=False, name=None))
            batch = {prediction.dicom_id: _csv_lines([_csv_row(prediction)])
                     for prediction in _predict(models, image_224, image_320, device, identifiers)}
            side.write("".join(batch.values()))
            side.flush()
            os.fsync(side.fileno())
            lines.update(batch)
            progress.update(len(batch))
    write_text_atomic(out, HEADER + "".join(lines[dicom_id] for dicom_id in images["dicom_id"]))
    partial.unlink()
    return ExpertRun(images=len(images), computed=len(pending), resumed=int(finished.sum()))
