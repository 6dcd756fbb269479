"""From a config file and overrides to the config a run uses, and what a field change means."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import ml_collections

from prunebias_jax.config.validation import check_runlocal_overrides

# Sweep axes: extending them reuses the checkpoints of the cells already trained.
SWEEP_KEYS = (
  "pruning.methods",
  "pruning.sparsities",
  "seeds",
  "quantization.schemes",
  "quantization.prune_first",
  "quantization.ptq",
  "quantization.qat",
)
# Fields that change how a run reports or where it runs, not what it computes.
COSMETIC_KEYS = (
  "progress_seconds",
  "overwrite",
  "compile_cache",
  "stage",
  "shard.count",
  "shard.index",
  "distributed",
  "coordinator_address",
  "num_processes",
  "process_id",
  "checkpoint.every_steps",
  "checkpoint.every_seconds",
  "checkpoint.background",
  "checkpoint.keep",
  "monitor.every_steps",
  "monitor.test_accuracy",
  "report.format",
  "report.cka_cell",
)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} for a nested dict (tuples as lists, as they come back from JSON)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def resolve_config(
  config: ml_collections.ConfigDict, explicit_keys: Collection[str] = ()
) -> ml_collections.ConfigDict:
  """Applies `runlocal_overrides` when `runlocal=True` (tiny settings for a CPU check).

  Keys the user set on the command line (`explicit_keys`, dotted) win over runlocal's values.
  Returns an unlocked copy; the caller's config stays as it is.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  check_runlocal_overrides(config)
  if config.get("runlocal") and config.get("runlocal_overrides"):
    for dotted, value in config.runlocal_overrides:
      if dotted in explicit_keys:
        continue
      *parents, leaf = dotted.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config
