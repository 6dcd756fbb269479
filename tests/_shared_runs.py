"""The CLI runs that test_multihost.py and test_parallel.py share (a session fixture in
conftest.py), so that no run is made twice: one dense teacher, trained by a 2-process × 2-device
run, is restored by a 1-process × 4-device run and by a 1-process × 1-device run. The
comparisons (2 processes vs 1 over the same 4 devices; 4 devices vs 1) then each see the same
teacher, so only the stages under test can differ. Trained separately, 48 dense steps amplify
float-order differences chaotically (see test_multihost.py's docstring).

Where this jaxlib cannot run cross-process CPU collectives, the 4-device run trains the teacher
itself and the multi-host tests skip with the probe's reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The config of the 2-process run. every_steps=4: the training stages also write (and discard)
# mid-stage checkpoints across processes. The 1-process runs add a second pruning method
# (ONE_PROCESS_METHODS): test_parallel.py checks both on 1 vs 4 devices; test_multihost.py compares
# the 2-process run with the 4-device run's l1_filter cells.
ARGS = [
  "--config",
  "configs/default.py",
  "--config.runlocal=True",
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


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int, **extra: str) -> dict[str, str]:
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


def multi_args(port: int, process_id: int, num_processes: int = 2) -> list[str]:
  return [
    "--config.distributed=True",
    f"--config.coordinator_address=127.0.0.1:{port}",
    f"--config.num_processes={num_processes}",
    f"--config.process_id={process_id}",
  ]


def run_processes(
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


MULTI_METHODS = "('l1_filter',)"
ONE_PROCESS_METHODS = "('l1_filter','random')"


def cli(workdir: Path, *extra: str, methods: str = MULTI_METHODS) -> list[str]:
  # `methods` is one flag: a second --config.pruning.methods would be appended to the first
  # (ml_collections' tuple override), not replace it.
  return [
    sys.executable,
    "-m",
    "prunebias_jax.main",
    *ARGS,
    f"--config.pruning.methods={methods}",
    f"--workdir={workdir}",
    *extra,
  ]


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


def check_cpu_collectives(tmp: Path) -> str | None:
  """None when this jaxlib runs cross-process CPU collectives, else why not (the line it
  printed); fails the test on any other error of the probe."""
  port = free_port()
  logs = [tmp / f"probe{i}.log" for i in range(2)]
  cmds = [[sys.executable, "-c", PROBE, f"127.0.0.1:{port}", str(i)] for i in range(2)]
  codes = run_processes(cmds, env(2), logs, timeout=180)
  out = "\n".join(log.read_text() for log in logs)
  if codes != [0, 0]:
    for marker in UNSUPPORTED:
      if marker in out:
        line = next(l for l in out.splitlines() if marker in l).strip()
        return f"multi-process CPU collectives are not supported by this jaxlib: {line}"
    pytest.fail(f"2-process CPU probe failed (exit codes {codes}):\n{out[-3000:]}")
  return None


def run_pair(workdir: Path, logs: list[Path]) -> tuple[list[int], list[str]]:
  port = free_port()
  codes = run_processes([cli(workdir, *multi_args(port, i)) for i in range(2)], env(2), logs)
  return codes, [log.read_text() for log in logs]


class SharedRuns(NamedTuple):
  multi: Path | None  # the 2-process workdir (None: collectives unsupported, see `skip`)
  multi_logs: list[str]  # process 0's and process 1's output
  skip: str | None  # why there is no 2-process run
  four: Path  # 1 process × 4 devices, the teacher restored from `multi` (or trained)
  four_log: str
  one: Path  # 1 process × 1 device, the same teacher restored
  one_log: str


def make_shared_runs(tmp: Path) -> SharedRuns:
  skip = check_cpu_collectives(tmp)
  multi, multi_logs, teacher = None, [], None
  if skip is None:
    multi = tmp / "multi"
    codes, multi_logs = run_pair(multi, [tmp / f"proc{i}.log" for i in range(2)])
    assert codes == [0, 0], (
      f"exit codes {codes}\n--- proc0\n{multi_logs[0][-3000:]}\n--- proc1\n{multi_logs[1][-3000:]}"
    )
    teacher = multi / "checkpoints" / "dense"
  logs = {}
  for name, devices in (("four", 4), ("one", 1)):
    workdir = tmp / name
    if teacher is not None:
      shutil.copytree(teacher, workdir / "checkpoints" / "dense")
    codes = run_processes(
      [cli(workdir, methods=ONE_PROCESS_METHODS)], env(devices), [tmp / f"{name}.log"]
    )
    logs[name] = (tmp / f"{name}.log").read_text()
    assert codes == [0], logs[name][-3000:]
    teacher = teacher or workdir / "checkpoints" / "dense"
  return SharedRuns(multi, multi_logs, skip, tmp / "four", logs["four"], tmp / "one", logs["one"])
