"""The validated merge config (:mod:`swudi.config.merge_config`), strict YAML, shared value checks and
sweep grids (:mod:`swudi.config.grid`)."""

from swudi.config.merge_config import MergeConfig, apply_overrides, config_from_mapping, load_config

__all__ = ["MergeConfig", "apply_overrides", "config_from_mapping", "load_config"]
