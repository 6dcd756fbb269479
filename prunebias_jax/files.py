"""Atomic file writes: a reader (or a run killed mid-write) never sees a half-written file.

A written file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less the
umask: 0644 under the usual umask 022), not the 0600 of a temporary file, so colleagues on a
shared cluster can read results, plots and caches.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from prunebias_jax.faults import crash_point

TMP_SUFFIX = ".tmp"
OWNER_SEPARATOR = "~"  # in no host name: `.<name>~<owner>~<random>.tmp`


def owner() -> str:
  """This process as the owner of its temporaries: '<host>-<pid>' (host names carry no '~';
  a '~' or '/' that one did would be replaced)."""
  host = socket.gethostname().replace(OWNER_SEPARATOR, "_").replace("/", "_")
  return f"{host}-{os.getpid()}"


def temporary_owner(path: str | os.PathLike) -> str | None:
  """The owner (`owner()`) named in a temporary's file name; None for one without."""
  parts = Path(path).name.split(OWNER_SEPARATOR)
  return parts[1] if len(parts) == 3 and parts[2].endswith(TMP_SUFFIX) else None


def current_umask() -> int:
  """The process's umask. Linux reports it in /proc (read-only); elsewhere it is read by
  setting and restoring it, which is not atomic but runs before any writer thread exists."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def default_file_mode() -> int:
  """The mode `open(path, "w")` creates a file with: 0o666 less the umask."""
  return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
  """A binary file that becomes `path` only when the block ends without an exception.

  It is a temporary file in the same directory (so the rename is atomic), named with its
  owner (so a worker sharing the workdir can tell a live writer's file from a dead one's),
  given the default file mode, fsynced, then renamed over `path`; on an exception it is
  deleted and `path` keeps its old contents.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  prefix = f".{path.name}{OWNER_SEPARATOR}{owner()}{OWNER_SEPARATOR}"
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=TMP_SUFFIX)
  try:
    with os.fdopen(fd, "wb") as f:
      # mkstemp creates 0600 whatever the umask; give the file the mode open() would.
      os.fchmod(f.fileno(), default_file_mode())
      yield f
      f.flush()
      os.fsync(f.fileno())
    crash_point(f"write:{path.name}")  # tests: a kill here must leave the old `path` intact
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` through :func:`atomic_writer`."""
  with atomic_writer(path) as f:
    f.write(data.encode() if isinstance(data, str) else data)


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


def remove_stale_temporaries(
  directory: str | os.PathLike, alive: Callable[[str], bool] = lambda owner: False
) -> list[Path]:
  """Deletes the `.<name>~<owner>~*.tmp` files that `write_atomic` leaves when a run is
  killed between writing and renaming (they are never read), but those of an owner that
  `alive(owner)` says is still running (another worker writing it now); returns what was
  removed."""
  directory = Path(directory)
  removed = []
  if directory.is_dir():
    for tmp in directory.rglob(f".*{TMP_SUFFIX}"):
      who = temporary_owner(tmp)
      if who is not None and alive(who):
        continue
      if tmp.is_file() and not tmp.is_symlink():
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
  return removed


def directory_size(directory: str | os.PathLike) -> int:
  """Bytes in all regular files under `directory`."""
  total = 0
  for root, _, files in os.walk(directory):
    for name in files:
      try:
        st = os.lstat(os.path.join(root, name))
      except OSError:
        continue
      total += st.st_size
  return total


def format_bytes(n: float) -> str:
  """`n` bytes as B, KiB, MiB or GiB (the largest unit that keeps the number >= 1)."""
  if n < 1024:
    return f"{n:.0f} B"
  for unit in ("KiB", "MiB", "GiB"):
    n /= 1024
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}"
