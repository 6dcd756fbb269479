"""Mid-stage checkpoints and non-finite losses, in process: a stage interrupted after any
step and resumed from its last checkpoint ends with exactly (bit for bit) the state of an
uninterrupted stage; a NaN loss stops with the stage, step and last finite loss, or is skipped."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fit_helpers import Interrupted, assert_bitwise_equal, reprune

from configs.default import get_config as default_config
from prunebias_jax.checkpoint import StageCheckpoint
from prunebias_jax.config import base_config
from prunebias_jax.data import load_dataset
from prunebias_jax.data.pipeline import steps_per_epoch, train_batches
from prunebias_jax.models import get_model
from prunebias_jax.pruning import apply_masks, prune
from prunebias_jax.train import (
  NonFiniteLossError,
  create_state,
  fit,
  loop,
  make_optimizer,
  make_train_step,
)

BATCH = 64
EPOCHS = 2


@pytest.fixture(scope="module")
def setup():
  data = load_dataset(default_config().data)
  model = get_model("small_cnn", data.num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + data.image_shape), train=False)
  optimizer = make_optimizer(
    base_config().finetune.optim, steps_per_epoch(len(data.train), BATCH), EPOCHS
  )
  steps = {}

  def step(population: int = 1, skip: bool = False, kd: bool = False):
    key = (population, skip, kd)
    if key not in steps:
      steps[key] = make_train_step(
        model,
        optimizer,
        mean=data.mean,
        std=data.std,
        crop_padding=1,
        flip=False,
        kd=kd,
        population=population,
        shared_masks=False,
        skip_nonfinite=skip,
      )
    return steps[key]

  return data, variables, optimizer, step


def _state(variables, optimizer, masks, members: int = 1):
  """A fresh state (stacked for a population), its masks inside it."""
  states = [
    create_state(
      apply_masks(variables["params"], masks), variables["batch_stats"], optimizer, masks=masks
    )
    for _ in range(members)
  ]
  return states[0] if members == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _run(
  setup, tmp_path, *, seeds, every: int, crash_at: int | None, monkeypatch, background=False
):
  data, variables, optimizer, step = setup
  members = 1 if isinstance(seeds, int) else len(seeds)
  masks = prune(variables["params"], "global_magnitude", 0.5)

  def crash(point):
    if crash_at is not None and point == f"stage:step{crash_at}":
      raise Interrupted(point)

  monkeypatch.setattr(loop, "crash_point", crash)
  ckpt = StageCheckpoint(tmp_path / "partial", every_steps=every, keep=2, background=background)
  state = _state(variables, optimizer, masks, members)
  try:
    return fit(
      state,
      step(members),
      data.train,
      stage="stage",
      batch_size=BATCH,
      epochs=EPOCHS,
      seed=seeds,
      epoch_hook=reprune(members),
      checkpoint=ckpt,
      progress_seconds=1e9,
    )
  finally:
    ckpt.close()


@pytest.mark.parametrize(
  "seeds,every,crash_at,background",
  [
    (3, 5, 17, False),  # resumes at step 15, mid-epoch 2 (its re-pruning already happened)
    (3, 6, 13, False),  # resumes at step 12 = the epoch boundary (the re-pruning must run now)
    (3, 5, 9, False),  # resumes at step 5, mid-epoch 1 (the re-pruning comes later)
    ((3, 4), 5, 23, False),  # a population of two, resumed mid-epoch 2
    (3, 5, 17, True),  # saved in the background while the steps went on
  ],
)
def test_resumed_stage_equals_uninterrupted(
  setup, tmp_path, monkeypatch, seeds, every, crash_at, background
):
  per_epoch = steps_per_epoch(len(setup[0].train), BATCH)
  assert per_epoch == 12  # the cases above are placed around this epoch boundary
  reference_state, _ = _run(
    setup, tmp_path / "a", seeds=seeds, every=0, crash_at=None, monkeypatch=monkeypatch
  )
  run_b = functools.partial(
    _run, setup, tmp_path / "b", seeds=seeds, every=every, monkeypatch=monkeypatch
  )
  with pytest.raises(Interrupted):
    run_b(crash_at=crash_at, background=background)
  saved = StageCheckpoint(tmp_path / "b" / "partial", every_steps=every)
  assert saved.latest_step() == (crash_at // every) * every
  saved.close()
  state, summary = run_b(crash_at=None, background=background)
  assert summary["resumed_at_step"] == (crash_at // every) * every
  assert_bitwise_equal(state, reference_state)
  assert_bitwise_equal(state.masks, reference_state.masks)


def test_resume_skips_exactly_the_consumed_batches(setup):
  split = setup[0].train
  full = list(train_batches(split, BATCH, 7, 0, 3))
  for skip in (0, 5, 12, 13, 30):
    rest = list(train_batches(split, BATCH, 7, 0, 3, skip=skip))
    assert len(rest) == len(full) - skip
    for (e1, x1, y1), (e2, x2, y2) in zip(rest, full[skip:]):
      assert e1 == e2
      np.testing.assert_array_equal(x1, x2)
      np.testing.assert_array_equal(y1, y2)


def test_checkpoints_keep_the_last_k(tmp_path):
  ckpt = StageCheckpoint(tmp_path / "p", every_steps=2, keep=2)
  tree = {"w": jnp.arange(3.0)}
  for step in (2, 4, 6, 8):
    assert ckpt.due(step, total=10)
    ckpt.save(step, {"w": tree["w"] + step})
  assert not ckpt.due(10, total=10) and not ckpt.due(3, total=10)
  assert sorted(int(p.name) for p in (tmp_path / "p").iterdir() if p.name.isdigit()) == [6, 8]
  restored, step = ckpt.restore(tree)
  assert step == 8
  np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 8)
  ckpt.discard()
  assert not (tmp_path / "p").exists()


def test_time_based_saves_follow_the_clock(tmp_path):
  """every_seconds alone: due once the clock has moved that far since the start or the last
  save, whatever the step; with every_steps too, whichever comes first; never at the end."""
  now = [100.0]
  ckpt = StageCheckpoint(tmp_path / "p", every_steps=0, every_seconds=60.0, clock=lambda: now[0])
  assert not ckpt.due(1, total=100)
  now[0] = 159.9
  assert not ckpt.due(7, total=100)
  now[0] = 160.0
  assert ckpt.due(7, total=100) and not ckpt.due(100, total=100)
  ckpt.save(7, {"w": jnp.ones(2)})
  assert not ckpt.due(8, total=100)  # the clock restarts at the save
  now[0] = 219.0
  assert not ckpt.due(9, total=100)
  now[0] = 220.5
  assert ckpt.due(9, total=100)
  ckpt.close()
  both = StageCheckpoint(tmp_path / "q", every_steps=4, every_seconds=60.0, clock=lambda: now[0])
  assert both.due(4, total=100) and not both.due(5, total=100)
  now[0] += 60.0
  assert both.due(5, total=100)
  both.close()


def test_a_background_save_copies_the_state_before_it_is_donated(tmp_path):
  """save() returns before the files are written, and the next step is given the saved
  arrays to donate (to overwrite in place). What lands on disk is still the state as it was
  at the save: Orbax copies the arrays off the device before save() returns (on the CPU the
  copy is a view, and JAX then declines the donation rather than overwrite it)."""
  ckpt = StageCheckpoint(tmp_path / "p", every_steps=1, background=True)
  state = {"w": jnp.arange(1_000_000, dtype=jnp.float32), "b": jnp.full((7,), 3.0)}
  before = jax.device_get(state)
  ckpt.save(1, state)
  step = jax.jit(lambda s: jax.tree.map(lambda a: a * 2.0 + 1.0, s), donate_argnums=0)
  after = jax.block_until_ready(step(state))
  ckpt.wait()
  restored, steps_done = ckpt.restore(before)
  assert steps_done == 1
  np.testing.assert_array_equal(restored["w"], before["w"])
  np.testing.assert_array_equal(restored["b"], before["b"])
  np.testing.assert_array_equal(after["w"], before["w"] * 2.0 + 1.0)
  ckpt.close()


_KILL_DURING_WRITE = """
import os, signal, sys
import jax, numpy as np
from prunebias_jax.checkpoint import StageCheckpoint
ckpt = StageCheckpoint(sys.argv[1], every_steps=1, background=True)
ckpt.save(1, {"w": np.full((8,), 1.0, np.float32)})
ckpt.wait()
big = np.random.default_rng(0).standard_normal(40_000_000).astype(np.float32)  # 160 MB
ckpt.save(2, {"w": np.full((8,), 2.0, np.float32), "big": big})
os.kill(os.getpid(), signal.SIGKILL)  # while step 2 is being written
"""


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint(tmp_path):
  import signal
  import subprocess
  import sys

  proc = subprocess.run(
    [sys.executable, "-c", _KILL_DURING_WRITE, str(tmp_path / "p")], capture_output=True
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  ckpt = StageCheckpoint(tmp_path / "p", every_steps=1)
  assert ckpt.latest_step() == 1  # step 2 was never finalised: the rerun resumes from step 1
  restored, steps_done = ckpt.restore({"w": np.zeros((8,), np.float32)})
  assert steps_done == 1 and restored["w"].tolist() == [1.0] * 8
  ckpt.close()


class _PoisonAt:
  """Wraps a step so that its reported loss is NaN from call `at` on (the step's own result is
  kept); the loop must notice from the metrics alone."""

  def __init__(self, step, at: int):
    self.step, self.at, self.calls, self.losses = step, at, 0, []

  def __call__(self, *args):
    state, metrics = self.step(*args)
    self.calls += 1
    self.losses.append(float(metrics["loss"]))
    if self.calls >= self.at:
      metrics = {**metrics, "loss": jnp.float32(jnp.nan), "nonfinite": jnp.int32(1)}
    return state, metrics


def test_nonfinite_loss_stops_with_stage_step_and_last_finite_loss(setup, tmp_path):
  data, variables, optimizer, step = setup
  poisoned = _PoisonAt(step(), at=5)
  ckpt = StageCheckpoint(tmp_path / "partial", every_steps=8, keep=2)
  with pytest.raises(NonFiniteLossError) as e:
    fit(
      _state(variables, optimizer, None),
      poisoned,
      data.train,
      stage="dense_seed3",
      batch_size=BATCH,
      epochs=EPOCHS,
      seed=3,
      progress_seconds=1e9,
      checkpoint=ckpt,
    )
  message = str(e.value)
  assert "dense_seed3" in message and "step 5/24" in message and "epoch 1" in message
  assert f"last finite loss {poisoned.losses[3]:.4g} at step 4" in message
  # Checked before saving: the state after the NaN was never checkpointed.
  assert ckpt.latest_step() is None
  ckpt.close()


def test_skip_drops_the_update_of_a_nonfinite_step(setup):
  data, variables, optimizer, step = setup
  kd_skip = step(skip=True, kd=True)
  batch = next(train_batches(data.train, BATCH, 0, 0, 1))
  images, labels = jnp.asarray(batch[1]), jnp.asarray(batch[2])
  state = _state(variables, optimizer, None)
  before = jax.tree.map(np.asarray, state)
  teacher = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  # T = NaN makes the KD loss NaN: the update must be dropped, the counter must advance.
  new, metrics = kd_skip(
    state, images, labels, jax.random.key(0), teacher, jnp.float32(0.5), jnp.float32(jnp.nan)
  )
  assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert int(new.step) == 1
  assert_bitwise_equal(
    (new.params, new.batch_stats, new.opt_state),
    (before.params, before.batch_stats, before.opt_state),
  )
  # A finite step still updates.
  state = _state(variables, optimizer, None)
  new, metrics = kd_skip(
    state, images, labels, jax.random.key(0), teacher, jnp.float32(0.5), jnp.float32(4.0)
  )
  assert int(metrics["nonfinite"]) == 0
  assert not np.array_equal(
    np.asarray(jax.tree.leaves(new.params)[0]), np.asarray(jax.tree.leaves(before.params)[0])
  )


def test_skip_mode_counts_and_finishes(setup):
  data, variables, optimizer, step = setup
  poisoned = _PoisonAt(step(skip=True), at=20)
  state, summary = fit(
    _state(variables, optimizer, None),
    poisoned,
    data.train,
    stage="s",
    batch_size=BATCH,
    epochs=EPOCHS,
    seed=0,
    progress_seconds=1e9,
    nonfinite="skip",
  )
  assert summary["nonfinite_steps"] == 5  # calls 20..24
  assert int(state.step) == 24


def test_unknown_nonfinite_rule_is_refused(setup):
  data, variables, optimizer, step = setup
  with pytest.raises(ValueError, match="'ignore'"):
    fit(
      _state(variables, optimizer, None),
      step(),
      data.train,
      stage="s",
      batch_size=BATCH,
      epochs=1,
      seed=0,
      nonfinite="ignore",
    )
