"""Multi-host: 2 processes × 2 CPU devices joined by `jax.distributed` over loopback compute the
run of 1 process × 4 CPU devices, and only process 0 writes the files of record.

Each process is a real CLI run (`python -m prunebias_jax.main ... --config.distributed=True`);
the device count per process is fixed at JAX start-up, hence subprocesses throughout.

The 2-process run trains everything from scratch; the 1-process run then restores its dense
teacher and fine-tunes the same pruned teacher, so the comparison checks the multi-host
training, pruning, CE/KD fine-tuning, evaluation and checkpoints to float tolerance. (Trained
separately, 48 dense steps amplify float-order differences chaotically: even 1 vs 4 devices in
ONE process differ by up to 9/719 in a fine-tuned model's accuracy on this config.
`scripts/multihost_smoke.sh` prints that fully independent comparison for humans.)
The runs are made once per session (tests/_shared_runs.py): test_parallel.py checks the same
1-process × 4-device run against 1 device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _shared_runs import ROOT, cli, env, free_port, multi_args, run_pair, run_processes


@pytest.fixture(scope="module")
def runs(shared_runs):
  """(1-process workdir, 2-process workdir, [process 0 log, process 1 log], 1-process log)."""
  if shared_runs.skip:
    pytest.skip(shared_runs.skip)
  return shared_runs.four, shared_runs.multi, shared_runs.multi_logs, shared_runs.four_log


CELLS = ["l1_filter_s0.5_ce_seed0", "l1_filter_s0.5_kd_seed0"]  # the 2-process run's students


def _records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]


def _files(workdir: Path) -> list[str]:
  """The run files, checkpoints and TensorBoard events aside (event file names carry the time
  and host; the 1-process runs restore the teacher, so they log no dense stage), and the
  per-unit record files and locks, named by the units and processes of each run (checked in
  test_only_process_0_writes_files_of_record)."""
  skip = {"checkpoints", "tensorboard", "cells", "locks"}
  return sorted(
    str(p.relative_to(workdir))
    for p in workdir.rglob("*")
    if p.is_file() and not skip & set(p.relative_to(workdir).parts)
  )


def test_two_processes_join_one_mesh(runs):
  _, _, (log0, log1), single_log = runs
  for i, log in enumerate((log0, log1)):
    assert f"distributed: process {i} of 2; 2 local / 4 global cpu devices" in log, log[-2000:]
    assert "devices: 4 × cpu over 2 process(es)" in log
    assert "stage dense: training small_cnn from scratch" in log and "dense step " in log
    for cell in CELLS:  # both trained
      assert f"{cell} step " in log, cell
  assert (
    "devices: 4 × cpu over 1 process(es)" in single_log and "stage dense: restored" in single_log
  )


def test_two_processes_match_one_process(runs):
  single, multi, _, _ = runs
  # the 1-process run also pruned with 'random' (for test_parallel.py): its other cells
  a_records = [r for r in _records(single) if r["method"] in ("dense", "l1_filter")]
  b_records = _records(multi)
  assert len(_records(single)) == 5 and len(a_records) == len(b_records) == 3
  for a, b in zip(a_records, b_records):
    key = (a["method"], a["sparsity"], a["kd"], a["seed"])
    assert key == (b["method"], b["sparsity"], b["kd"], b["seed"])
    assert a.keys() == b.keys(), key
    assert a["num_test_examples"] == b["num_test_examples"] == 719, key
    assert abs(a["accuracy"] - b["accuracy"]) <= 3 / 719, (key, a["accuracy"], b["accuracy"])
    assert abs(a["cka"] - b["cka"]) <= 5e-3, (key, a["cka"], b["cka"])
    assert a["realized_sparsity"] == b["realized_sparsity"], key
    assert a["realized_sparsity_per_layer"] == b["realized_sparsity_per_layer"], key
    assert a.get("target_sparsity") == b.get("target_sparsity"), key
    np.testing.assert_allclose(a["fpr"], b["fpr"], atol=3 / 719, err_msg=str(key))
    np.testing.assert_allclose(a["fnr"], b["fnr"], atol=3 / 70, err_msg=str(key))
  # The dense record evaluates the very same teacher: only float summation order could differ.
  assert a_records[0]["accuracy"] == b_records[0]["accuracy"]
  assert abs(a_records[0]["cka"] - b_records[0]["cka"]) <= 1e-5


def test_only_process_0_writes_files_of_record(runs):
  single, multi, (log0, log1), _ = runs
  assert _files(multi) == _files(
    single
  )  # results, cells, config, dataset, timings, results.md, plots
  assert "results.jsonl" in _files(multi) and any(f.startswith("plots/") for f in _files(multi))
  # No temp file of an interrupted or concurrent write, nor an unfinished Orbax checkpoint.
  leftovers = [
    str(p)
    for p in multi.rglob("*")
    if p.name.endswith(".tmp") or ".write-check." in p.name or "orbax-checkpoint-tmp" in p.name
  ]
  assert not leftovers, leftovers
  # One writer of the training curves too: one event file per model, rows not doubled.
  events = sorted(p.parent.name for p in (multi / "tensorboard").rglob("events.out.tfevents.*"))
  assert events == sorted(set(events)) and "dense_seed0" in events, events
  rows = (multi / "metrics.jsonl").read_text().splitlines()
  assert len(rows) == len(set(rows)) > 0
  lines = (multi / "results.jsonl").read_text().splitlines()
  assert len(lines) == len(set(lines)) == 3  # one writer: no duplicated or interleaved records
  # write_results prints the table: process 0 did, process 1 did not.
  assert "| method | sparsity |" in log0 and "| method | sparsity |" not in log1
  for name in ("dense", *CELLS):
    steps = sorted(p.name for p in (multi / "checkpoints" / name).iterdir() if p.is_dir())
    # one finished checkpoint from the 2-process save, at the step the 1-process run saved
    assert len(steps) == 1 and steps == sorted(
      p.name for p in (single / "checkpoints" / name).iterdir()
    ), steps
  # One record file per unit, one liveness lock per process, one provenance line per stage.
  cells = sorted(p.name for p in (multi / "cells").iterdir())
  assert cells == sorted(f"{n}.npz" for n in ("dense", *CELLS)), cells
  assert len(list((multi / "locks" / "workers").iterdir())) == 2
  stages = [json.loads(l)["stage"] for l in (multi / "provenance.jsonl").read_text().splitlines()]
  assert sorted(stages) == sorted(["dense", *CELLS, "report"]), stages
  config = json.loads((multi / "config.json").read_text())
  assert config["num_processes"] == 2 and config["distributed"] is True


def test_rerun_restores_every_model(runs, tmp_path):
  """Also the persistent compilation cache's exception: with the session's cache warm from
  the first 2-process run, jax 0.12.1's processes hung in the evaluation's first collective
  (measured: 2 of 2 reruns by hand with a warm cache, and in CI); multi-process CPU runs
  therefore skip the cache."""
  _, multi, _, _ = runs
  again = tmp_path / "again"
  shutil.copytree(multi, again)
  shutil.rmtree(again / "cells")  # without the finished cells' records, every model is restored
  codes, text = run_pair(again, [tmp_path / f"proc{i}.log" for i in range(2)])
  assert codes == [0, 0], (
    f"exit codes {codes}\n--- proc0\n{text[0][-1500:]}\n--- proc1\n{text[1][-1500:]}"
  )
  for log in text:
    assert "stage dense: restored" in log and "from scratch" not in log and "seed0 step " not in log
    assert "compilation cache: not used by a multi-process CPU run" in log
  assert (again / "results.jsonl").read_text() == (multi / "results.jsonl").read_text()


def test_unreachable_coordinator_exits_2_with_one_line(tmp_path):
  port = free_port()  # nobody listens: process 0 never started
  proc = subprocess.run(
    cli(tmp_path / "w", *multi_args(port, 1)),
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=env(2, PRUNEBIAS_DISTRIBUTED_TIMEOUT="3"),
    timeout=120,
  )
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("I")]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error:") and f"127.0.0.1:{port}" in lines[0], (
    proc.stderr
  )
  assert "Traceback" not in proc.stderr and not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize(
  "override,expected",
  [
    ("--config.process_id=2", "config.process_id=2"),
    ("--config.coordinator_address=localhost", "config.coordinator_address='localhost'"),
  ],
)
def test_bad_distributed_settings_exit_2(tmp_path, override, expected):
  key = override.split("=", 1)[0]  # in place of multi_args' value (the CLI refuses a repeat)
  good = [a for a in multi_args(free_port(), 0) if not a.startswith(key + "=")]
  cmd = cli(tmp_path / "w", *good, override)
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(1), timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]


def test_when_to_initialise():
  from ml_collections import ConfigDict

  from prunebias_jax.distributed import on_tpu, wanted

  auto, on, off = (ConfigDict({"distributed": v}) for v in (None, True, False))
  cpu = {"JAX_PLATFORMS": "cpu"}
  assert wanted(auto, cpu) == (
    False,
    "config.distributed=None and no TPU or JAX_COORDINATOR_ADDRESS",
  )
  assert wanted(on, cpu)[0] and not wanted(off, {"TPU_WORKER_HOSTNAMES": "a,b"})[0]
  assert wanted(auto, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})[0]
  assert wanted(auto, {"TPU_WORKER_HOSTNAMES": "t0,t1", "TPU_ACCELERATOR_TYPE": "v4-16"})[0]
  assert on_tpu({"TPU_ACCELERATOR_TYPE": "v5litepod-16"})
  assert not on_tpu({"TPU_ACCELERATOR_TYPE": "v4-16", "JAX_PLATFORMS": "cpu"})  # forced off TPU


@pytest.mark.parametrize("setting", [None, False])
def test_multi_process_settings_of_a_single_process_run_are_refused_not_ignored(setting):
  """num_processes/process_id/coordinator_address only mean something in a multi-process run:
  set without one (config.distributed off or automatic and nothing to detect) they are refused
  before JAX starts, and a bad value is refused even then."""
  from ml_collections import ConfigDict

  from prunebias_jax.config import ConfigError
  from prunebias_jax.distributed import maybe_initialize

  base = {"distributed": setting, "coordinator_address": None, "process_id": None}
  with pytest.raises(ConfigError, match=r"config.num_processes=2 set, but this run is single"):
    maybe_initialize(ConfigDict({**base, "num_processes": 2}))
  with pytest.raises(ConfigError, match=r"config.num_processes=-1 is not allowed"):
    maybe_initialize(ConfigDict({**base, "num_processes": -1}))
  assert maybe_initialize(ConfigDict({**base, "num_processes": None})) is False


def test_the_scanned_loop_on_two_processes_equals_their_per_step_loop(shared_runs, tmp_path):
  """train_loop=scan across 2 processes × 2 devices (the split and each epoch's indices put
  on the devices from each process's own copy, batches gathered and sharded in the chunk):
  the same final state, bit for bit, as the per-step loop of the same processes (a model
  XLA:CPU compiles alike in and out of a loop)."""
  if shared_runs.skip:
    pytest.skip(shared_runs.skip)
  port, out = free_port(), tmp_path / "out.json"
  script = str(ROOT / "tests" / "_scan_multihost.py")
  cmds = [[sys.executable, script, f"127.0.0.1:{port}", str(i), str(out)] for i in range(2)]
  logs = [tmp_path / f"proc{i}.log" for i in range(2)]
  codes = run_processes(cmds, env(2, PYTHONPATH=str(ROOT)), logs, timeout=300)
  assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
  result = json.loads(out.read_text())
  assert result["devices"] == 4 and result["processes"] == 2 and result["steps"] == 24
  assert result["equal"], result
