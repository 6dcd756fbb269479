"""Populations: N students trained together (one vmapped step, or each member's own step in
turn) equal N separate runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prunebias_jax import experiment
from prunebias_jax.config import ConfigError


def tiny(workdir_config_changes: dict):
  from configs.default import get_config

  cfg = get_config()
  cfg.dense.epochs = 2
  cfg.finetune.epochs = 2  # gradual: 10% for one epoch, then re-pruned per member to 60%
  cfg.pruning.methods = ("random",)  # per-seed masks differ: the harder case
  cfg.pruning.sparsities = (0.6,)
  cfg.pruning.schedule = "gradual"
  cfg.pruning.frequency_epochs = 1
  cfg.pruning.end_fraction = 1.0  # the ramp spans both epochs (span 1)
  for k, v in workdir_config_changes.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return cfg


@pytest.mark.parametrize("step", ["vmap", "sequential"])
def test_population_of_three_equals_three_separate_runs(tmp_path, step):
  separate = experiment.run(tiny({"seeds": (0, 1, 2)}), tmp_path / "separate")
  together = experiment.run(
    tiny({"seeds": (0,), "population": 3, "population_step": step}), tmp_path / "population"
  )
  assert len(separate) == len(together) == 1 + 3 * 2
  for a, b in zip(
    sorted(separate, key=lambda r: (r["kd"], r["seed"], r["method"])),
    sorted(together, key=lambda r: (r["kd"], r["seed"], r["method"])),
  ):
    assert (a["method"], a["seed"], a["kd"]) == (b["method"], b["seed"], b["kd"])
    assert a["realized_sparsity_per_layer"] == b["realized_sparsity_per_layer"]  # same masks
    # The vmapped step convolves with per-member weights (a grouped convolution), which rounds
    # differently from a plain one; 24 SGD steps amplify that into a few flipped test
    # predictions (seen on jax 0.12: 6 of 719 for one class's FPR). Masks must match exactly.
    if step == "sequential":  # each member's own step: the separate run's very numbers
      assert (a["accuracy"], a["cka"], a["fpr"]) == (b["accuracy"], b["cka"], b["fpr"])
    assert abs(a["accuracy"] - b["accuracy"]) <= 8 / 719
    np.testing.assert_allclose(a["cka"], b["cka"], atol=1e-2)
    np.testing.assert_allclose(a["fpr"], b["fpr"], atol=10 / 719)
  # One record per member, and the per-seed students really differ from each other.
  accs = {r["seed"]: r["cka"] for r in together if r["method"] == "random" and not r["kd"]}
  assert len(set(accs.values())) == 3
  cells = [
    json.loads(l) for l in (tmp_path / "population" / "cells.jsonl").read_text().splitlines()
  ]
  assert all(c["seeds"] == [0, 1, 2] for c in cells)


def test_population_must_divide_the_seeds(tmp_path):
  with pytest.raises(ConfigError, match="population=2"):
    experiment.run(tiny({"seeds": (0, 1, 2), "population": 2}), tmp_path / "w")
