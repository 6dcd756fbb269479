"""The workdir: what may be written there, where each checkpoint lives, and what is cleaned.

    <workdir>/config.json, dataset.json             the run's description (written first)
             checkpoints/<name>/                    one Orbax checkpoint per trained model
             checkpoints/partial/<stage>/           mid-stage checkpoints of a stage in progress
             results.jsonl, cells.jsonl, correlations.jsonl, results.md, plots/, timings.json
             previous_runs/<time>/                  the run files of an earlier, different config
             cells/<unit>.npz                       each finished unit's records and outputs
             locks/, provenance.jsonl               the workers of a shared sweep (`claims`)

What may be reused is decided by the checkpoints alone: each carries the identity of its
training (`provenance`), and a run restores a model only when that identity is its own.
A finished model trained differently stops the run before any training (exit 2) unless
`overwrite=True`, which deletes just those models; mid-stage checkpoints of a different
training are discarded (the stage never finished); everything else is kept, so a change
that only affects stages not yet trained, or only the analysis, reuses what is done. When
the config differs from config.json, the old run files (which describe that config) move to
previous_runs/ instead of being mixed with or overwritten by the new run's. Multi-host:
every process decides before any process writes, and only process 0 deletes or moves.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

from prunebias_jax.checkpoint import Identity, IdentityMismatch, ModelCheckpoint, StageCheckpoint
from prunebias_jax.claims import LOCKS, WORKERS
from prunebias_jax.config import COSMETIC_KEYS, SWEEP_KEYS, base_config, flatten
from prunebias_jax.errors import CheckpointError, ConfigError
from prunebias_jax.files import check_writable, remove_stale_temporaries, write_json_atomic

CELLS = "cells"  # cells/<unit>.npz: each finished unit's records (`cellfiles`)
PARTIAL = "partial"  # checkpoints/partial/<stage>: mid-stage checkpoints of stages in progress
PREVIOUS = "previous_runs"  # previous_runs/<time>/: run files of an earlier, different config
RUN_FILES = (
  "results.jsonl",
  "cells.jsonl",
  "correlations.jsonl",
  "results.md",
  "timings.json",
  "dataset.json",
  "config.json",
  "predictions.npz",
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


def check_paths(workdir: Path, checkpoint_names: Collection[str]) -> None:
  """Every path the run will write, checked before any training (ConfigError naming it):
  a file where the run keeps a directory or the reverse, a symlink that does not resolve (a
  loop, a missing target), a directory that cannot be written to (read-only, immutable).
  Found at the end of a long run, each of these used to end in an OS traceback."""
  ckpts = workdir / "checkpoints"
  dirs = [ckpts, ckpts / PARTIAL, workdir / "plots", workdir / PREVIOUS]
  dirs += [workdir / LOCKS, workdir / LOCKS / WORKERS, workdir / CELLS]
  dirs += [ckpts / n for n in checkpoint_names] + [ckpts / PARTIAL / n for n in checkpoint_names]
  files = [workdir / n for n in RUN_FILES]
  if (workdir / "plots").is_dir():
    files += sorted(
      p for p in (workdir / "plots").iterdir() if p.suffix in (".png", ".pdf", ".svg")
    )
  for path in dirs:
    _expect(path, directory=True)
  for path in files:
    _expect(path, directory=False)
  # access(2), not a probe file: checking must not change the directories it checks (their
  # mtimes included). It honours read-only mounts and immutable inodes, for root too.
  for path in (
    workdir,
    ckpts,
    ckpts / PARTIAL,
    workdir / "plots",
    workdir / LOCKS,
    workdir / CELLS,
  ):
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
      raise ConfigError(
        f"{path} is not writable (read-only, immutable or without permission); the run "
        "writes there: fix it or use a new --workdir"
      )


def _expect(path: Path, directory: bool) -> None:
  kind = "a directory" if directory else "a file"
  try:
    info = os.lstat(path)
  except FileNotFoundError:
    return
  except OSError as e:  # e.g. a parent is a file (ENOTDIR)
    raise ConfigError(
      f"{path} cannot be used ({e.strerror or e}); the run keeps {kind} there: move what is in "
      "the way or use a new --workdir"
    ) from None
  if stat.S_ISLNK(info.st_mode):
    try:
      info = os.stat(path)
    except OSError as e:
      raise ConfigError(
        f"{path} is a symlink that does not resolve ({e.strerror or e}: a loop or a missing "
        f"target); the run keeps {kind} there: remove it or use a new --workdir"
      ) from None
  if stat.S_ISDIR(info.st_mode) != directory:
    found = "a directory" if stat.S_ISDIR(info.st_mode) else "a file"
    raise ConfigError(
      f"{path} is {found} where the run keeps {kind}: move it away or use a new --workdir"
    )


def config_differences(workdir: Path, config: ml_collections.ConfigDict) -> list[str] | None:
  """The fields at which the workdir's config.json differs from `config` (sweep axes and
  reporting-only fields aside); None when there is no readable config.json."""
  path = workdir / "config.json"
  try:
    old = flatten(json.loads(path.read_text()))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning("%s is unreadable (%s): treated as a run of another config", path, e)
    return None
  new = flatten(json.loads(config.to_json()))
  # A workdir written before a config field existed ran with that field's default.
  defaults = flatten(json.loads(base_config().to_json()))
  old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
  ignore = set(SWEEP_KEYS) | set(COSMETIC_KEYS) | {"runlocal_overrides"}
  keys = set(old) | set(new)
  return sorted(k for k in keys if k not in ignore and old.get(k) != new.get(k))


def guard(
  workdir: Path,
  differing: list[str] | None,
  config: ml_collections.ConfigDict,
  alive: Callable[[str], bool] = lambda owner: False,
) -> None:
  """Moves the run files of a different config (`differing`: `config_differences`) to
  previous_runs/, writes this run's config.json, and removes the temporaries of a run killed
  mid-write (but those of a worker that `alive` says still runs). Called once every check
  has passed, holding the workdir's setup lock (`claims`): a refused run changes nothing,
  and a second worker starting now sees this one's config.json, not an empty workdir."""
  barrier("workdir checked")
  if is_writer():
    present = [n for n in RUN_FILES + ("plots",) if (workdir / n).exists()]
    if differing != [] and present:
      target = workdir / PREVIOUS / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
      while target.exists():  # two runs within a second
        target = target.with_name(target.name + "_")
      target.mkdir(parents=True)
      for name in present:
        (workdir / name).rename(target / name)
      why = "no config.json" if differing is None else f"differs at {', '.join(differing[:5])}"
      logging.warning(
        "the workdir's run files describe another config (%s): moved to %s", why, target
      )
    write_json_atomic(workdir / "config.json", json.loads(config.to_json()))
    for tmp in remove_stale_temporaries(workdir, alive):
      logging.info("removed %s (a temporary file of an interrupted run)", tmp)
  barrier("workdir ready")


def model_checkpoint(
  workdir: Path, name: str, expect: dict[str, Any], identity: Identity, legacy_ok: bool
) -> ModelCheckpoint:
  """The checkpoint of the trained model `name` (dense, dense_seed<s>, <cell>_seed<s>),
  restored only if it was trained as `identity` says."""
  return ModelCheckpoint(
    workdir / "checkpoints" / name, expect=expect, identity=identity, legacy_ok=legacy_ok
  )


def partial_dir(workdir: Path, stage: str) -> Path:
  return workdir / "checkpoints" / PARTIAL / stage


def stage_checkpoint(
  workdir: Path,
  stage: str,
  cfg: ml_collections.ConfigDict,
  expect: dict[str, Any],
  identity: Identity,
) -> StageCheckpoint | None:
  """Mid-stage checkpoints of `stage` per `config.checkpoint` (None when every_steps and
  every_seconds are both 0)."""
  every_seconds = cfg.get("every_seconds", 0.0)  # a config.json of older runs lacks it
  if not cfg.every_steps and not every_seconds:
    return None
  return StageCheckpoint(
    partial_dir(workdir, stage),
    cfg.every_steps,
    cfg.keep,
    expect=expect,
    identity=identity,
    every_seconds=every_seconds,
    background=background(cfg.get("background", "auto")),
  )


def background(setting: str) -> bool:
  """`checkpoint.background`: 'on', 'off', or 'auto' (on with an accelerator)."""
  if setting == "auto":
    return jax.default_backend() != "cpu"
  return setting == "on"


def check_checkpoints(
  workdir: Path,
  expect: dict[str, Any],
  identities: dict[str, Identity],
  legacy_ok: bool,
  overwrite: bool,
  delete: bool = True,
) -> None:
  """Reads the metadata of every checkpoint in `workdir` before any training, so one of
  another model, a damaged one, or one this run would train differently stops the run now
  (CheckpointError, exit 2), not hours later, and is never overwritten.

  `identities`: {checkpoint or stage name: the identity this run trains it with}. A finished
  model whose identity differs is refused, or deleted with `overwrite`; mid-stage
  checkpoints whose identity differs are deleted (their stage is trained again from its
  start). Checkpoints this run does not train are only checked for model and classes.
  `delete=False`: only the refusal, nothing deleted (before the workdir's setup lock)."""
  root = workdir / "checkpoints"
  if not root.is_dir():
    return
  dirs = [d for d in root.iterdir() if d.is_dir() and d.name != PARTIAL]
  if (root / PARTIAL).is_dir():
    dirs += [d for d in (root / PARTIAL).iterdir() if d.is_dir()]
  stale: list[tuple[Path, IdentityMismatch]] = []
  for d in sorted(dirs):
    # Another worker of a sweep may be saving (or discarding) this stage's mid-stage
    # checkpoint right now: a step it is still writing reads as damaged for a moment, so a
    # partial checkpoint is read again before it is refused; one that vanished is fine.
    tries = PARTIAL_READS if d.parent.name == PARTIAL else 1
    for attempt in range(1, tries + 1):
      try:
        _read_checkpoint(d, expect, identities.get(d.name), legacy_ok)
        break
      except IdentityMismatch as e:
        stale.append((d, e))
        break
      except (CheckpointError, FileNotFoundError):
        if not d.is_dir():
          break
        if attempt == tries:
          raise
        time.sleep(PARTIAL_READ_WAIT_S)
  finished = [(d, e) for d, e in stale if d.parent.name != PARTIAL]
  if finished and not overwrite:
    more = f" ({len(finished) - 1} more checkpoint(s) differ)" if len(finished) > 1 else ""
    first = finished[0][1]
    raise IdentityMismatch(f"{first}{more}", first.differences)
  if not delete:  # a check only: refuse, or change nothing
    return
  barrier("checkpoints checked")
  if is_writer():
    for d, e in stale:
      what = "mid-stage checkpoints" if d.parent.name == PARTIAL else "overwrite=True: the model"
      logging.warning("%s %s deleted (trained differently: %s)", what, d, e.differences)
      shutil.rmtree(d)
  barrier("stale checkpoints deleted")


# A mid-stage checkpoint that cannot be read is read again this many times, this far apart,
# before the run refuses it (see check_checkpoints).
PARTIAL_READS = 15
PARTIAL_READ_WAIT_S = 1.0


def _read_checkpoint(
  directory: Path, expect: dict[str, Any], identity: Identity | None, legacy_ok: bool
) -> None:
  """Reads the latest step's metadata of `directory` (CheckpointError / IdentityMismatch)."""
  ckpt = ModelCheckpoint(
    directory, expect=expect, identity=identity, legacy_ok=legacy_ok, cleanup_tmp=False
  )
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


def is_saved(workdir: Path, name: str) -> bool:
  """Whether checkpoints/<name> holds a finished save (Orbax names a finalized step by its
  number alone; a save in progress has a temporary name)."""
  path = workdir / "checkpoints" / name
  return path.is_dir() and any(p.name.isdigit() and p.is_dir() for p in path.iterdir())
