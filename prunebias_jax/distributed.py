"""Multi-host start-up: `jax.distributed.initialize()` before any other JAX call.

A TPU pod slice or a GPU cluster runs one process per host (or per GPU). Every process runs
the same program; `jax.distributed.initialize()` connects them to a coordinator (process 0)
so that `jax.devices()` lists the devices of all processes and one jitted step spans them all.
It must run before anything initialises the JAX backend (any computation, `jax.devices()`,
`jax.device_put`, ...), so `main` calls `maybe_initialize` right after parsing the flags.

When (config.distributed):
- True: always. `coordinator_address` / `num_processes` / `process_id` are passed when set;
  unset ones are detected by JAX from the cluster environment (Cloud TPU, SLURM, Open MPI, ...).
  With all three set, JAX's cluster detection is skipped (a loopback test, a hand-made launch).
- None (default): automatic on a Cloud TPU VM (TPU environment variables, or libtpu plus TPU
  chips on the PCI bus: detected without starting the backend) and when JAX_COORDINATOR_ADDRESS
  is set; otherwise a plain single-process run.
- False: never.

A failure (unreachable coordinator, timeout, inconsistent process ids) is a `ConfigError` with
one line, which `main` prints before exiting with code 2. The connection timeout is
`initialization_timeout` seconds (default 300, or $PRUNEBIAS_DISTRIBUTED_TIMEOUT).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import socket
import time
from collections.abc import Mapping

from absl import logging

from prunebias_jax import compilecache
from prunebias_jax.errors import ConfigError, one_line

# Set on Cloud TPU VMs (GCE and GKE) by the TPU runtime / the VM image.
TPU_ENV_VARS = (
  "TPU_WORKER_HOSTNAMES",
  "TPU_PROCESS_ADDRESSES",
  "TPU_ACCELERATOR_TYPE",
  "TPU_WORKER_ID",
  "MEGASCALE_COORDINATOR_ADDRESS",
)
TIMEOUT_ENV = "PRUNEBIAS_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def _cloud_tpu_vm() -> bool:
  """libtpu installed and TPU chips attached, checked without starting a JAX backend."""
  try:  # `import jax` sets this flag (libtpu found and TPU chips on the PCI bus)
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel

    if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
      return True
  except ImportError:
    pass
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def on_tpu(environ: Mapping[str, str] | None = None) -> bool:
  """True on a Cloud TPU VM, unless JAX_PLATFORMS names platforms without 'tpu'."""
  environ = os.environ if environ is None else environ
  platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms and "tpu" not in platforms:
    return False
  if any(environ.get(name) for name in TPU_ENV_VARS):
    return True
  return _cloud_tpu_vm()


def wanted(config, environ: Mapping[str, str] | None = None) -> tuple[bool, str]:
  """(initialise?, why) for `config.distributed` (True / False / None = automatic)."""
  environ = os.environ if environ is None else environ
  setting = config.get("distributed")
  if setting is not None:
    return bool(setting), f"config.distributed={setting}"
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True, "JAX_COORDINATOR_ADDRESS is set"
  if on_tpu(environ):
    return True, "running on a Cloud TPU VM"
  return False, "config.distributed=None and no TPU or JAX_COORDINATOR_ADDRESS"


def _arguments(config) -> dict:
  """The explicit initialize() arguments, checked (one-line ConfigError on a bad value)."""
  address = config.get("coordinator_address")
  num = config.get("num_processes")
  pid = config.get("process_id")
  if address is not None:
    host, sep, port = str(address).rpartition(":")
    if not (isinstance(address, str) and sep and host and port.isdigit() and 0 < int(port) < 65536):
      raise ConfigError(
        f"config.coordinator_address={address!r} is not allowed; expected 'host:port', "
        "e.g. '10.0.0.1:1234' (the address of process 0)"
      )
  if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
    raise ConfigError(f"config.num_processes={num!r} is not allowed; expected an integer >= 1")
  if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
    raise ConfigError(f"config.process_id={pid!r} is not allowed; expected an integer >= 0")
  if num is not None and pid is not None and pid >= num:
    raise ConfigError(
      f"config.process_id={pid!r} is not allowed; expected an integer in [0, {num - 1}] "
      f"(config.num_processes={num})"
    )
  return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def _timeout(initialization_timeout: int | None) -> int:
  if initialization_timeout is not None:
    return int(initialization_timeout)
  raw = os.environ.get(TIMEOUT_ENV, "")
  try:
    return int(raw) if raw.strip() else DEFAULT_TIMEOUT_S
  except ValueError:
    raise ConfigError(
      f"{TIMEOUT_ENV}={raw!r} is not allowed; expected whole seconds, e.g. 300"
    ) from None


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until process 0's coordinator accepts TCP connections at `address` ('host:port').

  JAX's own client aborts the whole process (SIGABRT, no Python exception) when it cannot reach
  the coordinator in time; checking first turns a wrong address or a missing process 0 into a
  one-line ConfigError.
  """
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
      raise ConfigError(
        f"config.coordinator_address={address!r}: cannot resolve host {host!r} "
        f"({e.strerror or e}); use the address of process 0's host"
      ) from None
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(5.0, remaining))):
        return
    except OSError as e:
      if time.monotonic() + 0.5 >= deadline:
        raise ConfigError(
          f"cannot reach the coordinator (process 0) at {address} within {timeout_s:g} s "
          f"({e.strerror or e}); start process 0 with the same config.coordinator_address, "
          f"check the host/port and firewall, or raise {TIMEOUT_ENV}"
        ) from None
      time.sleep(0.5)


def maybe_initialize(config, *, initialization_timeout: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when `config.distributed` asks for it (see the module
  docstring); returns whether this process is now part of a multi-process run.

  Must be the first JAX call of the program. Raises ConfigError (one line) on a bad setting or
  when the processes cannot connect.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  kwargs = _arguments(config)  # checked even when unused: a bad value is never ignored
  go, why = wanted(config)
  if not go:
    given = {k: v for k, v in kwargs.items() if v is not None}
    if given:  # set for a multi-process run that will not happen: say so, do not drop them
      names = ", ".join(f"config.{k}={v!r}" for k, v in given.items())
      raise ConfigError(
        f"{names} set, but this run is single-process ({why}); set "
        "--config.distributed=True for a multi-process run, or leave them unset"
      )
    return False
  timeout = _timeout(initialization_timeout)
  if jax.distributed.is_initialized():  # e.g. a caller (or a test harness) initialised already
    logging.info(
      "distributed: already initialised (process %d of %d)",
      jax.process_index(),
      jax.process_count(),
    )
    return True
  if xla_bridge.backends_are_initialized():
    raise ConfigError(
      "jax.distributed.initialize() must run before any other JAX call, but a JAX backend "
      "is already running in this process"
    )
  # CPU multi-process collectives (a loopback test, CPU clusters): gloo over TCP, which is the
  # default of this JAX; an older default of no collectives would fail the first all-reduce.
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = all(v is not None for v in kwargs.values())
  where = (
    kwargs["coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS") or "auto-detected"
  )
  logging.info(
    "distributed: initialising (%s); coordinator %s, process %s of %s, timeout %d s",
    why,
    where,
    "auto" if kwargs["process_id"] is None else kwargs["process_id"],
    "auto" if kwargs["num_processes"] is None else kwargs["num_processes"],
    timeout,
  )
  if (
    where != "auto-detected"
    and kwargs["process_id"] not in (None, 0)
    and re.fullmatch(r".+:\d+", where)
  ):
    wait_for_coordinator(where, timeout)
  try:
    jax.distributed.initialize(
      **kwargs,
      initialization_timeout=timeout,
      **({"cluster_detection_method": "deactivate"} if explicit else {}),
    )
    # Starting the backend exchanges the device topology with every process: fail here, not mid-run.
    local, total = jax.local_device_count(), jax.device_count()
  except (RuntimeError, ValueError, TypeError, OSError) as e:
    auto = lambda v: "auto" if v is None else v
    raise ConfigError(
      f"jax.distributed.initialize failed ({why}; coordinator {where}; process "
      f"{auto(kwargs['process_id'])} of {auto(kwargs['num_processes'])}): "
      f"{one_line(e, 400) or type(e).__name__}. Check that every process uses the same "
      "coordinator_address (process 0's host:port, reachable from all hosts) and num_processes, "
      f"with distinct process_id values, and that all processes start within {timeout} s"
    ) from None
  logging.info(
    "distributed: process %d of %d; %d local / %d global %s devices",
    jax.process_index(),
    jax.process_count(),
    local,
    total,
    jax.devices()[0].platform,
  )
  # Before the first cross-process program (the workdir checks): enable() keeps the cache off
  # for a multi-process CPU run (see compilecache).
  compilecache.enable(config.get("compile_cache", compilecache.AUTO))
  return True
