"""Data parallelism over a `jax.sharding.Mesh` with one `data` axis.

The global batch is sharded over every device of every process; parameters, masks, optimizer
state and batch-norm statistics are replicated. Under `jax.jit` the compiler (GSPMD) turns
the batch reductions of the step — the loss mean, and the batch-norm mean/variance — into
cross-device all-reduces, so batch-norm statistics are those of the global batch and N devices
compute what one device computes for the same global batch (up to float summation order).

Multi-host: each process holds only its slice of every global batch
(`process_slice`) and `jax.make_array_from_process_local_data` assembles the global array;
the same code runs unchanged on one process.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
DATA_AXIS = "data"


class DataParallel:
  """The mesh and the shardings of one run."""

  def __init__(self, devices: list | None = None):
    devices = list(jax.devices() if devices is None else devices)
    # Auto axis types: with the (newer) Explicit default, integer-label cross-entropy fails
    # with a sharding error inside a plain data-parallel step.
    self.mesh = jax.make_mesh(
      (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )
    self.batch = NamedSharding(self.mesh, P(DATA_AXIS))
    self.eval_batches = NamedSharding(self.mesh, P(None, DATA_AXIS))  # (num_batches, batch, ...)
    self.replicated = NamedSharding(self.mesh, P())

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def check_batch_size(self, batch_size: int, field: str) -> str | None:
    """An error message when `batch_size` does not split evenly over the devices."""
    if batch_size % self.num_devices:
      return (
        f"config.{field}={batch_size} does not divide by the {self.num_devices} devices; "
        f"use a multiple of {self.num_devices}"
      )
    return None

  @staticmethod
  def process_slice(global_size: int) -> slice:
    """This process's contiguous share of a global batch axis."""
    n = jax.process_count()
    per = global_size // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)

  def put_batch(
    self, local: np.ndarray, sharding: NamedSharding | None = None, axis: int = 0
  ) -> jax.Array:
    """A global array, sharded along `axis`, from this process's slice of it."""
    sharding = self.batch if sharding is None else sharding
    global_shape = list(local.shape)
    global_shape[axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))

  def replicate(self, tree: PyTree) -> PyTree:
    """Every leaf replicated on every device (None leaves stay None)."""
    if jax.process_count() == 1:
      return jax.device_put(tree, self.replicated)
    # Every process holds the same values. A restored checkpoint lives on one local device
    # (device_put cannot move it across hosts), and device_put of host data first gathers
    # every process's copy to check that they agree (a training split would go whole to
    # every process): build each replicated array from this process's own copy instead.

    def put(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, self.replicated)
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

    return jax.tree.map(put, tree)
