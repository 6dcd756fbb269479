"""The workdir: what may be written there, where each checkpoint lives, and what is cleaned.

    <workdir>/config.json, dataset.json             the run's description (written first)
             checkpoints/<name>/                    one Orbax checkpoint per trained model
             checkpoints/partial/<stage>/           mid-stage checkpoints of a stage in progress
             results.jsonl, cells.jsonl, correlations.jsonl, results.md, plots/, timings.json

A workdir holds the run of one config: another config is refused unless `overwrite=True`
(which discards the old run), except for the sweep axes, which extend it, and for fields that
only change how a run reports. Multi-host: every process decides before any process writes,
and only process 0 deletes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

from prunebias_jax.checkpoint import ModelCheckpoint, StageCheckpoint
from prunebias_jax.config import COSMETIC_KEYS, SWEEP_KEYS, base_config, flatten
from prunebias_jax.errors import ConfigError
from prunebias_jax.files import check_writable, remove_stale_temporaries

PARTIAL = "partial"  # checkpoints/partial/<stage>: mid-stage checkpoints of stages in progress
RUN_FILES = (
  "results.jsonl",
  "cells.jsonl",
  "correlations.jsonl",
  "results.md",
  "timings.json",
  "dataset.json",
  "config.json",
)


def barrier(name: str) -> None:
  """All processes of a multi-host run meet here (a no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"prunebias_jax: {name}")


def is_writer() -> bool:
  """Only process 0 writes files of record; Orbax coordinates checkpoints itself."""
  return jax.process_index() == 0


def ensure_writable(workdir: Path) -> None:
  """Creates `workdir` and proves a file can be written there (ConfigError otherwise)."""
  try:
    check_writable(workdir)
  except OSError as e:
    raise ConfigError(
      f"--workdir {str(workdir)!r} is not writable ({e.strerror or e}); "
      "pass a directory you can write to"
    ) from None


def must_discard(workdir: Path, config: ml_collections.ConfigDict) -> bool:
  """True when `workdir` holds a run of a different config and overwrite=True; raises
  ConfigError when it does and overwrite is off (never mixes results of two configs)."""
  path = workdir / "config.json"
  if not path.exists():
    return False
  try:
    old = flatten(json.loads(path.read_text()))
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(
      f"{path} is unreadable ({e}); use a new --workdir or --config.overwrite=True"
    ) from None
  new = flatten(json.loads(config.to_json()))
  # A workdir written before a config field existed ran with that field's default.
  defaults = flatten(json.loads(base_config().to_json()))
  old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
  ignore = set(SWEEP_KEYS) | set(COSMETIC_KEYS) | {"runlocal_overrides"}
  keys = set(old) | set(new)
  differing = sorted(k for k in keys if k not in ignore and old.get(k) != new.get(k))
  if not differing:
    return False
  if not config.overwrite:
    raise ConfigError(
      f"workdir {workdir} holds a run of a different config (differs at: "
      f"{', '.join(differing[:5])}); use a new --workdir or --config.overwrite=True to discard it"
    )
  logging.warning(
    "overwrite=True: discarding the previous run in %s (differs at %s)", workdir, differing
  )
  return True


def guard(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to mix a different config's results into `workdir` (see `must_discard`), and
  removes the temporaries of a run killed mid-write."""
  discard = must_discard(workdir, config)
  barrier("workdir checked")
  if is_writer():
    if discard:
      for name in ("checkpoints", "plots"):
        shutil.rmtree(workdir / name, ignore_errors=True)
      for name in RUN_FILES:
        (workdir / name).unlink(missing_ok=True)
    for tmp in remove_stale_temporaries(workdir):
      logging.info("removed %s (a temporary file of an interrupted run)", tmp)
  barrier("workdir ready")


def model_checkpoint(workdir: Path, name: str, expect: dict[str, Any]) -> ModelCheckpoint:
  """The checkpoint of the trained model `name` (dense, dense_seed<s>, <cell>_seed<s>)."""
  return ModelCheckpoint(workdir / "checkpoints" / name, expect=expect)


def partial_dir(workdir: Path, stage: str) -> Path:
  return workdir / "checkpoints" / PARTIAL / stage


def stage_checkpoint(
  workdir: Path, stage: str, cfg: ml_collections.ConfigDict, expect: dict[str, Any]
) -> StageCheckpoint | None:
  """Mid-stage checkpoints of `stage` per `config.checkpoint` (None when every_steps is 0)."""
  if not cfg.every_steps:
    return None
  return StageCheckpoint(partial_dir(workdir, stage), cfg.every_steps, cfg.keep, expect=expect)


def check_checkpoints(workdir: Path, expect: dict[str, Any]) -> None:
  """Reads the metadata of every checkpoint in `workdir` before any training, so one of
  another model or a damaged one stops the run now (CheckpointError, exit 2), not hours
  later, and is never overwritten."""
  root = workdir / "checkpoints"
  if not root.is_dir():
    return
  dirs = [d for d in root.iterdir() if d.is_dir() and d.name != PARTIAL]
  if (root / PARTIAL).is_dir():
    dirs += [d for d in (root / PARTIAL).iterdir() if d.is_dir()]
  for d in sorted(dirs):
    ckpt = ModelCheckpoint(d, expect=expect)
    try:
      if ckpt.latest_step() is not None:
        ckpt.read_meta()
    finally:
      ckpt.close()


def finish_stage(partial: StageCheckpoint | None) -> None:
  """The stage's models are saved: its mid-stage checkpoints are no longer needed."""
  if partial is None:
    return
  barrier("stage saved")
  if is_writer():
    partial.discard()
  else:
    partial.close()


def drop_stale_partial(workdir: Path, stage: str) -> None:
  """Deletes the mid-stage checkpoints of a stage whose model is saved (a kill came between
  saving the model and deleting them)."""
  path = partial_dir(workdir, stage)
  if path.is_dir() and is_writer():
    shutil.rmtree(path, ignore_errors=True)
