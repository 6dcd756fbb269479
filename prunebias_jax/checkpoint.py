"""Orbax checkpoints: one CheckpointManager directory per trained model, plus mid-stage
checkpoints of a training stage in progress.

Orbax writes every step into a temporary directory and renames it when finished, so a run
killed during a save leaves no checkpoint that looks complete (the leftover temporary
directory is removed by the next run). Restoring never writes: a checkpoint that does not fit
the run (another model, another number of classes) or that is damaged raises
`CheckpointError` and stays as it is on disk.

A checkpoint also carries the *identity of its training*: the flat {field: value} dict of
everything that shaped the model (config values, the data's fingerprint, the teacher's
identity) and its digest. A run restores a model only when the digest matches its own, so
no other file in the workdir (config.json may be missing or wrong) can make it report a
model it did not train.

Nothing here unpickles: Orbax stores arrays through TensorStore and metadata as JSON.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from prunebias_jax.errors import CheckpointError, DiskFullError, one_line

PyTree = Any


def tree_signature(tree: PyTree) -> list[str]:
  """`path:shape:dtype` of every leaf: what a checkpoint must match to be restored."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [
    f"{jax.tree_util.keystr(p)}:{tuple(np.shape(x))}:"
    f"{np.dtype(getattr(x, 'dtype', np.float32)).name}"
    for p, x in leaves
  ]


Identity = dict[str, Any]  # flat {field: JSON value}: what shaped a trained model


def digest(identity: Identity) -> str:
  """sha256 of the identity's canonical JSON (sorted keys, no whitespace)."""
  text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()


def identity_differences(stored: Identity, expected: Identity, limit: int = 3) -> str:
  """'field: trained with A, this run has B; ...' for the first `limit` differing fields."""
  keys = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
  parts = [
    f"{k}: trained with {stored.get(k, 'nothing')!r}, this run has {expected.get(k, 'nothing')!r}"
    for k in keys[:limit]
  ]
  more = f"; and {len(keys) - limit} more field(s)" if len(keys) > limit else ""
  return "; ".join(parts) + more if parts else "the same fields, another digest"


class IdentityMismatch(CheckpointError):
  """A checkpoint trained with something else than this run would train it with;
  `differences` says what (one line)."""

  def __init__(self, message: object, differences: str):
    super().__init__(message)
    self.differences = differences


def _first_difference(expected: list[str], found: list[str]) -> str:
  if len(expected) != len(found):
    return f"{len(found)} arrays stored, this run has {len(expected)}"
  for e, f in zip(expected, found):
    if e != f:
      return f"stored {f}, this run has {e}"
  return "same arrays"


SPACE_MARGIN = 256 << 10  # bytes beyond the arrays: Orbax's metadata and manifests


def _check_space(directory: Path, tree: PyTree) -> None:
  """DiskFullError before a save that cannot fit: a save that runs out of space midway fails
  in Orbax's background threads, each printing its own traceback."""
  need = sum(int(getattr(x, "nbytes", np.asarray(x).nbytes)) for x in jax.tree.leaves(tree))
  existing = directory
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  free = shutil.disk_usage(existing).free
  if free < need + SPACE_MARGIN:
    raise DiskFullError(
      f"disk full writing {directory} ({free / 2**20:.1f} MiB free, the checkpoint needs "
      f"{(need + SPACE_MARGIN) / 2**20:.1f} MiB); what was written before is intact: free "
      "space and rerun the same command to resume"
    )


class ModelCheckpoint:
  """Saves/restores a pytree (e.g. `{'params', 'batch_stats'[, 'masks']}`) with JSON metadata.

  `expect` (e.g. `{'model': 'resnet20', 'num_classes': 10}`) is stored in the metadata and
  checked on restore, together with the shapes and dtypes of every array, so a checkpoint of
  another model is refused with a message saying what differs.

  `identity` (see the module docstring) is stored with its digest and, when given, must
  match on restore (`IdentityMismatch` otherwise). A checkpoint written before identities
  existed has none: it is accepted only with `legacy_ok` (the caller has other evidence of
  how it was trained, e.g. an unchanged config.json).

  `cleanup_tmp`: delete the temporaries of an interrupted save on opening; only the worker
  that owns the checkpoint's stage (`claims`) may, a reader must not (another worker may be
  saving it now).
  """

  def __init__(
    self,
    directory: str | Path,
    max_to_keep: int = 1,
    expect: dict[str, Any] | None = None,
    identity: Identity | None = None,
    legacy_ok: bool = False,
    cleanup_tmp: bool = True,
  ):
    self.directory = Path(directory).absolute()
    self.expect = dict(expect or {})
    self.identity = identity
    self.legacy_ok = legacy_ok
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=cleanup_tmp
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: PyTree, meta: dict[str, Any], wait: bool = True) -> None:
    """Saves `tree` as `step` (a no-op when that step is already on disk: a resumed run
    recomputes the same values, and a finished checkpoint is never rewritten).

    `wait=False`: returns once the arrays are copied off the devices (Orbax's blocking part),
    while the files are written in the background; the step becomes visible (and the oldest
    one is deleted) only when the write is complete, so a kill mid-write leaves the previous
    checkpoints as they were. The next save, `wait()` and `close()` wait for it."""
    self._manager.wait_until_finished()  # one save at a time
    if step in self._manager.all_steps():
      return
    _check_space(self.directory, tree)
    meta = {**meta, **self.expect, "signature": tree_signature(tree)}
    if self.identity is not None:
      meta.update(identity=self.identity, identity_digest=digest(self.identity))
    self._manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
    )
    if wait:
      self._manager.wait_until_finished()

  def wait(self) -> None:
    """Blocks until a save started with `wait=False` is on disk."""
    self._manager.wait_until_finished()

  def _fail(self, step: int | None, reason: str) -> CheckpointError:
    where = self.directory if step is None else self.directory / str(step)
    return CheckpointError(
      f"checkpoint {where} cannot be used by this run: {reason}. It was left untouched; "
      "move it away or use a new --workdir"
    )

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of `step` (default: the latest), checked against `expect`."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
      raise self._fail(
        step, f"its metadata is unreadable ({type(e).__name__}: {one_line(e, 200)})"
      ) from None
    if not isinstance(meta, dict):
      raise self._fail(step, "its metadata is not a JSON object")
    for key, value in self.expect.items():
      if key in meta and meta[key] != value:
        raise self._fail(
          step, f"it was written for {key}={meta[key]!r}, this run has {key}={value!r}"
        )
    if self.identity is not None:
      self._check_identity(step, meta)
    return meta

  def _check_identity(self, step: int, meta: dict[str, Any]) -> None:
    stored = meta.get("identity_digest")
    if stored is None:
      if self.legacy_ok:
        return
      raise IdentityMismatch(
        f"checkpoint {self.directory} was written before checkpoints recorded how they were "
        "trained, and the workdir's config.json is missing or differs from this run's, so "
        "nothing shows it was trained with this config; it was left untouched. Rerun with "
        "the config it was trained with, use a new --workdir, or --config.overwrite=True to "
        "retrain it",
        "no recorded training identity",
      )
    if stored != digest(self.identity):
      found = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
      differences = identity_differences(found, self.identity)
      raise IdentityMismatch(
        f"checkpoint {self.directory} was trained with a different config ({differences}); "
        "it was left untouched. Rerun with the config it was trained with, use a new "
        "--workdir, or --config.overwrite=True to retrain the models that differ (the others "
        "are kept)",
        differences,
      )

  def restore(self, abstract_tree: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores the latest step into the structure/shapes/dtypes of `abstract_tree`."""
    step = self._manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.read_meta(step)
    expected = tree_signature(abstract_tree)
    if "signature" in meta and meta["signature"] != expected:
      raise self._fail(
        step, f"its arrays differ ({_first_difference(expected, meta['signature'])})"
      )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_tree)
    try:
      restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      )
    except Exception as e:
      raise self._fail(step, f"restoring failed ({type(e).__name__}: {one_line(e, 200)})") from None
    got = tree_signature(restored.state)
    if got != expected:
      raise self._fail(step, f"its arrays differ ({_first_difference(expected, got)})")
    return restored.state, meta

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# A multi-process run decides a time-based save at step multiples of this only: every process
# must save at the same step, so process 0's clock decides, broadcast to the others (one small
# collective per 50 steps instead of one per step).
TIME_CHECK_STEPS = 50


class StageCheckpoint:
  """Mid-stage checkpoints of one training stage: the whole train state (params, batch stats,
  optimizer state, step) and the masks, every `every_steps` steps and every `every_seconds`
  seconds of training (whichever comes first; 0 turns either off), keeping the last `keep`.
  `background`: training goes on while the files are written (`ModelCheckpoint.save` with
  wait=False), so a save costs the copy of the state off the devices; a kill during the write
  leaves the previous checkpoint to resume from.

  The data order and the per-step RNG are pure functions of (seed, step), so the step count
  is all a resumed run needs to continue exactly where the killed one was (whenever the saves
  happened). `discard()` removes the directory once the stage's final model checkpoint is
  safely written.
  """

  def __init__(
    self,
    directory: str | Path,
    every_steps: int,
    keep: int = 2,
    expect: dict[str, Any] | None = None,
    identity: Identity | None = None,
    every_seconds: float = 0.0,
    background: bool = False,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.every_steps = int(every_steps)
    self.every_seconds = float(every_seconds)
    self.background = bool(background)
    self._clock = clock
    self._last = clock()
    self._ckpt = ModelCheckpoint(
      directory, max_to_keep=max(1, int(keep)), expect=expect, identity=identity
    )
    self.directory = self._ckpt.directory

  def due(self, steps_done: int, total: int, since: int | None = None) -> bool:
    """Whether to save after `steps_done` steps (the stage's end is saved by the caller): a
    multiple of `every_steps`, or `every_seconds` since the last save (or the start). `since`:
    the step count the caller last asked at (default `steps_done - 1`; the scanned loop asks
    once per chunk of steps, and its chunks end at every multiple of `every_steps`)."""
    if steps_done >= total:
      return False
    if self.every_steps > 0 and steps_done % self.every_steps == 0:
      return True
    if self.every_seconds <= 0:
      return False
    late = self._clock() - self._last >= self.every_seconds
    if jax.process_count() == 1:
      return late
    since = steps_done - 1 if since is None else since
    if steps_done // TIME_CHECK_STEPS == since // TIME_CHECK_STEPS:  # no check point passed
      return False
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(int(late)))

  def latest_step(self) -> int | None:
    return self._ckpt.latest_step()

  def save(self, steps_done: int, tree: PyTree) -> None:
    self._ckpt.save(steps_done, tree, {"steps_done": steps_done}, wait=not self.background)
    self._last = self._clock()

  def wait(self) -> None:
    """Blocks until the last save is on disk."""
    self._ckpt.wait()

  def restore(self, abstract_tree: PyTree) -> tuple[PyTree, int]:
    tree, meta = self._ckpt.restore(abstract_tree)
    return tree, int(meta["steps_done"])

  def discard(self) -> None:
    self._ckpt.close()
    shutil.rmtree(self.directory, ignore_errors=True)

  def close(self) -> None:
    self._ckpt.close()
