"""The command line as the tests drive it: a run (optionally SIGKILLed at a crash point), a
kill-then-resume check against an uninterrupted run, and a bad value that must end in one line
before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("results.jsonl", "cells.jsonl", "correlations.jsonl", "results.md")


def run_main(
  args: Sequence[str],
  workdir: Path,
  kill_at: str | None = None,
  env: dict | None = None,
  timeout: int = 1200,
) -> subprocess.CompletedProcess:
  """`python -m prunebias_jax.main *args --workdir=workdir`; `kill_at` ('<stage>:step<n>',
  `faults.crash_point`) SIGKILLs it there."""
  env = {**{k: v for k, v in os.environ.items() if k != "PRUNEBIAS_JAX_KILL_AT"}, **(env or {})}
  if kill_at:
    env["PRUNEBIAS_JAX_KILL_AT"] = kill_at
  cmd = [sys.executable, "-m", "prunebias_jax.main", *args, f"--workdir={workdir}"]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_kill_resumes_to_the_same_bytes(
  args: Sequence[str], workdir: Path, stage: str, reference: Path, kill_step: int = 8
) -> None:
  """SIGKILL `stage` at step `kill_step` (after a mid-stage checkpoint at step 5: the args set
  checkpoint.every_steps=5), rerun, and compare every result file with `reference`'s."""
  killed = run_main(args, workdir, kill_at=f"{stage}:step{kill_step}")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert (workdir / "checkpoints" / "partial" / stage).is_dir()
  rerun = run_main(args, workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"{stage}: resumed from the mid-stage checkpoint at step 5/" in rerun.stderr
  for name in RESULTS:
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), name


def one_line_error(args: Sequence[str], workdir: Path) -> str:
  """The one stderr line of a run refused for bad input (exit code 2, nothing trained)."""
  proc = run_main(args, workdir, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, lines
  assert not (workdir / "checkpoints").exists()
  return lines[0]


def finished_run(args: Sequence[str], workdir: Path) -> Path:
  """A run that must succeed; returns its workdir."""
  proc = run_main(args, workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]
