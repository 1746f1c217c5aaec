"""Evaluate a checkpoint: ``python eval.py ckpt=PATH [split=test] [key=value ...]`` (Hydra).

``PATH`` is a training checkpoint (``.ckpt``) or a directory written by
``python -m models.checkpoints export``.

Generates answers greedily for the split, scores them, and writes to the run directory
``predictions.jsonl`` (one record per sample), ``results.json`` and ``results.md``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from evaluation.metrics import score_sample
from evaluation.report import aggregate, markdown_table, write_json_atomic, write_jsonl_atomic, write_text_atomic
from models.checkpoints import input_spec, load_checkpoint
from models.module import LumenModule
from train import prepare

# Data settings that change what the model sees; by default taken from the checkpoint.
PROMPT_SETTINGS = ("use_prior", "interval_in_prompt", "expert_demographics")


def generate_records(module: LumenModule, datamodule, split: str, accelerator: str) -> list[dict]:
    """One record per sample: ids, question, the model's answer and the reference answer."""
    samples = {sample.sample_id: sample for sample in datamodule.dataset(split).samples}
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False)
    batches = trainer.predict(module, dataloaders=datamodule.generation_loader(split))
    tokenizer = datamodule.tokenizer
    records = []
    for batch in batches:
        answers = tokenizer.batch_decode(batch["tokens"], skip_special_tokens=True)
        for sample_id, answer in zip(batch["sample_ids"], answers):
            sample = samples[sample_id]
            records.append(
                {
                    "sample_id": sample_id,
                    "task": sample.task,
                    "question_type": sample.question_type,
                    "question": sample.question,
                    "has_prior": sample.has_prior,
                    "prediction": answer.strip(),
                    "reference": sample.reference,
                    # The enhanced long training target, which BLEU-4 and ROUGE-L score against.
                    **({"answer": sample.answer} if sample.answer != sample.reference else {}),
                    **({"options": sample.options} if sample.options else {}),
                }
            )
    return records


def evaluate(cfg: DictConfig) -> dict:
    prepare(cfg)
    # Seeded after preparation, which draws random numbers only when it has to build something.
    L.seed_everything(cfg.seed)
    loaded = load_checkpoint(cfg.ckpt)
    module = LumenModule(net=loaded.config.to_dict(), optimizer={}, scheduler={},
                         max_new_tokens=cfg.max_new_tokens or loaded.max_new_tokens or 64)
    module.model = loaded.model
    as_trained = {key: loaded.prompt.get(key, True) for key in PROMPT_SETTINGS if cfg.data[key] is None}
    if loaded.prompt.get("experts") and cfg.data.experts is None:
        raise ValueError(f"{cfg.ckpt} was trained with expert predictions in its prompts: set data.experts=<the "
                         "expert CSV> (the synthetic world's is paths.experts)")
    datamodule = hydra.utils.instantiate(
        cfg.data, tokenizer_dir=str(module.config.llm_dir), input_spec=input_spec(module.config), **as_trained
    )
    records = [record | score_sample(record) for record in generate_records(module, datamodule, cfg.split, cfg.accelerator)]
    results = aggregate(records)
    results["checkpoint"] = str(Path(cfg.ckpt).resolve())
    results["split"] = cfg.split
    model = loaded.model
    results["model"] = {
        "vision": loaded.config.vision.type,
        "projector": model.projector.projector_type,
        "fusion_mode": model.fusion.mode,
        "tokens_per_image": model.tokens_per_image,
        "visual_tokens_with_prior": model.fusion.slots * model.tokens_per_image if datamodule.use_prior else None,
    }
    out = Path(cfg.paths.output_dir)
    write_jsonl_atomic(out / "predictions.jsonl", records)
    write_json_atomic(out / "results.json", results)
    table = markdown_table(results)
    write_text_atomic(out / "results.md", table)
    print(table)
    print(f"results: {out}")
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
