"""A sweep on a cluster: the dense stage, then every cell as a task, then the report.

    python -m prunebias_jax.sweep --config configs/default.py --workdir /shared/runs/x \\
        --engine ray [--address auto] [--gpus_per_cell 1] [--cpus_per_cell 1] [--retries 2]

`--engine ray` (`pip install 'prunebias_jax[ray]'`) submits one task for the dense stage, then
one per cell (`units.plan`) with `--cpus_per_cell`/`--gpus_per_cell` resources, then one for
the report. `--address` joins a running cluster (`auto`: the one `ray start` made on this
machine; `ray://host:10001`: a remote head); without it a Ray instance with this machine's
CPUs (and GPUs) is started for the sweep. `--engine local` runs the same tasks one after
another in this process (no Ray), e.g. to debug a config.

Every task runs `experiment.run` on the shared --workdir with the unit's name, so the engine
adds nothing the workdir does not already guarantee: locks (`claims`) make a task that runs
twice do its cell once, and the run files are assembled from the cells' files in plan order,
byte-identical to a single process. Each worker must see the workdir at the same path (a
shared filesystem) and have this package installed.

Progress: one line per finished or failed cell. A cell whose task fails is retried up to
`--retries` times (a bad config or input is not retried: it would fail again); a worker that
dies is retried by Ray. The sweep ends with the cells that still failed (exit 1; rerun the
same command to do just those), or with the report (exit 0).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from prunebias_jax import main as cli
from prunebias_jax.config import resolve_config
from prunebias_jax.errors import EXIT_BAD_INPUT, UserError, one_line

ENGINES = ("ray", "local")
flags.DEFINE_enum("engine", "ray", ENGINES, "Where the tasks run: a Ray cluster, or this process.")
flags.DEFINE_string(
  "address", None, "Ray cluster to join ('auto', 'ray://head:10001'); none: a new one."
)
flags.DEFINE_float("cpus_per_cell", 1.0, "CPUs a cell's task reserves (Ray).")
flags.DEFINE_float("gpus_per_cell", 0.0, "GPUs a cell's task reserves (Ray); 1 on a GPU cluster.")
flags.DEFINE_integer("retries", 2, "Times a failed cell is tried again.", lower_bound=0)
FLAGS = flags.FLAGS


class Failure(Exception):
  """A task that failed; `retriable` is False for bad input (it would fail again)."""

  def __init__(self, message: str, retriable: bool):
    super().__init__(message)
    self.retriable = retriable


class LocalEngine:
  """The tasks one after another in this process."""

  def __init__(self):
    self.tasks: dict[int, tuple] = {}

  def submit(self, stage: str, only: Sequence[str] | None, args: tuple) -> Any:
    self.tasks[len(self.tasks)] = (*args, stage, only)
    return len(self.tasks) - 1

  def wait(self, handles: list) -> tuple[Any, dict[str, Any] | Failure]:
    from prunebias_jax.experiment import run_stage

    handle = handles[0]
    try:
      return handle, run_stage(*self.tasks[handle])
    except UserError as e:
      return handle, Failure(f"{type(e).__name__}: {one_line(e, 300)}", retriable=False)
    except Exception as e:
      return handle, Failure(f"{type(e).__name__}: {one_line(e, 300)}", retriable=True)

  def close(self) -> None:
    pass


class RayEngine:
  """Tasks on a Ray cluster (started here when `address` is None)."""

  def __init__(self, address: str | None, cpus: float, gpus: float):
    try:
      import ray
    except ImportError:
      cli._fail("--engine ray needs Ray: pip install 'prunebias_jax[ray]'")
    self.ray = ray
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    resources = ray.cluster_resources()
    logging.info(
      "Ray cluster: %g CPUs, %g GPUs; each cell reserves %g CPUs, %g GPUs",
      resources.get("CPU", 0),
      resources.get("GPU", 0),
      cpus,
      gpus,
    )
    if cpus > resources.get("CPU", 0) or gpus > resources.get("GPU", 0):
      cli._fail(
        f"a cell reserves {cpus:g} CPUs and {gpus:g} GPUs, but the cluster has "
        f"{resources.get('CPU', 0):g} and {resources.get('GPU', 0):g}: no cell could start"
      )
    from prunebias_jax.experiment import run_stage

    # A GPU task gets a fresh process: JAX binds the devices Ray assigned once, at start.
    self.task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2, max_calls=1 if gpus else 0)(
      run_stage
    )

  def submit(self, stage: str, only: Sequence[str] | None, args: tuple) -> Any:
    return self.task.remote(*args, stage, only)

  def wait(self, handles: list) -> tuple[Any, dict[str, Any] | Failure]:
    ray = self.ray
    ready, _ = ray.wait(handles, num_returns=1)
    try:
      return ready[0], ray.get(ready[0])
    except ray.exceptions.RayTaskError as e:
      cause = e.cause if isinstance(e.cause, BaseException) else e
      message = f"{type(cause).__name__}: {one_line(cause, 300)}"
      return ready[0], Failure(message, retriable=not isinstance(cause, UserError))
    except ray.exceptions.RayError as e:  # the worker died (Ray retried it already)
      return ready[0], Failure(f"{type(e).__name__}: {one_line(e, 300)}", retriable=True)

  def close(self) -> None:
    self.ray.shutdown()


def sweep(
  engine: Any,
  config: ml_collections.ConfigDict,
  workdir: str,
  explicit_keys: Collection[str],
  retries: int,
  say: Callable[[str], None] = print,
) -> list[str]:
  """Runs the dense stage, every cell and the report on `engine`; returns the cells that
  failed after `retries` retries (the report is written only when none did)."""
  from prunebias_jax import units

  names = [u.name for u in units.plan(resolve_config(config, explicit_keys))]
  args = (config, workdir, tuple(explicit_keys))
  start = time.time()
  failed = _run(engine, {"dense": ("dense", None)}, args, retries, say, start)
  if failed:
    say(f"the dense stage failed ({failed['dense']}); no cell was started")
    return ["dense"]
  tasks = {name: ("cells", [name]) for name in names}
  failed = _run(engine, tasks, args, retries, say, start)
  if failed:
    say(f"{len(failed)} of {len(names)} cells failed; the report needs every cell:")
    for name, why in failed.items():
      say(f"  {name}: {why}")
    say("rerun the same command: the finished cells are kept, only these run again")
    return list(failed)
  if _run(engine, {"report": ("report", None)}, args, 0, say, start):
    return ["report"]
  return []


def _run(
  engine: Any,
  tasks: dict[str, tuple[str, list[str] | None]],
  args: tuple,
  retries: int,
  say: Callable[[str], None],
  start: float,
) -> dict[str, str]:
  """Runs `tasks` ({name: (stage, only)}) to the end; returns {name: why} of those that
  failed `retries` + 1 times (or once, for bad input), in the order of `tasks`."""
  pending = {engine.submit(stage, only, args): name for name, (stage, only) in tasks.items()}
  attempts = dict.fromkeys(tasks, 1)
  failed, done = {}, 0
  while pending:
    handle, result = engine.wait(list(pending))
    name = pending.pop(handle)
    elapsed = time.time() - start
    if isinstance(result, Failure):
      if result.retriable and attempts[name] <= retries:
        say(f"{name}: failed ({result}); retry {attempts[name]}/{retries}")
        attempts[name] += 1
        stage, only = tasks[name]
        pending[engine.submit(stage, only, args)] = name
        continue
      failed[name] = str(result)
      say(f"{name}: failed ({result})")
      continue
    done += 1
    say(
      f"[{done}/{len(tasks)}] {name}: done in {result['seconds']:.1f} s by {result['worker']} "
      f"(sweep {elapsed:.0f} s)"
    )
  return {name: failed[name] for name in tasks if name in failed}  # in plan order


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli._fail(f"unexpected arguments {argv[1:]!r}; pass options as --flag=value")
  config = cli.loaded_config(cli._CONFIG)
  if not FLAGS.workdir:
    cli._fail("--workdir is required (a directory every worker sees at the same path)")
  logging.set_verbosity(logging.INFO)
  explicit_keys = set(config_flags.get_override_values(FLAGS["config"]))
  cli._check_values(config, explicit_keys)
  cfg = resolve_config(config, explicit_keys)
  if cfg.stage != "all" or cfg.shard.count != 1:
    cli._fail(
      f"config.stage={cfg.stage!r}, config.shard.count={cfg.shard.count}: the sweep engine "
      "runs every stage and gives each cell a task itself; drop those overrides",
      EXIT_BAD_INPUT,
    )
  if FLAGS.engine == "ray":
    engine = RayEngine(FLAGS.address, FLAGS.cpus_per_cell, FLAGS.gpus_per_cell)
  else:
    engine = LocalEngine()
  try:
    failed = sweep(engine, config, FLAGS.workdir, explicit_keys, FLAGS.retries)
  finally:
    engine.close()
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
