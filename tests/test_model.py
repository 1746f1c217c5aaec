"""LumenModel and its parts, built from tiny real components (timm ViT, Qwen2)."""

import pytest
import timm
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from models.lumen import LumenModel
from models.module import parameter_groups
from models.projector import IntervalEmbedding, Merge2x2, MLPDownsampleProjector, TemporalFusion
from models.vision import TimmVisionTower

IMAGE_TOKEN_ID = 5
TOKENS_PER_IMAGE = 4  # 4x4 patch grid -> 2x2 after the merge


def tiny_model(seed: int = 0) -> LumenModel:
    torch.manual_seed(seed)
    tower = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=16, depth=2,
        num_heads=2, num_classes=0, class_token=False, global_pool="avg",
    )
    vision = TimmVisionTower(tower, layer=-1)
    llm = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=32, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=48, max_position_embeddings=128)
    )
    projector = MLPDownsampleProjector(vision.grid, vision.hidden_size, 24)
    fusion = TemporalFusion(24, projector.tokens_per_image)
    return LumenModel(vision, projector, fusion, llm, IMAGE_TOKEN_ID).eval()


def batch(has_prior: list[bool], text_tokens: int = 6) -> dict:
    """Prompts of text tokens followed by the image tokens each sample needs, right-padded."""
    rows = []
    for prior in has_prior:
        images = (2 if prior else 1) * TOKENS_PER_IMAGE
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


def test_merge_2x2_uses_nvila_channel_order():
    grid = torch.arange(16.0).view(1, 16, 1)  # token (r, c) holds r * 4 + c
    merged = Merge2x2((4, 4))(grid)
    assert merged.shape == (1, 4, 4)
    # token (0, 0) = [x(0,0), x(0,1), x(1,0), x(1,1)]; token (0, 1) = [x(0,2), x(0,3), x(1,2), x(1,3)]
    assert merged[0, 0].tolist() == [0, 1, 4, 5]
    assert merged[0, 1].tolist() == [2, 3, 6, 7]
    assert merged[0, 2].tolist() == [8, 9, 12, 13]


def test_merge_rejects_an_odd_grid():
    with pytest.raises(ValueError, match="even token grid"):
        Merge2x2((5, 4))


def test_vision_tower_returns_patch_tokens_of_the_chosen_layer():
    tower = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=16, depth=3, num_heads=2, num_classes=0)
    images = torch.randn(2, 3, 32, 32)
    expected = tower.forward_intermediates(images, indices=[1], norm=False, output_fmt="NLC",
                                           intermediates_only=True)[0]
    vision = TimmVisionTower(tower, layer=-2)
    tokens = vision(images)
    assert tokens.shape == (2, 16, 16)  # 4x4 patches, no CLS token
    torch.testing.assert_close(tokens, expected)
    assert len(vision.blocks) == 2


def test_fusion_starts_as_identity_on_current_tokens():
    fusion = TemporalFusion(dim=8, tokens_per_image=4)
    current, prior = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    fused, _ = fusion(current, prior, torch.tensor([True, False, True]), torch.tensor([10.0, 0.0, 400.0]))
    torch.testing.assert_close(fused, current)


def test_fusion_output_depends_on_prior_only_when_present():
    fusion = TemporalFusion(dim=8, tokens_per_image=4)
    torch.nn.init.normal_(fusion.difference_mlp[-1].weight)
    current = torch.randn(2, 4, 8)
    has_prior = torch.tensor([True, False])
    days = torch.tensor([30.0, 0.0])
    a, _ = fusion(current, torch.randn(2, 4, 8), has_prior, days)
    b, _ = fusion(current, torch.randn(2, 4, 8), has_prior, days)
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_interval_embedding_separates_intervals_and_missing_prior():
    embedding = IntervalEmbedding(dim=8)
    vectors = embedding(torch.tensor([1.0, 30.0, 365.0, 0.0]), torch.tensor([True, True, True, False]))
    assert not torch.allclose(vectors[0], vectors[1])
    assert not torch.allclose(vectors[1], vectors[2])
    torch.testing.assert_close(vectors[3], embedding.no_interval)


def test_visual_tokens_are_prior_then_current_per_sample():
    model = tiny_model()
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


def test_every_parameter_gets_a_gradient_even_without_priors():
    model = tiny_model().train()
    inputs = batch([False, False])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    model(**inputs, labels=labels).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


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
    assert groups["vision"]["lr"] == 1e-5 and groups["projector"]["lr"] == 1e-3
    assert groups["fusion"]["lr"] == 1e-3 and groups["llm"]["lr"] == 1e-4
    assert groups["llm"]["weight_decay"] == 0.1 and groups["llm/no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.llm.get_input_embeddings().weight) in no_decay
    assert id(model.projector.layers[1].weight) in no_decay  # LayerNorm
    assert id(model.projector.layers[2].weight) not in no_decay
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
