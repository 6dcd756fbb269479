"""Shared fixtures. Tests run on the CPU with the default single device."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `configs.default` imports as a module

# One persistent XLA compilation cache for the session, set before anything imports jax: this
# process and every run the tests start (the CLI, kill/resume, parallel and multi-host tests;
# they inherit the environment) compile the same train, eval and metric programs many times.
# A cached executable is the one the compiler produced, so no result changes; the directory is
# new per session (and removed after it), so no session reads another's entries. A cache the
# caller already set up is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="prunebias-jax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  # JAX's default (1 s) would skip most of the small CPU programs that dominate start-up here.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  _owner = os.getpid()  # a forked child (mutmut's workers) must not remove the shared cache
  atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache, ignore_errors=True))


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


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
  """The 2-process, 4-device and 1-device CLI runs that test_multihost.py and test_parallel.py
  both check (tests/_shared_runs.py), made once per session."""
  from _shared_runs import make_shared_runs

  return make_shared_runs(tmp_path_factory.mktemp("shared_runs"))
