"""The command line: bad input ends the run before training with one line and exit code 2."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("layout", ["no test split", "link loop"])
def test_bad_data_input_exits_2_before_training(tmp_path, layout):
  root = tmp_path / "images"
  (root / "train" / "cat").mkdir(parents=True)
  if layout == "link loop":  # an OSError deep in the listing, not a missing folder
    (root / "test").mkdir()
    os.symlink("loop", root / "train" / "loop")
  proc = run_cli(
    "--config.data.source=image_folder", f"--config.data.dir={root}", workdir=tmp_path / "w"
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  expected = "test" if layout == "no test split" else f"cannot read {root / 'train' / 'loop'}"
  assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr
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


def _immutable(path: Path) -> bool:
  """chattr +i `path` where the filesystem and the privileges allow it (then not even root
  can create files in it)."""
  done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
  return done.returncode == 0


def _shape(workdir: Path, case: str) -> str:
  """Puts the wrong thing where the run writes; returns the path the message must name."""
  w = workdir
  w.mkdir(parents=True)
  if case == "results.jsonl is a directory":
    (w / "results.jsonl").mkdir()
    return str(w / "results.jsonl")
  if case == "plots is a file":
    (w / "plots").write_text("x")
    return str(w / "plots")
  if case == "checkpoints is a file":
    (w / "checkpoints").write_text("x")
    return str(w / "checkpoints")
  if case == "a model's checkpoint is a file":
    (w / "checkpoints").mkdir()
    (w / "checkpoints" / "dense").write_text("x")
    return str(w / "checkpoints" / "dense")
  if case == "config.json is a symlink loop":
    (w / "config.json").symlink_to(w / "config.json")
    return str(w / "config.json")
  if case == "a plot is a directory":
    (w / "plots" / "cie_grid.png").mkdir(parents=True)
    return str(w / "plots" / "cie_grid.png")
  if case == "partial/ is a dangling symlink":
    (w / "checkpoints").mkdir()
    (w / "checkpoints" / "partial").symlink_to(w / "nowhere")
    return str(w / "checkpoints" / "partial")
  if case == "plots/ is immutable":
    (w / "plots").mkdir()
    if not _immutable(w / "plots"):
      pytest.skip("chattr +i is not allowed here")
    return str(w / "plots")
  raise AssertionError(case)


@pytest.mark.parametrize(
  "case",
  [
    "results.jsonl is a directory",
    "plots is a file",
    "checkpoints is a file",
    "a model's checkpoint is a file",
    "config.json is a symlink loop",
    "a plot is a directory",
    "partial/ is a dangling symlink",
    "plots/ is immutable",
  ],
)
def test_a_workdir_of_the_wrong_shape_exits_2_with_one_line_before_training(tmp_path, case):
  """Each path the run writes, in the way: exit 2, stderr exactly one line naming the path,
  no traceback, nothing trained and nothing that was there changed."""
  workdir = tmp_path / "w"
  path = _shape(workdir, case)
  before = sorted((str(p), p.is_dir()) for p in workdir.rglob("*"))
  try:
    proc = run_cli(workdir=workdir)
  finally:
    subprocess.run(["chattr", "-i", str(workdir / "plots")], capture_output=True)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: ") and path in lines[0], lines[0]
  assert sorted((str(p), p.is_dir()) for p in workdir.rglob("*")) == before


def test_only_the_closed_event_loop_noise_is_dropped(monkeypatch):
  """The unraisable-exception filter main installs drops exactly Orbax's closed-loop callback
  error (printed mid-line under load after a failed checkpoint read) and forwards the rest."""
  import types

  from prunebias_jax import main

  seen = []
  monkeypatch.setattr(sys, "__unraisablehook__", seen.append)

  def unraisable(error: BaseException) -> types.SimpleNamespace:
    return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None)

  main._closed_loop_noise(unraisable(RuntimeError("Event loop is closed")))
  assert seen == []
  for error in (RuntimeError("Event loop is closed for good"), ValueError("Event loop is closed")):
    main._closed_loop_noise(unraisable(error))
  forwarded = [u.exc_value.args[0] for u in seen]
  assert forwarded == ["Event loop is closed for good", "Event loop is closed"]


@pytest.mark.parametrize(
  "body,expected",
  [
    ("def get_config():\n  return None\n", "get_config() returned NoneType None"),
    ("import sys\ndef get_config():\n  sys.exit(0)\n", "line 3: SystemExit: 0"),
  ],
)
def test_config_file_that_returns_none_or_exits_is_one_line_exit_2(tmp_path, body, expected):
  """Through the real command: absl adds a 'Logging before flag parsing' line to its own
  warning about None, and a sys.exit(0) in the file used to end the run silently with 0."""
  path = tmp_path / "my_config.py"
  path.write_text(body)
  cmd = [sys.executable, "-m", "prunebias_jax.main", f"--config={path}", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"error: cannot load --config {path}") and expected in lines[0]
