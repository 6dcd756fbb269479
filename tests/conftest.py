"""Shared fixtures. Tests run on the CPU with the default single device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `configs.default` imports as a module


@pytest.fixture()
def tiny_config():
  """The default config shrunk to seconds: 2 methods × 1 sparsity, 1–2 epochs."""
  from configs.default import get_config

  cfg = get_config()
  cfg.dense.epochs = 2
  cfg.finetune.epochs = 1
  cfg.pruning.methods = ("l1_filter", "global_magnitude")
  cfg.pruning.sparsities = (0.7,)
  cfg.progress_seconds = 1000.0
  return cfg
