"""A checkpoint is restored only when it was trained as this run would train it.

Each checkpoint carries the identity of its training (`prunebias_jax.provenance`); no other
file can make a run report a model it did not train (the workdir's config.json may be
missing), and a change that only affects stages not yet trained keeps the stages that are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from configs.default import get_config as default_config
from prunebias_jax import experiment, provenance, stages
from prunebias_jax import workdir as workdir_lib
from prunebias_jax.checkpoint import IdentityMismatch, ModelCheckpoint, digest
from prunebias_jax.config import resolve_config
from prunebias_jax.data import load_dataset
from prunebias_jax.errors import Interrupted


def _tiny():
  cfg = default_config()  # the demo's data: its imbalanced fine-tuning split
  cfg.dense.epochs = 1
  cfg.finetune.epochs = 1
  cfg.pruning.methods = ("random",)
  cfg.pruning.sparsities = (0.5,)
  cfg.analysis.bootstrap_resamples = 0
  return cfg


def _identities(**changes):
  cfg = _tiny()
  for key, value in changes.items():
    *groups, name = key.split("__")
    node = cfg
    for g in groups:
      node = node[g]
    node[name] = value
  cfg = resolve_config(cfg)
  return stages.planned_identities(cfg, load_dataset(cfg.data))


@pytest.fixture(scope="module")
def base_identities():
  return _identities()


DENSE, CE, KD = "dense", "random_s0.5_ce_seed0", "random_s0.5_kd_seed0"


@pytest.mark.parametrize(
  "change,changed",
  [
    # What shapes the teacher changes every model (the students start from it).
    (dict(dense__epochs=2), {DENSE, CE, KD}),
    (dict(dense__optim__learning_rate=0.2), {DENSE, CE, KD}),
    (dict(data__flip=True), {DENSE, CE, KD}),
    (dict(data__crop_padding=2), {DENSE, CE, KD}),
    (dict(model="resnet20"), {DENSE, CE, KD}),
    (dict(compute_dtype="bfloat16"), {DENSE, CE, KD}),
    (dict(data__batch_size=32), {DENSE, CE, KD}),
    (dict(seed=3), {DENSE, CE, KD}),  # the teacher's seed (students: `seeds`)
    # The fine-tuning split (the imbalance) only: the teacher is kept.
    (dict(data__imbalance__keep_fractions=(0.5, 0.5, 0.5)), {CE, KD}),
    (dict(finetune__optim__learning_rate=0.01), {CE, KD}),
    (dict(finetune__epochs=2), {CE, KD}),
    (dict(finetune__batch_size=32), {CE, KD}),
    # KD only.
    (dict(kd__temperature=2.0), {KD}),
    (dict(kd__alpha=0.5), {KD}),
    # Nothing that trains.
    (dict(analysis__bootstrap_resamples=9), set()),
    (dict(metrics__zero_rate="exclude"), set()),
    (dict(checkpoint__every_steps=3), set()),
    (dict(progress_seconds=1.0), set()),
    (dict(nonfinite="skip"), set()),
    (dict(data__eval_batch_size=128), set()),
  ],
)
def test_an_identity_changes_exactly_with_what_shapes_the_model(base_identities, change, changed):
  new = _identities(**change)
  differ = {
    name
    for name in set(base_identities) | set(new)
    if name in base_identities and name in new and base_identities[name] != new[name]
  }
  renamed = set(new) - set(base_identities)
  assert differ | renamed == changed, change


def test_the_identity_carries_the_values_and_the_teacher(base_identities):
  dense, kd = base_identities[DENSE], base_identities[KD]
  assert dense["dense.epochs"] == 1 and dense["seed"] == 0 and dense["stage"] == "dense"
  assert kd["teacher"] == digest(dense)
  assert kd["kd.temperature"] == 4.0 and base_identities[CE]["kd.temperature"] is None
  assert kd["pruning.plan"] == [[0, 0.5]]  # one-shot: the target at epoch 0
  json.dumps(kd, allow_nan=False)  # storable as checkpoint metadata
  assert base_identities[CE] == base_identities[CE]  # the stage of one model: its identity


def test_the_fingerprint_sees_any_change_of_the_images_or_labels():
  cfg = resolve_config(_tiny())
  split = load_dataset(cfg.data).train
  fp = provenance.fingerprint(split)
  assert provenance.fingerprint(split.take(np.arange(len(split)))) == fp
  images = split.images.copy()
  images[17, 3, 4, 0] ^= 1
  assert provenance.fingerprint(type(split)(images, split.labels)) != fp
  labels = split.labels.copy()
  labels[[0, 1]] = labels[[1, 0]] if labels[0] != labels[1] else (labels[0] + 1) % 10
  assert provenance.fingerprint(type(split)(split.images, labels)) != fp
  order = np.arange(len(split))[::-1]
  assert provenance.fingerprint(split.take(order)) != fp


def test_population_stage_identity_names_every_member():
  cfg = _tiny()
  cfg.seeds = (0, 1)
  cfg.population = 2
  cfg = resolve_config(cfg)
  ids = stages.planned_identities(cfg, load_dataset(cfg.data))
  stage = ids["random_s0.5_ce_seed0+1"]
  assert stage["members"] == [digest(ids[CE]), digest(ids["random_s0.5_ce_seed1"])]
  assert ids[CE]["population"] == [0, 1]


# ------------------------------------------------------------------------------ on real runs
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  cfg = _tiny()
  cfg.analysis.dense_seeds = (1,)
  workdir = tmp_path_factory.mktemp("finished")
  experiment.run(cfg, workdir)
  return cfg, workdir


def _state(directory):
  return sorted(
    (str(p.relative_to(directory)), p.stat().st_mtime_ns, p.is_file() and p.read_bytes())
    for p in directory.rglob("*")
  )


def test_without_config_json_a_different_training_is_never_restored(finished, tmp_path):
  """The issue's case: config.json deleted, other training values; the run stops before any
  work naming the checkpoint and the field, and changes nothing."""
  cfg, source = finished
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  (workdir / "config.json").unlink()
  before = _state(workdir)
  other = cfg.copy_and_resolve_references()
  other.dense.epochs = 2
  other.finetune.optim.learning_rate = 0.5
  with pytest.raises(IdentityMismatch, match=r"checkpoints/dense was trained .*dense\.epochs"):
    experiment.run(other, workdir)
  assert _state(workdir) == before


def test_every_checkpoint_is_checked_against_its_own_identity(finished):
  """For each model of the run (teacher, dense population, CE and KD student): a changed
  identity for that one name is refused at the check before training and by its restore."""
  cfg, workdir = finished
  cfg = resolve_config(cfg)
  ids = stages.planned_identities(cfg, load_dataset(cfg.data))
  expect = {"model": cfg.model, "num_classes": 10}
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name != "partial")
  assert names == ["dense", "dense_seed1", CE, KD]
  workdir_lib.check_checkpoints(workdir, expect, ids, legacy_ok=False, overwrite=False)
  for name in names:
    changed = {**ids, name: {**ids[name], "seed": 99}}
    with pytest.raises(IdentityMismatch, match=rf"checkpoints/{name} .*seed: trained with"):
      workdir_lib.check_checkpoints(workdir, expect, changed, legacy_ok=False, overwrite=False)
    ckpt = ModelCheckpoint(workdir / "checkpoints" / name, expect=expect, identity=changed[name])
    with pytest.raises(IdentityMismatch):
      ckpt.read_meta()
    ckpt.close()


def test_a_checkpoint_without_identity_needs_an_unchanged_config_json(tmp_path):
  tree = {"w": np.arange(3.0)}
  ckpt = ModelCheckpoint(tmp_path / "old")
  ckpt.save(1, tree, {"steps": 1})  # written as before identities existed
  ckpt.close()
  identity = {"stage": "dense", "seed": 0}
  with pytest.raises(IdentityMismatch, match="before checkpoints recorded how they were"):
    ModelCheckpoint(tmp_path / "old", identity=identity).restore(tree)
  restored, _ = ModelCheckpoint(tmp_path / "old", identity=identity, legacy_ok=True).restore(tree)
  np.testing.assert_array_equal(restored["w"], tree["w"])


def test_a_change_to_later_stages_keeps_the_teacher_and_drops_stale_mid_stage_state(
  tmp_path, monkeypatch
):
  """Interrupted during the CE fine-tuning (after a mid-stage checkpoint), then rerun with
  another fine-tuning learning rate, as the non-finite-loss advice says: the teacher is
  restored, not retrained; the stale mid-stage checkpoint is dropped; the results equal those
  of a run of the new config that was never interrupted."""
  from prunebias_jax.train import loop

  cfg = _tiny()
  cfg.checkpoint.every_steps = 4
  workdir = tmp_path / "w"

  def interrupt(name):
    if name == f"{CE}:step6":
      raise KeyboardInterrupt

  monkeypatch.setattr(loop, "crash_point", interrupt)
  with pytest.raises(Interrupted, match=rf"interrupted at {CE} step 6/12; .*\(from step 4\)"):
    experiment.run(cfg, workdir)
  partial = workdir / "checkpoints" / "partial" / CE
  assert ModelCheckpoint(partial).latest_step() == 4
  teacher = _state(workdir / "checkpoints" / "dense")
  monkeypatch.undo()

  trained = []
  real_fit = stages.fit
  monkeypatch.setattr(
    stages, "fit", lambda *a, **k: trained.append(k["stage"]) or real_fit(*a, **k)
  )
  changed = cfg.copy_and_resolve_references()
  changed.finetune.optim.learning_rate = 0.01
  experiment.run(changed, workdir)  # no overwrite needed: no finished model differs
  assert trained == [CE, KD]
  assert _state(workdir / "checkpoints" / "dense") == teacher
  fresh = tmp_path / "fresh"
  experiment.run(changed, fresh)
  for name in ("results.jsonl", "cells.jsonl"):
    assert (workdir / name).read_bytes() == (fresh / name).read_bytes(), name


def test_overwrite_retrains_only_the_models_that_differ(finished, tmp_path, monkeypatch):
  cfg, source = finished
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  old_results = (workdir / "results.jsonl").read_bytes()
  teacher = _state(workdir / "checkpoints" / "dense")
  trained = []
  real_fit = stages.fit
  monkeypatch.setattr(
    stages, "fit", lambda *a, **k: trained.append(k["stage"]) or real_fit(*a, **k)
  )
  changed = cfg.copy_and_resolve_references()
  changed.kd.temperature = 2.0
  with pytest.raises(IdentityMismatch, match=KD):
    experiment.run(changed, workdir)
  assert trained == []
  changed.overwrite = True
  experiment.run(changed, workdir)
  assert trained == [KD]  # the teacher, the dense population and the CE student are kept
  assert _state(workdir / "checkpoints" / "dense") == teacher
  # The old run's files describe the old config: kept under previous_runs/, not overwritten.
  (previous,) = (workdir / "previous_runs").iterdir()
  assert (previous / "results.jsonl").read_bytes() == old_results
  assert json.loads((previous / "config.json").read_text())["kd"]["temperature"] == 4.0


def test_an_analysis_change_reanalyses_without_training(finished, tmp_path, monkeypatch):
  cfg, source = finished
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  monkeypatch.setattr(stages, "fit", lambda *a, **k: pytest.fail("a model was retrained"))
  checkpoints = _files(workdir / "checkpoints")
  changed = cfg.copy_and_resolve_references()
  changed.analysis.bootstrap_resamples = 20
  changed.metrics.zero_rate = "exclude"
  changed.report.format = "svg"  # vector figures for a paper: a report option, no training
  records = experiment.run(changed, workdir)
  assert all("cev_ci" in r for r in records)  # the new analysis ran
  assert all(r["cev"] == r["cev_exclude"] for r in records)  # under the new metrics rule
  assert json.loads((workdir / "config.json").read_text())["analysis"]["bootstrap_resamples"] == 20
  assert _files(workdir / "checkpoints") == checkpoints  # not one checkpoint byte touched
  figures = sorted(p.name for p in (workdir / "plots").glob("*.svg"))
  assert figures == [
    f"{name}.svg"
    for name in (
      "accuracy_vs_sparsity",
      "bias_vs_size",
      "bias_vs_sparsity",
      "cie_grid",
      "cka_layers",
      "cka_vs_cev",
      "class_changes",
      "similarity_vs_bias",
    )
  ]
  assert all((workdir / "plots" / f).read_text().lstrip().startswith("<?xml") for f in figures)


def _files(directory: Path) -> dict[str, bytes]:
  """Every file under `directory` by relative path, with its bytes."""
  return {
    str(p.relative_to(directory)): p.read_bytes()
    for p in sorted(directory.rglob("*"))
    if p.is_file()
  }
