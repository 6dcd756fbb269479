"""What shaped each trained model: its training identity, stored in its checkpoint.

A model is restored only when the identity this run would train it with equals the one in
its checkpoint (`checkpoint.ModelCheckpoint`), whatever config.json says. An identity is a
flat {field: JSON value} dict of exactly what changes the trained weights:

- every model: the architecture, number of classes, compute dtype, the fingerprint of the
  split it trains on (a hash of its images and labels, in order: it covers the data source,
  subsets, imbalance and image size at once), the normalisation statistics, the
  augmentation, the resolved batch size, the stage's epochs and optimizer, and its seed;
- a dense model: nothing else;
- a student: the teacher's identity digest (it starts from the teacher's weights and learns
  from its logits), the pruning method, target and the realised schedule {epoch: sparsity},
  CE or KD (with α and T), and for a population its seeds and mask sharing.

Left out on purpose, because a finished model does not depend on them: the checkpoint and
progress settings, the number of devices, `nonfinite` (a model that finished under 'stop'
had no non-finite step, the same as under 'skip'; the skipped steps are in its metadata),
and everything that only evaluates or reports (`analysis.*`, `metrics.*`, the test split).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from prunebias_jax.checkpoint import Identity, digest
from prunebias_jax.config import flatten
from prunebias_jax.data import Dataset, Split


def fingerprint(split: Split) -> str:
  """blake2b of a split's images and labels (shapes, dtypes, bytes, in order)."""
  h = hashlib.blake2b(digest_size=16)
  for a in (split.images, split.labels):
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).data)
  return h.hexdigest()


def _stage(config: ml_collections.ConfigDict, stage: str, split_fingerprint: str) -> Identity:
  """The fields every model of `stage` ('dense' or 'finetune') shares."""
  cfg = config
  optim = flatten(cfg[stage].optim.to_dict(), f"{stage}.optim.")
  return {
    "model": cfg.model,
    "compute_dtype": cfg.compute_dtype,
    "data.fingerprint": split_fingerprint,
    "data.crop_padding": cfg.data.crop_padding,
    "data.flip": cfg.data.flip,
    f"{stage}.batch_size": cfg[stage].batch_size or cfg.data.batch_size,
    f"{stage}.epochs": cfg[stage].epochs,
    **optim,
  }


def dense_identity(
  config: ml_collections.ConfigDict, data: Dataset, seed: int, split_fingerprint: str
) -> Identity:
  """The identity of the dense model trained from scratch with `seed` on the split whose
  `fingerprint` is given (the teacher's training split)."""
  return {
    "stage": "dense",
    **_stage(config, "dense", split_fingerprint),
    **_data_fields(data),
    "seed": int(seed),
  }


def student_identity(
  config: ml_collections.ConfigDict,
  data: Dataset,
  teacher: Identity,
  *,
  method: str,
  sparsity: float,
  plan: dict[int, float],
  kd: bool,
  temperature: float | None,
  seed: int,
  population: Sequence[int],
  split_fingerprint: str,
) -> Identity:
  """The identity of one fine-tuned student (`population`: the seeds trained with it;
  `split_fingerprint`: of the fine-tuning split)."""
  together = len(population) > 1
  return {
    "stage": "finetune",
    **_stage(config, "finetune", split_fingerprint),
    **_data_fields(data),
    "teacher": digest(teacher),
    "seed": int(seed),
    "pruning.method": method,
    "pruning.sparsity": float(sparsity),
    # JSON object keys are strings: the epochs as a list of [epoch, sparsity] pairs.
    "pruning.plan": [[int(e), float(s)] for e, s in sorted(plan.items())],
    "kd": bool(kd),
    "kd.alpha": config.kd.alpha if kd else None,
    "kd.temperature": float(temperature) if kd else None,
    "population": [int(s) for s in population] if together else None,
    "population_masks": config.population_masks if together else None,
  }


def stage_identity(members: Sequence[Identity]) -> Identity:
  """The identity of a training stage (its mid-stage checkpoints): that of its one model, or
  of all the members of a population trained together."""
  if len(members) == 1:
    return dict(members[0])
  return {"stage": "population", "members": [digest(m) for m in members]}


def _data_fields(data: Dataset) -> dict[str, Any]:
  return {
    "num_classes": data.num_classes,
    "data.mean": [float(v) for v in data.mean],
    "data.std": [float(v) for v in data.std],
  }
