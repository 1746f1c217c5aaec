"""Training FLOPs: measured once per part on the meta device, scaled to any batch; the formula agrees."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from run.cli import compose_config
from models.config import ModelConfig
from models.factory import build_model, input_spec
from models.flops import (FORMULA_TOLERANCE, StepFlops, formula_flops, measure_step_flops, meta_model, sequence_lengths,
                          target_tokens)
from models.lit_module import BATCH_INPUTS
from tests.helpers import WORLD_SUBJECTS
from run.train import instantiate_data


@pytest.fixture(scope="module")
def demo(world, tiny_base, tmp_path_factory):
    """``demo(mode)``: the demo model on the tiny base with that fusion mode, and a real training batch
    collated for it whose samples are partly with a prior."""
    run = tmp_path_factory.mktemp("flops")
    built = {}

    def config_and_batch(mode: str = "difference") -> tuple[ModelConfig, dict]:
        if mode not in built:
            cfg = compose_config("train", [
                f"paths.output_dir={run}", f"paths.cache_dir={run}", f"paths.world_dir={world}",
                f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}", "data.batch_size=8",
                f"model.net.fusion.mode={mode}",
                # The whole model trained, as formula_flops counts it (the demo freezes its tower).
                "model.net.tune_vision=true"])
            config = ModelConfig(**cfg.model.net)
            datamodule = instantiate_data(cfg, input_spec(config))
            datamodule.setup("fit")
            mixed = (batch for batch in datamodule.train_dataloader()
                     if 0 < int(batch["has_prior"].sum()) < len(batch["has_prior"]))
            built[mode] = config, next(mixed)
        return built[mode]

    return config_and_batch


def counted_training_flops(model, batch: dict) -> int:
    """FlopCounterMode over a real forward + backward on CPU, attention in math form (the convention)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(**{key: batch[key] for key in BATCH_INPUTS}, labels=batch["labels"]).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["difference", "concat", "fused"])
def test_scaled_flops_equal_the_flops_counted_in_a_real_training_step(demo, mode):
    config, batch = demo(mode)
    model = build_model(config).train()
    # The real step also computes the padding, so count every position of the padded rows as real.
    every_position = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    assert measure_step_flops(config).of_batch(every_position) == counted_training_flops(model, batch)


def test_a_frozen_visual_path_costs_its_forward_only(demo):
    config, batch = demo()
    frozen = dataclasses.replace(config, tune_vision=False, tune_projector=False)
    model = build_model(frozen).train()
    images = batch["current_images"][:1]
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model.projector(model.vision(images))
    trained, measured = measure_step_flops(config), measure_step_flops(frozen)
    assert measured.per_image == counter.get_total_flops()
    assert measured.per_image < trained.per_image / 2
    # The LLM still trains its embeddings, so it runs its full backward.
    assert (measured.per_token, measured.per_token_pair) == (trained.per_token, trained.per_token_pair)


def test_padding_is_not_counted_and_a_packed_row_counts_each_sample(demo):
    config, _ = demo()
    flops = measure_step_flops(config)
    images = {"current_images": torch.zeros(3, 3, 32, 32), "prior_images": torch.zeros(1, 3, 32, 32)}
    padded = {**images, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
              "labels": torch.tensor([[-100, 4, 5, -100], [-100, -100, -100, -100], [-100, -100, 6, 7]])}
    packed = {**images, "attention_mask": torch.ones(1, 9, dtype=torch.long),
              "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]),
              "labels": torch.tensor([[-100, 4, 5, -100, -100, -100, -100, 6, 7]])}
    assert sequence_lengths(padded).tolist() == sequence_lengths(packed).tolist() == [3, 2, 4]
    assert target_tokens(padded) == target_tokens(packed) == 4
    expected = (4 * flops.per_image + 1 * flops.per_prior + 9 * flops.per_token
                + (9 + 4 + 16) * flops.per_token_pair + 4 * flops.per_target)
    assert flops.of_batch(padded) == flops.of_batch(packed) == expected


def test_the_lm_head_is_counted_at_target_positions_only(demo):
    """A training step runs the LM head where a label follows, not at prompt, image or padding tokens."""
    config, batch = demo()
    flops = measure_step_flops(config)
    targets = target_tokens(batch)
    assert 0 < targets < batch["attention_mask"].sum() / 4
    fewer = dict(batch, labels=batch["labels"].masked_fill(batch["labels"] == batch["labels"].max(), -100))
    assert target_tokens(fewer) < targets
    assert flops.of_batch(batch) - flops.of_batch(fewer) == (targets - target_tokens(fewer)) * flops.per_target


def test_the_llm_terms_are_the_torchtitan_count(demo):
    """12 L d FLOPs per token per token of context; 6 per weight per token (bar norms and biases,
    which no matmul multiplies: FlopCounterMode counts matmuls), the LM head's per target."""
    config, _ = demo()
    flops, model = measure_step_flops(config), meta_model(config)
    llm = model.llm.config
    assert flops.per_token_pair == 12 * llm.num_hidden_layers * llm.hidden_size
    matrices = sum(p.numel() for name, p in model.llm.get_decoder().named_parameters()
                   if p.ndim == 2 and "embed_tokens" not in name)
    assert flops.per_token == 6 * matrices
    assert flops.per_target == 6 * llm.vocab_size * llm.hidden_size


@pytest.mark.parametrize("mode", ["difference", "concat", "fused"])
def test_the_formula_agrees_with_the_measurement(demo, mode):
    config, batch = demo(mode)
    images = len(batch["has_prior"]) + int(batch["has_prior"].sum())
    priors, lengths, targets = int(batch["has_prior"].sum()), sequence_lengths(batch).tolist(), target_tokens(batch)
    measured = measure_step_flops(config)(images, priors, lengths, targets)
    estimated = formula_flops(meta_model(config), images, priors, lengths, targets)
    assert abs(estimated / measured - 1) < FORMULA_TOLERANCE


def test_step_flops_add_up_over_batches():
    flops = StepFlops(per_image=100, per_prior=10, per_token=3, per_token_pair=1, per_target=7)
    assert flops(images=3, priors=1, sequence_lengths=[4, 5], targets=2) == 300 + 10 + 27 + 41 + 14
    assert flops(3, 1, [4, 5], 2) == flops(2, 1, [4], 1) + flops(1, 0, [5], 1)
