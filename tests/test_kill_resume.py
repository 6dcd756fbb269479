"""Kill the command with SIGKILL at several points, rerun it, and get byte for byte the results
of a run that was never interrupted; no half-written file is ever visible in between.

The kills inside the run use the crash points of `prunebias_jax.faults` (the process SIGKILLs
itself, like a preempted VM); one kill comes from outside, while dense training is running.
"""

from __future__ import annotations

import json
import os
import re
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


def _run(workdir: Path, kill_at: str | None = None, *extra: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PRUNEBIAS_JAX_KILL_AT"}
  if kill_at:
    env["PRUNEBIAS_JAX_KILL_AT"] = kill_at
  return subprocess.run(
    _command(workdir) + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
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


def _signal_during_dense_training(workdir: Path, sig: int) -> tuple[int, list[str]]:
  """Runs the command, sends `sig` once the dense model is past step 7 (after its first
  mid-stage checkpoint); returns (exit status, stderr lines)."""
  proc = subprocess.Popen(
    _command(workdir),
    cwd=ROOT,
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
    env={k: v for k, v in os.environ.items() if k != "PRUNEBIAS_JAX_KILL_AT"},
    # A shell starts background jobs with SIGINT ignored; a terminal's Ctrl-C is not.
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  deadline = time.monotonic() + 600
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if " dense step " in line and int(line.split(" dense step ")[1].split("/")[0]) >= 7:
      proc.send_signal(sig)
      break
    assert time.monotonic() < deadline
  lines += proc.stderr.read().splitlines(keepends=True)
  proc.wait(timeout=60)
  proc.stderr.close()
  return proc.returncode, lines


def test_killed_anywhere_and_rerun_gives_the_uninterrupted_results(reference, tmp_path):
  workdir = tmp_path / "w"
  # 1. From outside, while the dense model trains (after its first mid-stage checkpoint).
  returncode, _ = _signal_during_dense_training(workdir, signal.SIGKILL)
  assert returncode == -signal.SIGKILL
  assert (workdir / "checkpoints" / "partial" / "dense").is_dir()
  _assert_nothing_half_written(workdir)

  # 2.-5. The run kills itself: during dense training again (resumed from the checkpoint of
  # step 5 or later), between the two fine-tunings, while computing metrics, and between
  # writing results.md's temporary copy and renaming it.
  # compare#2: the KD student's metrics (the dense records are already in cells/dense.npz, and
  # the CE student's are the first computed by that run).
  points = ["dense:step23", "saved:l1_filter_s0.5_ce_seed0", "compare#2", "write:results.md"]
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
  assert list(workdir.glob(".results.md~*.tmp"))  # its temporary copy was left behind

  final = _run(workdir)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "a temporary file of an interrupted run" in final.stderr
  assert not list(workdir.rglob(".*.tmp"))
  _assert_nothing_half_written(workdir)
  assert not any((workdir / "checkpoints" / "partial").iterdir())
  for name in RESULTS:
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), name


def test_the_scanned_loop_killed_mid_chunk_reruns_to_its_uninterrupted_results(tmp_path):
  """train_loop=scan (chunks of 16 steps, cut by the saves every 5): SIGKILLed mid-chunk in
  the dense stage (step 7 of the chunk 6-10) and in the KD student's (step 9), each rerun
  resumes from the last save; the end is byte for byte an uninterrupted scanned run's. (Its
  own reference: on the CPU a scanned convolution rounds differently, jax-ml/jax#12868.)"""
  scan = "--config.train_loop=scan"
  reference = _run(tmp_path / "ref", None, scan)
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert "dense: 32 steps in scanned chunks of 16" in reference.stderr
  workdir = tmp_path / "w"
  logs = []
  for point in ("dense:step7", "l1_filter_s0.5_kd_seed0:step9"):
    proc = _run(workdir, point, scan)
    assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
    logs.append(proc.stderr)
    _assert_nothing_half_written(workdir)
  assert "dense: resumed from the mid-stage checkpoint at step 5/32" in logs[1]
  final = _run(workdir, None, scan)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "l1_filter_s0.5_kd_seed0: resumed from the mid-stage checkpoint at step 5" in final.stderr
  for name in RESULTS:
    assert (workdir / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


_INFO_OR_WARNING = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d")  # absl's log line prefix


def _error_lines(stderr: str) -> list[str]:
  """stderr without absl's INFO/WARNING log lines: the outcome a user reads (tracebacks and
  ERROR records included, so they count against the one line)."""
  return [line for line in stderr.splitlines() if line.strip() and not _INFO_OR_WARNING.match(line)]


def test_ctrl_c_is_one_line_and_a_rerun_resumes(reference, tmp_path):
  """SIGINT (Ctrl-C) during dense training: exit 130, one line naming the stage, the step and
  where a rerun resumes; no traceback; the rerun ends with the uninterrupted results."""
  workdir = tmp_path / "w"
  returncode, lines = _signal_during_dense_training(workdir, signal.SIGINT)
  assert returncode == 130, "".join(lines)[-3000:]
  outcome = _error_lines("".join(lines))
  assert len(outcome) == 1, outcome
  # The signal lands after step 7 was logged; how much later depends on the machine's load:
  # the resume point is the last mid-stage checkpoint (every 5 steps) before the step.
  m = re.fullmatch(
    r"error: interrupted at dense step (\d+)/32; rerun the same command to resume "
    r"\(from step (\d+)\)",
    outcome[0],
  )
  assert m, outcome
  step, saved = int(m.group(1)), int(m.group(2))
  # (The signal may land between a step and its save: then the previous one.)
  assert step >= 7 and saved % 5 == 0 and step - 5 <= saved <= step, outcome
  _assert_nothing_half_written(workdir)
  final = _run(workdir)
  assert final.returncode == 0, final.stderr[-3000:]
  for name in RESULTS:
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), name


def _tiny_filesystem(path: Path, size: str) -> bool:
  """Mounts a tmpfs of `size` at `path` where the machine allows it (root in a container
  with CAP_SYS_ADMIN); False otherwise."""
  path.mkdir(parents=True, exist_ok=True)
  try:
    done = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
      capture_output=True,
      timeout=30,
    )
  except (OSError, subprocess.TimeoutExpired):
    return False
  return done.returncode == 0


def test_disk_full_is_one_line_and_a_rerun_after_freeing_space_resumes(reference, tmp_path):
  """A filesystem of 2 MiB fills during the dense model's mid-stage checkpoints (each needs
  about 1.1 MiB): exit 4, one line naming the path and the free space, nothing half-written;
  the same workdir with room resumes from the last one saved to the uninterrupted results."""
  mount = tmp_path / "tiny"
  if not _tiny_filesystem(mount, "2m"):
    pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
  try:
    proc = _run(mount / "w")
    assert proc.returncode == 4, proc.stderr[-3000:]
    outcome = _error_lines(proc.stderr)
    assert len(outcome) == 1, outcome
    assert outcome[0].startswith("error: disk full writing ") and "MiB free" in outcome[0]
    assert str(mount / "w") in outcome[0]
    _assert_nothing_half_written(mount / "w")
    subprocess.run(["cp", "-a", str(mount / "w"), str(tmp_path / "w")], check=True)
  finally:
    subprocess.run(["umount", str(mount)], capture_output=True)
  final = _run(tmp_path / "w")
  assert final.returncode == 0, final.stderr[-3000:]
  assert "dense: resumed from the mid-stage checkpoint at step " in final.stderr
  for name in RESULTS:
    assert (tmp_path / "w" / name).read_bytes() == (reference / name).read_bytes(), name
