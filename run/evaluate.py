"""An evaluation run from a composed config (what ``python eval.py ckpt=PATH`` runs).

``PATH`` is a training checkpoint (a ``.ckpt`` file, or the directory of shards an FSDP2 run saves),
a file written by ``python -m models.checkpoints consolidate`` or a directory written by
``python -m models.checkpoints export``.

Generates answers greedily for the split, on ``trainer.devices`` x ``trainer.num_nodes`` processes
(resumable with any number: rerun with ``hydra.run.dir=<the run directory>``, see
``evaluation.generation``); each process loads the whole model, from a sharded checkpoint's shards
too. The first process then scores the answers (and has the judge score the open ones) and writes to
the run directory
``predictions.jsonl`` (one record per sample, with its scores), ``results.json``, ``results.md`` and
PNG plots; with ``logger=wandb`` the table goes to a W&B run as well (and the plots with
``upload_plots=true``).
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
import lightning as L
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError, MissingInputs
from common.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from common.llm import LLMConfig
from evaluation.generation import generate_records, remove_partials
from evaluation.judge import judge_client, judge_records, judge_summary
from evaluation.metrics import is_closed, score_sample
from evaluation.plots import plot_by_question_type, plot_distributions
from evaluation.report import aggregate, difference_headline, markdown_report, markdown_table
from models.checkpoints import LoadedCheckpoint, load_checkpoint
from models.factory import input_spec, vision_type
from models.lit_module import LumenLitModule
from run.cli import check_config, prepare

# Data settings that change what the model sees, by default taken from the checkpoint, and what a checkpoint
# that does not record one was trained with (image_resize: recorded since the default became the base's own).
PROMPT_SETTINGS = {"use_prior": True, "interval_in_prompt": True, "expert_demographics": True, "image_resize": "pad"}


def checkpoint_version(path: Path) -> dict[str, int]:
    """Size and last modification of a checkpoint file, or of a sharded checkpoint's files: a model
    trained again into the same path must not be credited with the old model's answers."""
    files = [path] if path.is_file() else [file for file in path.rglob("*") if file.is_file()]
    stats = [file.stat() for file in files]
    return {"bytes": sum(stat.st_size for stat in stats), "modified_ns": max(stat.st_mtime_ns for stat in stats)}


def require_checkpoint(cfg: DictConfig, command: str = "evaluate with python eval.py") -> None:
    """Fails before anything is prepared when ``ckpt`` is unset or names nothing; ``command`` is what to run."""
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt is None:
        raise MissingInputs(f"ckpt is not set: {command} ckpt=<a checkpoint from train.py, "
                            "a sharded checkpoint directory, or an exported model directory>")
    if not Path(cfg.ckpt).exists():
        raise MissingInputs(f"ckpt = {cfg.ckpt} does not exist: give the checkpoint train.py printed "
                            "(checkpoint: ...), or a directory from python -m models.checkpoints export")


def generation_module(loaded: LoadedCheckpoint, max_new_tokens: int | None = None) -> LumenLitModule:
    """The loaded model in a module that generates, at most ``max_new_tokens`` tokens (by default as it
    was trained to); what eval.py and predict.py both generate with."""
    module = LumenLitModule(net=loaded.config.to_dict(), optimizer={}, scheduler={},
                            max_new_tokens=max_new_tokens or loaded.max_new_tokens or 64)
    module.model = loaded.model
    return module


PRECISIONS = ("32-true", "bf16-true", "16-true")


def check_processes(cfg: DictConfig) -> None:
    """The processes and precision of generation, refused before anything is prepared: whole numbers of
    devices and nodes; under torchrun, as many processes as they make, in one run directory."""
    problems = [f"trainer.{key}={cfg.trainer[key]!r}: expected a whole number, 1 or more"
                for key in ("devices", "num_nodes")
                if isinstance(cfg.trainer[key], bool) or not isinstance(cfg.trainer[key], int) or cfg.trainer[key] < 1]
    if cfg.precision not in PRECISIONS:
        problems.append(f"precision={cfg.precision!r}: expected one of {PRECISIONS}")
    started = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun (and by Lightning for its own processes)
    if not problems and started > 1 and started != cfg.trainer.devices * cfg.trainer.num_nodes:
        problems.append(f"{started} processes were started but trainer.devices x trainer.num_nodes = "
                        f"{cfg.trainer.devices * cfg.trainer.num_nodes}: give trainer.devices=<processes per node>"
                        " (and trainer.num_nodes) to match")
    if started > 1 and HydraConfig.initialized() and not any(
            override.startswith("hydra.run.dir=") for override in HydraConfig.get().overrides.hydra):
        problems.append("each process names its own run directory from the time it started: give them one, "
                        "hydra.run.dir=<a directory>")
    if problems:
        raise ConfigError("\n".join(problems))


def evaluate(cfg: DictConfig) -> dict | None:
    check_config(cfg)
    check_processes(cfg)
    require_checkpoint(cfg)
    prepare(cfg)
    # Seeded after preparation, which draws random numbers only when it has to build something.
    L.seed_everything(cfg.seed)
    loaded = load_checkpoint(cfg.ckpt)
    module = generation_module(loaded, cfg.max_new_tokens)
    as_trained = {key: loaded.prompt.get(key, unrecorded) for key, unrecorded in PROMPT_SETTINGS.items()
                  if cfg.data[key] is None}
    if loaded.prompt.get("experts_in_prompt") and cfg.data.experts is None:
        raise ConfigError(f"{cfg.ckpt} was trained with expert predictions in its prompts: set data.experts=<the "
                         "expert CSV> (the synthetic world's is paths.experts)")
    datamodule = hydra.utils.instantiate(
        cfg.data, tokenizer_dir=str(module.config.llm_dir), input_spec=input_spec(module.config), **as_trained
    )
    out = Path(cfg.paths.output_dir)
    fingerprint = {
        "checkpoint": str(Path(cfg.ckpt).resolve()), "checkpoint_version": checkpoint_version(Path(cfg.ckpt)),
        "split": cfg.split, "max_new_tokens": module.hparams.max_new_tokens, "precision": cfg.precision,
        "prompt": {key: datamodule.hparams[key] for key in ("use_prior", "interval_in_prompt", "experts_in_prompt",
                                                            "expert_demographics", "image_resize")},
        "sources": OmegaConf.to_container(cfg.data.sources, resolve=True),
        "limit": OmegaConf.to_container(cfg.data.limit, resolve=True),
    }
    generated = generate_records(module, datamodule.dataset(cfg.split).samples, datamodule.generation_collator,
                                 datamodule.eval_batch_size, datamodule.num_workers, cfg.accelerator, out, fingerprint,
                                 devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
                                 precision=cfg.precision)
    if generated is None:  # another process than the first: its share is generated, the first scores them all
        return None
    records = [record | score_sample(record) for record in generated]
    judge = judge_open_answers(records, cfg.judge, out) if cfg.get("judge") else None
    results = aggregate(records)
    results["samples"] = {"split": cfg.split, "limit": datamodule.limit.get(cfg.split), "sources": {
        name: {"loaded": counts["loaded"], "scored": counts["kept"]}
        for name, counts in datamodule.sample_counts[cfg.split].items()}}
    if judge is not None:
        results["judge"] = judge
    results["checkpoint"] = str(Path(cfg.ckpt).resolve())
    results["split"] = cfg.split
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    model = loaded.model
    results["model"] = {
        "vision": vision_type(loaded.config),
        "projector": model.projector.projector_type,
        "fusion_mode": model.fusion.mode,
        "tokens_per_image": model.tokens_per_image,
        "visual_tokens_with_prior": model.fusion.slots * model.tokens_per_image if datamodule.use_prior else None,
    }
    write_jsonl_atomic(out / "predictions.jsonl", records)
    remove_partials(out)
    write_json_atomic(out / "results.json", results)
    report = markdown_report(results)
    write_text_atomic(out / "results.md", report)
    plots = [*plot_by_question_type(results, out), plot_distributions(records, out)]
    log_to_loggers(cfg, markdown_table(results), [plot for plot in plots if plot is not None])
    print(report)
    headline = difference_headline(records)
    if headline is not None:
        print(headline)
    print(f"results: {out}")
    return results


def judge_open_answers(records: list[dict], judge: DictConfig, out: Path) -> dict:
    """Adds the LLM judge's score to every open-ended record (yes/no and single-choice questions have
    exact answers) and returns the judge's summary for results.json."""
    client = judge_client(LLMConfig(**judge), cache_path=out / "judge_cache.jsonl")
    open_ended = [r for r in records if r["task"] != "mmxu" and not is_closed(r["reference"])]
    judged = judge_records(open_ended, client)
    for record, judgement in zip(open_ended, judged):
        record |= judgement
    return judge_summary(judged, client)


def log_to_loggers(cfg: DictConfig, table: str, plots: list[Path]) -> None:
    """The results table, and with ``upload_plots`` the score plots, to the configured W&B run (never
    images of patients). The run is finished on the way out, marked failed if logging raised."""
    for config in (cfg.get("logger") or {}).values():
        logger = hydra.utils.instantiate(config)
        if isinstance(logger, WandbLogger):
            with logger.experiment:
                lines = [line for line in table.splitlines() if line and not line.startswith("| ---")]
                rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
                logger.log_table("eval/results", columns=rows[0], data=rows[1:])
                if cfg.upload_plots:
                    logger.log_image("eval/plots", images=[str(plot) for plot in plots],
                                     caption=[plot.stem for plot in plots])
