"""Every entry-point config and experiment composes; the paper's recipe says what is missing."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from run.cli import compose_config
from run.train import train

EXPERIMENTS = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml"))


def test_the_expected_experiments_exist():
    assert {"demo", "nvila_ft", "lumen"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_train_config(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.task_name == experiment
    assert cfg.model._target_ == "models.lit_module.LumenLitModule"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_eval_config_composes_and_takes_prompt_settings_from_the_checkpoint():
    cfg = compose_config("eval", ["ckpt=model.ckpt"])
    assert cfg.data._target_ == "datamodules.datamodule.LumenDataModule"
    assert cfg.data.use_prior is None and cfg.data.interval_in_prompt is None


@pytest.mark.parametrize("config", ["train", "eval"])
def test_a_run_on_real_data_resolves_its_whole_config(config):
    """With prepare=none (real data, a real base) every value still resolves, as the saved config and
    eval's results.json need: the synthetic world's paths fall back to its defaults."""
    cfg = compose_config(config, ["ckpt=model.ckpt", "prepare=none", "paths.mimic_cxr_jpg=/data/mimic-cxr-jpg",
                                  "paths.diffvqa=/data/medical-diff-vqa", "paths.cache_dir=/cache",
                                  "paths.output_dir=/run"][config == "train":])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["world_dir"] == "/cache/world-400subjects-seed0"
    assert resolved["paths"]["mimic_cxr_jpg"] == "/data/mimic-cxr-jpg"


def test_default_run_is_the_demo():
    default = compose_config("train", [])
    demo = compose_config("train", ["experiment=demo"])
    default.task_name = demo.task_name
    assert OmegaConf.to_yaml(default) == OmegaConf.to_yaml(demo)


def test_the_demo_trains_on_its_difference_weighted_mixture_with_the_tower_the_base_holds():
    cfg = compose_config("train", [])
    sources = {name: source for name, source in cfg.data.sources.items() if source is not None}
    assert {name: (list(source.tasks), source.weight) for name, source in sources.items()} == {
        "diagnostic": (["diagnostic"], 0.3), "difference": (["difference"], 4.0)}
    assert cfg.trainer.max_epochs == 8 and cfg.trainer.accelerator == "cpu"
    # A tiny ResNet base, whose family and read layer the model takes from the base itself.
    assert cfg.prepare.tiny_base.vision_tower == "resnet"
    assert (cfg.model.net.vision.type, cfg.model.net.vision.layer) == (None, None)
    # The other experiments bring their own data and length, not the demo's.
    nvila_ft = compose_config("train", ["experiment=nvila_ft"])
    assert list(nvila_ft.data.sources.diffvqa.tasks) == ["diagnostic"] and nvila_ft.trainer.max_epochs == 1
    assert {compose_config("train", [f"experiment={name}"]).trainer.max_epochs for name in ("mmxu", "lumen")} == {1}


def test_lumen_is_the_papers_recipe():
    cfg = compose_config("train", ["experiment=lumen"])
    assert cfg.model.optimizer.lr == 1.5e-5
    assert cfg.trainer.max_epochs == 1
    assert cfg.trainer.strategy._target_ == "models.parallel.FSDP2Strategy"
    assert cfg.model.net.attn_implementation == "flash_attention_2"
    assert cfg.model.fsdp.param_dtype == "bfloat16"
    sources = {name: source for name, source in cfg.data.sources.items() if source is not None}
    assert {name: source._target_.rsplit(".", 1)[1] for name, source in sources.items()} == {
        "diagnostic": "DiffVQASource", "difference": "DiffVQASource", "prognostic": "PrognosticSource"}
    assert (sources["diagnostic"].tasks, sources["difference"].tasks) == (["diagnostic"], ["difference"])
    assert sources["prognostic"].path is None  # the user's built JSONL: required


def test_lumen_feeds_images_as_nvila_does_and_reads_the_bases_vision_layer():
    cfg = compose_config("train", ["experiment=lumen"])
    assert cfg.data.image_resize == "squash"
    assert cfg.model.net.vision.layer is None


def test_the_demo_and_nvila_ft_take_the_bases_image_policy():
    for experiment in ("demo", "nvila_ft"):
        assert compose_config("train", [f"experiment={experiment}"]).data.image_resize is None


def test_nvila_ft_trains_on_single_image_diagnostic_questions():
    cfg = compose_config("train", ["experiment=nvila_ft"])
    assert cfg.data.sources.diffvqa.tasks == ["diagnostic"]
    assert cfg.data.use_prior is False


# The paper's recipe on this machine's CPU (otherwise refused at once on a machine without a GPU).
LUMEN_ON_CPU = ["experiment=lumen", "trainer.accelerator=cpu"]


def test_lumen_without_data_fails_at_once_naming_the_config_key(tmp_path):
    cfg = compose_config("train", [*LUMEN_ON_CPU, f"paths.output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"paths\.mimic_cxr_jpg is not set.*set paths\.mimic_cxr_jpg=<path>"):
        train(cfg)


def test_lumen_with_a_wrong_base_path_names_the_path_and_the_key(tmp_path):
    missing = tmp_path / "NVILA-8B"
    cfg = compose_config("train", [*LUMEN_ON_CPU, f"paths.output_dir={tmp_path}", f"model.net.base={missing}",
                                   f"paths.mimic_cxr_jpg={tmp_path}", f"paths.diffvqa={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=rf"model\.net\.base = {missing} does not exist"):
        train(cfg)


def test_lumen_without_its_prognostic_questions_names_the_key_before_building_the_model(tmp_path, world, tiny_base):
    cfg = compose_config("train", [*LUMEN_ON_CPU, f"paths.output_dir={tmp_path}", f"model.net.base={tiny_base}",
                                   f"paths.mimic_cxr_jpg={world / 'mimic-cxr-jpg'}",
                                   f"paths.diffvqa={world / 'medical-diff-vqa'}"])
    with pytest.raises(FileNotFoundError, match=r"paths\.prognostic is not set.*build prognostic"):
        train(cfg)


def test_lumen_without_its_expert_predictions_names_the_key(tmp_path, world, tiny_base):
    cfg = compose_config("train", [*LUMEN_ON_CPU, f"paths.output_dir={tmp_path}", f"model.net.base={tiny_base}",
                                   f"paths.mimic_cxr_jpg={world / 'mimic-cxr-jpg'}",
                                   f"paths.diffvqa={world / 'medical-diff-vqa'}",
                                   f"paths.prognostic={world / 'prognostic' / 'prognostic.jsonl'}"])
    with pytest.raises(FileNotFoundError, match=r"paths\.experts is not set.*build experts"):
        train(cfg)
