"""The command line: bad input ends the run before training with one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, workdir: Path | str) -> subprocess.CompletedProcess:
  cmd = [
    sys.executable,
    "-m",
    "prunebias_jax.main",
    "--config",
    "configs/default.py",
    f"--workdir={workdir}",
    *args,
  ]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
  "override,expected",
  [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.pruning.sparsities=(0.5,1.0)", "pruning.sparsities=1.0"),
    ("--config.pruning.sparsities=(-0.1,)", "pruning.sparsities=-0.1"),
    ("--config.model=resnet9000", "resnet9000"),
    ("--config.data.source=mnist_from_mars", "mnist_from_mars"),
    ("--config.pruning.methods=('l1_filter','snip')", "snip"),
    ("--config.kd.temperature=0", "kd.temperature=0"),
    ("--config.kd.temperature=-2.0", "kd.temperature=-2.0"),
    ("--config.kd.alpha=1.5", "kd.alpha=1.5"),
    ("--config.kd.alpha=banana", "banana"),
  ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, override, expected):
  proc = run_cli(override, workdir=tmp_path / "w")
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert expected in lines[0] and "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()  # nothing trained


def test_unwritable_workdir_exits_2(tmp_path):
  target = tmp_path / "file-not-dir"
  target.write_text("x")
  proc = run_cli(workdir=target / "sub")
  assert (
    proc.returncode == 2 and "workdir" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
  )


def test_bad_data_input_exits_2_before_training(tmp_path):
  root = tmp_path / "images"
  (root / "train" / "cat").mkdir(parents=True)  # no test split
  proc = run_cli(
    "--config.data.source=image_folder", f"--config.data.dir={root}", workdir=tmp_path / "w"
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "test" in lines[0] and "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_unprepared_tfds_dir_exits_2_and_says_how_to_prepare(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "prunebias_jax.main",
    "--config",
    "configs/cifar10.py",
    f"--workdir={tmp_path / 'w'}",
    f"--config.data.data_dir={tmp_path / 'empty'}",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert "prepare_data.py" in lines[0] and "cifar10" in lines[0]


def test_missing_config_file_exits_2(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "prunebias_jax.main",
    "--config",
    "configs/nope.py",
    f"--workdir={tmp_path}",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "nope.py" in proc.stderr and "Traceback" not in proc.stderr


def test_runlocal_end_to_end(tmp_path):
  proc = run_cli(
    "--config.runlocal=True", "--config.pruning.methods=('l1_filter',)", workdir=tmp_path / "w"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| l1_filter | 0.9 |" in proc.stdout  # the table is printed
  assert "stage dense" in proc.stderr and "img/s" in proc.stderr  # progress lines
  assert (tmp_path / "w" / "results.jsonl").read_text().count("\n") == 1 + 2 * 2
