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

from common.errors import ConfigError, MissingInputs
from common.files import write_jsonl_atomic
from common.readers import InputError, Problems
from common.tokenizer import load_tokenizer
from datamodules.collate import LumenCollator
from datamodules.datamodule import SampleDataset, read_image
from datamodules.dicom import read_study_file
from datamodules.experts import expert_text
from datamodules.experts_builder import load_expert_models, predict_experts
from datamodules.mmxu import history_text
from datamodules.pairs import Pair, make_pair, read_manifest
from datamodules.presets import AskError
from datamodules.records import Sample
from evaluation.generation import PARTIAL, PREDICTIONS, generate_records
from models.checkpoints import load_checkpoint
from models.factory import input_spec
from models.lit_module import BATCH_INPUTS, LumenLitModule
from run.evaluate import PROMPT_SETTINGS, checkpoint_version, require_checkpoint

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
        self.experts = None
        if self.settings["experts_in_prompt"]:
            if experts_weights_dir is None:
                raise ConfigError(f"{ckpt} was trained with expert predictions in its prompts: set experts.weights_dir="
                                  "<the directory of TorchXRayVision's weight files> to compute them for your images "
                                  "(python -m datamodules.build experts reads the same directory)")
            self.experts = load_expert_models(experts_weights_dir)
        self.module = LumenLitModule(net=loaded.config.to_dict(), optimizer={}, scheduler={},
                                     max_new_tokens=max_new_tokens or loaded.max_new_tokens or 64)
        self.module.model = loaded.model
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
        one image, with the expert models' text for a model trained with it."""
        sample, warnings = pair.sample, pair.warnings
        if sample.has_prior and not self.settings["use_prior"]:
            sample = replace(sample, prior_image=None, interval_days=None)
            warnings += ("this model was trained on the current image alone (use_prior=false): the prior study is "
                         "not shown to it",)
        if self.experts is not None:
            image = read_image(sample.image, sample, "image")
            prediction = predict_experts(self.experts, {sample.sample_id: image})[sample.sample_id]
            sample = replace(sample, expert=expert_text(prediction, self.settings["expert_demographics"]))
        return sample, warnings

    def prompt(self, sample: Sample) -> str:
        """The chat-formatted text the model is given, with each image's visual tokens as one placeholder."""
        ids, _ = self.collator.tokenize(sample)
        token = self.collator.tokenizer.convert_tokens_to_ids(self.collator.image_token)
        collapsed = [t for i, t in enumerate(ids) if t != token or i == 0 or ids[i - 1] != token]
        return self.collator.tokenizer.decode(collapsed)

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
    history = None
    if cfg.prior_report is not None:
        report = Path(cfg.prior_report)
        if not report.is_file():
            raise MissingInputs(f"prior_report = {report} does not exist: give the prior study's report as a text file")
        history = history_text(report.read_text(encoding="utf-8"), "global")
    options = OmegaConf.to_container(cfg.options) if OmegaConf.is_config(cfg.options) else cfg.options
    if isinstance(options, str):
        options = options.split("|")
    try:
        return make_pair("pair", current, prior, str(cfg.question), days=cfg.days, finding=_text(cfg.finding),
                         options=options, current_date=_text(cfg.current_date), prior_date=_text(cfg.prior_date),
                         interval_days=cfg.interval_days, allow_different_patients=cfg.allow_different_patients,
                         history=history)
    except AskError as error:
        raise ConfigError(f"{error.field}: {error}") from None


def check_request(cfg: DictConfig) -> None:
    """What is missing, all in one message, before the checkpoint is loaded."""
    require_checkpoint(cfg)
    if cfg.output not in ("text", "json"):
        raise ConfigError(f"output={cfg.output!r}: expected text or json")
    if cfg.manifest is not None:
        if cfg.current is not None or cfg.prior is not None:
            raise ConfigError("give manifest= (many pairs) or current= and prior= (one pair), not both")
        if not Path(cfg.manifest).is_file():
            raise MissingInputs(f"manifest = {cfg.manifest} does not exist: give a CSV with columns current, question "
                                "(and prior, days, finding, options, current_date, prior_date, interval_days, id)")
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


def predict_manifest(cfg: DictConfig) -> list[dict]:
    problems = Problems()
    manifest = read_manifest(cfg.manifest, problems, allow_different_patients=cfg.allow_different_patients)
    predictor = Predictor(cfg.ckpt, cfg.accelerator, cfg.max_new_tokens, cfg.experts.weights_dir)
    samples, warnings = [], []
    for pair in manifest.pairs:
        sample, pair_warnings = predictor.as_trained(pair)
        samples.append(sample)
        warnings += [f"{sample.sample_id}: {warning}" for warning in pair_warnings]
    out = manifest_out(cfg)
    fingerprint = {
        "checkpoint": str(predictor.ckpt.resolve()), "checkpoint_version": checkpoint_version(predictor.ckpt),
        "max_new_tokens": predictor.module.hparams.max_new_tokens, "prompt": predictor.settings,
    }
    records = generate_records(predictor.module, samples, predictor.collator, cfg.batch_size, cfg.num_workers,
                               predictor.accelerator, out, fingerprint) if samples else []
    changed = [sample.sample_id for sample, record in zip(samples, records)
               if (record["question"], record.get("interval_days"), record.get("options")) !=
               (sample.question, sample.interval_days, sample.options)]
    if changed:
        raise ConfigError(f"{out} holds answers to other questions for {', '.join(changed[:5])}"
                          f"{' and more' if len(changed) > 5 else ''}: their manifest rows changed since. Give those "
                          "rows new ids, or set out= to another directory")
    write_jsonl_atomic(out / PREDICTIONS, records)
    (out / PARTIAL).unlink(missing_ok=True)
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"answered {len(records)} of {manifest.rows} rows of {cfg.manifest}"
          + (f"; {len(problems)} left out:" if problems else ""))
    for line in problems.lines():
        print(f"  {line}")
    print(f"predictions: {out / PREDICTIONS}")
    if problems:
        raise InputError(cfg.manifest, f"{len(problems)} of {manifest.rows} rows could not be asked (listed above); "
                         "the others were answered", fix="fix those rows and run the same command again: only they "
                         "are generated")
    return records
