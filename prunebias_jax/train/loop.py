"""The training loop: batches → jitted steps, with a steady progress line."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from prunebias_jax.checkpoint import StageCheckpoint
from prunebias_jax.choices import NONFINITE_RULES
from prunebias_jax.data.dataset import Split
from prunebias_jax.data.pipeline import epoch_batches, steps_per_epoch, train_batches
from prunebias_jax.errors import ConfigError, Interrupted, NonFiniteLossError
from prunebias_jax.faults import crash_point
from prunebias_jax.parallel import DataParallel
from prunebias_jax.train.state import TrainState

PyTree = Any


def format_duration(seconds: float) -> str:
  """'42s' or '12m05s': how progress lines give an ETA or an elapsed time."""
  seconds = int(max(0, seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# Step i's RNG of every member: fold_in(key(seed), i). One jitted function for every stage (a
# jit made inside fit() was compiled again by each stage of a sweep).
_fold_in_members = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


@jax.jit
def _accumulate(
  window: dict, persistent: dict, metrics: dict, step: jax.Array
) -> tuple[dict, dict]:
  """Adds one step's metrics on the device (no host sync). `window` holds the sums since the
  last progress line over steps with a finite loss; `persistent` the number of non-finite
  steps, the first one (-1: none) and the last finite loss before it."""
  finite = metrics["nonfinite"] == 0
  first = persistent["first_bad"]
  first = jnp.where((first < 0) & jnp.any(~finite), step, first)
  window = {
    "loss": window["loss"] + jnp.where(finite, metrics["loss"], 0.0),
    "accuracy": window["accuracy"] + jnp.where(finite, metrics["accuracy"], 0.0),
    "finite": window["finite"] + finite.astype(jnp.int32),
  }
  persistent = {
    "nonfinite": persistent["nonfinite"] + (~finite).astype(jnp.int32),
    "first_bad": first,
    "last_finite": jnp.where(first < 0, metrics["loss"], persistent["last_finite"]),
    "last_finite_step": jnp.where(first < 0, step, persistent["last_finite_step"]),
  }
  return window, persistent


# The scanned loop's chunk: at most this many steps per compiled `lax.scan` (a host sync per
# chunk at most). 32 steps of ResNet-20 at batch 128 are ~50 ms on an H100 and ~20 s on the
# 2-core CPU; an epoch is split into equal chunks of at most this length.
SCAN_STEPS = 32
# The split goes on the device when it takes at most this share of one device's memory.
DEVICE_DATA_FRACTION = 0.25
LOOPS = ("auto", "scan", "step")


def fits_on_device(nbytes: int, fraction: float | None = None) -> bool:
  """Whether `nbytes` of training data (held whole on every device) take at most `fraction`
  (default `DEVICE_DATA_FRACTION`) of one local device's memory (its allocator's limit; on the
  CPU, the host's RAM)."""
  fraction = DEVICE_DATA_FRACTION if fraction is None else fraction
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return nbytes <= fraction * limit


def scan_length(
  step_fn: Callable, split: Split, per_epoch: int, loop: str = "auto", scan_steps: int = SCAN_STEPS
) -> int:
  """The chunk length of the scanned loop for this step and split, or 0 for the per-step
  loop (see `fit`): the epoch split into ceil(per_epoch / scan_steps) equal chunks, so no
  chunk runs more skipped steps than there are chunks in an epoch."""
  if loop not in LOOPS:
    raise ValueError(f"loop={loop!r}; allowed: {', '.join(LOOPS)}")
  if not (isinstance(scan_steps, int) and scan_steps >= 1):
    raise ValueError(f"scan_steps={scan_steps!r}; allowed: an integer >= 1")
  if loop == "step":
    return 0
  nbytes = split.images.nbytes + split.labels.nbytes
  why = None
  if loop == "auto" and jax.default_backend() == "cpu":
    # XLA:CPU runs a convolution inside a loop body far slower than the same one outside
    # (jax-ml/jax#12868; measured: a small CNN's scanned step ~30x slower than its own step).
    logging.log_first_n(
      logging.INFO,
      "training one step at a time (train_loop=auto on the CPU: XLA:CPU runs convolutions "
      "inside a scanned loop far slower, jax-ml/jax#12868)",
      1,
    )
    return 0
  if getattr(step_fn, "body", None) is None:
    why = "the step is several programs (population_step='sequential')"
  elif not fits_on_device(nbytes):
    why = (
      f"the training split ({_megabytes(nbytes)}) takes more than "
      f"{DEVICE_DATA_FRACTION:.0%} of one device's memory"
    )
  if why is not None:
    if loop == "scan":
      raise ConfigError(
        f"train_loop='scan' cannot run here: {why}; use train_loop='step' or 'auto'"
      )
    logging.info("training one step at a time from host batches: %s", why)
    return 0
  chunks = -(-per_epoch // scan_steps)
  return -(-per_epoch // chunks)


def _megabytes(nbytes: int) -> str:
  return f"{nbytes / 2**20:.1f} MB"


def _epoch_rows(
  split: Split, batch_size: int, seeds: Sequence[int], epoch: int, population: bool, pad: int
) -> np.ndarray:
  """(steps + pad, [members,] batch) int32: the epoch's batches as example indices
  (`epoch_batches`, the per-step loop's batches), `pad` zero rows after them so a chunk's
  dynamic slice never runs off the end."""
  rows = [epoch_batches(len(split), batch_size, s, epoch) for s in seeds]
  rows = np.stack(rows, axis=1) if population else rows[0]
  return np.concatenate([rows, np.zeros((pad,) + rows.shape[1:], np.int32)])


def _chunk_fn(
  step_fn: Callable, length: int, population: bool, indexed: bool, parallel: DataParallel
) -> Callable:
  """The jitted chunk of `length` steps of `step_fn.body`, made once per step and settings
  (kept on the `TrainStep`, so every stage and cell of a run reuses it):

  chunk(state, window, persistent, images, labels, rows, first, count, step0, base_rngs,
        teacher_variables, alpha, temperature) -> (state, window, persistent, metrics)

  runs steps step0 .. step0+count-1 on the batches rows[first : first+count] gathered from
  the device-resident `images`/`labels` (steps count..length-1 of the scan are skipped: the
  state and the sums pass through unchanged); `metrics` stacks each step's (zeros where
  skipped). State and sums are donated."""
  key = (length, population, indexed, parallel.mesh)
  if key in step_fn.chunks:
    return step_fn.chunks[key]
  body = step_fn.body
  batch = parallel.eval_batches if population else parallel.batch  # the batch axis is sharded

  def chunk(state, window, persistent, images, labels, rows, first, count, step0, base_rngs, *rest):
    rows = jax.lax.dynamic_slice_in_dim(rows, first, length, axis=0)

    def one(carry, inputs):
      j, idx = inputs
      i = step0 + j
      rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base_rngs, i)
      x = jax.lax.with_sharding_constraint(images[idx], batch)
      y = jax.lax.with_sharding_constraint(labels[idx], batch)

      def run(carry):
        state, window, persistent = carry
        state, metrics = body(
          state, x, y, rngs if population else rngs[0], *rest, idx if indexed else None
        )
        return (state, *_accumulate(window, persistent, metrics, i)), metrics

      def skip(carry):
        shapes = jax.eval_shape(run, carry)[1]
        return carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      # Skipped steps cost nothing but the branch (a select over the whole state would copy
      # it each step); on a GPU the branch reads one predicate per step.
      return jax.lax.cond(j < count, run, skip, carry)

    carry, metrics = jax.lax.scan(
      one, (state, window, persistent), (jnp.arange(length, dtype=jnp.int32), rows)
    )
    return (*carry, metrics)

  step_fn.chunks[key] = jax.jit(chunk, donate_argnums=(0, 1, 2))
  return step_fn.chunks[key]


@functools.cache
def _fresh_sums(shape: tuple[int, ...], sharding) -> Callable[[], tuple[dict, dict]]:
  """The jitted maker of the loop's (window, persistent) sums at the start (see
  `_accumulate`), placed by `sharding`: one per shape and sharding."""

  def make():
    window = {
      "loss": jnp.zeros(shape),
      "accuracy": jnp.zeros(shape),
      "finite": jnp.zeros(shape, jnp.int32),
    }
    persistent = {
      "nonfinite": jnp.zeros(shape, jnp.int32),
      "first_bad": jnp.int32(-1),
      "last_finite": jnp.full(shape, jnp.nan),
      "last_finite_step": jnp.int32(-1),
    }
    return window, persistent

  return jax.jit(make, out_shardings=sharding)


def fit(
  state: TrainState,
  step_fn: Callable,
  split: Split,
  *,
  stage: str,
  batch_size: int,
  epochs: int,
  seed: int | Sequence[int],
  teacher_variables: PyTree | None = None,
  alpha: float = 0.0,
  temperature: float = 1.0,
  progress_seconds: float = 10.0,
  epoch_hook: Callable[[int, TrainState], TrainState] | None = None,
  parallel: DataParallel | None = None,
  checkpoint: StageCheckpoint | None = None,
  nonfinite: str = "stop",
  step_log: Any | None = None,
  learning_rate: Callable[[int], float] | None = None,
  epoch_end: Callable[[int, int, TrainState], None] | None = None,
  loop: str = "auto",
  scan_steps: int = SCAN_STEPS,
) -> tuple[TrainState, dict]:
  """Runs `epochs` epochs of `step_fn` over shuffled full batches of `split`; returns
  (state, summary). The masks travel in `state.masks` (final masks: the returned state's).

  Step i uses the RNG fold_in(key(seed), i) and epoch e the order permutation(seed, e), so the
  run is a pure function of (state, data, seed). A sequence of seeds trains a population with
  a vmapped `step_fn` (state stacked on a leading member axis): member k sees exactly the
  batches and RNG a single run with seeds[k] would see. Logs `stage step i/N loss acc img/s ETA`
  every `progress_seconds` and at the end. With `parallel`, each process feeds its slice of
  every global batch and the step runs sharded over the mesh (state and teacher replicated).
  `epoch_hook(epoch, state) -> state` runs before the first step of every epoch (gradual
  pruning replaces `state.masks` there; masks are traced values, so new masks do not
  recompile the step).

  `loop`: 'scan' puts the split on the devices once, uploads one (steps, batch) index matrix
  per epoch and runs chunks of up to `scan_steps` steps in one compiled `lax.scan` (batches
  gathered on the device, the step RNG derived inside, one host sync per chunk at most; a
  chunk never crosses an epoch or an `every_steps` checkpoint, and its unused steps are
  skipped, so every chunk is the same program); 'step' dispatches one step at a time from
  host batches; 'auto' scans when `step_fn` is a `TrainStep` with a `body` and the split takes
  at most a quarter of one device's memory (`fits_on_device`), else steps. Both compute the
  same steps (tests/test_loop_scan.py compares them bit for bit).

  `checkpoint`: the state (masks included) is saved every `checkpoint.every_steps` steps, and a
  stage that finds a saved step continues from it; since the data order and RNG depend only on
  (seed, step), the resumed run computes exactly what the uninterrupted one would have.

  `nonfinite`: 'stop' raises NonFiniteLossError naming the stage, the first step with a
  NaN/Inf loss and the last finite loss (checked at every progress line and before every
  checkpoint, so a poisoned state is never saved); 'skip' needs a step built with
  `skip_nonfinite=True`, which leaves the state unchanged on such steps, and counts them.

  `step_log` (a `monitor.StepLog`): the scalars of the steps it `wants`, kept as device arrays
  and fetched at the next progress sync (no extra sync), with `learning_rate(i)` the rate step
  i used (the optimizer's schedule). `epoch_end(epoch, step, state)` runs after the last step
  of every epoch (1-based epoch; on every process: it may evaluate on the mesh).
  """
  if nonfinite not in NONFINITE_RULES:
    raise ValueError(f"nonfinite={nonfinite!r}; allowed: {', '.join(NONFINITE_RULES)}")
  per_epoch = steps_per_epoch(len(split), batch_size)
  total = per_epoch * epochs
  parallel = DataParallel() if parallel is None else parallel
  local = parallel.process_slice(batch_size)
  population = not isinstance(seed, int)
  seeds = list(seed) if population else [seed]
  length = scan_length(step_fn, split, per_epoch, loop, scan_steps)
  start_step = 0
  if checkpoint is not None and checkpoint.latest_step() is not None:
    saved, start_step = checkpoint.restore({"state": state})
    state = saved["state"]
    logging.info(
      "%s: resumed from the mid-stage checkpoint at step %d/%d (%s)",
      stage,
      start_step,
      total,
      checkpoint.directory,
    )
  state, teacher_variables = parallel.replicate((state, teacher_variables))
  base_rngs = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))  # key(s) per member
  alpha = jnp.float32(alpha)
  temperature = jnp.float32(temperature)
  shape = (len(seeds),) if population else ()
  # The sums are replicated like the state (a scanned chunk takes them back as they came out,
  # so it compiles once), made on the devices (multi-process: no host value to agree on).
  fresh_window = lambda: _fresh_sums(shape, parallel.replicated)()[0]
  window_sums, persistent = _fresh_sums(shape, parallel.replicated)()
  window, window_start, start = 0, time.perf_counter(), time.perf_counter()
  last_log, reported_bad = time.perf_counter(), 0
  summary: dict[str, float] = {}
  # A stage resumed mid-epoch already ran that epoch's hook (its masks were saved); one resumed
  # at an epoch boundary has not, like an uninterrupted run about to start that epoch.
  current_epoch = start_step // per_epoch if start_step % per_epoch else -1
  indexed = state.distill is not None  # CRD's memory banks are addressed by example index
  done = start_step
  # (step, epoch, device metrics, row of a chunk's stacked metrics or None) for step_log
  pending: list[tuple[int, int, dict, int | None]] = []
  kd_alpha = float(alpha) if teacher_variables is not None else 0.0  # 0: no KD term to log
  if step_log is not None:
    step_log.start(start_step)

  def sync(epoch: int, save: bool) -> None:
    """The progress line, the non-finite check and the checkpoint after `done` steps: the
    only host syncs, once per progress line and before a checkpoint."""
    nonlocal window_sums, window, window_start, last_log, reported_bad, summary, pending
    now = time.perf_counter()
    if not (now - last_log >= progress_seconds or done == total or save):
      return
    got, bad = jax.device_get((window_sums, persistent))
    first_bad = int(bad["first_bad"])
    if first_bad >= 0 and nonfinite == "stop":
      last = float(np.mean(bad["last_finite"]))
      last_text = (
        f"last finite loss {last:.4g} at step {int(bad['last_finite_step']) + 1}"
        if int(bad["last_finite_step"]) >= 0
        else "no finite loss before it"
      )
      raise NonFiniteLossError(
        f"{stage}: non-finite loss at step {first_bad + 1}/{total} "
        f"(epoch {first_bad // per_epoch + 1}); "
        f"{last_text}. Lower the learning rate, check the data, or set --config.nonfinite=skip"
      )
    skipped = int(np.max(bad["nonfinite"]))
    if skipped > reported_bad:
      logging.warning(
        "%s: skipped %d step(s) with a non-finite loss so far (first at step %d)",
        stage,
        skipped,
        first_bad + 1,
      )
      reported_bad = skipped
    # Population: the mean over members of each member's mean over its finite steps.
    finite = np.maximum(np.asarray(got["finite"]), 1)
    loss = float(np.mean(np.asarray(got["loss"]) / finite))
    acc = float(np.mean(np.asarray(got["accuracy"]) / finite))
    now = time.perf_counter()
    rate = window * batch_size / max(now - window_start, 1e-9)
    eta = (total - done) * batch_size / max(rate, 1e-9)
    logging.info(
      "%s step %d/%d epoch %d/%d loss %.4f acc %.3f %.0f img/s ETA %s",
      stage,
      done,
      total,
      epoch + 1,
      epochs,
      loss,
      acc,
      rate,
      format_duration(eta),
    )
    summary = {"train_loss": loss, "train_accuracy": acc}
    if pending:
      step_log.write(_step_rows(pending, seeds, population, kd_alpha, learning_rate, rate))
      pending = []
    window_sums = fresh_window()
    window, window_start, last_log = 0, now, now
    if save:
      checkpoint.save(done, {"state": state})
      window_start = time.perf_counter()  # the save is not training throughput

  try:
    if length:  # the scanned loop
      logging.info(
        "%s: %d steps in scanned chunks of %d, the %s training split on the device",
        stage,
        total - start_step,
        length,
        _megabytes(split.images.nbytes + split.labels.nbytes),
      )
      run_chunk = _chunk_fn(step_fn, length, population, indexed, parallel)
      images, labels = parallel.replicate((split.images, split.labels))
      order_epoch, order = -1, None
      while done < total:
        epoch, row = divmod(done, per_epoch)
        if epoch != current_epoch:
          current_epoch = epoch
          if epoch_hook is not None:
            state = parallel.replicate(epoch_hook(epoch, state))
        if epoch != order_epoch:  # the epoch's batches, as one index matrix
          rows = _epoch_rows(split, batch_size, seeds, epoch, population, length)
          order_epoch, order = epoch, parallel.replicate(rows)
        end = min((epoch + 1) * per_epoch, done + length)
        if checkpoint is not None and checkpoint.every_steps > 0:
          end = min(end, (done // checkpoint.every_steps + 1) * checkpoint.every_steps)
        state, window_sums, persistent, metrics = run_chunk(
          state,
          window_sums,
          persistent,
          images,
          labels,
          order,
          row,
          end - done,
          done,
          base_rngs,
          teacher_variables,
          alpha,
          temperature,
        )
        if step_log is not None:
          pending += [
            (i, epoch, metrics, i - done - 1)
            for i in range(done + 1, end + 1)
            if step_log.wants(i, total)
          ]
        window += end - done
        previous, done = done, end
        for i in range(previous + 1, end):  # the chunk's steps before its last
          crash_point(f"{stage}:step{i}")
        if epoch_end is not None and done % per_epoch == 0:
          epoch_end(done // per_epoch, done, state)
        sync(epoch, checkpoint is not None and checkpoint.due(done, total, since=previous))
        crash_point(f"{stage}:step{done}")
    else:  # one step at a time, from host batches
      member_batches = zip(
        *(
          train_batches(split, batch_size, s, 0, epochs, skip=start_step, with_indices=indexed)
          for s in seeds
        )
      )
      for i, batches in enumerate(member_batches, start=start_step):
        epoch = batches[0][0]
        if epoch != current_epoch:
          current_epoch = epoch
          if epoch_hook is not None:
            state = parallel.replicate(epoch_hook(epoch, state))
        rngs = _fold_in_members(base_rngs, i)
        if population:  # (members, batch, ...): the batch axis (1) is the sharded one
          images = parallel.put_batch(
            np.stack([b[1][local] for b in batches]), parallel.eval_batches, axis=1
          )
          labels = parallel.put_batch(
            np.stack([b[2][local] for b in batches]), parallel.eval_batches, axis=1
          )
          # CRD's bank rows of the members' own examples; the banks are replicated.
          indices = parallel.replicate(np.stack([b[3] for b in batches])) if indexed else None
        else:
          images, labels, rngs = (
            parallel.put_batch(batches[0][1][local]),
            parallel.put_batch(batches[0][2][local]),
            rngs[0],
          )
          indices = parallel.replicate(batches[0][3]) if indexed else None
        state, metrics = step_fn(
          state, images, labels, rngs, teacher_variables, alpha, temperature, indices
        )
        window_sums, persistent = _accumulate(window_sums, persistent, metrics, i)
        window += 1
        done = i + 1
        if step_log is not None and step_log.wants(done, total):
          pending.append((done, epoch, metrics, None))
        if epoch_end is not None and done % per_epoch == 0:
          epoch_end(done // per_epoch, done, state)
        sync(epoch, checkpoint is not None and checkpoint.due(done, total))
        crash_point(f"{stage}:step{done}")
  except KeyboardInterrupt:  # Ctrl-C: one line; the last mid-stage checkpoint is intact
    if checkpoint is not None:
      checkpoint.wait()  # a save still being written finishes first
    saved = checkpoint.latest_step() if checkpoint is not None else None
    raise Interrupted(
      f"interrupted at {stage} step {done}/{total}; rerun the same command to resume"
      + (f" (from step {saved})" if saved else " (this stage from its start)")
    ) from None
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  steps_run = total - start_step
  # The last step always syncs, so `reported_bad` is the stage's final count of skipped steps.
  summary.update(
    steps=total,
    seconds=seconds,
    images_per_second=steps_run * batch_size / max(seconds, 1e-9),
    resumed_at_step=start_step,
    nonfinite_steps=reported_bad,
  )
  return state, summary


def _step_rows(
  pending: list[tuple[int, int, dict, int | None]],
  seeds: Sequence[int],
  population: bool,
  alpha: float,
  learning_rate: Callable[[int], float] | None,
  rate: float,
) -> list[dict]:
  """metrics.jsonl rows of the pending steps, one per step and member (`monitor`)."""
  arrays = {id(m): m for _, _, m, _ in pending}  # a chunk's stacked metrics, fetched once
  fetched = dict(zip(arrays, jax.device_get(list(arrays.values()))))
  rows = []
  for step, epoch, device_metrics, row in pending:
    metrics = fetched[id(device_metrics)]
    if row is not None:  # one step of a chunk's stacked metrics
      metrics = jax.tree.map(lambda a, row=row: a[row], metrics)
    for k, seed in enumerate(seeds):
      value = lambda name: float(np.asarray(metrics[name]).reshape(-1)[k if population else 0])
      loss, ce = value("loss"), value("ce")
      row = {
        "step": step,
        "epoch": epoch + 1,
        "seed": seed,
        "loss": loss,
        "ce_loss": ce,
        "train_accuracy": value("accuracy"),
        "images_per_second": round(rate, 1),
        "nonfinite": int(value("nonfinite")),
      }
      if "feature_loss" in metrics:  # a feature method: β·F, and α'·T²·KL with +kd
        row["feature_loss"] = value("feature_loss")
        if "kd_loss" in metrics:
          row["kd_loss"] = value("kd_loss")
      elif alpha > 0:  # the KD stage's α·T²·KL term: what the loss adds to (1 − α)·CE
        row["kd_loss"] = loss - (1.0 - alpha) * ce
      if learning_rate is not None:
        row["learning_rate"] = float(learning_rate(step - 1))
      finite = lambda v: v if not isinstance(v, float) or np.isfinite(v) else None
      rows.append({key: finite(v) for key, v in row.items()})
  return rows


def evaluate(
  eval_fn: Callable,
  variables: PyTree,
  masks: PyTree | None,
  images: np.ndarray,
  num_examples: int,
  parallel: DataParallel | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Logits and per-layer features ({'features': penultimate, 'stage1': ..., ...}) of the
  first `num_examples` rows of the padded set
  (images (num_batches, batch, H, W, C); each batch is sharded over the devices). With a
  population eval_fn the outputs have a leading member axis."""
  parallel = DataParallel() if parallel is None else parallel
  local = parallel.process_slice(images.shape[1])
  variables, masks = parallel.replicate((variables, masks))
  images = parallel.put_batch(images[:, local], parallel.eval_batches, axis=1)
  logits, layers = jax.device_get(eval_fn(variables, masks, images))
  # The example axis is the one before the logits' class axis (after the member axis of a
  # population); layers may have more trailing axes (spatial maps).
  rows = (slice(None),) * (logits.ndim - 2) + (slice(num_examples),)
  return np.asarray(logits[rows]), {k: np.asarray(v[rows]) for k, v in layers.items()}


def compare(
  compare_fn: Callable,
  reference_variables: PyTree,
  variables: PyTree,
  masks: PyTree | None,
  images: np.ndarray,
  labels: np.ndarray,
  valid: np.ndarray,
  subset: np.ndarray,
  num_examples: int,
  parallel: DataParallel | None = None,
) -> tuple[np.ndarray, tuple]:
  """Logits of the first `num_examples` rows of the padded set, the similarity sums against
  the reference and the confusion counts (`make_compare_fn`); `labels`, `valid` and `subset`
  (num_batches, batch) are sharded like the images (multi-host: each process gives its
  slice)."""
  parallel = DataParallel() if parallel is None else parallel
  local = parallel.process_slice(images.shape[1])
  reference_variables, variables, masks = parallel.replicate(
    (reference_variables, variables, masks)
  )
  put = lambda a: parallel.put_batch(a[:, local], parallel.eval_batches, axis=1)
  logits, stats = jax.device_get(
    compare_fn(
      reference_variables,
      variables,
      masks,
      put(images),
      put(labels),
      put(valid),
      put(subset),
    )
  )
  rows = (slice(None),) * (logits.ndim - 2) + (slice(num_examples),)
  return np.asarray(logits[rows]), stats
