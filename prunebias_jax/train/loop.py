"""The training loop: batches → jitted steps, with a steady progress line."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from prunebias_jax.data.dataset import Split
from prunebias_jax.data.pipeline import steps_per_epoch, train_batches
from prunebias_jax.parallel import DataParallel
from prunebias_jax.train.state import TrainState

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss."""


def _format_eta(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def fit(state: TrainState, step_fn: Callable, split: Split, *, stage: str, batch_size: int, epochs: int,
        seed: int | Sequence[int], masks: PyTree | None = None, teacher_variables: PyTree | None = None,
        alpha: float = 0.0, temperature: float = 1.0, progress_seconds: float = 10.0,
        epoch_hook: Callable[[int, TrainState, PyTree], tuple[TrainState, PyTree]] | None = None,
        parallel: DataParallel | None = None) -> tuple[TrainState, dict, PyTree]:
  """Runs `epochs` epochs of `step_fn` over shuffled full batches of `split`; returns
  (state, summary, final masks).

  Step i uses the RNG fold_in(key(seed), i) and epoch e the order permutation(seed, e), so the
  run is a pure function of (state, data, seed). A sequence of seeds trains a population with
  a vmapped `step_fn` (state stacked on a leading member axis): member k sees exactly the
  batches and RNG a single run with seeds[k] would see. Logs `stage step i/N loss acc img/s ETA`
  every `progress_seconds` and at the end; a non-finite loss stops training with the stage,
  step and last finite loss. With `parallel`, each process feeds its slice of every global
  batch and the step runs sharded over the mesh (state, masks and teacher replicated). `epoch_hook(epoch, state, masks) -> (state, masks)` runs before
  the first step of every epoch (gradual pruning changes the masks there; the masks are a
  step argument, so new masks do not recompile the step).
  """
  total = steps_per_epoch(len(split), batch_size) * epochs
  parallel = DataParallel() if parallel is None else parallel
  local = parallel.process_slice(batch_size)
  state, masks, teacher_variables = parallel.replicate((state, masks, teacher_variables))
  population = not isinstance(seed, int)
  seeds = list(seed) if population else [seed]
  base_rngs = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))  # key(s) per member
  fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
  alpha = jnp.float32(alpha)
  temperature = jnp.float32(temperature)
  sums = {"loss": jnp.float32(0), "accuracy": jnp.float32(0)}
  window, window_start, start = 0, time.perf_counter(), time.perf_counter()
  last_finite, last_log = float("nan"), time.perf_counter()
  summary: dict[str, float] = {}
  current_epoch = -1
  member_batches = zip(*(train_batches(split, batch_size, s, 0, epochs) for s in seeds))
  for i, batches in enumerate(member_batches):
    epoch = batches[0][0]
    if epoch != current_epoch:
      current_epoch = epoch
      if epoch_hook is not None:
        state, masks = epoch_hook(epoch, state, masks)
        state, masks = parallel.replicate((state, masks))
    rngs = fold(base_rngs, i)
    if population:  # (members, batch, ...): the batch axis (1) is the sharded one
      images = parallel.put_batch(np.stack([b[1][local] for b in batches]), parallel.eval_batches, axis=1)
      labels = parallel.put_batch(np.stack([b[2][local] for b in batches]), parallel.eval_batches, axis=1)
    else:
      images, labels, rngs = parallel.put_batch(batches[0][1][local]), parallel.put_batch(batches[0][2][local]), rngs[0]
    state, metrics = step_fn(state, images, labels, rngs, masks, teacher_variables, alpha, temperature)
    sums = {k: sums[k] + metrics[k] for k in sums}
    window += 1
    now = time.perf_counter()
    if now - last_log >= progress_seconds or i + 1 == total:
      got = jax.device_get(sums)  # the only host sync: once per progress line
      # Population: the mean over members (any non-finite member makes the mean non-finite).
      loss, acc = float(np.mean(got["loss"])) / window, float(np.mean(got["accuracy"])) / window
      if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"{stage}: non-finite loss at step {i + 1}/{total} (epoch {epoch + 1}); last finite mean loss "
            f"{last_finite:.4g}. Lower the learning rate or check the data.")
      last_finite = loss
      now = time.perf_counter()
      rate = window * batch_size / max(now - window_start, 1e-9)
      eta = (total - i - 1) * batch_size / max(rate, 1e-9)
      logging.info("%s step %d/%d epoch %d/%d loss %.4f acc %.3f %.0f img/s ETA %s", stage, i + 1, total,
                   epoch + 1, epochs, loss, acc, rate, _format_eta(eta))
      summary = {"train_loss": loss, "train_accuracy": acc}
      sums = {k: jnp.zeros_like(v) for k, v in sums.items()}
      window, window_start, last_log = 0, now, now
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  summary.update(steps=total, seconds=seconds, images_per_second=total * batch_size / max(seconds, 1e-9))
  return state, summary, masks


def evaluate(eval_fn: Callable, variables: PyTree, masks: PyTree | None, images: np.ndarray,
             num_examples: int, parallel: DataParallel | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Logits and per-layer features ({'features': penultimate, 'stage1': ..., ...}) of the
  first `num_examples` rows of the padded set
  (images (num_batches, batch, H, W, C); each batch is sharded over the devices). With a
  population eval_fn the outputs have a leading member axis."""
  parallel = DataParallel() if parallel is None else parallel
  local = parallel.process_slice(images.shape[1])
  variables, masks = parallel.replicate((variables, masks))
  images = parallel.put_batch(images[:, local], parallel.eval_batches, axis=1)
  logits, layers = jax.device_get(eval_fn(variables, masks, images))
  return np.asarray(logits[..., :num_examples, :]), {k: np.asarray(v[..., :num_examples, :]) for k, v in layers.items()}
