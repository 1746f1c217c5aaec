"""Vision towers: each family, built from its real on-disk format, returns the chosen layer's patch tokens."""

import json

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, CheckpointWrapper

from models.parallel import checkpoint_blocks
from models.vision import build_vision_tower, read_spec, tower_type_of
from tests import towers
from tests.helpers import assert_same_up_to_summation_order

IMAGES = torch.randn(2, 3, towers.IMAGE_SIZE, towers.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
GRID = towers.IMAGE_SIZE // towers.PATCH


def reference_tokens(kind: str, model: torch.nn.Module, layer: int) -> torch.Tensor:
    """The layer's patch tokens, computed through each library's own full forward."""
    with torch.no_grad():
        if kind == "siglip":
            return model(IMAGES, output_hidden_states=True).hidden_states[layer]
        if kind in ("dinov2", "clip"):
            return model(IMAGES, output_hidden_states=True).hidden_states[layer][:, 1:]  # drop CLS
        if kind == "timm":
            return model.forward_intermediates(IMAGES, indices=[layer % towers.DEPTH], norm=False,
                                               output_fmt="NLC", intermediates_only=True)[0]
        output = model.visual.forward_intermediates(IMAGES, indices=[layer % towers.DEPTH], output_fmt="NLC",
                                                    intermediates_only=True)
        return output["image_intermediates"][0]


TOWERS = [
    ("siglip", "hf", towers.write_siglip),
    ("dinov2", "hf", towers.write_dinov2),
    ("clip", "hf", towers.write_clip),
    ("timm", "timm", towers.write_timm),
    ("open_clip", "open_clip", towers.write_open_clip),
]
# A convnet without blocks or stages (its stages are timm's feature modules: layer1, layer2, ...).
WITH_RESNET = [*TOWERS, ("resnet", "timm", towers.write_resnet)]


@pytest.mark.parametrize(("kind", "tower_type", "write"), TOWERS, ids=[t[0] for t in TOWERS])
@pytest.mark.parametrize("layer", [-2, -1])
def test_tower_returns_the_patch_tokens_of_the_chosen_layer(tmp_path, kind, tower_type, write, layer):
    model = write(tmp_path / kind)
    tower = build_vision_tower(tower_type, tmp_path / kind, layer).eval()
    with torch.no_grad():
        tokens = tower(IMAGES)
    assert tokens.shape == (2, GRID * GRID, towers.WIDTH)
    torch.testing.assert_close(tokens, reference_tokens(kind, model, layer))
    assert tower.grid == (GRID, GRID) and tower.hidden_size == towers.WIDTH


@pytest.mark.parametrize(("kind", "tower_type", "write"), TOWERS, ids=[t[0] for t in TOWERS])
def test_saved_tower_reloads_with_identical_outputs(tmp_path, kind, tower_type, write):
    write(tmp_path / kind)
    tower = build_vision_tower(tower_type, tmp_path / kind, -2).eval()
    tower.save(tmp_path / "saved")
    reloaded = build_vision_tower(tower_type, tmp_path / "saved", tower.index).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IMAGES), tower(IMAGES), rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "tower_type", "write"), TOWERS, ids=[t[0] for t in TOWERS])
def test_layers_after_the_chosen_one_are_not_kept(tmp_path, kind, tower_type, write):
    write(tmp_path / kind)
    tower = build_vision_tower(tower_type, tmp_path / kind, 0)
    block_names = {name.split(".layers.")[-1].split(".layer.")[-1].split(".blocks.")[-1].split(".resblocks.")[-1]
                   .split(".")[0] for name, _ in tower.named_parameters()
                   if any(part in name for part in (".layers.", ".layer.", ".blocks.", ".resblocks."))}
    assert block_names == {"0"}


def test_siglip_tower_saved_with_nvila_key_prefix_loads(tmp_path):
    """NVILA's vision_tower/model.safetensors was written by transformers 4.x: keys start "vision_model."."""
    from safetensors.torch import load_file, save_file

    model = towers.write_siglip(tmp_path / "siglip")
    weights = load_file(tmp_path / "siglip" / "model.safetensors")
    save_file({f"vision_model.{k}": v for k, v in weights.items()}, tmp_path / "siglip" / "model.safetensors")
    tower = build_vision_tower("hf", tmp_path / "siglip", -2).eval()
    with torch.no_grad():
        torch.testing.assert_close(tower(IMAGES), reference_tokens("siglip", model, -2))


@pytest.mark.parametrize(("kind", "tower_type", "write"), TOWERS, ids=[t[0] for t in TOWERS])
def test_spec_is_read_without_the_weights(tmp_path, kind, tower_type, write):
    write(tmp_path / kind)
    for weights in tmp_path.joinpath(kind).glob("*.safetensors"):
        weights.unlink()
    spec = read_spec(tower_type, tmp_path / kind, -2)
    assert spec.image_size == towers.IMAGE_SIZE and spec.grid == (GRID, GRID)
    assert len(spec.mean) == len(spec.std) == 3


def test_open_clip_tower_never_builds_the_text_tower(tmp_path):
    towers.write_open_clip(tmp_path / "clip")
    tower = build_vision_tower("open_clip", tmp_path / "clip", -1)
    assert all(name.startswith("visual.") for name, _ in tower.named_parameters())
    assert not any("token_embedding" in name for name in tower.state_dict())


@pytest.mark.parametrize(("kind", "tower_type", "write"), WITH_RESNET, ids=[t[0] for t in WITH_RESNET])
def test_a_towers_family_is_read_from_its_files(tmp_path, kind, tower_type, write):
    write(tmp_path / kind)
    assert tower_type_of(tmp_path / kind) == tower_type
    tower = build_vision_tower(tower_type, tmp_path / kind, -1)
    tower.save(tmp_path / "saved")  # as export writes it
    assert tower_type_of(tmp_path / "saved") == tower_type


def test_a_directory_without_a_tower_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no vision tower at {tmp_path}: expected config.json"):
        tower_type_of(tmp_path)


def test_unknown_tower_type_and_layer_are_clear_errors(tmp_path):
    towers.write_siglip(tmp_path / "siglip")
    with pytest.raises(ValueError, match="model.net.vision.type='vit'"):
        build_vision_tower("vit", tmp_path / "siglip", -2)
    with pytest.raises(ValueError, match=r"model.net.vision.layer=5 is out of range for the 3-layer tower"):
        build_vision_tower("hf", tmp_path / "siglip", 5)


def test_unsupported_hugging_face_model_is_a_clear_error(tmp_path):
    towers.write_siglip(tmp_path / "siglip")
    config = json.loads((tmp_path / "siglip" / "config.json").read_text())
    (tmp_path / "siglip" / "config.json").write_text(json.dumps(config | {"model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(ValueError, match="model_type 'vit' is not a supported Hugging Face vision tower"):
        build_vision_tower("hf", tmp_path / "siglip", -2)


def test_missing_tower_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vision tower at"):
        build_vision_tower("timm", tmp_path / "nothing", -2)


# (A ResNet's stages hold batch norm and are not checkpointed: tests/test_parallel.py.)
@pytest.mark.parametrize(("kind", "tower_type", "write"), TOWERS, ids=[t[0] for t in TOWERS])
def test_activation_checkpointing_gives_the_same_gradients(tmp_path, kind, tower_type, write):
    write(tmp_path / kind)
    gradients = []
    for checkpointed in (False, True):
        tower = build_vision_tower(tower_type, tmp_path / kind, -1).train()
        if checkpointed:
            checkpoint_blocks(tower, tower.blocks)
            assert sum(isinstance(m, CheckpointWrapper) for m in tower.modules()) == len(tower.blocks) > 0
        tower(IMAGES).square().sum().backward()
        # (the wrapper's prefix is in parameter names, not in state-dict keys)
        gradients.append({n.replace(_CHECKPOINT_PREFIX, ""): p.grad for n, p in tower.named_parameters() if p.requires_grad})
    assert_same_up_to_summation_order(gradients[1], gradients[0])


def test_timm_convnet_gives_its_stage_feature_map_as_tokens(tmp_path):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    convnet = timm.create_model("convnext_atto", pretrained=False, num_classes=0).eval()
    save_for_hf(convnet, str(tmp_path / "convnext"), model_args={"num_classes": 0}, safe_serialization=True)
    tower = build_vision_tower("timm", tmp_path / "convnext", -2).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = tower(images)
        (expected,) = convnet.forward_intermediates(images, indices=[2], intermediates_only=True)
    assert tower.grid == (14, 14) and tower.hidden_size == expected.shape[1]  # stage 2: stride 16
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2))
