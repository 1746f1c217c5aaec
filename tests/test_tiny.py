import json

import numpy as np
import pytest
import torch

from datamodules.synthetic.population import SITES, simulate_population
from run import tiny_base
from run.tiny_base import (
    DRAWN_SEED_OFFSET, DRAWN_VIEWS, MANIFEST, RESNET_READ_STAGE, base_manifest, build_tiny_base, drawn_pretraining_set,
    ensure_tiny_base,
)
from tests.helpers import TINY_LLM, TINY_VISION


def test_a_world_regenerated_in_place_by_another_generator_makes_the_tiny_base_stale(world, tmp_path):
    same_place = tmp_path / "world"
    same_place.mkdir()
    manifest = json.loads((world / "world.json").read_text())
    (same_place / "world.json").write_text(json.dumps(manifest))
    before = base_manifest(same_place)
    (same_place / "world.json").write_text(json.dumps({**manifest, "generator_version": "0.9"}))
    after = base_manifest(same_place)
    assert before["world"] == after["world"] and before != after
    assert before["world_generator"] == {key: manifest[key] for key in ("generator_version", "subjects", "seed")}


def test_a_drawn_pretraining_set_labels_every_site_and_view_of_its_own_population_whatever_draws_it():
    mean = std = (0.5, 0.5, 0.5)
    pixels, targets = drawn_pretraining_set(3, seed=11, image_size=16, mean=mean, std=std, workers=1)
    images = [(study, image) for study in simulate_population(3, 11) for image in study.images]
    assert pixels.shape == (len(images), 3, 16, 16) and targets.shape == (len(images), len(SITES) + len(DRAWN_VIEWS))
    expected = [[*(np.array(study.levels) > 0), *(image.view == view for view in DRAWN_VIEWS)] for study, image in images]
    assert torch.equal(targets, torch.tensor(np.array(expected, dtype=np.float32)))
    assert targets[:, :len(SITES)].sum() > 0  # the three subjects have findings to learn
    forked, forked_targets = drawn_pretraining_set(3, seed=11, image_size=16, mean=mean, std=std, workers=2)
    assert torch.equal(pixels, forked) and torch.equal(targets, forked_targets)
    other, _ = drawn_pretraining_set(3, seed=12, image_size=16, mean=mean, std=std, workers=1)
    assert other.shape != pixels.shape or not torch.equal(other, pixels)


def test_a_tiny_base_pretrained_on_a_drawn_population_says_so_and_is_rebuilt_when_that_changes(world, tmp_path):
    options = dict(vision_tower="siglip", vision=TINY_VISION, llm=TINY_LLM, vision_pretrain_steps=2, vision_pretrain_subjects=4)
    base = ensure_tiny_base(tmp_path / "base", world, **options)
    built = json.loads((base / MANIFEST).read_text())
    assert built["vision_pretrain_subjects"] == 4 and built["vision_pretrain_lr"] == 1e-3
    stamp = (base / MANIFEST).stat().st_mtime_ns
    assert ensure_tiny_base(tmp_path / "base", world, **options) == base and (base / MANIFEST).stat().st_mtime_ns == stamp
    ensure_tiny_base(tmp_path / "base", world, **{**options, "vision_pretrain_subjects": 5})
    assert json.loads((base / MANIFEST).read_text())["vision_pretrain_subjects"] == 5


def test_a_drawn_population_that_is_the_world_itself_or_a_negative_one_is_refused(world, tmp_path):
    twin = tmp_path / "world"
    twin.mkdir()
    manifest = json.loads((world / "world.json").read_text())
    (twin / "world.json").write_text(json.dumps({**manifest, "seed": DRAWN_SEED_OFFSET}))
    with pytest.raises(ValueError, match=f"seed {DRAWN_SEED_OFFSET}"):
        build_tiny_base(tmp_path / "base", twin, vision_pretrain_subjects=2)
    with pytest.raises(ValueError, match="vision_pretrain_subjects=-1"):
        base_manifest(world, vision_pretrain_subjects=-1)
    assert not (tmp_path / "base").exists()


def test_a_base_built_at_the_old_pretraining_batch_is_rebuilt_and_a_bad_batch_is_refused(world, tmp_path, monkeypatch):
    batches = []
    pretrain = tiny_base.pretrain_vision_tower
    monkeypatch.setattr(tiny_base, "pretrain_vision_tower",
                        lambda *args, **kwargs: batches.append(args[6]) or pretrain(*args, **kwargs))
    options = dict(vision_tower="siglip", vision=TINY_VISION, llm=TINY_LLM, vision_pretrain_steps=2)
    base = ensure_tiny_base(tmp_path / "base", world, **options)
    built = json.loads((base / MANIFEST).read_text())
    assert built["vision_pretrain_batch_size"] == 32 and batches == [32]
    # A manifest written before the batch size was an option: that base was pretrained on batches of 64,
    # so it is kept for a run that asks for 64 and rebuilt for one that asks for today's default.
    del built["vision_pretrain_batch_size"]
    (base / MANIFEST).write_text(json.dumps(built))
    stamp = (base / MANIFEST).stat().st_mtime_ns
    ensure_tiny_base(tmp_path / "base", world, **options, vision_pretrain_batch_size=64)
    assert (base / MANIFEST).stat().st_mtime_ns == stamp and batches == [32]
    ensure_tiny_base(tmp_path / "base", world, **options)
    assert (base / MANIFEST).stat().st_mtime_ns != stamp and batches == [32, 32]
    assert json.loads((base / MANIFEST).read_text())["vision_pretrain_batch_size"] == 32
    for bad in (0, 32.0):
        with pytest.raises(ValueError, match=f"vision_pretrain_batch_size={bad}"):
            base_manifest(world, vision_pretrain_batch_size=bad)


def test_a_resnet_tower_base_loads_as_a_timm_tower_whose_read_stage_the_pretraining_taught(world, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from models.config import ModelConfig
    from models.factory import build_model, input_spec, vision_layer

    read = []
    resnet_tokens = tiny_base.resnet_tokens
    monkeypatch.setattr(tiny_base, "resnet_tokens", lambda tower, pixels: read.append(pixels.shape[0]) or resnet_tokens(tower, pixels))
    options = dict(llm=TINY_LLM, vision_pretrain_steps=2, vision_tower="resnet",
                   vision=dict(image_size=32, channels=(8, 16, 16, 16)))
    base = ensure_tiny_base(tmp_path / "base", world, **options)
    built = json.loads((base / MANIFEST).read_text())
    assert built["vision_tower"] == "resnet" and built["vision"]["channels"] == [8, 16, 16, 16]
    assert read == [1, 32, 32]  # the head's width, then each pretraining batch, all read at the stage the VLM reads
    stamp = (base / MANIFEST).stat().st_mtime_ns
    ensure_tiny_base(tmp_path / "base", world, **options)  # the same options (a tuple of widths) keep it
    assert (base / MANIFEST).stat().st_mtime_ns == stamp and read == [1, 32, 32]
    # The pretraining head read the mean of the tokens. A ResNet base from before the pool was recorded was
    # pretrained on each token's largest logit: it is rebuilt.
    assert built["vision_pretrain_pool"] == "mean"
    del built["vision_pretrain_pool"]
    (base / MANIFEST).write_text(json.dumps(built))
    pools = []
    pretrain = tiny_base.pretrain_vision_tower
    monkeypatch.setattr(tiny_base, "pretrain_vision_tower",
                        lambda *args, **kwargs: pools.append(kwargs["pool"]) or pretrain(*args, **kwargs))
    ensure_tiny_base(tmp_path / "base", world, **options)
    assert pools == ["mean"] and json.loads((base / MANIFEST).read_text())["vision_pretrain_pool"] == "mean"
    # The model finds the family (timm) and the layer (the manifest's vision_layer) from the base itself.
    assert built["vision_layer"] == RESNET_READ_STAGE
    config = ModelConfig(base=str(base), tune_vision=False)
    spec = input_spec(config)
    assert (spec.image_size, spec.mean, spec.tokens_per_image) == (32, (0.5, 0.5, 0.5), 4)  # 4 x 4 tokens, merged 2 x 2
    model = build_model(config)
    stored = load_file(base / "vision_tower" / "model.safetensors")
    kept = model.vision.model.state_dict()
    assert {key for key in stored if key.startswith(("layer1.", "layer2."))} <= kept.keys()
    assert all(torch.equal(kept[key], stored[key]) for key in kept)  # the pretrained weights, stages 3-4 pruned
    with torch.no_grad():
        tokens = model.vision.eval()(torch.randn(3, 3, 32, 32))
    assert tokens.shape == (3, 16, 16)  # (images, 4 x 4 stage-2 positions, 16 channels)
    # What FSDP and activation checkpointing wrap one by one: the stages up to the one read.
    assert model.vision.blocks == [model.vision.model.layer1, model.vision.model.layer2]
    # A base built before the manifest named its layer is read at its family's: a ResNet's second stage...
    config = ModelConfig(base=str(base))
    (base / MANIFEST).write_text(json.dumps({key: value for key, value in built.items() if key != "vision_layer"}))
    assert vision_layer(config, None) == RESNET_READ_STAGE
    # ... and a base built before the tower family was an option is a SigLIP base (pretrained on the mean, read
    # at its last layer), and is kept as one.
    siglip = ensure_tiny_base(tmp_path / "siglip", world, vision_tower="siglip", vision=TINY_VISION, llm=TINY_LLM, vision_pretrain_steps=2)
    manifest = json.loads((siglip / MANIFEST).read_text())
    assert manifest["vision_tower"] == "siglip"
    del manifest["vision_tower"], manifest["vision_pretrain_pool"], manifest["vision_layer"]
    (siglip / MANIFEST).write_text(json.dumps(manifest))
    stamp = (siglip / MANIFEST).stat().st_mtime_ns
    ensure_tiny_base(tmp_path / "siglip", world, vision_tower="siglip", vision=TINY_VISION, llm=TINY_LLM, vision_pretrain_steps=2)
    assert (siglip / MANIFEST).stat().st_mtime_ns == stamp
    assert vision_layer(ModelConfig(base=str(siglip)), None) == -1
    with pytest.raises(ValueError, match="vision_tower='vit'"):
        base_manifest(world, vision_tower="vit")
    with pytest.raises(ValueError, match=r"a resnet tower has no settings \['hidden_size', .*set vision_tower=siglip"):
        base_manifest(world, vision=TINY_VISION)  # a SigLIP's settings for the default ResNet
    with pytest.raises(ValueError, match=r"a siglip tower has no settings \['channels'\].*set vision_tower=resnet"):
        base_manifest(world, vision_tower="siglip", vision={"channels": [8, 8, 8, 8]})
    # A tower type other than the base's is refused, naming both.
    with pytest.raises(ValueError, match=r"model.net.vision.type=hf but .* holds a timm tower: set model/vision=base"):
        build_model(ModelConfig(base=str(base), vision={"type": "hf", "layer": -1}))
