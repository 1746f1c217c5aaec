"""Answer generation for evaluation, written as it goes and resumable.

Each finished batch is appended to ``predictions.partial.jsonl`` in the run directory (flushed and
fsynced) by a Lightning prediction writer. A rerun into the same directory (``hydra.run.dir=<it>``)
generates only the samples in neither that file nor a finished ``predictions.jsonl`` (so a finished
run can be scored again, e.g. with a judge, without generating again); a torn last line (a crash
mid-write) is dropped and that sample generated again. ``generation.json`` records what is being
generated (checkpoint, split, prompt settings, generation length), and a rerun with other settings
is refused rather than mixed in. The records come back in dataset order; the caller writes
``predictions.jsonl`` atomically and then removes the partial file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader

from common.errors import ConfigError
from common.files import whole_lines, write_json_atomic
from datamodules.datamodule import SampleDataset
from datamodules.records import Sample

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
PARTIAL = "predictions.partial.jsonl"
FINGERPRINT = "generation.json"
# What generation wrote; everything else in a finished record is a score, computed again.
RECORD_FIELDS = ("sample_id", "task", "question_type", "question", "has_prior", "interval_days", "prediction", "reference",
                 "answer", "options")


def record(sample: Sample, prediction: str) -> dict:
    """One prediction record: ids, the question, the days between the studies, the model's answer, the
    reference it is scored against (None for a person's own question, ``predict.py``) and, when it
    differs, the training target (an enhanced full sentence)."""
    out = {
        "sample_id": sample.sample_id, "task": sample.task, "question_type": sample.question_type,
        "question": sample.question, "has_prior": sample.has_prior, "interval_days": sample.interval_days,
        "prediction": prediction.strip(), "reference": sample.reference,
    }
    if sample.answer != sample.reference:
        out["answer"] = sample.answer
    if sample.options:
        out["options"] = sample.options
    return out


def _finished(predictions: Path) -> dict[str, dict]:
    if not predictions.is_file():
        return {}
    records = map(json.loads, predictions.read_text(encoding="utf-8").splitlines())
    return {item["sample_id"]: {k: item[k] for k in RECORD_FIELDS if k in item} for item in records}


def _done(partial: Path) -> dict[str, dict]:
    """Records already appended, by sample id; a torn last line is cut off."""
    size = partial.stat().st_size if partial.is_file() else 0
    whole = whole_lines(partial)
    if len(whole) < size:
        log.warning("%s: dropped a torn last line (an interrupted write); that sample is generated again", partial)
    return {item["sample_id"]: item for item in map(json.loads, whole.decode("utf-8").splitlines())}


def check_settings(out: Path, fingerprint: dict) -> None:
    """Refuses to add answers generated with ``fingerprint``'s settings to ``out``'s, generated with others."""
    fingerprint_path = out / FINGERPRINT
    if (out / PARTIAL).is_file() or (out / PREDICTIONS).is_file():
        previous = json.loads(fingerprint_path.read_text()) if fingerprint_path.is_file() else None
        if previous != fingerprint:
            raise ConfigError(
                f"{out} holds answers generated with other settings ({fingerprint_path}: {previous}); "
                f"now: {fingerprint}. Write into another directory, or delete {PREDICTIONS}, {PARTIAL} and "
                f"{FINGERPRINT} there to start over"
            )


def stored_records(out: Path) -> dict[str, dict]:
    """The records a run into ``out`` already holds, finished or appended, by sample id."""
    return _finished(out / PREDICTIONS) | _done(out / PARTIAL)


class _AppendRecords(BasePredictionWriter):
    """Appends each predicted batch's records to the partial file as soon as it is decoded."""

    def __init__(self, partial: Path, samples: dict[str, Sample], tokenizer):
        super().__init__(write_interval="batch")
        self.partial, self.samples, self.tokenizer = partial, samples, tokenizer

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        answers = self.tokenizer.batch_decode(prediction["tokens"], skip_special_tokens=True)
        lines = "".join(json.dumps(record(self.samples[sample_id], answer)) + "\n"
                        for sample_id, answer in zip(prediction["sample_ids"], answers))
        with self.partial.open("a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())


def generate_records(module, samples: list[Sample], collator, batch_size: int, num_workers: int, accelerator: str,
                     out: Path, fingerprint: dict) -> list[dict]:
    """Every sample's record, in order, generating only those not already in ``out``'s partial file,
    in batches of ``collator``'s (a generation ``LumenCollator``) left-padded prompts."""
    check_settings(out, fingerprint)
    partial = out / PARTIAL
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / FINGERPRINT, fingerprint)
    done = stored_records(out)
    pending = [sample for sample in samples if sample.sample_id not in done]
    if done:
        log.info("resuming %s: %d of %d answers already generated", partial, len(samples) - len(pending), len(samples))
    if pending:
        writer = _AppendRecords(partial, {sample.sample_id: sample for sample in pending}, collator.tokenizer)
        # tqdm rather than Lightning's default Rich bar, which reaches a log file only when generation ends.
        trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=[writer, TQDMProgressBar()])
        loader = DataLoader(SampleDataset(pending), batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        done |= _done(partial)
    return [done[sample.sample_id] for sample in samples]
