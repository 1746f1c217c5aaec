"""Train a LUMEN model: ``python train.py [experiment=NAME] [key=value ...]`` (Hydra). The run itself is
``run.train.train``."""

from __future__ import annotations

from omegaconf import DictConfig

from run.cli import entry_point
from run.train import train


@entry_point("train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
