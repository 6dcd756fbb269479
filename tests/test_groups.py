"""Sensitive attributes for any dataset (data.groups): an image folder's attributes table,
intersectional groups, and one-line refusals for every attribute that cannot be used."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import fairlearn.metrics as flm
import numpy as np
import pytest
from PIL import Image

from configs.default import get_config as default_config
from prunebias_jax import records, stages
from prunebias_jax.audit import audit
from prunebias_jax.config import ConfigError, validate_config
from prunebias_jax.data import DataError, load_dataset
from prunebias_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RACES = ("asian", "black", "white")
GENDERS = ("female", "male")


def build_folder(root: Path, n_train: int = 24, n_test: int = 18, table: str = "csv") -> dict:
  """A 2-class face-like folder (class = gender) with race and age per image in an attributes
  table; each image's pixels encode its index, so a loaded image can be traced to its row.
  Returns {relative path: row}."""
  rows = {}
  k = 0
  for split, n in (("train", n_train), ("test", n_test)):
    for i in range(n):
      gender = GENDERS[i % 2]
      folder = root / split / gender
      folder.mkdir(parents=True, exist_ok=True)
      rel = f"{split}/{gender}/img{i:03d}.png"
      Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(root / rel)
      rows[rel] = {"path": rel, "race": RACES[(i // 2) % 3], "age": str(20 + i % 4), "id": k}
      k += 1
  if table == "csv":
    with open(root / "attributes.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=["path", "race", "age", "id"])
      w.writeheader()
      w.writerows(rows.values())
  elif table == "jsonl":
    with open(root / "attributes.jsonl", "w") as f:
      for r in rows.values():
        f.write(json.dumps(r) + "\n")
  return rows


def folder_data(root: Path, cache: Path, **kw):
  cfg = default_config()
  cfg.data.source = "image_folder"
  cfg.data.dir = str(root)
  cfg.data.cache_dir = str(cache)
  cfg.data.imbalance.classes = ()
  cfg.data.imbalance.keep_fractions = ()
  for key, value in kw.items():
    cfg.data[key] = value
  return cfg


def row_of(image: np.ndarray, rows: dict) -> dict:
  by_id = {r["id"]: r for r in rows.values()}
  return by_id[int(image[0, 0, 0])]


@pytest.mark.parametrize("table", ["csv", "jsonl"])
def test_groups_come_from_the_table_row_of_each_image(tmp_path, table):
  rows = build_folder(tmp_path / "faces", table=table)
  ds = load_dataset(
    folder_data(tmp_path / "faces", tmp_path / "cache", group_attribute="race").data
  )
  assert ds.group_names == RACES
  for split in (ds.train, ds.test):
    races = [row_of(img, rows)["race"] for img in split.images]
    assert [ds.group_names[g] for g in split.groups] == races
    assert split.groups.dtype == np.int32


def test_dpd_and_eod_from_the_attributes_equal_fairlearn_on_the_race_strings(tmp_path):
  rows = build_folder(tmp_path / "faces", n_test=60)
  ds = load_dataset(folder_data(tmp_path / "faces", tmp_path / "c", group_attribute="race").data)
  rng = np.random.default_rng(3)
  y = ds.test.labels
  pred = np.where(rng.random(len(y)) < 0.7, y, 1 - y)
  race = np.array([row_of(img, rows)["race"] for img in ds.test.images])  # strings, not ids
  got = records.fairness(y, ds.test.groups, pred, ds.num_classes, len(ds.group_names))
  assert got["dpd"] == pytest.approx(
    flm.demographic_parity_difference(y, pred, sensitive_features=race), abs=1e-6
  )
  assert got["eod"] == pytest.approx(
    flm.equalized_odds_difference(y, pred, sensitive_features=race), abs=1e-6
  )


def test_intersectional_groups_are_the_combinations_that_occur(tmp_path):
  rows = build_folder(tmp_path / "faces")
  cfg = folder_data(tmp_path / "faces", tmp_path / "c", group_attribute=("race", "age"))
  ds = load_dataset(cfg.data)
  train_rows = [r for r in rows.values() if r["path"].startswith("train/")]
  combos = sorted({(r["race"], r["age"]) for r in rows.values()})
  assert ds.group_names == tuple(f"{a}/{b}" for a, b in combos)
  want = {c: 0 for c in combos}
  for r in train_rows:
    want[(r["race"], r["age"])] += 1
  counts = np.bincount(ds.train.groups, minlength=len(combos))
  assert counts.tolist() == [want[c] for c in combos]
  for img, g in zip(ds.test.images, ds.test.groups):
    r = row_of(img, rows)
    assert ds.group_names[g] == f"{r['race']}/{r['age']}"


def test_an_explicit_table_and_subsets_use_only_the_rows_they_need(tmp_path):
  rows = build_folder(tmp_path / "faces", table="none")
  table = tmp_path / "elsewhere.jsonl"
  with open(table, "w") as f:
    for r in rows.values():
      f.write(json.dumps(r) + "\n")
    f.write(json.dumps({"path": "train/male/not-used.png", "race": "other"}) + "\n")
  cfg = folder_data(
    tmp_path / "faces", tmp_path / "c", group_attribute="race", attributes=str(table)
  )
  cfg.data.train_examples = 12
  validate_config(cfg)
  ds = load_dataset(cfg.data)
  assert len(ds.train) == 12 and ds.group_names == RACES  # the unused 'other' row is no group


def _rewrite(root: Path, change) -> None:
  path = root / "attributes.csv"
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  rows = change(rows)
  fields = list(rows[0]) if rows else ["path", "race"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)


def _only_in_train(rows):
  for r in rows:
    if r["path"].startswith("train/") and r["path"].endswith("000.png"):
      r["race"] = "pacific"  # a group with training images only
  return rows


BAD = [
  ("no table", None, {"group_attribute": "race"}, r"needs an attributes table.*attributes\.csv"),
  (
    "unknown column",
    None,
    {"group_attribute": "ethnicity"},
    r"'ethnicity' is not a column.*'race'",
  ),
  (
    "one unknown in a tuple",
    None,
    {"group_attribute": ("race", "sex")},
    r"'sex' is not a column",
  ),
  (
    "image without a row",
    lambda rows: rows[1:],
    {"group_attribute": "race"},
    r"1 of the 24 'train' images have no row .*train/female/img000\.png",
  ),
  (
    "empty value",
    lambda rows: [dict(r, race="" if i == 3 else r["race"]) for i, r in enumerate(rows)],
    {"group_attribute": "race"},
    r"1 'train' images have no value for 'race'",
  ),
  (
    "group without a test example",
    _only_in_train,
    {"group_attribute": "race"},
    r"'pacific' .* no test example",
  ),
  (
    "one group",
    lambda rows: [dict(r, race="asian") for r in rows],
    {"group_attribute": "race"},
    r"gives one group \('asian'\)",
  ),
  (
    "two rows for one image",
    lambda rows: rows + rows[:1],
    {"group_attribute": "race"},
    r"two rows for 'train/female/img000\.png'",
  ),
  (
    "no path column",
    lambda rows: [{"file": r["path"], "race": r["race"]} for r in rows],
    {"group_attribute": "race"},
    r"no 'path' column",
  ),
  (
    "missing explicit table",
    None,
    {"group_attribute": "race", "attributes": "/nowhere/attributes.csv"},
    r"data\.attributes='/nowhere/attributes\.csv' is not a file",
  ),
]


@pytest.mark.parametrize(("case", "change", "fields", "message"), BAD, ids=[b[0] for b in BAD])
def test_an_unusable_group_attribute_stops_before_training_and_writes_nothing(
  tmp_path, case, change, fields, message
):
  root = tmp_path / "faces"
  build_folder(root, table="none" if case == "no table" else "csv")
  if change is not None:
    _rewrite(root, change)
  cfg = folder_data(root, tmp_path / "cache", **fields)
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=message) as e:
    stages.prepare(cfg, workdir)
  assert e.value.exit_code == 2 and "\n" not in str(e.value)
  assert not workdir.exists() or not any(workdir.iterdir())
  assert not (tmp_path / "cache").exists()  # refused before any image was decoded


def test_the_digits_and_a_missing_tfds_feature_refuse_a_group_attribute(monkeypatch):
  cfg = default_config()
  cfg.data.group_attribute = "race"
  with pytest.raises(DataError, match=r"the embedded digits have no sensitive attributes"):
    load_dataset(cfg.data)

  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  monkeypatch.setattr(
    mocking,
    "_getitems",
    lambda record_keys, generator, serialized=False: [generator[k] for k in record_keys],
  )
  cfg.data.source, cfg.data.name = "tfds", "cifar10"
  cfg.data.imbalance.classes, cfg.data.imbalance.keep_fractions = (), ()
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(DataError, match=r"data\.group_attribute='race' is not a feature of TFDS"):
      load_dataset(cfg.data)


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("group_attribute", 5, r"data\.group_attribute=5 .*an attribute name, or a tuple"),
    ("group_attribute", ("race", "race"), r"distinct values \('race' is repeated\)"),
    ("group_attribute", ("race", ""), r"data\.group_attribute=\('race', ''\)"),
    ("attributes", "a.csv", r"data\.attributes='a\.csv' .*data\.source='image_folder'"),
  ],
)
def test_bad_attribute_fields_are_config_errors(field, value, message):
  cfg = default_config()
  cfg.data[field] = value
  with pytest.raises(ConfigError, match=message):
    validate_config(cfg)


def test_cli_runs_with_intersectional_groups_and_refuses_a_bad_column_in_one_line(tmp_path):
  root = tmp_path / "faces"
  build_folder(root, n_train=40, n_test=30)
  base = [
    sys.executable,
    "-m",
    "prunebias_jax.main",
    "--config",
    "configs/default.py",
    "--config.runlocal=True",
    "--config.data.source=image_folder",
    f"--config.data.dir={root}",
    f"--config.data.cache_dir={tmp_path / 'cache'}",
    "--config.data.imbalance.classes=()",
    "--config.data.imbalance.keep_fractions=()",
    "--config.data.batch_size=8",
    "--config.pruning.methods=('l1_filter',)",
    "--config.pruning.sparsities=(0.5,)",
    "--config.analysis.bootstrap_resamples=0",
  ]
  cli = lambda *extra: subprocess.run(
    base + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  bad = cli(f"--workdir={tmp_path / 'bad'}", "--config.data.group_attribute=ethnicity")
  lines = [l for l in bad.stderr.splitlines() if l.strip() and not l.startswith(("I", "W"))]
  assert bad.returncode == 2 and len(lines) == 1 and "'ethnicity'" in lines[0], bad.stderr[-2000:]
  assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())

  good = cli(f"--workdir={tmp_path / 'run'}", "--config.data.group_attribute=('race','age')")
  assert good.returncode == 0, good.stderr[-3000:]
  recs = [json.loads(l) for l in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
  assert all(r["dpd"] is not None and r["eod"] is not None for r in recs)
  run = tmp_path / "run"
  config = json.loads((run / "config.json").read_text())
  assert config["data"]["group_attribute"] == ["race", "age"]
  described = json.loads((run / "dataset.json").read_text())
  with np.load(run / "predictions.npz") as z:
    saved = {k: z[k] for k in z.keys()}
  names = described["group_names"]
  assert saved["group_names"].tolist() == names and len(names) == 12  # 3 races × 4 ages
  assert np.bincount(saved["groups"], minlength=12).tolist() == described["test_group_counts"]
  # Per-group accuracy, recomputed from the saved predictions; CIEs counted once per group.
  y, g = saved["labels"], saved["groups"]
  for i, r in enumerate(recs):
    want = [np.mean(saved["predictions"][i][g == k] == y[g == k]) for k in range(12)]
    np.testing.assert_allclose(r["per_group_accuracy"], want, atol=1e-6)
  cells = [json.loads(l) for l in (run / "cells.jsonl").read_text().splitlines()]
  for c in cells:
    assert sum(c["cie_per_group"]) == c["num_cie"] and len(c["per_group_accuracy"]) == 12
  # The audit of the run's predictions with its groups gives the run's DPD/EOD.
  report = audit(y, saved["logits"][0], {"m": saved["logits"][1:2]}, groups=g, config=None)
  cfg_analysis = report.records[0]
  assert cfg_analysis["dpd"] == recs[1]["dpd"] and cfg_analysis["eod"] == recs[1]["eod"]
  text = (run / "results.md").read_text()
  assert "## Group fairness (test set, data.group_attribute = ('race', 'age'))" in text
  assert "asian/20 (" in text and "| l1_filter | 0.5 | CE |" in text.split("## Group")[1]
  assert (run / "plots" / "group_gaps_vs_sparsity.png").stat().st_size > 0
