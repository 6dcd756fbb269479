"""A finished run as Python objects: its config, records and any of its trained models.

    from prunebias_jax.load import load_run
    run = load_run("runs/default")
    run.config, run.records, run.cells, run.correlations, run.dataset   # what the run wrote
    run.model_names()                      # the checkpoints: 'dense', 'l1_filter_s0.5_kd_seed0'
    model = run.model(run.records[3])      # by record, or by name: run.model("dense")
    logits = model.apply(images)           # uint8 NHWC images, like the run's test images
    model.params, model.batch_stats, model.masks, model.meta

`apply` does what the run's evaluation does: scale to [0, 1], normalise with the run's
training statistics (dataset.json), apply the masks, run the model in inference mode. Nothing
is checked against the config that trained the model beyond what the checkpoint records (the
model name, its number of classes and its array shapes): this loads what is there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prunebias_jax import quantization as qz
from prunebias_jax import stages
from prunebias_jax.checkpoint import ModelCheckpoint
from prunebias_jax.data.pipeline import normalize
from prunebias_jax.errors import CheckpointError, ConfigError
from prunebias_jax.models import get_model
from prunebias_jax.pruning import apply_masks, dense_masks, masks_from_flat, masks_to_flat

Record = dict[str, Any]
PARTIAL = "partial"  # checkpoints/partial/: mid-stage states, not models


class LoadedModel(NamedTuple):
  """One trained model of a run. `masks` is None for a dense model."""

  name: str
  params: Any
  batch_stats: Any
  masks: Any | None
  meta: dict[str, Any]
  module: Any  # the Flax module (Qwix-quantized for a quantization-aware student)
  mean: tuple[float, ...]
  std: tuple[float, ...]
  frozen: dict[str, Any] | None = None  # a static scheme's calibrated ranges ({'quant_stats'})

  def apply(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (n, classes) of uint8 NHWC `images`, evaluated as the run evaluated its models."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"images must be uint8 (n, H, W, C), got {images.dtype} {images.shape}")
    params = self.params if self.masks is None else apply_masks(self.params, self.masks)
    variables = {"params": params, "batch_stats": self.batch_stats, **(self.frozen or {})}
    mean, std = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)
    forward = jax.jit(
      lambda v, x: self.module.apply(v, normalize(x, mean, std), train=False).astype(jnp.float32)
    )
    out = [
      np.asarray(forward(variables, jnp.asarray(images[i : i + batch_size])))
      for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class Run(NamedTuple):
  """What `load_run` returns (see the module docstring)."""

  workdir: Path
  config: ml_collections.ConfigDict
  records: list[Record]
  cells: list[Record]
  correlations: list[Record]
  dataset: dict[str, Any]

  def model_names(self) -> list[str]:
    """The finished models' checkpoint names, sorted."""
    root = self.workdir / "checkpoints"
    if not root.is_dir():
      return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != PARTIAL)

  def checkpoint_name(self, record: Mapping[str, Any]) -> str:
    """The checkpoint of the model a results.jsonl record describes."""
    return stages.checkpoint_name(self.config, record)

  def model(self, which: str | Mapping[str, Any]) -> LoadedModel:
    """The trained model named `which` (see `model_names`) or described by a record; a
    quantization-aware student comes with its quantized module (and calibrated ranges)."""
    if not isinstance(which, str) and which.get("distill") == "ptq":
      raise CheckpointError(
        f"post-training-quantized models are computed, not saved: {which['method']!r} at "
        f"sparsity {which['sparsity']:g} is the teacher (run.model('dense'); ⊙ its pruning's "
        "masks) run through prunebias_jax.quantization.quantized_model"
      )
    name = which if isinstance(which, str) else self.checkpoint_name(which)
    directory = self.workdir / "checkpoints" / name
    if name == PARTIAL or not directory.is_dir():
      raise CheckpointError(
        f"{self.workdir} has no model {name!r}; its models: {', '.join(self.model_names())}"
      )
    cfg, data = self.config, self.dataset
    num_classes = len(data["class_names"])
    module = get_model(cfg.model, num_classes, dtype=cfg.compute_dtype)
    student = not name.startswith("dense")
    # A reader: a sweep may be saving a checkpoint of this workdir now (its temporaries stay).
    ckpt = ModelCheckpoint(
      directory, expect={"model": cfg.model, "num_classes": num_classes}, cleanup_tmp=False
    )
    try:
      # A quantization-aware student runs quantized as its training identity says.
      identity = ckpt.read_meta().get("identity") or {}
      scheme = identity.get("quantization.scheme")
      if scheme:
        module = qz.quantized_model(
          module,
          scheme,
          identity["quantization.weight_calibration"],
          identity.get("quantization.act_calibration", "absmax"),
        )
      dummy = jnp.zeros((1, *data["image_shape"]), jnp.float32)
      variables = module.init(jax.random.key(0), dummy, train=False)
      template = {k: v for k, v in variables.items() if k in ("params", "batch_stats", qz.STATS)}
      if student:
        template["masks"] = masks_to_flat(dense_masks(variables["params"]))
      tree, meta = ckpt.restore(template)
    finally:
      ckpt.close()
    masks = masks_from_flat(tree["params"], tree["masks"]) if student else None
    norm = data["normalization"]
    return LoadedModel(
      name,
      tree["params"],
      tree["batch_stats"],
      masks,
      meta,
      module,
      tuple(norm["mean"]),
      tuple(norm["std"]),
      {qz.STATS: tree[qz.STATS]} if qz.STATS in tree else None,
    )


def _jsonl(path: Path) -> list[Record]:
  return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def load_run(workdir: str | Path) -> Run:
  """The finished run in `workdir` (config.json, dataset.json, results/cells/correlations)."""
  workdir = Path(workdir)
  missing = [
    n for n in ("config.json", "dataset.json", "results.jsonl") if not (workdir / n).is_file()
  ]
  if missing:
    raise ConfigError(
      f"{workdir} is not a finished run: {', '.join(missing)} missing (a run writes them when "
      "it ends)"
    )
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  return Run(
    workdir,
    config,
    _jsonl(workdir / "results.jsonl"),
    _jsonl(workdir / "cells.jsonl"),
    _jsonl(workdir / "correlations.jsonl"),
    json.loads((workdir / "dataset.json").read_text()),
  )
