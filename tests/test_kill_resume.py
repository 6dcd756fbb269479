"""Kill the command with SIGKILL at several points, rerun it, and get byte for byte the results
of a run that was never interrupted; no half-written file is ever visible in between.

The kills inside the run use the crash points of `prunebias_jax.faults` (the process SIGKILLs
itself, like a preempted VM); one kill comes from outside, while dense training is running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
  "--config",
  "configs/default.py",
  "--config.dense.epochs=2",
  "--config.finetune.epochs=1",
  "--config.pruning.methods=('l1_filter',)",
  "--config.pruning.sparsities=(0.5,)",
  "--config.checkpoint.every_steps=5",
  "--config.progress_seconds=0.05",
  "--config.analysis.bootstrap_resamples=0",
  "--config.analysis.correlation_resamples=20",
  "--config.analysis.permutations=50",
]
RESULTS = ("results.jsonl", "cells.jsonl", "correlations.jsonl")


def _command(workdir: Path) -> list[str]:
  return [sys.executable, "-m", "prunebias_jax.main", *ARGS, f"--workdir={workdir}"]


def _run(workdir: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PRUNEBIAS_JAX_KILL_AT"}
  if kill_at:
    env["PRUNEBIAS_JAX_KILL_AT"] = kill_at
  return subprocess.run(
    _command(workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )


def _assert_nothing_half_written(workdir: Path) -> None:
  """Every file of record that exists is complete; temporaries are dot-files only."""
  for path in workdir.rglob("*"):
    if "checkpoints" in path.parts or not path.is_file():
      continue
    if path.name.startswith("."):
      assert path.name.endswith(".tmp"), path  # write_atomic's temporary, never read
      continue
    if path.suffix == ".jsonl":
      text = path.read_text()
      for line in text.splitlines():
        json.loads(line)
      assert text == "" or text.endswith("\n")  # correlations.jsonl is empty with a single cell
    elif path.suffix == ".json":
      json.loads(path.read_text())
    elif path.suffix == ".png":
      with Image.open(path) as im:
        im.verify()
    elif path.suffix == ".md":
      assert path.read_text().endswith("\n")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "on disk (checkpoints" in proc.stderr  # the workdir size is printed at the end
  assert not (workdir / "checkpoints" / "partial").exists() or not any(
    (workdir / "checkpoints" / "partial").iterdir()
  )
  return workdir


def test_same_config_and_seed_give_byte_identical_results(reference, tmp_path):
  proc = _run(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in RESULTS:
    assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name


def test_killed_anywhere_and_rerun_gives_the_uninterrupted_results(reference, tmp_path):
  workdir = tmp_path / "w"
  # 1. From outside, while the dense model trains (after its first mid-stage checkpoint).
  proc = subprocess.Popen(
    _command(workdir),
    cwd=ROOT,
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
    env={k: v for k, v in os.environ.items() if k != "PRUNEBIAS_JAX_KILL_AT"},
  )
  deadline = time.monotonic() + 600
  for line in proc.stderr:
    if " dense step " in line and int(line.split(" dense step ")[1].split("/")[0]) >= 7:
      proc.send_signal(signal.SIGKILL)
      break
    assert time.monotonic() < deadline
  proc.wait(timeout=60)
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  assert (workdir / "checkpoints" / "partial" / "dense").is_dir()
  _assert_nothing_half_written(workdir)

  # 2.-5. The run kills itself: during dense training again (resumed from the checkpoint of
  # step 5 or later), between the two fine-tunings, while computing metrics, and between
  # writing results.md's temporary copy and renaming it.
  points = ["dense:step23", "saved:l1_filter_s0.5_ce_seed0", "compare#3", "write:results.md"]
  logs = []
  for point in points:
    proc = _run(workdir, kill_at=point)
    logs.append(proc.stderr)
    assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
    _assert_nothing_half_written(workdir)
  assert "dense: resumed from the mid-stage checkpoint at step" in logs[0]
  assert "restored" in logs[2] and "l1_filter_s0.5_ce_seed0" in logs[2]  # no fine-tuning was redone
  # The kill between saving that model and deleting its mid-stage checkpoints left them; the
  # next run restored the model and deleted them.
  assert not (workdir / "checkpoints" / "partial" / "l1_filter_s0.5_ce_seed0").exists()
  assert not (workdir / "results.md").exists()  # killed before the rename: no partial results.md
  assert list(workdir.glob(".results.md.*.tmp"))  # its temporary copy was left behind

  final = _run(workdir)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "a temporary file of an interrupted run" in final.stderr
  assert not list(workdir.rglob(".*.tmp"))
  _assert_nothing_half_written(workdir)
  assert not any((workdir / "checkpoints" / "partial").iterdir())
  for name in RESULTS:
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), name
