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
from prunebias_jax.config import flatten, stage_settings
from prunebias_jax.data import Dataset, Split
from prunebias_jax.quantization import SCHEMES, split_method


def fingerprint(split: Split) -> str:
  """blake2b of a split's images and labels (shapes, dtypes, bytes, in order)."""
  h = hashlib.blake2b(digest_size=16)
  for a in (split.images, split.labels):
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).data)
  return h.hexdigest()


def _stage(
  config: ml_collections.ConfigDict, stage: str, split_fingerprint: str, method: str = "ce"
) -> Identity:
  """The fields every model of `stage` ('dense' or 'finetune', with the fine-tuning `method`'s
  own learning rate and batch size: `config.stage_settings`) shares."""
  cfg = config
  optim_cfg, batch_size, _ = stage_settings(cfg, stage, method)
  optim = flatten(optim_cfg.to_dict(), f"{stage}.optim.")
  return {
    "model": cfg.model,
    "compute_dtype": cfg.compute_dtype,
    "data.fingerprint": split_fingerprint,
    "data.crop_padding": cfg.data.crop_padding,
    "data.flip": cfg.data.flip,
    f"{stage}.batch_size": batch_size,
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
  distill: str | None = None,
) -> Identity:
  """The identity of one fine-tuned student (`population`: the seeds trained with it;
  `split_fingerprint`: of the fine-tuning split; `distill`: its fine-tuning method, when a
  feature distillation, with the weights and settings that method reads)."""
  together = len(population) > 1
  feature = distill not in (None, "ce", "kd")
  identity = {
    "stage": "finetune",
    **_stage(config, "finetune", split_fingerprint, distill or "ce"),
    **_data_fields(data),
    "teacher": digest(teacher),
    "seed": int(seed),
    "pruning.method": method,
    "pruning.sparsity": float(sparsity),
    # JSON object keys are strings: the epochs as a list of [epoch, sparsity] pairs.
    "pruning.plan": [[int(e), float(s)] for e, s in sorted(plan.items())],
    "kd": bool(kd),
    "kd.alpha": config.kd.alpha if kd and not feature else None,
    "kd.temperature": float(temperature) if kd else None,
    "population": [int(s) for s in population] if together else None,
    "population_masks": config.population_masks if together else None,
  }
  scheme = split_method(method)[1]
  if scheme:  # a quantized student: how its quantization was made (pruning students: unchanged)
    q = config.quantization
    identity["quantization.scheme"] = scheme
    identity["quantization.weight_calibration"] = q.weight_calibration
    if SCHEMES[scheme].act_bits:
      identity["quantization.act_calibration"] = q.act_calibration
    if SCHEMES[scheme].static:
      identity["quantization.calibration_examples"] = int(q.calibration_examples)
  if feature:  # CE and KD keep the identity they always had: their checkpoints stay valid
    d, name = config.distill, distill.removesuffix("+kd")
    identity["distill"] = distill
    identity["distill.ce_weight"] = float(d.ce_weight)
    identity["distill.kl_weight"] = float(d.kl_weight) if kd else None
    identity["distill.weight"] = float(d.weights[name])
    if name == "crd":
      identity["distill.crd"] = {k: d.crd[k] for k in sorted(d.crd.keys())}
  return identity


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
