"""Ask a trained model about your own studies: ``python predict.py ckpt=PATH current=FILE [prior=FILE]
question=PRESET|TEXT [key=value ...]``, or ``manifest=pairs.csv`` for many pairs (Hydra). The run itself is
``run.predict.predict``, whose docstring says what it reads, prints and writes."""

from __future__ import annotations

from omegaconf import DictConfig

from run.cli import entry_point
from run.predict import predict


@entry_point("predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
