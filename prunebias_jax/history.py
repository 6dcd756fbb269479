"""provenance.jsonl: one line each time a worker handles a stage of the sweep.

    {"stage": "dense" | <cell name> | "report", "action": ..., "worker": "<host>-<pid>",
     "host": ..., "start": <UTC ISO time>, "end": ..., "seconds": ..., "detail": ...,
     "package": <prunebias_jax version>, "jax": ..., "jaxlib": ..., "flax": ...,
     "device_kind": ..., "device_count": ..., "process_count": ...}

Actions: `trained` (this worker trained at least one of the stage's models), `restored`
(its models were saved already: restored and evaluated, or its records were already
written), `waited` (another worker held the stage; this one waited and used its result),
`written` (the report), `failed` (an exception while handling it; `detail` names it).

Timings and hosts live here, not in results.jsonl, whose bytes must not depend on who ran
what. Lines are appended under a lock (`claims`), one write each, so concurrent workers
never interleave them; a reader should skip a last line cut short by a full disk.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from prunebias_jax.claims import lock

FILE = "provenance.jsonl"


@functools.cache
def environment() -> dict[str, Any]:
  """The versions and devices every line carries."""

  def version(name: str) -> str | None:
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return None

  devices = jax.devices()
  return {
    "package": version("prunebias_jax"),
    "jax": jax.__version__,
    "jaxlib": version("jaxlib"),
    "flax": version("flax"),
    "device_kind": devices[0].device_kind,
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
  }


def _utc(t: float) -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def append(
  workdir: Path,
  stage: str,
  action: str,
  worker: str,
  start: float,
  end: float,
  detail: str | None = None,
) -> None:
  """Appends one line (`start`/`end`: time.time() values). Multi-host: process 0 only."""
  if jax.process_index() != 0:
    return
  line = {
    "stage": stage,
    "action": action,
    "worker": worker,
    "host": socket.gethostname(),
    "start": _utc(start),
    "end": _utc(end),
    "seconds": round(end - start, 3),
    "detail": detail,
    **environment(),
  }
  data = (json.dumps(line, sort_keys=True) + "\n").encode()
  with lock(workdir, "provenance"):
    fd = os.open(Path(workdir) / FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
      os.write(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)


def read(workdir: Path) -> list[dict[str, Any]]:
  """The lines of provenance.jsonl (a last line cut short is skipped)."""
  path = Path(workdir) / FILE
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue
  return out
