"""Watching a run: training scalars in metrics.jsonl and, with tensorboardX, TensorBoard events.

Every `monitor.every_steps` steps of every stage (and at its last step) the training loop hands
over that step's scalars, fetched at its next progress sync so the accelerator is never
stopped for them. One JSON object per step and model, in `<workdir>/metrics.jsonl`:

  stage, step (1-based), epoch (1-based), seed, loss (what the step minimised), ce_loss,
  kd_loss (the α·T²·KL term, KD stages only), feature_loss (β·F, feature distillations),
  learning_rate (the one the step used),
  train_accuracy (on that augmented training batch: not a test figure), images_per_second
  (the throughput of the progress window that fetched it), nonfinite (1: a NaN/Inf loss)

With `monitor.test_accuracy` each epoch's end adds {"stage", "step", "epoch", "seed",
"test_accuracy"}: the model at that point on the test set, one evaluation pass per epoch,
only watched (the models a run keeps and reports are the last-epoch ones, never picked by it).
When a stage resumes from a mid-stage checkpoint, its rows after that step (the interrupted
run's) are dropped first, so the file reads as an uninterrupted run. With tensorboardX
installed (`pip install tensorboardX`, or the `monitor` extra) the same scalars go to
`<workdir>/tensorboard/<model>/` as event files (`dense`, `l1_filter_s0.5_kd_seed0`, one per
member of a population) (`tensorboard --logdir`); TensorBoard
shows a resumed stage's repeated steps as written, the later value last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunebias_jax.files import atomic_writer, default_file_mode

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _tensorboard_writer_class():
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  return SummaryWriter


class StepLog:
  """The sink of one stage's scalars (see the module docstring). `enabled=False` (processes
  other than 0, or `monitor.every_steps=0`) makes every call a no-op."""

  def __init__(self, workdir: str | Path, stage: str, every_steps: int, enabled: bool = True):
    self.path = Path(workdir) / METRICS_FILE
    self.stage = stage
    self.every_steps = every_steps if enabled else 0
    self._writers: dict[Any, Any] = {}
    self._tensorboard = Path(workdir) / TENSORBOARD_DIR

  @property
  def enabled(self) -> bool:
    return self.every_steps > 0

  def wants(self, step: int, total: int) -> bool:
    """Whether the 1-based `step` of `total` is logged."""
    return self.enabled and (step % self.every_steps == 0 or step == total)

  def start(self, start_step: int) -> None:
    """Drops this stage's rows after `start_step` (an interrupted run's) and a torn last line."""
    if not self.enabled or not self.path.exists():
      return
    kept, changed = [], False
    for line in self.path.read_text().splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill mid-write
        changed = True
        continue
      if row.get("stage") == self.stage and row.get("step", 0) > start_step:
        changed = True
        continue
      kept.append(line)
    if changed:
      with atomic_writer(self.path) as f:
        f.write("".join(line + "\n" for line in kept).encode())

  def write(self, rows: Sequence[dict[str, Any]]) -> None:
    """Appends `rows` to metrics.jsonl (one line each) and to TensorBoard when installed."""
    if not self.enabled or not rows:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, default_file_mode())
    with os.fdopen(fd, "a") as f:
      f.write("".join(json.dumps({"stage": self.stage, **r}, sort_keys=True) + "\n" for r in rows))
    writer_class = _tensorboard_writer_class()
    if writer_class is None:
      return
    for r in rows:
      writer = self._writer(writer_class, r.get("seed"))
      for key, value in r.items():
        if key not in ("step", "epoch", "seed") and value is not None:
          tag = "test/accuracy" if key == "test_accuracy" else f"train/{key}"
          writer.add_scalar(tag, value, r["step"])

  def _writer(self, writer_class, seed):
    if seed not in self._writers:
      # Model stages are named after their checkpoint (…_seed<s>); populations get one each.
      named = seed is None or self.stage.endswith(f"_seed{seed}")
      name = self.stage if named else f"{self.stage}_seed{seed}"
      self._writers[seed] = writer_class(logdir=str(self._tensorboard / name))
    return self._writers[seed]

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers.clear()
