"""cells/<unit>.npz: a finished unit's records and evaluated outputs, written once it is done.

    meta                JSON {"unit": <name>, "key": <digest>, "records": [...],
                        "layer_names": [[layers of o<j>/layer_cka, depth order], ...]}
    o<j>/predictions    (n,) int32, for the unit's j-th model (its j-th record)
    o<j>/logits         (n, C)
    o<j>/layer_cka      (layers, layers): CKA of each teacher layer with each of the model's
    o<j>/confusion      (C, C) int32 counts [true, predicted] of the evaluation pass
    o<j>/map/<name>     the SVCCA subset's pooled maps (the dense teacher's, analysis.svcca_conv)

The run-level files (results.jsonl, cells.jsonl, ...) are assembled from these in plan order,
so their bytes do not depend on which worker wrote which unit. A file is used only when its
key is the one this run computes for the unit (`key`): the identities of the unit's models
and of the teacher, and every config field but the sweep axes, the shard and stage, and the
reporting-only fields. A file of another config is recomputed (from the checkpoints when
they are there), never mixed in; one that cannot be read is recomputed too.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from absl import logging

from prunebias_jax.checkpoint import Identity, digest
from prunebias_jax.config import COSMETIC_KEYS, SWEEP_KEYS, flatten
from prunebias_jax.files import atomic_writer
from prunebias_jax.records import LayerCKA, Outputs, Record
from prunebias_jax.workdir import CELLS

DIR = CELLS
# 2: similarity accumulated in the evaluation pass (layer_cka kept, no features); a file of an
# older format is recomputed from the checkpoints.
FORMAT = 2


class Stored(NamedTuple):
  records: list[Record]
  outputs: list[Outputs]


def path(workdir: Path, name: str) -> Path:
  return Path(workdir) / DIR / f"{name}.npz"


def key(
  config: ml_collections.ConfigDict, name: str, models: dict[str, Identity | None], cell: Any
) -> str:
  """The digest a unit's file must carry to be used by this run (see the module docstring);
  `models`: {checkpoint name: identity} of the unit's models and the teacher."""
  ignore = set(SWEEP_KEYS) | set(COSMETIC_KEYS) | {"runlocal_overrides"}
  fields = {k: v for k, v in flatten(json.loads(config.to_json())).items() if k not in ignore}
  return digest({"unit": name, "cell": cell, "models": models, "config": fields, "format": FORMAT})


def write(
  workdir: Path, name: str, unit_key: str, records: Sequence[Record], outputs: Sequence[Outputs]
) -> None:
  """Writes the unit's file atomically (a reader never sees half of it)."""
  names = [None if o.layer_cka is None else list(o.layer_cka.names) for o in outputs]
  meta = {"unit": name, "key": unit_key, "records": list(records), "layer_names": names}
  arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
  for j, out in enumerate(outputs):
    arrays[f"o{j}/predictions"] = np.asarray(out.predictions)
    if out.layer_cka is not None:
      arrays[f"o{j}/layer_cka"] = np.asarray(out.layer_cka.matrix)
    if out.confusion is not None:
      arrays[f"o{j}/confusion"] = np.asarray(out.confusion)
    if out.logits is not None:
      arrays[f"o{j}/logits"] = np.asarray(out.logits)
    for stage, v in (out.maps or {}).items():
      arrays[f"o{j}/map/{stage}"] = np.asarray(v)
  with atomic_writer(path(workdir, name)) as f:
    np.savez(f, **arrays)


def read(workdir: Path, name: str, unit_key: str) -> Stored | None:
  """The unit's records and outputs, or None when its file is missing, unreadable or of
  another key."""
  p = path(workdir, name)
  try:
    with np.load(p, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      if meta.get("key") != unit_key:
        logging.info("%s is of another config or model: recomputed", p)
        return None
      arrays = {k: z[k] for k in z.files if k != "meta"}
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    logging.warning("%s is unreadable (%s): recomputed", p, e)
    return None
  records = meta["records"]
  names = meta.get("layer_names") or [None] * len(records)
  outputs = []
  for j in range(len(records)):
    prefix = f"o{j}/"
    part = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    maps = {k[4:]: v for k, v in part.items() if k.startswith("map/")} or None
    # The similarity sums are not stored: the records already hold what they give.
    layer_cka = None if names[j] is None else LayerCKA(names[j], part["layer_cka"])
    outputs.append(
      Outputs(
        part["predictions"],
        part.get("logits"),
        None,
        layer_cka,
        maps,
        confusion=part.get("confusion"),
      )
    )
  return Stored(records, outputs)


def exists(workdir: Path, name: str) -> bool:
  return path(workdir, name).exists()
