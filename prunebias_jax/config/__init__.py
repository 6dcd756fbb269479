"""The config: every field with its default (`schema`), every rule a value must meet before
any work (`validation`), and how a file plus overrides becomes the run's config (`resolve`).

Config files (`configs/*.py`) start from `base_config()` and change what their experiment
needs, so every config shares one schema and one validator.
"""

from prunebias_jax.config.resolve import COSMETIC_KEYS, SWEEP_KEYS, flatten, resolve_config
from prunebias_jax.config.schema import base_config, sgd
from prunebias_jax.config.validation import (
  check_runlocal_overrides,
  check_schema,
  distill_methods,
  quantization_methods,
  shard_index,
  stage_settings,
  validate_against_dataset,
  validate_config,
)
from prunebias_jax.errors import ConfigError

__all__ = [
  "COSMETIC_KEYS",
  "ConfigError",
  "SWEEP_KEYS",
  "base_config",
  "check_runlocal_overrides",
  "check_schema",
  "distill_methods",
  "quantization_methods",
  "flatten",
  "resolve_config",
  "shard_index",
  "sgd",
  "stage_settings",
  "validate_against_dataset",
  "validate_config",
]
