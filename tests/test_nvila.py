"""NVILA-8B import without remote code: a tiny directory in NVILA's exact layout, checked against a
reference computation written from NVILA's published architecture, not from our modules (tests/nvila_base.py)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.factory import build_model, input_spec, load_tokenizer
from tests import towers
from tests.nvila_base import SCALES, nvila_visual_tokens, write_nvila

VISION_WIDTH = towers.WIDTH


@pytest.fixture(scope="module")
def nvila_dir(tmp_path_factory, tiny_base):
    """``Efficient-Large-Model/NVILA-8B`` in miniature: llm/, vision_tower/, mm_projector/, config.json."""
    return write_nvila(tmp_path_factory.mktemp("nvila") / "NVILA-8B", load_tokenizer(ModelConfig(base=str(tiny_base))))


def prompt_ids(tokenizer, images: int, tokens_per_image: int) -> torch.Tensor:
    image = "<image>" * tokens_per_image + "\n"
    text = tokenizer.apply_chat_template([{"role": "user", "content": image * images + "Is there edema?"}],
                                         add_generation_prompt=True, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


@pytest.fixture(scope="module")
def imported(nvila_dir):
    config = ModelConfig(base=str(nvila_dir["root"]), vision={"type": "hf", "layer": -2}, fusion={"mode": "concat"})
    return config, build_model(config).eval()


def test_imported_model_reads_nvila_projector_type_and_scales(imported):
    config, model = imported
    assert model.projector.projector_type == "mlp_downsample"
    assert model.projector.mm_hidden_size == SCALES * VISION_WIDTH
    assert input_spec(config)["tokens_per_image"] == 4


def test_the_meta_device_build_takes_the_projector_scales_from_the_weights_header(imported):
    config, model = imported
    with torch.device("meta"):
        skeleton = build_model(config, weights=False)
    assert skeleton.projector.mm_hidden_size == model.projector.mm_hidden_size == SCALES * VISION_WIDTH
    assert [(n, p.shape) for n, p in skeleton.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert all(p.is_meta for p in skeleton.parameters())


def test_imported_visual_tokens_equal_nvila_for_current_and_prior_images(nvila_dir, imported):
    _, model = imported
    generator = torch.Generator().manual_seed(3)
    current = torch.randn(2, 3, towers.IMAGE_SIZE, towers.IMAGE_SIZE, generator=generator)
    prior = torch.randn(1, 3, towers.IMAGE_SIZE, towers.IMAGE_SIZE, generator=generator)
    with torch.no_grad():
        tokens = model.visual_tokens(current, prior, torch.tensor([True, False]), torch.tensor([90.0, 0.0]))
    expected_current = nvila_visual_tokens(nvila_dir, current)
    expected = torch.cat([nvila_visual_tokens(nvila_dir, prior)[0], expected_current[0], expected_current[1]])
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_imported_logits_equal_nvila_on_a_two_image_prompt(nvila_dir, imported):
    _, model = imported
    generator = torch.Generator().manual_seed(4)
    current, prior = (torch.randn(1, 3, towers.IMAGE_SIZE, towers.IMAGE_SIZE, generator=generator) for _ in range(2))
    input_ids = prompt_ids(nvila_dir["tokenizer"], images=2, tokens_per_image=4)
    with torch.no_grad():
        logits = model(input_ids, torch.ones_like(input_ids), current_images=current, prior_images=prior,
                       has_prior=torch.tensor([True]), interval_days=torch.tensor([30.0])).logits
        reference_llm = nvila_dir["llm"].eval()
        embeddings = reference_llm.get_input_embeddings()(input_ids)
        image_positions = (input_ids == nvila_dir["tokenizer"].convert_tokens_to_ids("<image>"))[0]
        visual = torch.cat([nvila_visual_tokens(nvila_dir, prior)[0], nvila_visual_tokens(nvila_dir, current)[0]])
        embeddings[0, image_positions] = visual
        expected = reference_llm(inputs_embeds=embeddings).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_tokenizer_without_image_token_gets_it_added(nvila_dir, tmp_path):
    root = tmp_path / "nvila"
    shutil.copytree(nvila_dir["root"], root)
    tokenizer_config = json.loads((root / "llm" / "tokenizer_config.json").read_text())
    tokenizer_file = json.loads((root / "llm" / "tokenizer.json").read_text())
    image_id = next(t["id"] for t in tokenizer_file["added_tokens"] if t["content"] == "<image>")
    tokenizer_file["added_tokens"] = [t for t in tokenizer_file["added_tokens"] if t["content"] != "<image>"]
    del tokenizer_file["model"]["vocab"]["<image>"]
    (root / "llm" / "tokenizer.json").write_text(json.dumps(tokenizer_file))
    tokenizer_config.pop("extra_special_tokens", None)
    tokenizer_config.get("added_tokens_decoder", {}).pop(str(image_id), None)
    (root / "llm" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = load_tokenizer(ModelConfig(base=str(root)))
    assert "<image>" in tokenizer.get_vocab()
    assert tokenizer.tokenize("a<image>b") == ["a", "<image>", "b"]


def test_a_projector_that_does_not_fit_the_tower_is_a_clear_error(nvila_dir, tmp_path):
    root = tmp_path / "nvila"
    shutil.copytree(nvila_dir["root"], root)
    weights = load_file(root / "mm_projector" / "model.safetensors")
    weights["layers.2.weight"] = weights["layers.2.weight"][:, :-1].contiguous()
    save_file(weights, root / "mm_projector" / "model.safetensors")
    (root / "config.json").unlink()  # a base without NVILA's config.json: nothing to check the weights against
    with pytest.raises(ValueError, match="layers.2.weight takes 191 input channels, not a multiple of 2x2"):
        build_model(ModelConfig(base=str(root)))


def test_configured_projector_type_must_match_the_base(nvila_dir):
    with pytest.raises(ValueError, match="holds a mlp_downsample projector"):
        input_spec(ModelConfig(base=str(nvila_dir["root"]), projector="mlp_downsample_3x3_fix"))
