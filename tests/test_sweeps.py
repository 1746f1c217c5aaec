"""Every W&B sweep in configs/sweep/ runs train.py with overrides that compose into a valid config: each
parameter value (each listed value, the ends of each distribution) is turned into the command line the
agent builds (wandb's own create_sweep_command / create_sweep_command_args) and composed with Hydra,
which refuses a key that does not exist."""

from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from wandb.sdk.launch.sweeps.utils import SWEEP_COMMAND_ENV_VAR_REGEX, create_sweep_command, create_sweep_command_args

from run.cli import compose_config
from models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))
MACROS = {"${env}", "${interpreter}", "${program}", "${args_no_hyphens}"}
# What a Hydra app sets itself (${hydra:...}) and compose_config cannot.
OUTSIDE_HYDRA = ["paths.cache_dir=/cache", "paths.output_dir=/run"]


def parameter_values(spec: dict) -> list:
    """The values a sweep parameter can take that are worth composing: all listed values, or a
    distribution's two ends."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def sweep_commands(sweep: dict, monkeypatch) -> tuple[list[str], list[list[str]]]:
    """The fixed train.py overrides of the sweep's command (its ${envvar:NAME} macros filled in with
    /data/NAME), and the swept overrides of the runs worth checking: each parameter value alone (the
    others at the config's defaults), and all first and all last values together."""
    command = sweep["command"]
    for name in SWEEP_COMMAND_ENV_VAR_REGEX.findall(" ".join(command)):
        monkeypatch.setenv(name, f"/data/{name}")
    fixed = [chunk for chunk in create_sweep_command(list(command)) if chunk not in MACROS]
    parameters = sweep["parameters"]
    choices = [{key: value} for key, spec in parameters.items() for value in parameter_values(spec)]
    choices += [{key: parameter_values(spec)[end] for key, spec in parameters.items()} for end in (0, -1)]
    return fixed, [create_sweep_command_args({"args": {k: {"value": v} for k, v in choice.items()}})["args_no_hyphens"]
                   for choice in choices]


def check_valid(cfg: DictConfig) -> None:
    """What train.py would refuse later: the model config, the learning rates, the warmup."""
    ModelConfig(**cfg.model.net)
    rates = [rate for key in ("lr", "vision_lr", "projector_lr", "llm_lr")
             if (rate := cfg.model.optimizer[key]) is not None]
    assert all(isinstance(rate, float) for rate in rates), rates
    torch.optim.AdamW([{"params": [torch.zeros(1, requires_grad=True)], "lr": rate} for rate in rates])
    assert 0 <= cfg.model.scheduler.warmup_ratio < 1


def test_there_is_a_sweep_for_the_demo_and_for_the_papers_recipe():
    experiments = {next(chunk for chunk in yaml.safe_load(path.read_text())["command"] if chunk.startswith("experiment="))
                   for path in SWEEPS}
    assert {"experiment=demo", "experiment=lumen"} <= experiments


@pytest.mark.parametrize("path", SWEEPS, ids=[path.stem for path in SWEEPS])
def test_every_value_of_every_parameter_composes_into_a_valid_config(path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert (ROOT / sweep["program"]).is_file() and sweep["program"] == "train.py"
    assert sweep["command"][:3] == ["${env}", "${interpreter}", "${program}"] and "${args_no_hyphens}" in sweep["command"]
    assert "logger.wandb.offline=false" in sweep["command"]  # a sweep's runs report to the sweep
    assert f'"{sweep["metric"]["name"]}"' in (ROOT / "models" / "lit_module.py").read_text(), "the metric is never logged"
    fixed, runs = sweep_commands(sweep, monkeypatch)
    for swept in runs:
        cfg = compose_config("train", OUTSIDE_HYDRA + fixed + swept)
        check_valid(cfg)
        for override in swept:
            key, value = override.split("=", 1)
            assert str(OmegaConf.select(cfg, key)) == value, override


def test_a_misspelt_parameter_or_a_bad_value_fails(monkeypatch):
    good = yaml.safe_load((ROOT / "configs" / "sweep" / "demo.yaml").read_text())
    misspelt = good | {"parameters": {"model.optimizer.learning_rate": {"values": [1.0e-3]}}}
    fixed, runs = sweep_commands(misspelt, monkeypatch)
    with pytest.raises(ConfigCompositionException, match="model.optimizer.learning_rate"):
        compose_config("train", OUTSIDE_HYDRA + fixed + runs[0])
    fixed, runs = sweep_commands(good | {"parameters": {"model.net.fusion.mode": {"values": ["differnce"]}}}, monkeypatch)
    with pytest.raises(ValueError, match="model.net.fusion.mode='differnce'"):
        check_valid(compose_config("train", OUTSIDE_HYDRA + fixed + runs[0]))

