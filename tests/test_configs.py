"""Every config file loads, validates, carries its command, and its runlocal variant is valid;
the CIFAR-10 config runs end to end (shrunk) on the real image folder when it is present."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from prunebias_jax import experiment
from prunebias_jax.config import resolve_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").rglob("*.py") if not p.name.startswith("_"))
CIFAR10_DIR = ROOT.parent / "shared" / "data" / "cifar10"


def load(path: Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_is_valid_and_documents_its_command(path):
  module = load(path)
  config = module.get_config()
  validate_config(resolve_config(config))
  local = config.copy_and_resolve_references()
  local.runlocal = True
  validate_config(resolve_config(local))
  assert "python -m prunebias_jax.main --config configs/" in module.__doc__


def test_runlocal_keeps_explicit_overrides():
  config = load(ROOT / "configs" / "cifar10.py").get_config()
  config.runlocal = True
  config.dense.epochs = 9
  resolved = resolve_config(config, explicit_keys={"dense.epochs"})
  assert resolved.dense.epochs == 9 and resolved.data.train_examples == 5000
  assert resolve_config(config).dense.epochs == 6


def test_paper_imbalanced_config_matches_paper():
  config = load(ROOT / "configs" / "paper" / "cifar100_imbalanced.py").get_config()
  imb = config.data.imbalance
  keep = dict(zip(imb.classes, imb.keep_fractions))
  assert len(keep) == 15 and keep[83] == 0.1 and keep[17] == 0.2 and keep[6] == 0.5
  # The paper: 5·50 + 5·100 + 5·250 + 85·500 = 44,500 training images remain.
  assert sum(round(500 * keep.get(c, 1.0)) for c in range(100)) == 44_500
  assert config.model == "resnet32x4" and config.kd.temperature == 4.0 and config.kd.alpha == 0.9
  assert (
    config.finetune.optim.decay_epochs == (150, 180, 210) and config.pruning.schedule == "gradual"
  )


@pytest.mark.skipif(
  not CIFAR10_DIR.is_dir(), reason=f"real CIFAR-10 image folder not present at {CIFAR10_DIR}"
)
def test_cifar10_config_end_to_end_on_the_real_image_folder(tmp_path):
  config = load(ROOT / "configs" / "cifar10.py").get_config()
  config.data.source = "image_folder"
  config.data.dir = str(CIFAR10_DIR)
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.train_examples = 640
  config.data.test_examples = 300
  config.data.batch_size = 64
  config.dense.epochs = 1
  config.finetune.epochs = 2
  config.pruning.sparsities = (0.5,)
  config.pruning.frequency_epochs = 1  # gradual: 10% at epoch 1, 50% at epoch 2
  config.pruning.end_fraction = 1.0  # (the ramp spans both epochs)
  config.seeds = (0,)
  records = experiment.run(config, tmp_path / "run")
  # The control cell (unpruned, CE and KD) comes before the pruned ones.
  assert [r["method"] for r in records] == ["dense", "none", "none", "l1_filter", "l1_filter"]
  assert records[0]["num_test_examples"] == 300
  for r in records[1:]:
    assert r["realized_sparsity"] == pytest.approx(r["target_sparsity"], abs=1e-6)
    target = 0.0 if r["method"] == "none" else 0.5
    assert r["target_sparsity"] == pytest.approx(target, abs=0.02)
  ds = json.loads((tmp_path / "run" / "dataset.json").read_text())
  assert ds["class_names"][:3] == ["airplane", "automobile", "bird"]
  assert ds["finetune_train_class_counts"][2] < ds["teacher_train_class_counts"][2]  # bird kept 10%
