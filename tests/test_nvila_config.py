"""An NVILA base's top-level config.json is followed (vision layer, token selection, S2 scales, image policy)
and every value lumen does not implement is refused by name; images are fed as NVILA's processor feeds them."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from datamodules.collate import LoadedSample, LumenCollator, image_transform
from datamodules.datamodule import LumenDataModule
from datamodules.records import Sample
from datamodules.sources import DiffVQASource
from models.config import ModelConfig
from models.factory import build_model, input_spec, load_tokenizer, nvila_config, vision_layer
from tests import towers
from tests.nvila_base import nvila_visual_tokens, projector_weights, variant, write_nvila, write_projector


@pytest.fixture(scope="module")
def nvila(tmp_path_factory, tiny_base):
    return write_nvila(tmp_path_factory.mktemp("nvila") / "NVILA-8B", load_tokenizer(ModelConfig(base=str(tiny_base))))


def config(base, **options) -> ModelConfig:
    return ModelConfig(base=str(base), fusion={"mode": "concat"}, **options)


def current_tokens(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.visual_tokens(images, images[:0], torch.zeros(len(images), dtype=torch.bool),
                                   torch.zeros(len(images))).view(len(images), model.tokens_per_image, -1)


def wide_radiograph() -> Image.Image:
    """A 620 x 500 grayscale image with structure at every scale: a bright blob, a gradient and noise."""
    rows, cols = np.mgrid[0:500, 0:620]
    pixels = 40 + 150 * np.exp(-((cols - 250) ** 2 + (rows - 260) ** 2) / 2e4) + 0.1 * cols
    pixels += np.random.default_rng(0).normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


# What NVILA-8B's config.json says, followed.

def test_nvila_8b_config_gives_its_layer_scales_and_stretched_images(nvila):
    followed = nvila_config(config(nvila["root"]))
    assert (followed.vision_layer, followed.scales, followed.resize) == (-2, 3, "squash")
    spec = input_spec(config(nvila["root"]))
    assert (spec.resize, spec.image_size, spec.mean, spec.std) == ("squash", towers.IMAGE_SIZE, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("select_layer", [-1, 1, -3])
def test_the_tower_is_read_at_mm_vision_select_layer_as_an_index_into_hidden_states(nvila, tmp_path, select_layer):
    base = variant(nvila["root"], tmp_path / "nvila", {"mm_vision_select_layer": select_layer})
    model = build_model(config(base)).eval()
    images = torch.randn(2, 3, towers.IMAGE_SIZE, towers.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(current_tokens(model, images), nvila_visual_tokens(nvila, images, layer=select_layer),
                               rtol=1e-5, atol=1e-5)


def test_model_net_vision_layer_may_name_the_configs_layer_in_either_sign(nvila):
    for layer in (None, -2, towers.DEPTH - 2):
        chosen = config(nvila["root"], vision={"type": "hf", "layer": layer})
        assert vision_layer(chosen, nvila_config(chosen)) == -2
        assert input_spec(chosen).tokens_per_image == 4


def test_a_model_net_vision_layer_other_than_the_configs_is_refused(nvila):
    with pytest.raises(ValueError, match=r"model\.net\.vision\.layer=-1 but .*config\.json has "
                                         r"mm_vision_select_layer=-2 .* set model\.net\.vision\.layer=null"):
        input_spec(config(nvila["root"], vision={"type": "hf", "layer": -1}))


@pytest.mark.parametrize("scales", [2, 3])
def test_the_projector_reads_as_many_scales_as_s2_scales_lists(nvila, tmp_path, scales):
    base = variant(nvila["root"], tmp_path / "nvila", {
        "s2_scales": ",".join(str(towers.IMAGE_SIZE * k) for k in range(1, scales + 1)),
        "mm_hidden_size": scales * towers.WIDTH}, copy=("mm_projector",))
    projector = projector_weights(4 * scales * towers.WIDTH)
    write_projector(base / "mm_projector", projector)
    model = build_model(config(base)).eval()
    assert model.projector.mm_hidden_size == scales * towers.WIDTH
    images = torch.randn(1, 3, towers.IMAGE_SIZE, towers.IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    expected = nvila_visual_tokens(nvila | {"projector": projector}, images, scales=scales)
    torch.testing.assert_close(current_tokens(model, images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aspect_ratio", ["resize", "dynamic", "dynamic_s2"])
def test_each_supported_image_aspect_ratio_stretches_images(nvila, tmp_path, aspect_ratio):
    base = variant(nvila["root"], tmp_path / "nvila", {"image_aspect_ratio": aspect_ratio})
    assert input_spec(config(base)).resize == "squash"


def test_a_policy_that_tiles_lone_images_is_followed_untiled_and_says_so(nvila, caplog):
    with caplog.at_level(logging.INFO, logger="models.factory"):
        input_spec(config(nvila["root"]))
    assert "image_aspect_ratio=dynamic_s2 tiles a lone image; lumen does not" in caplog.text


def test_a_clip_tower_takes_patch_which_drops_its_cls_token(nvila, tmp_path):
    base = variant(nvila["root"], tmp_path / "nvila", {"mm_vision_select_feature": "patch", "dynamic_s2": False,
                                                       "image_aspect_ratio": "resize", "mm_hidden_size": towers.WIDTH},
                   copy=("vision_tower", "mm_projector"))
    shutil.rmtree(base / "vision_tower")
    CLIPVisionModel(CLIPVisionConfig(
        hidden_size=towers.WIDTH, intermediate_size=2 * towers.WIDTH, num_attention_heads=2,
        num_hidden_layers=towers.DEPTH, image_size=towers.IMAGE_SIZE, patch_size=towers.PATCH,
    )).save_pretrained(base / "vision_tower")
    write_projector(base / "mm_projector", projector_weights(4 * towers.WIDTH))
    assert input_spec(config(base)).tokens_per_image == 4
    stored = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(stored | {"mm_vision_select_feature": "cls_patch"}))
    with pytest.raises(ValueError, match=r"mm_vision_select_feature='cls_patch' keeps every token of the layer, but "
                                         r"the clip_vision_model tower .* has 1 token\(s\) before its patch tokens.* "
                                         r"mm_vision_select_feature='patch'"):
        input_spec(config(base))


# Values lumen does not implement, refused by name.

REFUSED = [
    ({"mm_vision_select_feature": "patch"},
     r"mm_vision_select_feature='patch' drops the first token of the layer, but the siglip_vision_model tower .* has "
     r"0 token\(s\) before its patch tokens.* for this tower is mm_vision_select_feature='cls_patch'"),
    ({"mm_vision_select_feature": "cls"}, r"mm_vision_select_feature='cls': expected one of cls_patch, patch"),
    ({"mm_vision_select_layer": 0},
     r"mm_vision_select_layer=0 is no layer of the 3-layer tower: .* -3\.\.-1 and 1\.\.3"),
    ({"mm_vision_select_layer": None}, r"mm_vision_select_layer=None: expected an integer"),
    ({"image_aspect_ratio": "pad"}, r"image_aspect_ratio='pad': NVILA pads an image to a square at full resolution and "
                                    r"then resizes it.*supported: resize, dynamic, dynamic_s2"),
    ({"image_aspect_ratio": None}, r"image_aspect_ratio=None: not a policy lumen implements; supported: resize"),
    ({"s2": True}, r"s2=True: the S2 tower runs every image at every one of s2_scales.*supported: s2=false"),
    ({"ps3": True}, r"ps3=True: PS3 selects high-resolution patches.*supported: ps3=false"),
    ({"s2_scales": "64,128,192"}, r"s2_scales='64,128,192': NVILA stretches an untiled image to the first scale, but "
                                  r"the tower .* takes 32 px"),
    ({"s2_scales": "32,64", "mm_hidden_size": 2 * towers.WIDTH},
     r"layers\.2\.weight\) takes 192 input channels, but .*config\.json says dynamic_s2 with s2_scales=32,64: 2 x the "
     r"tower's 16 channels x 2x2 merged tokens = 128"),
    ({"dynamic_s2": False, "mm_hidden_size": None},
     r"takes 192 input channels, but .* says no dynamic_s2, one scale: 1 x the tower's 16 channels"),
    ({"mm_hidden_size": 2 * towers.WIDTH}, r"mm_hidden_size=32 but dynamic_s2 with s2_scales=32,64,96: 3 x the tower's "
                                           r"16 channels = 48"),
    ({"vision_resolution": 64}, r"vision_resolution=64: NVILA would interpolate .* supported: -1 or the tower's 32"),
    ({"model_type": "llava"}, r"model_type 'llava': the config.json of a base directory is NVILA's \('llava_llama'\)"),
]


@pytest.mark.parametrize(("changes", "message"), REFUSED, ids=[json.dumps(changes) for changes, _ in REFUSED])
def test_an_unsupported_config_value_is_refused_naming_it(nvila, tmp_path, changes, message):
    base = variant(nvila["root"], tmp_path / "nvila", changes)
    with pytest.raises(ValueError, match=message):
        input_spec(config(base))
    with pytest.raises(ValueError, match=message):
        build_model(config(base), weights=False)


@pytest.mark.parametrize(("processor", "message"), [
    ({"resample": 2},
     r"preprocessor_config\.json: resample=2: NVILA resizes untiled images with it, lumen bicubically"),
    ({"size": {"height": 64, "width": 64}}, r"preprocessor_config\.json: size=\{'height': 64, 'width': 64\}: lumen "
                                            r"stretches images to the tower's square"),
])
def test_an_image_processor_lumen_cannot_reproduce_is_refused(nvila, tmp_path, processor, message):
    # Without dynamic S2 the untiled image is resized by the processor at its own size.
    base = variant(nvila["root"], tmp_path / "nvila", {"dynamic_s2": False, "image_aspect_ratio": "dynamic",
                                                       "mm_hidden_size": towers.WIDTH},
                   copy=("vision_tower", "mm_projector"))
    write_projector(base / "mm_projector", projector_weights(4 * towers.WIDTH))
    path = base / "vision_tower" / "preprocessor_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | processor))
    with pytest.raises(ValueError, match=message):
        input_spec(config(base))


def test_an_nvila_config_needs_a_hugging_face_tower(nvila):
    # NVILA's tower is a Hugging Face one: another type is refused before its loader reads the wrong files.
    with pytest.raises(ValueError, match="model.net.vision.type=timm but .* holds a hf tower: set model/vision=base"):
        input_spec(config(nvila["root"], vision={"type": "timm"}))


# Images as NVILA's processor feeds them.

def test_squash_is_the_siglip_processor_pixel_for_pixel_at_nvila_8bs_448_px():
    """transformers 4.46 (NVILA's) resized with PIL; its PIL implementation lives on as SiglipImageProcessorPil.
    The tolerance is float32 rounding of the normalisation; one grey level more or less is 2/255 = 0.008."""
    image = wide_radiograph()
    processor = SiglipImageProcessorPil(size={"height": 448, "width": 448}, resample=3, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3)
    expected = torch.as_tensor(processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0])
    torch.testing.assert_close(image_transform(image, 448, (0.5,) * 3, (0.5,) * 3, "squash"), expected,
                               rtol=0, atol=1e-6)


def test_the_collator_for_an_nvila_base_feeds_its_tower_processors_pixels(nvila, tmp_path):
    spec = input_spec(config(nvila["root"]))
    collator = LumenCollator(nvila["tokenizer"], **spec)
    sample = Sample("s-1", "diagnostic", "presence", "is there edema?", "no", image=tmp_path / "image.jpg")
    batch = collator([LoadedSample(sample, wide_radiograph(), None)])
    processor = SiglipImageProcessorPil.from_pretrained(nvila["root"] / "vision_tower")
    expected = torch.as_tensor(processor(wide_radiograph().convert("RGB"), return_tensors="pt")["pixel_values"])
    assert collator.resize == "squash"
    torch.testing.assert_close(batch["current_images"], expected, rtol=0, atol=1e-6)


@pytest.fixture
def sources(world):
    return {"diffvqa": DiffVQASource(str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg"))}


def test_the_data_follows_the_bases_policy_unless_told_otherwise_and_records_it(nvila, sources, caplog):
    spec = input_spec(config(nvila["root"]))
    tokenizer_dir = str(nvila["root"] / "llm")
    followed = LumenDataModule(sources=sources, tokenizer_dir=tokenizer_dir, input_spec=spec)
    assert (followed.train_collator.resize, followed.hparams.image_resize) == ("squash", "squash")
    with caplog.at_level(logging.WARNING, logger="datamodules.datamodule"):
        padded = LumenDataModule(sources=sources, tokenizer_dir=tokenizer_dir, input_spec=spec, image_resize="pad")
    assert (padded.generation_collator.resize, padded.hparams.image_resize) == ("pad", "pad")
    assert "data.image_resize=pad overrides the base's own policy, squash" in caplog.text


def test_a_base_without_a_policy_keeps_the_demos_pad(tiny_base, sources):
    spec = input_spec(ModelConfig(base=str(tiny_base), vision={"type": "hf", "layer": -1}))
    assert spec.resize is None
    data = LumenDataModule(sources=sources, tokenizer_dir=str(tiny_base / "llm"), input_spec=spec)
    assert (data.train_collator.resize, data.hparams.image_resize) == ("pad", "pad")
