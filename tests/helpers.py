"""Sizes and config helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
# Small enough to build in seconds, big enough for a few batches of every question type.
WORLD_SUBJECTS = 16
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64}
TINY_LLM = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64}
TINY_PRETRAIN_STEPS = 5


def compose_config(name: str, overrides: list[str]):
    """Composes ``configs/<name>.yaml`` as the entry point would (without running Hydra's app)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)
