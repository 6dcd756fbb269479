"""Crash points for the kill-and-resume tests.

The pipeline calls `crash_point(name)` at the places where a preemption hurts most (after a
training step, after a model is saved, while metrics are computed, between writing a file's
temporary copy and renaming it). Normally this does nothing. When the environment variable
`PRUNEBIAS_JAX_KILL_AT` is `name` (or `name#n`: the n-th time that point is reached), the
process sends itself SIGKILL there — no cleanup, no `finally`, exactly like a preempted VM —
so the tests can check that a rerun resumes and ends with the same results.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "PRUNEBIAS_JAX_KILL_AT"
_hits: Counter[str] = Counter()


def crash_point(name: str) -> None:
  """SIGKILLs this process if `PRUNEBIAS_JAX_KILL_AT` names this point (see the module doc)."""
  target = os.environ.get(ENV)
  if not target:
    return
  point, _, nth = target.partition("#")
  if point != name:
    return
  _hits[name] += 1
  if _hits[name] == (int(nth) if nth else 1):
    os.kill(os.getpid(), signal.SIGKILL)
