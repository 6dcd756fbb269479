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
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# every_steps=4: the training stages also write (and discard) mid-stage checkpoints across
# processes.
ARGS = [
  "--config",
  "configs/default.py",
  "--config.runlocal=True",
  "--config.pruning.methods=('l1_filter',)",
  "--config.pruning.sparsities=(0.5,)",
  "--config.checkpoint.every_steps=4",
]
TIMEOUT_S = 600  # per run; both processes of a pair share it
# jaxlib builds without multi-process CPU collectives say one of these.
UNSUPPORTED = (
  "Multiprocess computations aren't implemented on the CPU backend",
  "UNIMPLEMENTED",
  "collectives are not supported",
  "Unknown CPU collectives implementation",
)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {
    k: v
    for k, v in os.environ.items()
    if k
    not in (
      "JAX_COORDINATOR_ADDRESS",
      "JAX_NUM_PROCESSES",
      "JAX_PROCESS_ID",
      "JAX_LOCAL_DEVICE_IDS",
    )
  }
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    **extra,
  )
  return env


def _multi_args(port: int, process_id: int, num_processes: int = 2) -> list[str]:
  return [
    "--config.distributed=True",
    f"--config.coordinator_address=127.0.0.1:{port}",
    f"--config.num_processes={num_processes}",
    f"--config.process_id={process_id}",
  ]


def _run_processes(
  cmds: list[list[str]], env: dict[str, str], logs: list[Path], timeout: float = TIMEOUT_S
) -> list[int]:
  """Starts every command at once (output to its log file) and waits for all of them; on a
  timeout or any error, kills the ones still running. Returns the exit codes."""
  procs = []
  try:
    for cmd, log in zip(cmds, logs):
      with open(log, "w") as f:
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
      codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    return codes
  except subprocess.TimeoutExpired:
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
    pytest.fail(f"multi-process run did not finish within {timeout:.0f} s\n{tails}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _cli(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "prunebias_jax.main", *ARGS, f"--workdir={workdir}", *extra]


PROBE = """
import sys, jax, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), cluster_detection_method="deactivate")
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("d",), devices=jax.devices())
x = jax.make_array_from_process_local_data(
  NamedSharding(mesh, P("d")), np.ones(2, np.float32), (4,)
)
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
assert float(total) == 4.0, float(total)
print("PROBE OK", jax.process_index(), jax.device_count())
"""


def _check_cpu_collectives(tmp: Path) -> None:
  """Skips the module when this jaxlib cannot run cross-process CPU collectives."""
  port = _free_port()
  logs = [tmp / f"probe{i}.log" for i in range(2)]
  cmds = [[sys.executable, "-c", PROBE, f"127.0.0.1:{port}", str(i)] for i in range(2)]
  codes = _run_processes(cmds, _env(2), logs, timeout=180)
  out = "\n".join(log.read_text() for log in logs)
  if codes != [0, 0]:
    for marker in UNSUPPORTED:
      if marker in out:
        line = next(l for l in out.splitlines() if marker in l).strip()
        pytest.skip(f"multi-process CPU collectives are not supported by this jaxlib: {line}")
    pytest.fail(f"2-process CPU probe failed (exit codes {codes}):\n{out[-3000:]}")


def _run_pair(workdir: Path, logs: list[Path]) -> tuple[list[int], list[str]]:
  port = _free_port()
  codes = _run_processes([_cli(workdir, *_multi_args(port, i)) for i in range(2)], _env(2), logs)
  return codes, [log.read_text() for log in logs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(1-process workdir, 2-process workdir, [process 0 log, process 1 log], 1-process log)."""
  tmp = tmp_path_factory.mktemp("multihost")
  _check_cpu_collectives(tmp)

  multi = tmp / "multi"
  codes, text = _run_pair(multi, [tmp / f"proc{i}.log" for i in range(2)])
  assert codes == [0, 0], (
    f"exit codes {codes}\n--- proc0\n{text[0][-3000:]}\n--- proc1\n{text[1][-3000:]}"
  )

  single = tmp / "single"
  # The same teacher for both (see the module docstring): the 1-process run restores it.
  shutil.copytree(multi / "checkpoints" / "dense", single / "checkpoints" / "dense")
  codes = _run_processes([_cli(single)], _env(4), [tmp / "single.log"])
  single_log = (tmp / "single.log").read_text()
  assert codes == [0], single_log[-3000:]
  return single, multi, text, single_log


def _records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]


def _files(workdir: Path) -> list[str]:
  return sorted(
    str(p.relative_to(workdir))
    for p in workdir.rglob("*")
    if p.is_file() and "checkpoints" not in p.relative_to(workdir).parts
  )


def test_two_processes_join_one_mesh(runs):
  _, _, (log0, log1), single_log = runs
  for i, log in enumerate((log0, log1)):
    assert f"distributed: process {i} of 2; 2 local / 4 global cpu devices" in log, log[-2000:]
    assert "devices: 4 × cpu over 2 process(es)" in log
    assert "stage dense: training small_cnn from scratch" in log and "dense step " in log
    assert (
      "l1_filter_s0.5_ce_seed0 step " in log and "l1_filter_s0.5_kd_seed0 step " in log
    )  # both trained
  assert (
    "devices: 4 × cpu over 1 process(es)" in single_log and "stage dense: restored" in single_log
  )


def test_two_processes_match_one_process(runs):
  single, multi, _, _ = runs
  a_records, b_records = _records(single), _records(multi)
  assert len(a_records) == len(b_records) == 3  # dense + l1_filter 0.5 × (CE, KD)
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
  lines = (multi / "results.jsonl").read_text().splitlines()
  assert len(lines) == len(set(lines)) == 3  # one writer: no duplicated or interleaved records
  # write_results prints the table: process 0 did, process 1 did not.
  assert "| method | sparsity |" in log0 and "| method | sparsity |" not in log1
  for name in ("dense", "l1_filter_s0.5_ce_seed0", "l1_filter_s0.5_kd_seed0"):
    steps = sorted(p.name for p in (multi / "checkpoints" / name).iterdir() if p.is_dir())
    # one finished checkpoint from the 2-process save, at the step the 1-process run saved
    assert len(steps) == 1 and steps == sorted(
      p.name for p in (single / "checkpoints" / name).iterdir()
    ), steps
  config = json.loads((multi / "config.json").read_text())
  assert config["num_processes"] == 2 and config["distributed"] is True


def test_rerun_restores_every_model(runs, tmp_path):
  _, multi, _, _ = runs
  again = tmp_path / "again"
  shutil.copytree(multi, again)
  codes, text = _run_pair(again, [tmp_path / f"proc{i}.log" for i in range(2)])
  assert codes == [0, 0], (
    f"exit codes {codes}\n--- proc0\n{text[0][-1500:]}\n--- proc1\n{text[1][-1500:]}"
  )
  for log in text:
    assert "stage dense: restored" in log and "from scratch" not in log and "seed0 step " not in log
  assert (again / "results.jsonl").read_text() == (multi / "results.jsonl").read_text()


def test_unreachable_coordinator_exits_2_with_one_line(tmp_path):
  port = _free_port()  # nobody listens: process 0 never started
  proc = subprocess.run(
    _cli(tmp_path / "w", *_multi_args(port, 1)),
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=_env(2, PRUNEBIAS_DISTRIBUTED_TIMEOUT="3"),
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
  cmd = _cli(tmp_path / "w", *_multi_args(_free_port(), 0), override)
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(1), timeout=120)
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
