"""The multi-task mixture: weighted, length-grouped, seeded, rank-sharded batches; sources; the
DataModule with workers; the LUMEN mixture trained end to end on the synthetic world."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from run.cli import compose_config
from datamodules.collate import image_transform, user_prompt
from datamodules.datamodule import LumenDataModule
from datamodules.records import Sample
from datamodules.sampling import MixtureBatchSampler
from datamodules.sources import DiffVQASource, PrognosticSource
from models.config import ModelConfig
from models.factory import input_spec
from tests.helpers import WORLD_SUBJECTS
from run.train import train


def sampler(sizes=(100, 40), weights=(1.0, 0.5), batch_size=4, **options) -> MixtureBatchSampler:
    lengths = np.random.default_rng(0).integers(10, 200, size=sum(sizes))
    return MixtureBatchSampler(sizes, weights, lengths, batch_size, **options)


def test_weights_set_how_often_each_source_is_seen_per_epoch():
    batches = list(sampler(sizes=(100, 40, 30), weights=(1.0, 0.5, 2.0)))
    drawn = Counter(index for batch in batches for index in batch)
    assert all(drawn[i] == 1 for i in range(100))  # weight 1: every sample once
    assert sum(drawn[i] for i in range(100, 140)) == 20 and max(drawn[i] for i in range(100, 140)) == 1
    assert all(drawn[i] == 2 for i in range(140, 170))  # weight 2: every sample twice
    assert len(batches) == len(sampler(sizes=(100, 40, 30), weights=(1.0, 0.5, 2.0))) == 180 // 4


def test_batches_are_grouped_by_length_but_in_random_order():
    grouped, ungrouped = sampler(group_batches=8), sampler(group_batches=1)
    lengths = grouped.lengths

    def padding(batches):
        return sum(max(lengths[b]) * len(b) - sum(lengths[b]) for b in batches)

    assert padding(list(grouped)) < 0.5 * padding(list(ungrouped))
    first_lengths = [max(lengths[b]) for b in list(grouped)[:8]]
    assert first_lengths != sorted(first_lengths, reverse=True)


def test_an_epoch_is_reproducible_and_the_next_one_differs():
    a, b = sampler(seed=3), sampler(seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_ranks_share_an_epoch_without_overlap_and_run_the_same_number_of_steps():
    ranks = [sampler(rank=rank, world_size=3, seed=1) for rank in range(3)]
    batches = [list(rank) for rank in ranks]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(ranks[0])
    seen = [tuple(batch) for rank in batches for batch in rank]
    assert len(seen) == len(set(seen))
    everything = list(sampler(seed=1))
    assert set(seen) <= {tuple(batch) for batch in everything}


@pytest.mark.parametrize("weights, message", [((1.0,), "2 sources but 1 weights"), ((0.0, 0.0), "select at least")])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        sampler(weights=weights)


def test_the_prompt_places_interval_expert_history_question_and_options_in_order():
    sample = Sample("mmxu-1", "mmxu", "worsen", "How has the left lung changed?", "B", Path("c.jpg"),
                    Path("p.jpg"), 12.0, options={"A": "improved", "B": "worsened", "C": "no change", "D": "new"},
                    history="The previous report: small left effusion.", expert="Expert models: effusion: yes.")
    assert user_prompt(sample, "<image>", True, "concat") == (
        "Image-1 (prior study): <image>\nImage-2 (current study): <image>\n"
        "The prior study was taken 12 days earlier.\nExpert models: effusion: yes.\n"
        "The previous report: small left effusion.\nHow has the left lung changed?\n"
        "A. improved\nB. worsened\nC. no change\nD. new\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_an_answer_that_is_not_an_option_is_refused():
    with pytest.raises(ValueError, match="answer 'E' is not one of the options"):
        Sample("m", "mmxu", "worsen", "q", "E", Path("c.jpg"), options={"A": "x", "B": "y"})


def test_resize_policies_pad_squash_or_crop_a_wide_image():
    from PIL import Image
    wide = Image.new("L", (40, 20), color=255)
    stats = {policy: image_transform(wide, 8, (0.5,) * 3, (0.5,) * 3, policy) for policy in ("pad", "squash", "crop")}
    assert stats["pad"][:, 0].mean() < 0.9 and stats["pad"][:, 4].min() == 1.0  # fill rows above, image in the middle
    assert torch.equal(stats["squash"], torch.ones(3, 8, 8)) and torch.equal(stats["crop"], torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="resize='stretch'"):
        image_transform(wide, 8, (0.5,) * 3, (0.5,) * 3, "stretch")


@pytest.fixture
def sources(world):
    diffvqa, mimic = str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg")
    return {
        "diagnostic": DiffVQASource(diffvqa, mimic, tasks=("diagnostic",)),
        "difference": DiffVQASource(diffvqa, mimic, tasks=("difference",), weight=2.0),
        "prognostic": PrognosticSource(str(world / "prognostic" / "prognostic.jsonl"), diffvqa, mimic, weight=0.5),
    }


def datamodule(sources, tiny_base, **options) -> LumenDataModule:
    spec = input_spec(ModelConfig(base=str(tiny_base), vision={"type": "hf", "layer": -1}))
    return LumenDataModule(sources=sources, tokenizer_dir=str(tiny_base / "llm"), input_spec=spec, **options)


def test_the_mixture_draws_every_source_by_its_weight(sources, tiny_base):
    data = datamodule(sources, tiny_base, batch_size=4)
    sizes = {name: len(part) for name, part in zip(sources, data.source_datasets("train"))}
    assert all(sizes.values())
    loader = data.train_dataloader()
    tasks = Counter(task for batch in loader.batch_sampler for task in (loader.dataset.samples[i].task for i in batch))
    assert tasks == {"diagnostic": sizes["diagnostic"], "difference": 2 * sizes["difference"],
                     "prognostic": round(0.5 * sizes["prognostic"])}
    assert data.hparams.tasks == ["diagnostic", "difference", "prognostic"]


def test_a_limit_keeps_each_sources_first_samples_and_counts_them_before_and_after(sources, tiny_base):
    everything = datamodule(sources, tiny_base).source_datasets("test")
    assert all(len(part) > 3 for part in everything)  # so that the limit cuts every source
    limited = datamodule(sources, tiny_base, limit={"test": 3})
    assert [part.samples for part in limited.source_datasets("test")] == [part.samples[:3] for part in everything]
    assert limited.sample_counts["test"] == {name: {"loaded": len(part), "kept": 3}
                                             for name, part in zip(sources, everything)}


def test_workers_give_the_same_batches_as_the_main_process(sources, tiny_base):
    def first_batches(workers):
        loader = datamodule(sources, tiny_base, batch_size=4, num_workers=workers).train_dataloader()
        return [batch for batch, _ in zip(loader, range(3))]

    for alone, pooled in zip(first_batches(0), first_batches(2)):
        assert alone["sample_ids"] == pooled["sample_ids"]
        assert torch.equal(alone["input_ids"], pooled["input_ids"])
        assert torch.equal(alone["current_images"], pooled["current_images"])


def test_enhanced_answers_train_and_the_short_ones_stay_for_metrics(world, tiny_base, tmp_path):
    from datamodules.build import main
    enhanced = tmp_path / "enhanced.jsonl"
    main(["enhance", "--diffvqa", str(world / "medical-diff-vqa"), "--out", str(enhanced)])
    source = DiffVQASource(str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg"), enhanced=str(enhanced))
    samples, _ = source.load("test", use_prior=True)
    yes = next(s for s in samples if s.short_answer == "yes")
    assert yes.answer.startswith("Yes, ") and yes.reference == "yes"
    records = [json.loads(line) for line in enhanced.read_text().splitlines()]
    for record in records:
        if record["sample_id"] == samples[0].sample_id:
            record["short_answer"] = "something else"
    enhanced.write_text("".join(json.dumps(r) + "\n" for r in records))
    stale = DiffVQASource(str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg"), enhanced=str(enhanced))
    with pytest.raises(ValueError, match=f"{samples[0].sample_id} has short answer 'something else'"):
        stale.load("test", use_prior=True)


def test_a_missing_source_file_fails_when_configured(world):
    with pytest.raises(FileNotFoundError, match="paths.prognostic = /nowhere.jsonl does not exist"):
        PrognosticSource("/nowhere.jsonl", str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg"))


def test_the_lumen_mixture_trains_on_the_synthetic_world(demo_overrides):
    overrides = demo_overrides + ["data=lumen", "trainer.max_steps=6", "data.limit.val=8",
                                  "data.sources.difference.weight=2.0"]
    trainer = train(compose_config("train", overrides))
    assert trainer.global_step == 6
    assert trainer.datamodule.hparams.tasks == ["diagnostic", "difference", "prognostic"]


def test_expert_predictions_go_into_every_prompt_once(sources, tiny_base, world):
    data = datamodule(sources, tiny_base, experts=str(world / "experts" / "experts.csv"))
    samples = data.samples("val")
    assert samples and all(s.expert.startswith("Expert models' findings on the current image: ") for s in samples)
    prompt = user_prompt(samples[0], "<image>", True, "difference")
    assert prompt.count("Expert models'") == 1 and prompt.count("Estimated age") == 1
    assert prompt.index("Expert models'") < prompt.index(samples[0].question)
    without = datamodule(sources, tiny_base, experts=str(world / "experts" / "experts.csv"), expert_demographics=False)
    assert "Estimated age" not in without.samples("val")[0].expert
    assert data.hparams.experts_in_prompt is True and datamodule(sources, tiny_base).hparams.experts_in_prompt is False


def test_an_image_without_expert_predictions_is_named(sources, tiny_base, world, tmp_path):
    lines = (world / "experts" / "experts.csv").read_text().splitlines()
    samples = datamodule(sources, tiny_base).samples("val")
    kept = [line for line in lines if samples[0].image.stem not in line]
    partial = tmp_path / "experts.csv"
    partial.write_text("\n".join(kept) + "\n")
    with pytest.raises(ValueError, match=f"no expert predictions for .* e.g. {samples[0].image}"):
        datamodule(sources, tiny_base, experts=str(partial)).samples("val")


def test_mmxu_fine_tunes_and_evaluates_with_letter_accuracy(demo_overrides, world, tmp_path):
    from run.evaluate import evaluate
    trainer = train(compose_config("train", demo_overrides + ["experiment=mmxu", "data=mmxu", "trainer.max_steps=4",
                                                              "data.limit.val=8"]))
    assert trainer.global_step == 4 and trainer.datamodule.hparams.tasks == ["mmxu"]
    checkpoint = trainer.checkpoint_callback.last_model_path
    results = evaluate(compose_config("eval", [
        f"ckpt={checkpoint}", "data=mmxu", f"paths.output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.world_dir={world}",
        f"prepare.world.subjects={WORLD_SUBJECTS}", "data.limit.test=8", "accelerator=cpu"]))
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    questions = len((world / "mmxu" / "MMXU-test.jsonl").read_text().splitlines())
    assert len(records) == min(8, questions) > 0 and all(r["task"] == "mmxu" and set(r["options"]) == set("ABCD") for r in records)
    assert all(r["choice_accuracy"] in (0, 1) for r in records)
    assert "choice_accuracy" in json.dumps(results)


def test_the_papers_prognostic_test_set_keeps_one_study_per_subject(world):
    diffvqa, mimic = str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg")
    path = str(world / "prognostic" / "prognostic.jsonl")
    every, _ = PrognosticSource(path, diffvqa, mimic).load("test", use_prior=True)
    kept, report = PrognosticSource(path, diffvqa, mimic, test_policy="one_study_per_subject").load("test", True)
    assert len({s.subject_id for s in kept}) == len({s.study_id for s in kept}) == len({s.subject_id for s in every})
    assert report.skipped["other_study_of_subject"] == len(every) - len(kept)
    with pytest.raises(ValueError, match="test_policy='latest'"):
        PrognosticSource(path, diffvqa, mimic, test_policy="latest")


def test_a_model_trained_with_expert_predictions_is_not_evaluated_without_them(demo_overrides, world, tmp_path):
    from run.evaluate import evaluate
    trainer = train(compose_config("train", demo_overrides + ["data.experts=${paths.experts}", "trainer.max_steps=2",
                                                              "data.limit.val=4"]))
    checkpoint = trainer.checkpoint_callback.last_model_path
    assert torch.load(checkpoint, weights_only=True)["datamodule_hyper_parameters"]["experts_in_prompt"] is True
    base = [f"ckpt={checkpoint}", f"paths.output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.world_dir={world}", f"prepare.world.subjects={WORLD_SUBJECTS}", "data.limit.test=4",
            "accelerator=cpu"]
    with pytest.raises(ValueError, match="trained with expert predictions in its prompts: set data.experts"):
        evaluate(compose_config("eval", base))
    evaluate(compose_config("eval", base + ["data.experts=${paths.experts}"]))
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()
