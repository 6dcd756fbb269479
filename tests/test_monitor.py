"""Watching a run (prunebias_jax.monitor): metrics.jsonl rows are the steps' own values, logging
changes nothing the model learns, a resumed stage's stale rows go, TensorBoard gets the same."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from prunebias_jax.data.dataset import Split
from prunebias_jax.models import get_model
from prunebias_jax.monitor import StepLog
from prunebias_jax.train import (
  create_state,
  fit,
  learning_rate_schedule,
  make_optimizer,
  make_train_step,
)

OPTIM = ml_collections.ConfigDict(
  dict(
    learning_rate=0.1,
    momentum=0.9,
    nesterov=False,
    weight_decay=0.0,
    schedule="cosine",
    decay_epochs=(),
    decay_factor=0.1,
  )
)
EPOCHS, BATCH = 2, 8


def _setup(kd: bool):
  model = get_model("small_cnn", 3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  rng = np.random.default_rng(0)
  split = Split(rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 40))
  per_epoch = len(split) // BATCH
  optimizer = make_optimizer(OPTIM, per_epoch, EPOCHS)
  step = make_train_step(
    model, optimizer, mean=(0.5,), std=(0.25,), crop_padding=0, flip=False, kd=kd
  )
  seen = []

  def recording(*args):  # what every step returned, fetched eagerly (only in this test)
    state, metrics = step(*args)
    seen.append(jax.device_get(metrics))
    return state, metrics

  def state():
    return create_state(variables["params"], variables["batch_stats"], optimizer)

  return split, state, recording, seen, variables, per_epoch


@pytest.mark.parametrize("kd", [False, True])
def test_rows_are_the_steps_values_and_logging_changes_no_weight(tmp_path, kd):
  split, state, step, seen, teacher, per_epoch = _setup(kd)
  kw = dict(stage="s", batch_size=BATCH, epochs=EPOCHS, seed=3, progress_seconds=1e9)
  kw |= dict(teacher_variables=teacher if kd else None, alpha=0.9, temperature=4.0)
  plain, _ = fit(state(), step, split, **kw)
  seen.clear()
  log = StepLog(tmp_path, "s", every_steps=3)
  schedule = learning_rate_schedule(OPTIM, per_epoch, EPOCHS)
  logged, _ = fit(state(), step, split, step_log=log, learning_rate=schedule, **kw)
  log.close()
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(logged.params)):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  total = per_epoch * EPOCHS
  assert [r["step"] for r in rows] == [3, 6, 9, total]  # every 3rd step and the last
  for r in rows:
    m = seen[r["step"] - 1]
    assert r["stage"] == "s" and r["seed"] == 3
    assert r["epoch"] == (r["step"] - 1) // per_epoch + 1
    assert r["loss"] == pytest.approx(float(m["loss"]), rel=1e-6)
    assert r["ce_loss"] == pytest.approx(float(m["ce"]), rel=1e-6)
    assert r["train_accuracy"] == pytest.approx(float(m["accuracy"]))
    assert r["learning_rate"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)
    assert r["nonfinite"] == 0 and r["images_per_second"] > 0
    if kd:  # loss = (1 − α)·CE + α·T²·KL: the logged KD term is the rest
      assert r["kd_loss"] == pytest.approx(r["loss"] - 0.1 * r["ce_loss"], rel=1e-5, abs=1e-6)
      assert r["kd_loss"] != pytest.approx(0.0)
    else:
      assert "kd_loss" not in r and r["loss"] == r["ce_loss"]


def test_a_resumed_stage_drops_its_stale_rows_and_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"stage": "a", "step": s} for s in (10, 20, 30)] + [{"stage": "b", "step": 10}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "a", "st')
  StepLog(tmp_path, "a", every_steps=10).start(20)  # resumed from its step-20 checkpoint
  assert [json.loads(l) for l in path.read_text().splitlines()] == [
    {"stage": "a", "step": 10},
    {"stage": "a", "step": 20},
    {"stage": "b", "step": 10},
  ]
  StepLog(tmp_path, "b", every_steps=0).start(0)  # disabled: the file is left alone
  assert len(path.read_text().splitlines()) == 3


def _events(directory: Path) -> list:
  """Every Event of the TFRecord event files under `directory` (the record framing read by
  hand: length, its CRC, the payload, its CRC)."""
  from tensorboardX.proto import event_pb2

  events = []
  for file in sorted(directory.rglob("events.out.tfevents.*")):
    data = file.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12 : pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events


def test_tensorboard_gets_the_same_scalars(tmp_path):
  pytest.importorskip("tensorboardX")
  log = StepLog(tmp_path, "l1_s0.5_ce_seed0+1", every_steps=1)  # a population stage
  log.write([{"step": 1, "epoch": 1, "seed": 0, "loss": 2.5, "ce_loss": 2.0, "kd_loss": None}])
  log.write([{"step": 2, "epoch": 1, "seed": 0, "loss": 1.5, "ce_loss": 1.25}])
  log.close()
  scalars = [
    (e.step, v.tag, v.simple_value)
    for e in _events(tmp_path / "tensorboard" / "l1_s0.5_ce_seed0+1_seed0")
    for v in e.summary.value
  ]
  assert sorted(scalars) == [
    (1, "train/ce_loss", 2.0),
    (1, "train/loss", 2.5),
    (2, "train/ce_loss", 1.25),
    (2, "train/loss", 1.5),
  ]


def test_a_population_with_shared_masks_logs_each_members_test_accuracy(tmp_path):
  from configs.default import get_config
  from prunebias_jax import experiment
  from prunebias_jax.load import load_run

  cfg = get_config()
  cfg.dense.epochs, cfg.finetune.epochs = 1, 2
  cfg.pruning.methods, cfg.pruning.sparsities = ("l1_filter",), (0.5,)
  cfg.seeds, cfg.population, cfg.population_masks = (0,), 2, "shared"
  cfg.analysis.bootstrap_resamples = 0
  records = experiment.run(cfg, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  run = load_run(tmp_path)
  students = [r for r in records if r["method"] != "dense"]
  assert len(students) == 4  # CE and KD, seeds 0 and 1, each trained as a population of 2
  for record in students:
    stage = run.checkpoint_name({**record, "seed": 0}) + "+1"  # the population's stage
    tested = [
      r
      for r in rows
      if r["stage"] == stage and r["seed"] == record["seed"] and "test_accuracy" in r
    ]
    assert [r["epoch"] for r in tested] == [1, 2]
    assert tested[-1]["test_accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)
