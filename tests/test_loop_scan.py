"""The scanned training loop (`fit(loop='scan')`: the split on the device, chunks of steps in
one `lax.scan`) against the per-step loop.

On a model without convolutions XLA:CPU compiles the step inside the loop body to the same
arithmetic, so the two loops must agree bit for bit: same batches, RNG, epoch hooks, skipped
chunk steps, checkpoints, resumes, metrics rows and non-finite handling. With convolutions
XLA:CPU runs another convolution inside a loop (jax-ml/jax#12868), so there the steps agree
to float32 rounding (the documented tolerance: 1e-5 after one step)."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fit_helpers import Interrupted, assert_bitwise_equal, reprune

from configs.default import get_config as default_config
from prunebias_jax.checkpoint import StageCheckpoint
from prunebias_jax.config import base_config
from prunebias_jax.data import load_dataset
from prunebias_jax.data.dataset import Split
from prunebias_jax.data.pipeline import steps_per_epoch
from prunebias_jax.models import get_model
from prunebias_jax.monitor import StepLog
from prunebias_jax.pruning import apply_masks, prune
from prunebias_jax.train import (
  NonFiniteLossError,
  create_state,
  fit,
  loop,
  make_optimizer,
  make_train_step,
)
from prunebias_jax.train.distill import init_crd
from prunebias_jax.train.steps import DistillWeights, TrainStep

BATCH = 64
EPOCHS = 2


class Dense(nn.Module):
  """Two dense layers with batch norm: no convolution, so the loop body compiles to the same
  arithmetic as the step alone on XLA:CPU. Sows 'features' (for CRD)."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, jnp.float32).reshape((x.shape[0], -1))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(24)(x)))
    self.sow("intermediates", "features", x)
    return nn.Dense(self.num_classes)(x)


@pytest.fixture(scope="module")
def setup():
  data = load_dataset(default_config().data)
  assert steps_per_epoch(len(data.train), BATCH) == 12  # the chunk cases below count on it
  model = Dense(data.num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + data.image_shape), train=False)
  optimizer = make_optimizer(base_config().finetune.optim, 12, EPOCHS)
  steps = {}

  def step(population: int = 1, kd: bool = False, skip: bool = False, method=None, m="vmap"):
    key = (population, kd, skip, method, m)
    if key not in steps:
      steps[key] = make_train_step(
        model,
        optimizer,
        mean=data.mean,
        std=data.std,
        crop_padding=1,
        flip=True,
        kd=kd,
        population=population,
        shared_masks=False,
        skip_nonfinite=skip,
        method=method,
        weights=DistillWeights(beta=0.8, crd_negatives=16) if method else None,
        members=m,
      )
    return steps[key]

  return data, model, variables, optimizer, step


def _state(setup, members: int = 1, crd: bool = False):
  data, model, variables, optimizer, _ = setup
  masks = prune(variables["params"], "global_magnitude", 0.5)
  states = [
    create_state(
      apply_masks(variables["params"], masks),
      variables["batch_stats"],
      optimizer,
      masks=masks,
      distill=init_crd(jax.random.key(k), data.train.labels, data.num_classes, 24, 24, 8, optimizer)
      if crd
      else None,
    )
    for k in range(members)
  ]
  return states[0] if members == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _run(setup, tmp_path, how: str, *, seeds=3, step=None, every=5, crash_at=None, **kw):
  """fit() of two epochs with a re-pruning hook, checkpoints every `every` steps and every
  step logged to tmp_path/metrics.jsonl; raises Interrupted after step `crash_at`."""
  data, _, variables, _, steps = setup
  members = 1 if isinstance(seeds, int) else len(seeds)
  teacher = {"params": variables["params"], "batch_stats": variables["batch_stats"]}

  def crash(point):
    if crash_at is not None and point == f"s:step{crash_at}":
      raise Interrupted(point)

  ckpt = StageCheckpoint(tmp_path / "partial", every_steps=every, keep=2) if every else None
  log = StepLog(tmp_path, "s", every_steps=1)
  original = loop.crash_point
  loop.crash_point = crash
  try:
    return fit(
      kw.pop("state", None) or _state(setup, members),
      step or steps(members),
      data.train,
      stage="s",
      batch_size=BATCH,
      epochs=EPOCHS,
      seed=seeds,
      teacher_variables=teacher,
      alpha=0.5,
      temperature=4.0,
      epoch_hook=reprune(members),
      checkpoint=ckpt,
      step_log=log,
      progress_seconds=1e9,
      loop=how,
      scan_steps=5,  # 12 steps an epoch: chunks of 4, cut at every 5th step by the saves
      **kw,
    )
  finally:
    loop.crash_point = original
    log.close()
    if ckpt is not None:
      ckpt.close()


def _rows(tmp_path) -> list[dict]:
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "images_per_second"} for r in rows]


@pytest.mark.parametrize(
  "case",
  ["ce", "kd", "population_vmap", "population_map", "crd"],
)
def test_scanned_loop_equals_the_per_step_loop_bit_for_bit(setup, tmp_path, case):
  steps = setup[4]
  seeds, step, crd = 3, None, False
  if case == "kd":
    step = steps(kd=True)
  elif case.startswith("population"):
    seeds, step = (3, 4), steps(2, m=case.split("_")[1])
  elif case == "crd":
    step, crd = steps(method="crd"), True
  members = 1 if isinstance(seeds, int) else 2
  got = {}
  for how in ("step", "scan"):
    state = _state(setup, members, crd=crd)
    got[how] = _run(setup, tmp_path / how, how, seeds=seeds, step=step, state=state)
  (a, summary_a), (b, summary_b) = got["step"], got["scan"]
  assert int(np.max(np.asarray(b.step))) == 24
  if case == "population_map":
    # lax.map is a loop of its own: nested in the chunk's loop, XLA:CPU compiles the members'
    # dense layers to another kernel, so the steps agree to float32 rounding only.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6)
    rows_a, rows_b = _rows(tmp_path / "step"), _rows(tmp_path / "scan")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    np.testing.assert_allclose([r["loss"] for r in rows_b], [r["loss"] for r in rows_a], 1e-5)
    return
  assert_bitwise_equal(a, b)
  assert summary_a["train_loss"] == summary_b["train_loss"]
  assert summary_a["train_accuracy"] == summary_b["train_accuracy"]
  assert _rows(tmp_path / "scan") == _rows(tmp_path / "step")
  assert len(_rows(tmp_path / "scan")) == 24 * members
  # Both saved the same mid-stage steps (5, 10, ..., 20; the last two kept).
  for how in ("step", "scan"):
    saved = sorted(int(p.name) for p in (tmp_path / how / "partial").iterdir() if p.name.isdigit())
    assert saved == [15, 20]


@pytest.mark.parametrize("crash_at", [7, 12, 13, 22])
def test_a_scanned_stage_interrupted_mid_chunk_resumes_to_the_same_bits(setup, tmp_path, crash_at):
  """Chunks of 4 steps cut at the saves (every 5): steps 1-4, 5, 6-9, 10, 11-12, 13-15, ...;
  an interruption after any step resumes from the last save to the uninterrupted state."""
  reference, _ = _run(setup, tmp_path / "ref", "step", every=0)
  with pytest.raises(Interrupted):
    _run(setup, tmp_path / "b", "scan", crash_at=crash_at)
  assert StageCheckpoint(tmp_path / "b" / "partial", 5).latest_step() == crash_at // 5 * 5
  state, summary = _run(setup, tmp_path / "b", "scan")
  assert summary["resumed_at_step"] == crash_at // 5 * 5
  assert_bitwise_equal(state, reference)


def _poisoned(step: TrainStep, at: int) -> TrainStep:
  """The step with its reported loss NaN from the `at`-th step on (1-based), decided from
  the state's step counter inside the step, so it holds in a scanned chunk too."""

  def body(state, *args):
    new, metrics = step.body(state, *args)
    bad = state.step + 1 >= at
    return new, {
      **metrics,
      "loss": jnp.where(bad, jnp.nan, metrics["loss"]),
      "nonfinite": jnp.where(bad, 1, metrics["nonfinite"]),
    }

  return TrainStep(jax.jit(body, donate_argnums=(0,)), body)


def test_a_nonfinite_loss_in_a_chunk_names_the_same_step_and_loss(setup, tmp_path):
  step = _poisoned(setup[4](), at=7)
  messages = []
  for how in ("step", "scan"):
    with pytest.raises(NonFiniteLossError) as e:
      _run(setup, tmp_path / how, how, step=step, every=0)
    messages.append(str(e.value))
  assert messages[0] == messages[1]
  assert "s: non-finite loss at step 7/24 (epoch 1); last finite loss" in messages[1]
  assert "at step 6." in messages[1]


def test_skipped_nonfinite_steps_are_counted_alike(setup, tmp_path):
  step = _poisoned(setup[4](skip=True), at=20)
  summaries = [
    _run(setup, tmp_path / how, how, step=step, every=0, nonfinite="skip")[1]
    for how in ("step", "scan")
  ]
  assert summaries[0]["nonfinite_steps"] == summaries[1]["nonfinite_steps"] == 5


def test_one_compiled_chunk_serves_every_chunk_and_every_stage(setup, tmp_path):
  step = setup[4](kd=True)
  step.chunks.clear()
  for k in range(2):
    _run(setup, tmp_path / str(k), "scan", step=step)
  ((fn),) = step.chunks.values()
  assert fn._cache_size() == 1


def test_a_convolutional_step_in_a_chunk_is_the_step_to_float32_rounding(setup):
  """XLA:CPU compiles a convolution inside a loop to another kernel (jax-ml/jax#12868): one
  step of the small CNN in a chunk agrees with the step alone within 1e-5."""
  data = setup[0]
  model = get_model("small_cnn", data.num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + data.image_shape), train=False)
  optimizer = make_optimizer(base_config().finetune.optim, 12, EPOCHS)
  step = make_train_step(model, optimizer, mean=data.mean, std=data.std, crop_padding=1, flip=True)
  one = Split(data.train.images[:BATCH], data.train.labels[:BATCH])
  got = []
  for how in ("step", "scan"):
    state = create_state(variables["params"], variables["batch_stats"], optimizer)
    got.append(
      jax.device_get(
        fit(state, step, one, stage="c", batch_size=BATCH, epochs=1, seed=0, loop=how)[0]
      )
    )
  for x, y in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1])):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-5)
  assert int(got[1].step) == 1


def test_the_loop_rule_and_its_errors(setup, monkeypatch):
  data, steps = setup[0], setup[4]
  step = steps()
  # An epoch of 12 steps in chunks of at most 5: three chunks of 4, none skipped.
  assert loop.scan_length(step, data.train, 12, "scan", 5) == 4
  assert loop.scan_length(step, data.train, 390, "scan", 32) == 30
  assert loop.scan_length(step, data.train, 12, "scan", 100) == 12
  assert loop.scan_length(step, data.train, 12, "step", 5) == 0
  # 'auto' on the CPU steps (jax-ml/jax#12868), and a plain callable has no body to scan.
  assert loop.scan_length(step, data.train, 12, "auto", 5) == 0
  plain = functools.partial(step.jitted)
  with pytest.raises(ValueError, match="population_step='sequential'"):
    loop.scan_length(plain, data.train, 12, "scan", 5)
  with pytest.raises(ValueError, match="population_step='sequential'"):
    loop.scan_length(steps(2, m="sequential"), data.train, 12, "scan", 5)
  monkeypatch.setattr(loop, "DEVICE_DATA_FRACTION", 1e-12)
  with pytest.raises(ValueError, match=r"training split \(0\.\d MB\) takes more than 0%"):
    loop.scan_length(step, data.train, 12, "scan", 5)
  with pytest.raises(ValueError, match="loop='loop'; allowed: auto, scan, step"):
    loop.scan_length(step, data.train, 12, "loop", 5)
  with pytest.raises(ValueError, match="scan_steps=0; allowed: an integer >= 1"):
    loop.scan_length(step, data.train, 12, "scan", 0)


def test_a_scanned_population_needs_one_program(tiny_config):
  from prunebias_jax.config import validate_config
  from prunebias_jax.errors import ConfigError
  from prunebias_jax.stages import population_step

  tiny_config.population, tiny_config.train_loop = 2, "scan"
  tiny_config.population_step = "sequential"
  with pytest.raises(ConfigError, match="train_loop='scan' cannot run population_step='seq"):
    validate_config(tiny_config)
  # 'auto' takes one program when the scanned loop is asked for (the CPU's 'sequential' else).
  tiny_config.population_step = "auto"
  validate_config(tiny_config)
  assert population_step(tiny_config) == "vmap"
  tiny_config.train_loop = "auto"
  assert population_step(tiny_config) == (
    "sequential" if jax.default_backend() == "cpu" else "vmap"
  )
