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
from evaluation.generation import PREDICTIONS, check_settings, generate_records, remove_partials, stored_records
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
            # Keyed by position: pairs asked one after another may share an id (the demo's all do).
            images = {str(place): read_image(sample.image, sample, "image") for place, (sample, _) in enumerate(chunk)}
            predictions = predict_experts(self.experts, images, device=str(self.device))
            prepared[start:start + batch_size] = [
                (replace(sample, expert=expert_text(predictions[str(place)], self.settings["expert_demographics"])),
                 warnings)
                for place, (sample, warnings) in enumerate(chunk)]
        return prepared

    def _prompted_as_trained(self, pair: Pair) -> tuple[Sample, tuple[str, ...]]:
        sample, warnings = pair.sample, pair.warnings
        if sample.has_prior and not self.settings["use_prior"]:
            sample = replace(sample, prior_image=None, interval_days=None)
            warnings += ("this model was trained on the current image alone (use_prior=false): the prior study is "
                         "not shown to it",)
        if pair.prior_report is not None:
            history = self.settings.get("history")
            if sample.task != "mmxu":
                warnings += ("only MMXU's single-choice questions were trained with the prior report: it is not "
                             "shown with this question (give options= to ask one)",)
            elif history in ("global", "regional"):
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
    if cfg.manifest is None and cfg.out is not None:
        raise ConfigError("out= is where a manifest's answers go: one pair's answer is printed (output=json for "
                          "one JSON object)")
    if cfg.manifest is not None:
        if cfg.output != "text":
            raise ConfigError(f"output={cfg.output} is for one pair: a manifest's answers go to "
                              f"<out>/{PREDICTIONS}, one JSON record per line")
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


ROWS = "manifest_rows.json"  # each answered row's sample id to a digest of what it asked (pairs.row_digest)


def predict_manifest(cfg: DictConfig) -> list[dict]:
    """Every good row of the manifest answered into ``<out>/predictions.jsonl``, in the manifest's order.
    A rerun generates only the rows without an answer. Refused before anything is generated: other
    generation settings than the stored answers', and a row whose question, interval, choices or files
    changed since its answer. A row that cannot be asked now keeps the answer an earlier run gave it
    (said so), so that no finished answer is lost to a file out of reach; the answers of rows no longer
    in the manifest are dropped (said so)."""
    problems = Problems(listed=None)  # every bad row by its line, not the first few of a kind
    manifest = read_manifest(cfg.manifest, problems, allow_different_patients=cfg.allow_different_patients)
    out = manifest_out(cfg)
    stored = stored_records(out)
    previous = json.loads((out / ROWS).read_text()) if (out / ROWS).is_file() else {}
    answered = [sample_id for sample_id in manifest.asked if sample_id in stored]
    unknown = [sample_id for sample_id in answered if sample_id not in previous]
    changed = [sample_id for sample_id in answered if previous.get(sample_id, manifest.asked[sample_id]) !=
               manifest.asked[sample_id]]
    for ids, why in ((unknown, f"no record of what they asked ({ROWS} is missing or lacks them)"),
                     (changed, "their manifest rows (question, interval, choices or files) changed since")):
        if ids:
            raise ConfigError(f"{out} holds answers for {', '.join(ids[:5])}{' and more' if len(ids) > 5 else ''} "
                              f"but {why}: give those rows new ids, or set out= to another directory")
    predictor = Predictor(cfg.ckpt, cfg.accelerator, cfg.max_new_tokens, cfg.experts.weights_dir)
    fingerprint = {
        "checkpoint": str(predictor.ckpt.resolve()), "checkpoint_version": checkpoint_version(predictor.ckpt),
        "max_new_tokens": predictor.module.hparams.max_new_tokens, "prompt": predictor.settings,
    }
    check_settings(out, fingerprint)
    kept = {sample_id: line for sample_id, line in manifest.failed.items()
            if sample_id in stored and sample_id not in manifest.asked}
    dropped = [sample_id for sample_id in stored if sample_id not in manifest.lines]
    pending = [index for index, pair in enumerate(manifest.pairs) if pair.sample.sample_id not in stored]
    asked = predictor.as_trained_many([manifest.pairs[index] for index in pending], cfg.batch_size)
    samples = [pair.sample for pair in manifest.pairs]
    for index, (sample, _) in zip(pending, asked):
        samples[index] = sample
    if pending:  # what each answer (appended as it is generated) asked, should the run be killed
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / ROWS, previous | manifest.asked)
    records = generate_records(predictor.module, samples, predictor.collator, cfg.batch_size, cfg.num_workers,
                               predictor.accelerator, out, fingerprint) if samples else []
    records = sorted(records + [stored[sample_id] for sample_id in kept],
                     key=lambda record: manifest.lines[record["sample_id"]])
    if records:
        write_jsonl_atomic(out / PREDICTIONS, records)
        digests = previous | manifest.asked
        write_json_atomic(out / ROWS, {record["sample_id"]: digests[record["sample_id"]] for record in records
                                       if record["sample_id"] in digests})
        remove_partials(out)
    for sample, warnings in asked:
        for warning in warnings:
            print(f"warning: {sample.sample_id}: {warning}")
    if records and dropped:
        print(f"dropped the earlier answers of {len(dropped)} rows no longer in the manifest "
              f"({', '.join(dropped[:5])}{' and more' if len(dropped) > 5 else ''})")
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
