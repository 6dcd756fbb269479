"""Atomic file writes: a reader (or a run killed mid-write) never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes to a temporary file in the same directory, fsyncs, then renames over `path`."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = data.encode() if isinstance(data, str) else data
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Pretty, key-sorted JSON, atomically."""
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable(directory: str | os.PathLike) -> None:
  """Creates `directory` if needed and proves a file can be written there (raises OSError)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write-check.")
  os.close(fd)
  os.unlink(tmp)
