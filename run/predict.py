"""Asking a trained model about a person's own studies (what ``python predict.py`` runs, and what
``demo.py``'s page calls).

One pair: ``current=`` (and ``prior=``) files, DICOM or image (``datamodules.dicom``), a question or a
preset (``datamodules.presets``) and the interval (``datamodules.pairs``), answered greedily and
printed with the interval used and the prompt settings the checkpoint was trained with; nothing is
written. Many pairs: ``manifest=pairs.csv`` is answered in batches into ``<out>/predictions.jsonl``
(``evaluation.generation``: resumable, one record per row in eval.py's schema, with ``reference``
null); a bad row is named by its line, counted and left out, and the others are answered.

Each sample is prompted exactly as ``eval.py`` prompts a dataset's: the same collator built with the
checkpoint's prompt settings, the same generation. A model trained with expert predictions in its
prompt gets them computed from the current image by TorchXRayVision's models
(``experts.weights_dir``), as ``python -m datamodules.build experts`` computes the expert CSV.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from common.errors import ConfigError, MissingInputs
from common.files import write_json_atomic, write_jsonl_atomic
from common.readers import InputError, Problems, read_text
from common.tokenizer import load_tokenizer
from datamodules.collate import LumenCollator
from datamodules.datamodule import SampleDataset, read_image
from datamodules.dicom import read_study_file
from datamodules.experts import expert_text
from datamodules.experts_builder import load_expert_models, predict_experts
from datamodules.mmxu import history_for_question
from datamodules.pairs import OPTIONAL_COLUMNS, Pair, make_pair, read_manifest
from datamodules.presets import AskError
from datamodules.records import Sample
from evaluation.generation import PARTIAL, PREDICTIONS, generate_records, stored_records
from models.checkpoints import load_checkpoint
from models.factory import input_spec
from models.lit_module import BATCH_INPUTS
from run.evaluate import PROMPT_SETTINGS, checkpoint_version, generation_module, require_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """A model's answer to one pair, with what a person needs to judge it."""

    sample: Sample
    prediction: str
    interval: dict | None  # {"days", "source"}
    prompt: str  # the chat text the model was given, each image's visual tokens shown as one <image>
    warnings: tuple[str, ...]

    def as_json(self, settings: dict) -> dict:
        return {"question": self.sample.question, "task": self.sample.task, "question_type": self.sample.question_type,
                "options": self.sample.options, "has_prior": self.sample.has_prior, "interval": self.interval,
                "answer": self.prediction, "prompt_settings": settings, "prompt": self.prompt,
                "warnings": list(self.warnings)}


class Predictor:
    """A checkpoint loaded once, asked about pairs of studies one at a time or in batches."""

    def __init__(self, ckpt: str | Path, accelerator: str = "auto", max_new_tokens: int | None = None,
                 experts_weights_dir: str | Path | None = None):
        loaded = load_checkpoint(ckpt)
        self.ckpt = Path(ckpt)
        # What the checkpoint was trained with; a setting an older checkpoint does not record is its default then.
        recorded = {key: loaded.prompt.get(key, unrecorded) for key, unrecorded in PROMPT_SETTINGS.items()}
        experts_in_prompt = bool(loaded.prompt.get("experts_in_prompt"))
        self.settings = {"fusion_mode": loaded.model.fusion.mode, "use_prior": recorded["use_prior"],
                         "interval_in_prompt": recorded["interval_in_prompt"], "image_resize": recorded["image_resize"],
                         "experts_in_prompt": experts_in_prompt}
        if experts_in_prompt:
            self.settings["expert_demographics"] = recorded["expert_demographics"]
        if "mmxu" in loaded.prompt.get("tasks", ()):
            # How its MMXU questions showed the prior report; a checkpoint from before this was recorded: unknown.
            self.settings["history"] = loaded.prompt.get("history")
        self.experts = None
        if self.settings["experts_in_prompt"]:
            if experts_weights_dir is None:
                raise ConfigError(f"{ckpt} was trained with expert predictions in its prompts: set experts.weights_dir="
                                  "<the directory of TorchXRayVision's weight files> to compute them for your images "
                                  "(python -m datamodules.build experts reads the same directory)")
            self.experts = load_expert_models(experts_weights_dir)
        self.module = generation_module(loaded, max_new_tokens)
        self.device = torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
                                   else "cpu")
        self.accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        self.module.to(self.device).eval()
        spec = input_spec(loaded.config)
        self.collator = LumenCollator(load_tokenizer(loaded.config.llm_dir, spec.image_token),
                                      interval_in_prompt=self.settings["interval_in_prompt"],
                                      **(spec | {"resize": self.settings["image_resize"]}), for_generation=True)

    def as_trained(self, pair: Pair) -> tuple[Sample, tuple[str, ...]]:
        """The pair's sample as the checkpoint's prompts were: without the prior for a model trained on
        one image, with the prior report as its MMXU questions showed it (or without it), and with the
        expert models' text for a model trained with it."""
        (sample, warnings), = self.as_trained_many([pair])
        return sample, warnings

    def as_trained_many(self, pairs: list[Pair], batch_size: int = 16) -> list[tuple[Sample, tuple[str, ...]]]:
        """``as_trained`` for many pairs, the expert models run on ``batch_size`` current images at a time."""
        prepared = [self._prompted_as_trained(pair) for pair in pairs]
        if self.experts is None:
            return prepared
        batches = range(0, len(prepared), batch_size)
        for start in tqdm(batches, desc="expert predictions", unit="batch", disable=len(batches) < 2):
            chunk = prepared[start:start + batch_size]
            images = {sample.sample_id: read_image(sample.image, sample, "image") for sample, _ in chunk}
            predictions = predict_experts(self.experts, images, device=str(self.device))
            prepared[start:start + batch_size] = [
                (replace(sample, expert=expert_text(predictions[sample.sample_id],
                                                    self.settings["expert_demographics"])), warnings)
                for sample, warnings in chunk]
        return prepared

    def _prompted_as_trained(self, pair: Pair) -> tuple[Sample, tuple[str, ...]]:
        sample, warnings = pair.sample, pair.warnings
        if sample.has_prior and not self.settings["use_prior"]:
            sample = replace(sample, prior_image=None, interval_days=None)
            warnings += ("this model was trained on the current image alone (use_prior=false): the prior study is "
                         "not shown to it",)
        if pair.prior_report is not None and sample.has_prior:
            history = self.settings.get("history")
            if history in ("global", "regional"):
                sample = replace(sample, history=history_for_question(pair.prior_report, history, sample.question))
            else:
                trained = ("without prior reports (its MMXU questions had history=none)" if history == "none" else
                           "without MMXU questions" if "history" not in self.settings else
                           "before checkpoints recorded how prior reports were shown")
                warnings += (f"this model was trained {trained}: the prior report is not shown to it",)
        return sample, warnings

    def prompt(self, sample: Sample) -> str:
        """The chat-formatted text the model is given, with each image's visual tokens as one placeholder."""
        return self.collator.chat_text(sample)

    @torch.inference_mode()
    def ask(self, pair: Pair) -> Answer:
        """One pair answered greedily, as ``eval.py`` answers a dataset's sample."""
        sample, warnings = self.as_trained(pair)
        batch = self.collator([SampleDataset([sample])[0]])
        inputs = {key: batch[key].to(self.device) for key in BATCH_INPUTS}
        tokens = self.module.predict_step(inputs | {"sample_ids": batch["sample_ids"]}, 0)["tokens"]
        prediction = self.collator.tokenizer.batch_decode(tokens, skip_special_tokens=True)[0].strip()
        interval = None if pair.interval is None or not sample.has_prior else \
            {"days": pair.interval.days, "source": pair.interval.source}
        return Answer(sample, prediction, interval, self.prompt(sample), warnings)


def _text(value) -> str | None:
    return None if value is None else str(value)


def pair_from_config(cfg: DictConfig) -> Pair:
    """``current=``, ``prior=``, the question and the interval settings as one pair."""
    current = read_study_file(cfg.current)
    prior = read_study_file(cfg.prior) if cfg.prior is not None else None
    report = None
    if cfg.prior_report is not None:
        report = read_text(cfg.prior_report, "the prior study's report as a text file")
    options = OmegaConf.to_container(cfg.options) if OmegaConf.is_config(cfg.options) else cfg.options
    if isinstance(options, str):
        options = options.split("|")
    try:
        return make_pair("pair", current, prior, str(cfg.question), days=cfg.days, finding=_text(cfg.finding),
                         options=options, current_date=_text(cfg.current_date), prior_date=_text(cfg.prior_date),
                         interval_days=cfg.interval_days, allow_different_patients=cfg.allow_different_patients,
                         prior_report=report)
    except AskError as error:
        raise ConfigError(f"{error.field}: {error}") from None


# What describes one pair, meaningless with a manifest (whose rows give each pair's own).
ONE_PAIR_KEYS = ("current", "prior", "question", "days", "finding", "options", "current_date", "prior_date",
                 "interval_days", "prior_report")


def check_request(cfg: DictConfig) -> None:
    """What is missing, all in one message, before the checkpoint is loaded."""
    require_checkpoint(cfg, "ask with python predict.py")
    if cfg.output not in ("text", "json"):
        raise ConfigError(f"output={cfg.output!r}: expected text or json")
    if cfg.manifest is not None:
        given = [key for key in ONE_PAIR_KEYS if cfg[key] is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} describe one pair, and manifest= many: give each pair's in the "
                              "manifest's columns, or drop manifest= to ask about one pair")
        if not Path(cfg.manifest).is_file():
            raise MissingInputs(f"manifest = {cfg.manifest} does not exist: give a CSV with columns current, question "
                                "(and any of " + ", ".join(OPTIONAL_COLUMNS) + ")")
        return
    missing = [f"{key}=<{what}>" for key, what in (("current", "the current study's DICOM or image file"),
                                                    ("question", "a preset or a question's text"))
               if cfg[key] is None]
    if missing:
        raise MissingInputs("missing " + " and ".join(missing) + " (or manifest=<a CSV of pairs>)")


def predict(cfg: DictConfig) -> list[dict] | Answer:
    check_request(cfg)
    if cfg.manifest is not None:
        return predict_manifest(cfg)
    pair = pair_from_config(cfg)  # the files and the question are checked before the model is loaded
    predictor = Predictor(cfg.ckpt, cfg.accelerator, cfg.max_new_tokens, cfg.experts.weights_dir)
    answer = predictor.ask(pair)
    if cfg.output == "json":
        print(json.dumps(answer.as_json(predictor.settings)))
        return answer
    for warning in answer.warnings:
        print(f"warning: {warning}")
    settings = ", ".join(f"{key}={value}" for key, value in predictor.settings.items())
    print(f"prompt settings (from the checkpoint): {settings}")
    if answer.interval is not None:
        print(f"interval: {answer.interval['days']:g} days ({answer.interval['source']})")
    print(f"question: {answer.sample.question}")
    for letter, text in (answer.sample.options or {}).items():
        print(f"  {letter}. {text}")
    print(f"answer: {answer.prediction}")
    return answer


def manifest_out(cfg: DictConfig) -> Path:
    """``out``, or beside the manifest: ``<its stem>-predictions/`` (the same each time, so a rerun resumes)."""
    manifest = Path(cfg.manifest)
    return Path(cfg.out) if cfg.out is not None else manifest.parent / f"{manifest.stem}-predictions"


ROWS = "manifest_rows.json"  # each answered row's sample id to a digest of its files (pairs.files_digest)


def stale_rows(stored: dict[str, dict], previous_files: dict[str, str], samples: list[Sample],
               files: dict[str, str]) -> list[str]:
    """The sample ids whose stored answer was to another question, interval, choices or files than the
    manifest's row now asks about."""
    return [sample.sample_id for sample in samples if sample.sample_id in stored and (
        (stored[sample.sample_id]["question"], stored[sample.sample_id].get("interval_days"),
         stored[sample.sample_id].get("options"), previous_files.get(sample.sample_id))
        != (sample.question, sample.interval_days, sample.options, files[sample.sample_id]))]


def predict_manifest(cfg: DictConfig) -> list[dict]:
    """Every good row of the manifest answered into ``<out>/predictions.jsonl``, in the manifest's order.
    A rerun generates only the rows without an answer; a row whose question or files changed since its
    answer is refused before anything is generated; a row that cannot be asked now keeps the answer an
    earlier run gave it (said so), so that no finished answer is lost to a file out of reach."""
    problems = Problems(listed=None)  # every bad row by its line, not the first few of a kind
    manifest = read_manifest(cfg.manifest, problems, allow_different_patients=cfg.allow_different_patients)
    out = manifest_out(cfg)
    stored = stored_records(out)
    previous_files = json.loads((out / ROWS).read_text()) if (out / ROWS).is_file() else {}
    samples = [pair.sample for pair in manifest.pairs]
    changed = stale_rows(stored, previous_files, samples, manifest.files)
    if changed:
        raise ConfigError(f"{out} holds answers to other questions or files for {', '.join(changed[:5])}"
                          f"{' and more' if len(changed) > 5 else ''}: their manifest rows changed since. Give those "
                          "rows new ids, or set out= to another directory")
    kept = {sample_id: line for sample_id, line in manifest.failed.items()
            if sample_id in stored and sample_id not in manifest.files}
    predictor = Predictor(cfg.ckpt, cfg.accelerator, cfg.max_new_tokens, cfg.experts.weights_dir)
    pending = [pair for pair in manifest.pairs if pair.sample.sample_id not in stored]
    asked = {sample.sample_id: (sample, warnings) for sample, warnings in
             predictor.as_trained_many(pending, cfg.batch_size)}
    samples = [asked.get(sample.sample_id, (sample, ()))[0] for sample in samples]
    fingerprint = {
        "checkpoint": str(predictor.ckpt.resolve()), "checkpoint_version": checkpoint_version(predictor.ckpt),
        "max_new_tokens": predictor.module.hparams.max_new_tokens, "prompt": predictor.settings,
    }
    if samples or kept:
        write_json_atomic(out / ROWS, {sample_id: previous_files[sample_id] for sample_id in kept if sample_id in
                                       previous_files} | manifest.files)
    records = generate_records(predictor.module, samples, predictor.collator, cfg.batch_size, cfg.num_workers,
                               predictor.accelerator, out, fingerprint) if samples else []
    records = sorted(records + [stored[sample_id] for sample_id in kept],
                     key=lambda record: manifest.lines[record["sample_id"]])
    if records:
        write_jsonl_atomic(out / PREDICTIONS, records)
        (out / PARTIAL).unlink(missing_ok=True)
    for sample_id, (_, warnings) in asked.items():
        for warning in warnings:
            print(f"warning: {sample_id}: {warning}")
    print(f"answered {len(records) - len(kept)} of {manifest.rows} rows of {cfg.manifest}"
          + (f"; {len(problems)} left out:" if problems else ""))
    for line in problems.lines():
        print(f"  {line}")
    for sample_id, line in kept.items():
        print(f"kept the earlier answer of line {line} ({sample_id}), which could not be asked again")
    if records:
        print(f"predictions: {out / PREDICTIONS}")
    if problems:
        raise InputError(cfg.manifest, f"{len(problems)} of {manifest.rows} rows could not be asked (listed above); "
                         "the others were answered", fix="fix those rows and run the same command again: only they "
                         "are generated")
    return records
