"""Evaluate a checkpoint: ``python eval.py ckpt=PATH [split=test] [key=value ...]`` (Hydra). The run itself
is ``run.evaluate.evaluate``, whose docstring says what it reads and writes."""

from __future__ import annotations

from omegaconf import DictConfig

from run.cli import entry_point
from run.evaluate import evaluate


@entry_point("eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
