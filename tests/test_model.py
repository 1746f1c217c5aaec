"""LumenModel: visual tokens in prompt order, splicing, gradients, generation, parameter groups."""

from pathlib import Path

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig,
                          SiglipVisionModel)

from models.lumen import LumenModel
from models.lit_module import parameter_groups
from models.fusion import TemporalFusion
from models.projector import MLPDownsampleProjector
from models.vision import HFVisionTower
from tests.helpers import SUMMATION_ORDER_TOLERANCE, assert_same_up_to_summation_order

IMAGE_TOKEN_ID = 5
TOKENS_PER_IMAGE = 4  # 4x4 patch grid -> 2x2 after the merge


def tiny_model(mode: str = "concat", seed: int = 0, use_interval: bool = True) -> LumenModel:
    torch.manual_seed(seed)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=32, patch_size=8))
    vision = HFVisionTower(tower, layer=-1, source=Path("tiny"))
    llm = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=32, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=48, max_position_embeddings=128)
    )
    projector = MLPDownsampleProjector(vision.grid, vision.hidden_size, 24)
    fusion = TemporalFusion(24, projector.tokens_per_image, mode=mode, use_interval=use_interval)
    return LumenModel(vision, projector, fusion, llm, IMAGE_TOKEN_ID).eval()


def batch(has_prior: list[bool], text_tokens: int = 6, slots: int = 2) -> dict:
    """Prompts of text tokens followed by the image tokens each sample needs, right-padded."""
    rows = []
    for prior in has_prior:
        images = (slots if prior else 1) * TOKENS_PER_IMAGE
        rows.append([7] * text_tokens + [IMAGE_TOKEN_ID] * images + [9, 10])
    longest = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (longest - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows])
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "current_images": torch.randn(len(has_prior), 3, 32, 32, generator=generator),
        "prior_images": torch.randn(sum(has_prior), 3, 32, 32, generator=generator),
        "has_prior": torch.tensor(has_prior),
        "interval_days": torch.tensor([30.0 if prior else 0.0 for prior in has_prior]),
    }


def labelled_batch(model: LumenModel, has_prior: list[bool]) -> tuple[dict, torch.Tensor]:
    """A batch for ``model``'s fusion mode and its labels: every text token, no image token."""
    inputs = batch(has_prior, slots=model.fusion.slots)
    return inputs, inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)


def test_visual_tokens_are_prior_then_current_per_sample():
    model = tiny_model("concat")
    inputs = batch([True, False])
    tokens = model.visual_tokens(
        inputs["current_images"], inputs["prior_images"], inputs["has_prior"], inputs["interval_days"]
    )
    assert tokens.shape == (3 * TOKENS_PER_IMAGE, 24)
    alone = model.visual_tokens(
        inputs["current_images"][1:], inputs["prior_images"][:0], inputs["has_prior"][1:], inputs["interval_days"][1:]
    )
    torch.testing.assert_close(tokens[2 * TOKENS_PER_IMAGE:], alone)


def test_image_tokens_are_replaced_by_visual_tokens():
    model = tiny_model()
    inputs = batch([True, False])
    images = {k: inputs[k] for k in ("current_images", "prior_images", "has_prior", "interval_days")}
    embeddings = model.embed(inputs["input_ids"], **images)
    text = model.llm.get_input_embeddings()(inputs["input_ids"])
    image_positions = inputs["input_ids"] == IMAGE_TOKEN_ID
    torch.testing.assert_close(embeddings[~image_positions], text[~image_positions])
    torch.testing.assert_close(embeddings[image_positions], model.visual_tokens(**images))


def test_token_count_mismatch_is_a_clear_error():
    model = tiny_model()
    inputs = batch([False])
    inputs["has_prior"] = torch.tensor([True])
    inputs["prior_images"] = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="collator and the model disagree"):
        model(**inputs)


@pytest.mark.parametrize("mode", ["concat", "difference", "fused"])
@pytest.mark.parametrize("has_prior", [[True, True], [True, False], [False, False]])
def test_every_parameter_gets_a_gradient_in_every_step(mode, has_prior):
    """DDP and FSDP need the same parameters in every rank's graph, whatever its batch holds."""
    model = tiny_model(mode).train()
    inputs, labels = labelled_batch(model, has_prior)
    model(**inputs, labels=labels).loss.backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert len(trainable) > 40


@pytest.mark.parametrize("mode", ["concat", "difference", "fused"])
def test_visual_token_count_per_sample_follows_the_mode(mode):
    model = tiny_model(mode)
    inputs = batch([True, False], slots=model.fusion.slots)
    images = {k: inputs[k] for k in ("current_images", "prior_images", "has_prior", "interval_days")}
    tokens = model.visual_tokens(**images)
    assert tokens.shape == ((model.fusion.slots + 1) * TOKENS_PER_IMAGE, 24)
    assert torch.isfinite(tokens).all()


def test_generate_returns_greedy_continuation_of_left_padded_prompts():
    model = tiny_model()
    inputs = batch([True])
    new = model.generate(**inputs, max_new_tokens=4, eos_token_id=31, pad_token_id=0)
    embeddings = model.embed(inputs["input_ids"], **{k: inputs[k] for k in inputs if k not in ("input_ids", "attention_mask")})
    expected = []
    for _ in range(new.shape[1]):
        logits = model.llm(inputs_embeds=embeddings).logits[:, -1]
        token = logits.argmax(-1)
        expected.append(int(token))
        embeddings = torch.cat([embeddings, model.llm.get_input_embeddings()(token)[:, None]], dim=1)
    assert new[0].tolist() == expected


def test_parameter_groups_give_vision_and_projector_their_rates_and_spare_norms_from_decay():
    model = tiny_model()
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-4, weight_decay=0.1, vision_lr=1e-5, projector_lr=1e-3)}
    assert set(groups) == {"vision", "vision/no_decay", "projector+fusion", "projector+fusion/no_decay", "llm",
                           "llm/no_decay"}
    assert groups["vision"]["lr"] == 1e-5 and groups["projector+fusion"]["lr"] == 1e-3 and groups["llm"]["lr"] == 1e-4
    assert groups["llm"]["weight_decay"] == 0.1 and groups["llm/no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.llm.get_input_embeddings().weight) in no_decay
    assert id(model.projector.layers[1].weight) in no_decay  # LayerNorm
    assert id(model.projector.layers[2].weight) not in no_decay
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)
    # The vision tower's unused final norm is frozen, so it never reaches the optimizer.
    assert not model.vision.model.post_layernorm.weight.requires_grad


def test_llm_gets_its_own_rate():
    groups = parameter_groups(tiny_model(), lr=1e-4, weight_decay=0.0, llm_lr=2e-5)
    assert {g["name"]: g["lr"] for g in groups} == {"vision+projector+fusion": 1e-4, "llm": 2e-5}


def test_components_with_the_same_settings_share_one_optimizer_group():
    model = tiny_model()
    (group,) = parameter_groups(model, lr=1e-4, weight_decay=0.0)
    assert group["name"] == "vision+projector+fusion+llm"
    assert len(group["params"]) == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("mode", ["concat", "difference", "fused"])
@pytest.mark.parametrize("has_prior", [[True, True], [True, False], [False, False]])
def test_a_step_under_bf16_autocast_trains_every_parameter(mode, has_prior):
    """bf16-mixed training: the fusion's bf16 matmul outputs meet float32 type embeddings."""
    model = tiny_model(mode).train()
    inputs, labels = labelled_batch(model, has_prior)
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("mode", ["concat", "difference", "fused"])
@pytest.mark.parametrize("has_prior", [[False, False], [True, False]])
def test_one_process_skips_the_prior_branches_only_when_no_sample_has_a_prior(mode, has_prior):
    """``every_parameter_every_step=False`` (one process) changes no loss or gradient; a batch without
    priors leaves the prior branches' parameters without a gradient instead of a zero one."""
    results = {}
    for every in (True, False):
        model = tiny_model(mode).train()
        model.fusion.every_parameter_every_step = every
        inputs, labels = labelled_batch(model, has_prior)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        results[every] = loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(results[False][0], results[True][0], rtol=0, atol=0)
    skipped = results[True][1].keys() - results[False][1].keys()
    if any(has_prior):
        assert skipped == set()
    else:
        fusion = {f"fusion.{name}" for name, _ in model.fusion.named_parameters()}
        assert skipped == fusion - {"fusion.current_type"} and len(skipped) >= 7
        assert all(results[True][1][name].abs().max() == 0 for name in skipped)
    assert_same_up_to_summation_order(results[False][1], {name: results[True][1][name] for name in results[False][1]})


def test_an_llm_that_transforms_its_logits_is_trained_through_its_own_forward():
    """The LM head is applied at the target positions only, unless the LLM's forward does more to it: a
    Gemma 2 softcaps its logits, and the loss is the one Hugging Face computes from its own forward."""
    model = tiny_model().train()
    torch.manual_seed(0)
    model.llm = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=32, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
        intermediate_size=48, max_position_embeddings=128, final_logit_softcapping=0.02, attn_implementation="eager"))
    inputs, labels = labelled_batch(model, [True, False])
    ours = model(**inputs, labels=labels).loss
    images = {key: inputs[key] for key in ("current_images", "prior_images", "has_prior", "interval_days")}
    embeddings = model.embed(inputs["input_ids"], **images)
    hugging_face = model.llm(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"], labels=labels).loss
    assert_same_up_to_summation_order(ours.detach(), hugging_face.detach())
    # The cap at 0.02 changes the loss far beyond rounding: the head alone would not give it.
    model.llm.config.final_logit_softcapping = None
    uncapped = model.llm(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"], labels=labels).loss
    assert abs(float(uncapped - hugging_face)) > 100 * SUMMATION_ORDER_TOLERANCE * float(hugging_face)
