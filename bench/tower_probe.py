"""How well a base's vision tower reads each finding: a linear probe on its features.

Fits a logistic regression per CheXpert label on the mean-pooled last-layer features of the train
split's images, and prints its accuracy on every other image next to the label's share there (what
always answering "absent" or "present" would get). A difference answer is right only when the findings
of both studies are all read right, so this bounds what a VLM on this tower can do before the tower
itself is trained further.

On a synthetic world it then reads the six Medical-Diff-VQA findings from the world's truth on each
study's frontal image the same way (fitted on the train split's studies) and answers the test split's
whole-image difference questions from those readings alone: the added and missing findings a linear
reader of the frozen tower gets right, next to what reading no finding anywhere gets.

    python -m bench.tower_probe                                    # the demo's cached tiny base and world
    python -m bench.tower_probe --base DIR --world DIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipImageProcessor, SiglipVisionModel

from datamodules.collate import image_transform
from datamodules.mimic import CHEXPERT_LABELS, FRONTAL_VIEWS, load_chexpert, load_images
from datamodules.synthetic.population import FINDINGS, site_column
from datamodules.synthetic.questions import WHOLE_IMAGE

ROOT = Path(__file__).resolve().parents[1]


# Where the demo caches its world and base (configs/paths/default.yaml).
CACHE = Path(os.environ.get("LUMEN_CACHE", ROOT / ".cache" / "lumen"))


def features(tower: SiglipVisionModel, processor: SiglipImageProcessor, paths: list[str]) -> torch.Tensor:
    """(images, hidden) mean-pooled last-layer tokens, standardised later."""
    size = tower.config.image_size
    pixels = torch.stack([image_transform(Image.open(path), size, processor.image_mean, processor.image_std)
                          for path in paths])
    with torch.no_grad():
        return torch.cat([tower(pixel_values=batch).last_hidden_state.mean(dim=1) for batch in pixels.split(256)])


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                   test_labels: torch.Tensor) -> float:
    """Accuracy of an L2-regularised logistic regression (L-BFGS) fitted on ``train``."""
    return float((probe_predictions(train, train_labels, test) == test_labels).float().mean())


def probe_predictions(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """0/1 predictions on ``test`` of an L2-regularised logistic regression (L-BFGS) fitted on ``train``."""
    weight = torch.zeros(train.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(train @ weight + bias, train_labels) + 1e-3 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return (test @ weight + bias > 0).float()


def finding_truth(world: Path) -> pd.DataFrame:
    """study_id -> whether each Medical-Diff-VQA finding is present at any of its sites (the world's truth)."""
    truth = pd.read_csv(world / "truth" / "studies.csv")
    present = pd.DataFrame({"study_id": truth["study_id"]})
    for finding in FINDINGS:
        columns = [site_column(finding, site) for site in finding.sites]
        present[finding.name] = (truth[columns] > 0).any(axis=1)
    return present.set_index("study_id")


def difference_sets_right(questions: pd.DataFrame, truth: pd.DataFrame, read: pd.DataFrame) -> float:
    """Share of whole-image difference questions (``study_id``, ``ref_id``) whose added and missing
    findings, taken from ``read`` (study_id -> finding -> present), equal those of ``truth``."""
    if questions.empty:
        raise ValueError("no difference questions to answer")

    def change(table: pd.DataFrame) -> np.ndarray:
        now, before = table.loc[questions["study_id"]].to_numpy(), table.loc[questions["ref_id"]].to_numpy()
        return np.concatenate([now & ~before, before & ~now], axis=1)  # (questions, added + missing)

    return float((change(read) == change(truth[read.columns])).all(axis=1).mean())


def difference_reader(tower: SiglipVisionModel, processor: SiglipImageProcessor, world: Path) -> None:
    """Prints the linear reader's accuracy per finding and on the test split's difference questions."""
    images = load_images(world / "mimic-cxr-jpg")
    frontal = images[images["view"].isin(FRONTAL_VIEWS)].drop_duplicates("study_id")
    truth = finding_truth(world)
    # A copy: pandas hands out read-only arrays, which torch warns about when it indexes with one.
    is_train = (frontal["split"] == "train").to_numpy(copy=True)
    train, other = frontal[is_train], frontal[~is_train]
    all_features = features(tower, processor, list(frontal["path"]))
    mean, std = all_features[is_train].mean(dim=0), all_features[is_train].std(dim=0) + 1e-6
    all_features = (all_features - mean) / std
    train_features = all_features[is_train]
    read = pd.DataFrame(index=frontal["study_id"].to_numpy())
    print(f"\nfindings read on the frontal image: fitted on {len(train)} train-split studies, scored on {len(other)} others\n")
    print("| finding | share present | probe accuracy |\n| --- | --- | --- |")
    for finding in truth.columns:
        target = torch.tensor(truth.loc[train["study_id"], finding].to_numpy(), dtype=torch.float32)
        read[finding] = probe_predictions(train_features, target, all_features).numpy().astype(bool)
        expected = truth.loc[other["study_id"], finding].to_numpy()
        print(f"| {finding} | {expected.mean():.2f} | {(read.loc[other['study_id'], finding].to_numpy() == expected).mean():.3f} |")
    questions = pd.read_csv(world / "medical-diff-vqa" / "mimic_pair_questions.csv")
    questions = questions[(questions["split"] == "test") & (questions["question"] == WHOLE_IMAGE)]
    unchanged = difference_sets_right(questions, truth, pd.DataFrame(False, index=truth.index, columns=truth.columns))
    print(f"\ntest-split whole-image difference questions ({len(questions)}): added and missing findings right "
          f"{difference_sets_right(questions, truth, read):.3f} from the linear readings; "
          f"{unchanged:.3f} from reading no finding anywhere (no finding added or missing)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=CACHE / "tiny-base-world-400subjects-seed0")
    parser.add_argument("--world", type=Path, default=CACHE / "world-400subjects-seed0")
    parser.add_argument("--min-share", type=float, default=0.02, help="leave out labels rarer than this")
    args = parser.parse_args()
    tower = SiglipVisionModel.from_pretrained(args.base / "vision_tower").eval()
    processor = SiglipImageProcessor.from_pretrained(args.base / "vision_tower")
    jpg = args.world / "mimic-cxr-jpg"
    images = load_images(jpg).merge(load_chexpert(jpg), on=["subject_id", "study_id"])
    train, test = images[images["split"] == "train"], images[images["split"] != "train"]
    train_features, test_features = features(tower, processor, list(train["path"])), features(tower, processor, list(test["path"]))
    mean, std = train_features.mean(dim=0), train_features.std(dim=0) + 1e-6
    train_features, test_features = (train_features - mean) / std, (test_features - mean) / std
    print(f"{args.base.name}: linear probe on {len(train)} train-split images, scored on {len(test)} others\n")
    print("| label | share of the scored images | probe accuracy |\n| --- | --- | --- |")
    for label in [label for label in CHEXPERT_LABELS if label in images.columns]:
        target, expected = (torch.tensor((part[label] == 1.0).to_numpy(), dtype=torch.float32) for part in (train, test))
        if float(expected.mean()) < args.min_share:
            continue
        accuracy = probe_accuracy(train_features, target, test_features, expected)
        print(f"| {label} | {float(expected.mean()):.2f} | {accuracy:.3f} |")
    if (args.world / "truth" / "studies.csv").is_file():
        difference_reader(tower, processor, args.world)


if __name__ == "__main__":
    main()
