"""Who does what in a shared workdir: one lock per stage, held by the worker doing it.

    <workdir>/locks/workers/<owner>.lock   held for a worker's whole life: proof it is alive
             locks/setup.lock              checking and preparing the workdir (seconds)
             locks/<stage>.lock            dense, each cell, report: one holder at a time
             locks/<stage>.holder          who took it last (for the waiting message)

Any number of workers (processes on one machine, or on many machines sharing the workdir on
a filesystem with working POSIX locks: local disks, NFSv4, GPFS, Lustre mounted with
`-o flock`) may run one sweep: a stage is done by the worker that holds its lock, while the
others wait for it (the dense teacher) or take another cell. The locks are OS locks
(flock(2), through `filelock`) that the kernel frees when their holder exits, however it
exits (SIGKILL included), so a killed worker never leaves a stage locked. Lock files are
never deleted (deleting one while another process waits on it would let two hold it): that
one exists means nothing. A filesystem without locks is an error, not a silent fallback to
lock files that a killed worker would leave behind.

Multi-host: the processes of one job are one worker; process 0 takes the locks and tells
the others what it decided (`agree`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import jax

from prunebias_jax.errors import ConfigError
from prunebias_jax.files import owner, write_atomic

LOCKS = "locks"
WORKERS = "workers"


def lock(workdir: Path, name: str) -> filelock.FileLock:
  """The lock of stage `name` (`locks/<name>.lock`): an OS lock, never a soft one."""
  path = Path(workdir) / LOCKS / f"{name}.lock"
  path.parent.mkdir(parents=True, exist_ok=True)
  # preserve_lock_file: the file stays on release (which also rules out the soft fallback).
  return filelock.FileLock(path, preserve_lock_file=True, thread_local=False)


def _process_zero() -> bool:
  return jax.process_index() == 0


def agree(value: int) -> int:
  """Process 0's `value` on every process of a multi-host job (itself on one process)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(value))


_LIVE: dict[Path, filelock.FileLock] = {}  # the liveness locks this process holds


class Worker:
  """This process as one of the workers of a workdir. `start()` takes its liveness lock,
  held as long as the process lives (the kernel frees it when it dies): a process that
  starts several runs on one workdir is one worker."""

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.owner = owner()

  def start(self) -> None:
    path = (self.workdir / LOCKS / WORKERS / f"{self.owner}.lock").absolute()
    if path in _LIVE:
      return
    try:
      life = lock(self.workdir, f"{WORKERS}/{self.owner}")
      life.acquire(timeout=0)
    except filelock.Timeout:  # a live process of this host with our pid: impossible
      raise ConfigError(f"worker {self.owner} is already running on {self.workdir}") from None
    except (OSError, NotImplementedError) as e:
      raise ConfigError(
        f"cannot lock files in {self.workdir / LOCKS} ({e}): workers share a workdir through "
        "OS file locks; use a filesystem that has them (a local disk, NFSv4, Lustre with "
        "-o flock)"
      ) from None
    _LIVE[path] = life

  def alive(self, who: str) -> bool:
    """Whether worker `who` (an `owner()`) still runs: its liveness lock is held."""
    if who == self.owner:
      return True
    path = self.workdir / LOCKS / WORKERS / f"{who}.lock"
    if not path.exists():  # never registered here (a run from before workers had locks)
      return False
    probe = lock(self.workdir, f"{WORKERS}/{who}")
    try:
      probe.acquire(timeout=0)
    except filelock.Timeout:
      return True
    probe.release()
    return False

  @contextlib.contextmanager
  def holding(self, name: str, wait: bool = True) -> Iterator[bool | None]:
    """Holds stage `name`'s lock for the block; yields True when it had to wait for another
    worker, False when it was free, and None (without the lock: the block must do nothing)
    when it was taken and `wait` is False. Multi-host: only process 0 locks."""
    held: filelock.FileLock | None = None
    waited: bool | None = False
    if _process_zero():
      held = lock(self.workdir, name)
      try:
        held.acquire(timeout=0)
      except filelock.Timeout:
        if wait:
          waited = True
          held.acquire()
        else:
          held, waited = None, None
      if held is not None:
        note = f"{self.owner} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
        write_atomic(self.workdir / LOCKS / f"{name}.holder", note)
    waited = {0: False, 1: True, 2: None}[agree({False: 0, True: 1, None: 2}[waited])]
    try:
      yield waited
    finally:
      if held is not None:
        held.release()

  def holder(self, name: str) -> str:
    """Who took stage `name`'s lock last ('<owner> <UTC time>'), for messages."""
    try:
      return (self.workdir / LOCKS / f"{name}.holder").read_text().strip()
    except OSError:
      return "another worker"
