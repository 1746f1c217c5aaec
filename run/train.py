"""A training run from a composed config (what ``python train.py`` runs): check the config, prepare, check
the inputs, build the trainer, the data and the module, fit, and say where the checkpoint went."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from common.contract import InputSpec
from common.errors import ConfigError, MissingInputs
from models.callbacks.console import TrainingProgressBar
from models.callbacks.log_config import LogConfig
from models.callbacks.resumable_checkpoint import Trained, require_resumable
from models.config import ModelConfig
from models.factory import input_spec
from models.parallel import accumulation
from run.cli import check_config, prepare

# What each input path must point to. A config lists the ones its run needs under `required_inputs`
# (the demo's prepare steps create them); each data source also checks its own files.
INPUTS = {
    "paths.mimic_cxr_jpg": "the MIMIC-CXR-JPG root (files/, mimic-cxr-2.0.0-*.csv.gz)",
    "paths.diffvqa": "the Medical-Diff-VQA directory (mimic_pair_questions.csv, mimic_all.csv)",
    "paths.prognostic": "the prognostic questions (python -m datamodules.build prognostic)",
    "paths.experts": "the expert predictions (python -m datamodules.build experts)",
    "model.net.base": "the base model directory (llm/, vision_tower/)",
}


def require_inputs(cfg: DictConfig) -> None:
    """Fails, naming every input path that is unset or does not exist and the key that sets it, in one
    message: the config's ``required_inputs`` and the files each data source checks itself."""
    problems = {}
    for key in cfg.get("required_inputs") or []:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or not Path(value).exists():
            problem = "is not set" if value is None else f"= {value} does not exist"
            what = INPUTS.get(key, "an input of this run")
            problems[key] = f"{key} {problem}: it must point to {what}; set {key}=<path>"
    for source in (cfg.data.get("sources") or {}).values():
        if source is None:
            continue
        try:
            hydra.utils.instantiate(source)
        except InstantiationException as error:
            if not isinstance(error.__cause__, FileNotFoundError):
                raise
            # A source's message starts with the key that feeds it; a required input may have named it.
            message = str(error.__cause__)
            problems.setdefault(message.split(" ", 1)[0], message)
    if len(problems) == 1:
        raise MissingInputs(*problems.values())
    if problems:
        raise MissingInputs(f"{len(problems)} inputs of this run are missing:\n" + "\n".join(problems.values()))


def instantiate_data(cfg: DictConfig, spec: InputSpec):
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
        raise ConfigError(
            f"trainer.accumulate_grad_batches={explicit} conflicts with data.global_batch_size={global_batch_size}, "
            f"which with data.batch_size={micro_batch_size} on {world_size} processes means {derived}: remove "
            "trainer.accumulate_grad_batches (it is derived), or set data.global_batch_size=null"
        )
    return explicit


def train(cfg: DictConfig) -> L.Trainer:
    check_config(cfg)
    prepare(cfg)
    require_inputs(cfg)
    # Seeded after preparation, which draws random numbers only when it has to build something.
    L.seed_everything(cfg.seed, workers=True)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks.append(LogConfig(OmegaConf.to_container(cfg, resolve=True)))
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(TrainingProgressBar())
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
        print(f"checkpoint: {checkpoint or f'none written (trained {trainer.global_step} steps)'}")
        print(f"logs: {Path(log_dir or cfg.paths.output_dir)}")
        if checkpoint:
            print(f"evaluate with: python eval.py ckpt={checkpoint}")
            trained = Trained.read(Path(checkpoint))
            extension = trained.extension(trainer.max_steps, trainer.max_epochs) if trained else ""
            print("resume or extend with: python train.py <the same overrides> ckpt_path=last "
                  f"hydra.run.dir={cfg.paths.output_dir} {extension}".rstrip())
    return trainer


def finish_wandb(loggers: list[Logger], exit_code: int) -> None:
    """Closes the W&B run (a no-op on ranks other than 0), marked failed when training raised: a
    later run in the same process (a multirun, a test) would otherwise log into it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=exit_code)
