"""Building from a base directory (freezing, projector choice, precision), export and reload."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from run.cli import compose_config
from run.evaluate import evaluate
from models.checkpoints import load_checkpoint
from models.config import ModelConfig
from models.factory import build_model, input_spec
from models.lit_module import LumenLitModule as LumenModule
from tests.helpers import WORLD_SUBJECTS, checkpoints_cli, model_inputs



@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "lumen-demo"
    checkpoints_cli("export", trained_checkpoint, out)
    return out


def test_export_writes_a_self_contained_directory(exported):
    assert {p.name for p in exported.iterdir()} == {"llm", "vision_tower", "mm_projector", "temporal_fusion",
                                                     "config.json", "README.md"}
    assert (exported / "llm" / "tokenizer.json").is_file() and (exported / "llm" / "model.safetensors").is_file()
    assert (exported / "vision_tower" / "preprocessor_config.json").is_file()
    assert json.loads((exported / "mm_projector" / "config.json").read_text())["mm_projector_type"] == "mlp_downsample"
    summary = json.loads((exported / "config.json").read_text())
    assert summary["model_type"] == "lumen" and summary["lumen"]["fusion"]["mode"] == "difference"
    assert "base" not in summary["lumen"] and summary["prompt"]["use_prior"] is True
    assert "difference" in (exported / "README.md").read_text()


def test_exported_model_reloads_with_identical_outputs(trained_checkpoint, exported):
    original, reloaded = load_checkpoint(trained_checkpoint), load_checkpoint(exported)
    batch = model_inputs(original.model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch).logits, original.model(**batch).logits, rtol=0, atol=0)
    assert reloaded.prompt["interval_in_prompt"] == original.prompt["interval_in_prompt"]
    assert reloaded.max_new_tokens == original.max_new_tokens


def test_exported_directory_does_not_depend_on_the_base(exported, tmp_path):
    moved = tmp_path / "moved"
    exported.rename(moved)
    try:
        assert load_checkpoint(moved).config.base == str(moved)
    finally:
        moved.rename(exported)


def test_exported_fusion_weights_refuse_another_fusion_mode(exported):
    with pytest.raises(ValueError, match="model.net.fusion.mode=concat but .* holds weights trained with mode=difference"):
        build_model(ModelConfig(base=str(exported), fusion={"mode": "concat"}))


def test_eval_accepts_an_exported_directory(exported, world, tmp_path):
    cfg = compose_config("eval", [f"ckpt={exported}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
                                  f"paths.world_dir={world}",
                                  f"prepare.world.subjects={WORLD_SUBJECTS}", "data.limit.test=8", "accelerator=cpu"])
    results = evaluate(cfg)
    assert results["checkpoint"] == str(exported.resolve())
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize(("flags", "frozen"), [
    ({"tune_vision": False}, {"vision"}),
    ({"tune_projector": False}, {"projector", "fusion"}),
    ({"tune_llm": False}, {"llm"}),
])
def test_tune_flags_freeze_their_components(tiny_base, flags, frozen):
    model = build_model(ModelConfig(base=str(tiny_base), **flags))
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vision", "projector", "fusion", "llm"} - frozen


def test_3x3_projector_is_chosen_by_config(tiny_base):
    config = ModelConfig(base=str(tiny_base), vision={"type": "hf", "layer": -1}, projector="mlp_downsample_3x3_fix")
    model = build_model(config)
    # The tiny tower's 4x4 grid is padded to 6x6 and merged to 2x2.
    assert model.projector.projector_type == "mlp_downsample_3x3_fix"
    assert model.tokens_per_image == input_spec(config)["tokens_per_image"] == 4


def test_flash_attention_without_the_package_is_a_clear_error(tiny_base):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ImportError, match="flash_attention_2 needs the flash-attn package"):
        build_model(ModelConfig(base=str(tiny_base), attn_implementation="flash_attention_2"))


@pytest.mark.parametrize(("dtype", "precision", "fits"), [
    ("float32", "bf16-mixed", True), ("bfloat16", "bf16-true", True), ("float32", "32-true", True),
    ("bfloat16", "bf16-mixed", False), ("float32", "bf16-true", False),
])
def test_model_dtype_must_fit_the_trainer_precision(tiny_base, dtype, precision, fits):
    from models.lit_module import _check_precision

    if fits:
        _check_precision(dtype, precision)
    else:
        with pytest.raises(ValueError, match=f"model.net.dtype={dtype} does not fit trainer.precision={precision}"):
            _check_precision(dtype, precision)


def test_module_builds_the_model_from_its_plain_config(tiny_base):
    module = LumenModule(net={"base": str(tiny_base), "fusion": {"mode": "difference"}}, optimizer={}, scheduler={})
    module.configure_model()
    assert module.model.fusion.mode == "difference" and module.model.fusion.slots == 2
