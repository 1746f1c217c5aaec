"""What the entry points (train.py, eval.py) share: composing their config, checking its values before
anything is prepared or built, running the cached preparation steps, reporting a person's mistakes
(an override Hydra cannot apply, a ``common.errors.UsageError``) as one paragraph on stderr with exit
code 2, argparse's convention, and keeping libraries' messages that say nothing about the run off the
console. Every other exception keeps its traceback."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from common.contract import RESIZE_POLICIES
from common.errors import ConfigError, UsageError
from models.config import ModelConfig

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """Composes ``configs/<name>.yaml`` as the entry points do, for use outside a Hydra app (tests,
    benchmarks). ``paths.cache_dir`` and ``paths.output_dir`` need explicit values there."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def prepare(cfg: DictConfig) -> None:
    """Runs the config's cached preparation steps (synthetic world, tiny base model) in order."""
    for name, step in (cfg.get("prepare") or {}).items():
        if step is not None:
            log.info("prepare %s ...", name)
            log.info("prepare %s: %s", name, hydra.utils.instantiate(step))


def check_config(cfg: DictConfig) -> None:
    """Refuses the values a run cannot use, each named with its key and what it may be, all in one
    message and before anything is prepared: the model's choices (``model.net``), the data's image
    resizing and batch sizes, and a GPU accelerator on a machine without one."""
    problems = [*_model_problems(cfg), *_data_problems(cfg), *_accelerator_problems(cfg)]
    if problems:
        raise ConfigError("\n".join(problems))


def _model_problems(cfg: DictConfig) -> list[str]:
    net = OmegaConf.select(cfg, "model.net")
    if net is None:
        return []
    # The base is an input path, checked once preparation (which may build it) is done.
    fields = {key: OmegaConf.to_container(net[key], resolve=True) if OmegaConf.is_config(net[key]) else net[key]
              for key in net if key != "base"}
    try:
        ModelConfig(base="", **fields)
    except ValueError as error:
        return [str(error)]
    except TypeError:  # a key ModelConfig does not have (+model.net.<key>=...)
        unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(ModelConfig)})
        return [f"model.net.{key}: the model has no such setting; its settings: "
                f"{', '.join(field.name for field in dataclasses.fields(ModelConfig))}" for key in unknown]
    return []


def _data_problems(cfg: DictConfig) -> list[str]:
    data = cfg.get("data") or {}
    problems = []
    if data.get("image_resize") not in (None, *RESIZE_POLICIES):
        problems.append(f"data.image_resize={data.image_resize!r}: expected one of {RESIZE_POLICIES} or null (the "
                        "base's own policy)")
    for key, nullable in (("batch_size", False), ("eval_batch_size", False), ("global_batch_size", True)):
        if key not in data or (nullable and data[key] is None):
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            expected = "a positive whole number" + (" or null" if nullable else "")
            problems.append(f"data.{key}={value!r}: expected {expected}")
    return problems


def _accelerator_problems(cfg: DictConfig) -> list[str]:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return []
    advice = {"trainer.accelerator": "train on the CPU with trainer=cpu (or keep this trainer and set "
                                     "trainer.accelerator=cpu)",
              "accelerator": "evaluate on the CPU with accelerator=cpu (or accelerator=auto)"}
    return [f"{key}={value} needs a GPU and this machine has none that torch can use: {advice[key]}"
            for key in advice if (value := OmegaConf.select(cfg, key)) in ("gpu", "cuda")]


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], None]]:
    """``hydra.main`` with ``configs/<config_name>.yaml`` for an entry point's ``main(cfg)``. A person's
    mistake ends the run with its message alone on stderr and exit code 2: an override Hydra cannot
    apply (an unknown key, with the config's closest keys; an option a config group does not have,
    with its options; bad syntax), or a ``UsageError`` the run raises."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], None]:
        # Hydra reports a failed composition itself (exit code 1) unless HYDRA_FULL_ERROR is set, when
        # it raises it: set while the config is composed, as the person had it while the run runs.
        full_error = os.environ.get("HYDRA_FULL_ERROR")

        def restore_full_error() -> None:
            if full_error is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = full_error

        @functools.wraps(task)  # Hydra unwraps it: the run is still named after the entry point's file
        def reported(cfg: DictConfig) -> Any:
            restore_full_error()
            try:
                return task(cfg)
            except UsageError as error:
                _fail(str(error))

        hydra_main = hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name=config_name)(reported)

        @functools.wraps(task)
        def main() -> None:
            quiet_library_noise()
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                hydra_main()
            except (ConfigCompositionException, OverrideParseException) as error:
                _fail(override_problem(error, config_name, get_args_parser().parse_args().overrides))
            finally:
                restore_full_error()

        return main

    return decorate


def quiet_library_noise() -> None:
    """Silences, each at its source, the library messages that say nothing about the run: Lightning's tips
    to install its cloud services, and the FutureWarning that torch 2.14 raises inside Lightning 2.6's own
    pytree helper on every fit and predict. Every other warning and log line stays."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:"))


def _fail(message: str) -> NoReturn:
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def override_problem(error: Exception, config_name: str, overrides: list[str]) -> str:
    """What is wrong with the command line's overrides, and what would be right."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, option = error.missing_cfg_file.rpartition("/")
        closest = difflib.get_close_matches(option, error.options, n=1)
        return (f"{group}={option}: {group} has no option {option!r}"
                + (f"; did you mean {group}={closest[0]}?" if closest else ".")
                + f" Its options: {', '.join(error.options)}")
    unknown, config = ([], None) if isinstance(error, OverrideParseException) else unknown_keys(config_name, overrides)
    if not unknown:
        return " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    keys = list(_keys(OmegaConf.to_container(config, resolve=False))) if config is not None else []
    lines = []
    for override in unknown:
        key = override.split("=", 1)[0]
        closest = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        suggestion = f"; did you mean {' or '.join(closest)}?" if closest else ""
        lines.append(f"{override}: the {config_name} config has no key {key}{suggestion}")
    return "\n".join(lines)


def unknown_keys(config_name: str, overrides: list[str]) -> tuple[list[str], DictConfig | None]:
    """The overrides of keys the config does not have, and the config composed without them (None when
    it still fails for another reason)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    kept = [override.input_line for override in parsed if not override.key_or_group.startswith("hydra")]
    unknown = []
    while True:
        try:
            return unknown, compose_config(config_name, kept)
        except ConfigCompositionException as error:
            match = re.match(r"Could not override '(.+?)'", str(error))
            failed = [line for line in kept if match and line.split("=", 1)[0] == match.group(1)]
            if not failed:
                return unknown, None
            unknown += failed
            kept = [line for line in kept if line not in failed]


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a config (as plain containers), dotted, inner nodes included; Hydra's own (``_target_``,
    ``_partial_``, ...) are not keys a person sets."""
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key).startswith("_"):
                continue
            yield f"{prefix}{key}"
            yield from _keys(value, f"{prefix}{key}.")
