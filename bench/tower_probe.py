"""How well a base's vision tower reads each finding: linear probes on its features.

Fits a logistic regression per CheXpert label on the mean-pooled tokens (of the layer the VLM reads) of
the train split's images, and prints its accuracy on every other image next to the label's share there
(what always answering "absent" or "present" would get). A difference answer needs the findings of
both studies read, so this bounds what a VLM on this tower can do before the tower itself is trained
further.

On a synthetic world it then reads the six Medical-Diff-VQA findings from the world's truth on each
study's frontal image (fitted on the train split's studies) with two readers: the linear probe on the
mean-pooled tokens, and a token reader (the same linear read of every token, the largest logit kept: can
some token tell?), and answers the test split's whole-image difference questions from each one's
readings: a finding is read as added (missing) when the probability that it is present now and was
absent before (or the reverse) is over one half, which, unlike thresholding each study's reading,
does not call a change from two uncertain readings.

Either tower family of the tiny base is read (``run.tiny_base``: a timm ResNet, or with
``--vision-tower siglip`` a SigLIP ViT), at the layer a VLM reads it with the demo's config.

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

from datamodules.collate import image_transform
from datamodules.mimic import CHEXPERT_LABELS, FRONTAL_VIEWS, load_chexpert, load_images
from datamodules.synthetic.population import FINDINGS, site_column
from datamodules.synthetic.questions import WHOLE_IMAGE
from models.config import ModelConfig
from models.factory import vision_layer, vision_type
from models.vision import VisionTower, build_vision_tower, read_spec

ROOT = Path(__file__).resolve().parents[1]


# Where the demo caches its world and base (configs/paths/default.yaml).
CACHE = Path(os.environ.get("LUMEN_CACHE", ROOT / ".cache" / "lumen"))


def tiny_tower(base: Path) -> tuple[VisionTower, tuple[int, tuple, tuple]]:
    """The base's tower as the demo's VLM reads it (``model/vision=base``: the family its files say, the layer its
    manifest names -- a ResNet's second stage, a SigLIP's last layer) and its input size, mean and std."""
    config = ModelConfig(base=str(base))
    kind, layer = vision_type(config), vision_layer(config, None)
    spec = read_spec(kind, base / "vision_tower", layer)
    return build_vision_tower(kind, base / "vision_tower", layer).eval(), (spec.image_size, spec.mean, spec.std)


def features(tower: VisionTower, size_mean_std: tuple[int, tuple, tuple], paths: list[str]) -> torch.Tensor:
    """(images, tokens, channels): the tokens of the layer the VLM reads, standardised later."""
    size, mean, std = size_mean_std
    pixels = torch.stack([image_transform(Image.open(path), size, mean, std) for path in paths])
    with torch.no_grad():
        return torch.cat([tower(batch) for batch in pixels.split(256)])


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Every channel to zero mean and unit variance over ``train``'s images (and tokens)."""
    dims = tuple(range(train.dim() - 1))
    mean, std = train.mean(dim=dims), train.std(dim=dims) + 1e-6
    return [(part - mean) / std for part in (train, *others)]


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                   test_labels: torch.Tensor) -> float:
    """Accuracy on ``test`` of an L2-regularised logistic regression (L-BFGS) fitted on ``train``."""
    return float(((probe_probabilities(train, train_labels, test) > 0.5).float() == test_labels).float().mean())


def probe_probabilities(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """P(label) on ``test`` from an L2-regularised logistic regression (L-BFGS) fitted on ``train``. Features
    (images, channels) are read as they are; tokens (images, tokens, channels) by reading every token with
    the same weights and keeping the largest logit (a finding needs one token that shows it)."""
    weight = torch.zeros(train.shape[-1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def logits(features: torch.Tensor) -> torch.Tensor:
        read = features @ weight + bias
        return read if features.dim() == 2 else read.amax(dim=1)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(logits(train), train_labels) + 1e-3 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return torch.sigmoid(logits(test))


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
    findings, taken from ``read`` (study_id -> finding -> present, or its probability), equal those of
    ``truth``. From probabilities a finding counts as added (missing) when P(present now, absent before)
    (or the reverse) is over one half, the readings of the two studies taken as independent."""
    if questions.empty:
        raise ValueError("no difference questions to answer")

    def change(table: pd.DataFrame) -> np.ndarray:
        now = table.loc[questions["study_id"]].to_numpy().astype(float)
        before = table.loc[questions["ref_id"]].to_numpy().astype(float)
        return np.concatenate([now * (1 - before) > 0.5, before * (1 - now) > 0.5], axis=1)  # (questions, added + missing)

    return float((change(read) == change(truth[read.columns])).all(axis=1).mean())


def difference_reader(images: pd.DataFrame, image_tokens: torch.Tensor, world: Path) -> None:
    """Prints each reader's accuracy per finding and on the test split's difference questions; ``images`` are
    the world's images, ``image_tokens`` their tokens (row for row)."""
    frontal = images[images["view"].isin(FRONTAL_VIEWS)].drop_duplicates("study_id")
    truth = finding_truth(world)
    # A copy: pandas hands out read-only arrays, which torch warns about when it indexes with one.
    is_train = (frontal["split"] == "train").to_numpy(copy=True)
    train, other = frontal[is_train], frontal[~is_train]
    tokens = image_tokens[torch.tensor(images.index.get_indexer(frontal.index))]
    readers = {"pooled reader": tokens.mean(dim=1), "token reader": tokens}
    read = {name: pd.DataFrame(index=frontal["study_id"].to_numpy()) for name in readers}
    print(f"\nfindings read on the frontal image: fitted on {len(train)} train-split studies, scored on {len(other)} others\n")
    print(f"| finding | share present | {' | '.join(readers)} |\n| --- | --- |{' --- |' * len(readers)}")
    for finding in truth.columns:
        target = torch.tensor(truth.loc[train["study_id"], finding].to_numpy(), dtype=torch.float32)
        expected = truth.loc[other["study_id"], finding].to_numpy()
        accuracies = []
        for name, reader_features in readers.items():
            fitted, everything = standardise(reader_features[is_train], reader_features)
            read[name][finding] = probe_probabilities(fitted, target, everything).numpy()
            accuracies.append((read[name].loc[other["study_id"], finding].to_numpy() > 0.5) == expected)
        print(f"| {finding} | {expected.mean():.2f} | {' | '.join(f'{right.mean():.3f}' for right in accuracies)} |")
    questions = pd.read_csv(world / "medical-diff-vqa" / "mimic_pair_questions.csv")
    questions = questions[(questions["split"] == "test") & (questions["question"] == WHOLE_IMAGE)]
    unchanged = difference_sets_right(questions, truth, pd.DataFrame(False, index=truth.index, columns=truth.columns))
    print(f"\ntest-split whole-image difference questions ({len(questions)}): added and missing findings right "
          + ", ".join(f"{difference_sets_right(questions, truth, table):.3f} from the {name}" for name, table in read.items())
          + f"; {unchanged:.3f} from reading no finding anywhere (no finding added or missing)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=CACHE / "tiny-base-resnet-world-400subjects-seed0")
    parser.add_argument("--world", type=Path, default=CACHE / "world-400subjects-seed0")
    parser.add_argument("--min-share", type=float, default=0.02, help="leave out labels rarer than this")
    args = parser.parse_args()
    tower, size_mean_std = tiny_tower(args.base)
    jpg = args.world / "mimic-cxr-jpg"
    all_images = load_images(jpg).reset_index(drop=True)
    # Every image through the tower once: the CheXpert probe and the difference reader share the tokens.
    image_tokens = features(tower, size_mean_std, list(all_images["path"]))
    images = all_images.reset_index().merge(load_chexpert(jpg), on=["subject_id", "study_id"])
    train, test = images[images["split"] == "train"], images[images["split"] != "train"]
    train_features, test_features = standardise(image_tokens[torch.tensor(train["index"].to_numpy())].mean(dim=1),
                                                image_tokens[torch.tensor(test["index"].to_numpy())].mean(dim=1))
    print(f"{args.base.name}: linear probe on the mean-pooled tokens of {len(train)} train-split images, scored on "
          f"{len(test)} others\n")
    print("| label | share of the scored images | probe accuracy |\n| --- | --- | --- |")
    for label in [label for label in CHEXPERT_LABELS if label in images.columns]:
        target, expected = (torch.tensor((part[label] == 1.0).to_numpy(), dtype=torch.float32) for part in (train, test))
        if float(expected.mean()) < args.min_share:
            continue
        accuracy = probe_accuracy(train_features, target, test_features, expected)
        print(f"| {label} | {float(expected.mean()):.2f} | {accuracy:.3f} |")
    if (args.world / "truth" / "studies.csv").is_file():
        difference_reader(all_images, image_tokens, args.world)


if __name__ == "__main__":
    main()
