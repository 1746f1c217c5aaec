"""Ask a trained model about your own studies in a browser: ``python demo.py ckpt=PATH [port=7860]`` (Hydra)
serves a page on http://127.0.0.1:7860, this machine only. The page is ``run.demo.build_app``, whose module
docstring says what it reads and what it keeps (nothing)."""

from __future__ import annotations

from omegaconf import DictConfig

from run.cli import entry_point
from run.demo import demo


@entry_point("demo")
def main(cfg: DictConfig) -> None:
    demo(cfg)


if __name__ == "__main__":
    main()
