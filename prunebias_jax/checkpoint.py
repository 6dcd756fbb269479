"""Orbax checkpoints: one CheckpointManager directory per trained model, plus mid-stage
checkpoints of a training stage in progress.

Orbax writes every step into a temporary directory and renames it when finished, so a run
killed during a save leaves no checkpoint that looks complete (the leftover temporary
directory is removed by the next run). Restoring never writes: a checkpoint that does not fit
the run (another model, another number of classes) or that is damaged raises
`CheckpointError` and stays as it is on disk.

Nothing here unpickles: Orbax stores arrays through TensorStore and metadata as JSON.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from prunebias_jax.errors import CheckpointError, one_line

PyTree = Any


def tree_signature(tree: PyTree) -> list[str]:
  """`path:shape:dtype` of every leaf: what a checkpoint must match to be restored."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [
    f"{jax.tree_util.keystr(p)}:{tuple(np.shape(x))}:"
    f"{np.dtype(getattr(x, 'dtype', np.float32)).name}"
    for p, x in leaves
  ]


def _first_difference(expected: list[str], found: list[str]) -> str:
  if len(expected) != len(found):
    return f"{len(found)} arrays stored, this run has {len(expected)}"
  for e, f in zip(expected, found):
    if e != f:
      return f"stored {f}, this run has {e}"
  return "same arrays"


class ModelCheckpoint:
  """Saves/restores a pytree (e.g. `{'params', 'batch_stats'[, 'masks']}`) with JSON metadata.

  `expect` (e.g. `{'model': 'resnet20', 'num_classes': 10}`) is stored in the metadata and
  checked on restore, together with the shapes and dtypes of every array, so a checkpoint of
  another model is refused with a message saying what differs.
  """

  def __init__(
    self, directory: str | Path, max_to_keep: int = 1, expect: dict[str, Any] | None = None
  ):
    self.directory = Path(directory).absolute()
    self.expect = dict(expect or {})
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: PyTree, meta: dict[str, Any]) -> None:
    """Saves `tree` as `step` (a no-op when that step is already on disk: a resumed run
    recomputes the same values, and a finished checkpoint is never rewritten)."""
    if step in self._manager.all_steps():
      return
    meta = {**meta, **self.expect, "signature": tree_signature(tree)}
    self._manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
    )
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
    return meta

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
    self._manager.close()


class StageCheckpoint:
  """Mid-stage checkpoints of one training stage: the whole train state (params, batch stats,
  optimizer state, step) and the masks, every `every_steps` steps, keeping the last `keep`.

  The data order and the per-step RNG are pure functions of (seed, step), so the step count
  is all a resumed run needs to continue exactly where the killed one was. `discard()` removes
  the directory once the stage's final model checkpoint is safely written.
  """

  def __init__(
    self,
    directory: str | Path,
    every_steps: int,
    keep: int = 2,
    expect: dict[str, Any] | None = None,
  ):
    self.every_steps = int(every_steps)
    self._ckpt = ModelCheckpoint(directory, max_to_keep=max(1, int(keep)), expect=expect)
    self.directory = self._ckpt.directory

  def due(self, steps_done: int, total: int) -> bool:
    """Whether to save after `steps_done` steps (the stage's end is saved by the caller)."""
    return self.every_steps > 0 and steps_done % self.every_steps == 0 and steps_done < total

  def latest_step(self) -> int | None:
    return self._ckpt.latest_step()

  def save(self, steps_done: int, tree: PyTree) -> None:
    self._ckpt.save(steps_done, tree, {"steps_done": steps_done})

  def restore(self, abstract_tree: PyTree) -> tuple[PyTree, int]:
    tree, meta = self._ckpt.restore(abstract_tree)
    return tree, int(meta["steps_done"])

  def discard(self) -> None:
    self._ckpt.close()
    shutil.rmtree(self.directory, ignore_errors=True)

  def close(self) -> None:
    self._ckpt.close()
