"""Orbax checkpoints of trained models: one CheckpointManager directory per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class ModelCheckpoint:
  """Saves/restores `{'params', 'batch_stats'[, 'masks']}` plus JSON metadata for one model.

  Orbax writes into a temporary directory and renames it when finished, so a run killed
  during a save leaves no checkpoint that looks complete.
  """

  def __init__(self, directory: str | Path, max_to_keep: int = 1):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: PyTree, meta: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                     meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, abstract_tree: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores the latest step into the structure/shapes/dtypes of `abstract_tree`."""
    step = self._manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_tree)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def close(self) -> None:
    self._manager.close()
