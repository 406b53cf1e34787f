"""The shipped recipes' Hydra configs composed in-process, as the recipe scripts compose them."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from helpers.launch import ROOT


def compose_config(recipe: str, overrides: list[str]) -> DictConfig:
    """``conf/<recipe>.yaml`` with ``overrides`` (Hydra's command-line syntax)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(recipe, overrides=overrides)
