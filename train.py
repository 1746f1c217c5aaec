"""Train a LUMEN model: ``python train.py [experiment=NAME] [key=value ...]`` (Hydra)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from models.checkpoints import ModelConfig, input_spec
from models.parallel import accumulation
from models.resume import require_resumable

log = logging.getLogger("train")

# What each input path must point to. A config lists the ones its run needs under `required_inputs`
# (the demo's prepare steps create them); each data source also checks its own files.
INPUTS = {
    "paths.mimic_cxr_jpg": "the MIMIC-CXR-JPG root (files/, mimic-cxr-2.0.0-*.csv.gz)",
    "paths.diffvqa": "the Medical-Diff-VQA directory (mimic_pair_questions.csv, mimic_all.csv)",
    "paths.prognostic": "the prognostic questions (python -m datamodules.build prognostic)",
    "paths.experts": "the expert predictions (python -m datamodules.build experts)",
    "model.net.base": "the base model directory (llm/, vision_tower/)",
}


CONFIGS = Path(__file__).resolve().parent / "configs"


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """Composes ``configs/<name>.yaml`` as the entry points do, for use outside a Hydra app (tests,
    benchmarks). ``paths.cache_dir`` and ``paths.output_dir`` need explicit values there."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def prepare(cfg: DictConfig) -> None:
    """Runs the config's cached preparation steps (synthetic world, tiny base model) in order."""
    for name, step in (cfg.get("prepare") or {}).items():
        if step is not None:
            log.info("prepare %s: %s", name, hydra.utils.instantiate(step))


def require_inputs(cfg: DictConfig) -> None:
    """Fails at once, naming the key to set, when a required input path is unset or does not exist."""
    for key in cfg.get("required_inputs") or []:
        what = INPUTS.get(key, "an input of this run")
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and Path(value).exists():
            continue
        problem = "is not set" if value is None else f"= {value} does not exist"
        raise FileNotFoundError(f"{key} {problem}: it must point to {what}; set {key}=<path>")


def instantiate_data(cfg: DictConfig, spec: dict):
    """The data config's DataModule. A source's own error (a missing file, a bad value) already says
    what to set, so it is raised as it is rather than inside Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(cfg.data, input_spec=spec)
    except InstantiationException as error:
        if isinstance(error.__cause__, (FileNotFoundError, ValueError)):
            raise error.__cause__ from None
        raise


def accumulate_grad_batches(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimizer step, derived from ``data.global_batch_size`` (see
    ``models.parallel.accumulation``). An explicit ``trainer.accumulate_grad_batches`` is used only
    without a global batch, and refused when it disagrees with one."""
    global_batch_size, micro_batch_size = cfg.data.get("global_batch_size"), cfg.data.batch_size
    derived = accumulation(global_batch_size, micro_batch_size, world_size)
    explicit = cfg.trainer.get("accumulate_grad_batches")
    if explicit is None:
        return derived
    if global_batch_size is not None and explicit != derived:
        raise ValueError(
            f"trainer.accumulate_grad_batches={explicit} conflicts with data.global_batch_size={global_batch_size}, "
            f"which with data.batch_size={micro_batch_size} on {world_size} processes means {derived}: remove "
            "trainer.accumulate_grad_batches (it is derived), or set data.global_batch_size=null"
        )
    return explicit


def train(cfg: DictConfig) -> L.Trainer:
    prepare(cfg)
    # Seeded after preparation, which draws random numbers only when it has to build something.
    L.seed_everything(cfg.seed, workers=True)
    require_inputs(cfg)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks.append(LogConfig(OmegaConf.to_container(cfg, resolve=True)))
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # Before the data is read: a global batch that does not divide fails at once.
    trainer.accumulate_grad_batches = accumulate_grad_batches(cfg, trainer.num_devices * trainer.num_nodes)
    require_resumable(trainer, cfg.get("ckpt_path"))
    spec = input_spec(ModelConfig(**cfg.model.net))
    datamodule = instantiate_data(cfg, spec)
    module = hydra.utils.instantiate(cfg.model)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        finish_wandb(loggers, exit_code=0 if trainer.state.finished else 1)
    log_dir = trainer.log_dir  # a collective call under distributed strategies: every rank asks
    if trainer.is_global_zero:
        checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        print(f"checkpoint: {checkpoint}")
        print(f"logs: {Path(log_dir or cfg.paths.output_dir)}")
        print(f"evaluate with: python eval.py ckpt={checkpoint}")
        print("resume or extend with: python train.py <the same overrides> ckpt_path=last "
              f"hydra.run.dir={cfg.paths.output_dir}")
    return trainer


class LogConfig(Callback):
    """Logs the whole resolved config as plain values to every logger, once the strategy knows each
    process's rank (loggers write from rank 0 only). The module and the datamodule leave theirs to it."""

    def __init__(self, config: dict):
        self.config = config

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)


def finish_wandb(loggers: list[Logger], exit_code: int) -> None:
    """Closes the W&B run (a no-op on ranks other than 0), marked failed when training raised: a
    later run in the same process (a multirun, a test) would otherwise log into it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=exit_code)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
