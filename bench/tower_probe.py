"""How well a base's vision tower reads each finding: a linear probe on its features.

Fits a logistic regression per CheXpert label on the mean-pooled last-layer features of the train
split's images, and prints its accuracy on every other image next to the label's share there (what
always answering "absent" or "present" would get). A difference answer is right only when the findings
of both studies are all read right, so this bounds what a VLM on this tower can do before the tower
itself is trained further.

    python -m bench.tower_probe                                    # the demo's cached tiny base and world
    python -m bench.tower_probe --base DIR --world DIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipImageProcessor, SiglipVisionModel

from datamodules.collate import image_transform
from datamodules.mimic import CHEXPERT_LABELS, load_chexpert, load_images

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
        return float(((test @ weight + bias > 0).float() == test_labels).float().mean())


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


if __name__ == "__main__":
    main()
