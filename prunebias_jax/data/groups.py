"""Sensitive groups: per-example attribute values turned into group ids with names.

`data.group_attribute` names one attribute or several. Several make intersectional groups:
one group per combination of values that occurs in the data (e.g. ``("race", "gender")`` gives
``black/female``, ``black/male``, ...). Group ids are positions in the sorted list of those
combinations, and the names are kept for the tables. A group with no test example cannot be
measured (its rates are 0/0), so it stops the run instead of being left out.

An image folder gets its attributes from a table at its root, ``attributes.csv`` (a header
row) or ``attributes.jsonl`` (one JSON object per line), or from the file `data.attributes`
names. Each row has a ``path`` column, the image's path relative to the folder root as the
folder stores it (``train/<class>/<file>``), and any other columns. Every image the run uses
needs a row and a non-empty value in each named column. Rows for images the run does not use
(other subsets, other files) are allowed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from prunebias_jax.errors import DataError, printable

ATTRIBUTE_TABLES = ("attributes.csv", "attributes.jsonl")
PATH_COLUMN = "path"
SEPARATOR = "/"  # between the values of an intersectional group's name


def attribute_names(group_attribute: str | Sequence[str] | None) -> tuple[str, ...]:
  """`data.group_attribute` as a tuple of names: None or '' (unset from the command line) →
  (), 'race' → ('race',)."""
  if not group_attribute:
    return ()
  if isinstance(group_attribute, str):
    return (group_attribute,)
  return tuple(group_attribute)


def find_table(root: Path, explicit: str | None) -> Path | None:
  """The attributes table of the image folder at `root`: `explicit` when given (it must
  exist), else the first of ATTRIBUTE_TABLES at the root, else None."""
  if explicit:
    path = Path(explicit).expanduser()
    if not path.is_file():
      raise DataError(
        f"data.attributes={printable(str(explicit))!r} is not a file; give a .csv or .jsonl "
        f"table with a {PATH_COLUMN!r} column"
      )
    return path
  for name in ATTRIBUTE_TABLES:
    if (root / name).is_file():
      return root / name
  return None


def _rows(path: Path) -> tuple[list[str], list[dict]]:
  """(columns, rows) of a .csv or .jsonl table."""
  suffix = path.suffix.lower()
  try:
    with open(path, newline="", encoding="utf-8") as f:
      if suffix == ".csv":
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows
      if suffix == ".jsonl":
        rows, columns = [], {}
        for i, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise DataError(f"attributes table {path}: line {i} is not JSON ({e.msg})") from e
          if not isinstance(row, dict):
            raise DataError(f"attributes table {path}: line {i} is not a JSON object")
          rows.append(row)
          columns.update(dict.fromkeys(row))
        return list(columns), rows
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"attributes table {path} cannot be read: {e}") from e
  raise DataError(f"attributes table {path} is neither .csv nor .jsonl")


def read_table(path: Path, attributes: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """{image path: its values of `attributes`} from the table at `path`."""
  columns, rows = _rows(path)
  if PATH_COLUMN not in columns:
    raise DataError(
      f"attributes table {path} has no {PATH_COLUMN!r} column (columns: "
      f"{', '.join(map(repr, columns)) or 'none'}); give each image's path relative to the "
      "folder root, e.g. train/<class>/<file>"
    )
  for a in attributes:
    if a not in columns:
      allowed = ", ".join(repr(c) for c in columns if c != PATH_COLUMN) or "none"
      raise DataError(
        f"data.group_attribute={a!r} is not a column of {path}; its columns are {allowed}"
      )
  table: dict[str, tuple[str, ...]] = {}
  for i, row in enumerate(rows, 1):
    key = str(row.get(PATH_COLUMN) or "").strip().removeprefix("./")
    if not key:
      raise DataError(f"attributes table {path}: row {i} has no {PATH_COLUMN!r}")
    if key in table:
      raise DataError(f"attributes table {path} has two rows for {printable(key)!r}")
    table[key] = tuple("" if row.get(a) is None else str(row[a]).strip() for a in attributes)
  return table


def folder_groups(
  table_path: Path,
  attributes: Sequence[str],
  splits: Sequence[tuple[str, Sequence[str]]],
) -> tuple[list[np.ndarray], tuple[str, ...]]:
  """Group ids of the images `splits` ((split name, relative paths), ...; the last is the
  test split) from the table, and the group names."""
  table = read_table(table_path, attributes)
  values = []
  for split, paths in splits:
    missing = [p for p in paths if p not in table]
    if missing:
      raise DataError(
        f"{len(missing)} of the {len(paths)} {split!r} images have no row in {table_path} "
        f"(e.g. {printable(missing[0])!r}); every image the run uses needs one"
      )
    rows = [table[p] for p in paths]
    for j, a in enumerate(attributes):
      empty = [p for p, r in zip(paths, rows) if not r[j]]
      if empty:
        raise DataError(
          f"{len(empty)} {split!r} images have no value for {a!r} in {table_path} "
          f"(e.g. {printable(empty[0])!r})"
        )
    values.append(rows)
  return encode_groups(values, attributes, str(table_path))


def encode_groups(
  values: Sequence[Sequence[tuple]],
  attributes: Sequence[str],
  source: str,
  name_of: Callable[[tuple], str] | None = None,
) -> tuple[list[np.ndarray], tuple[str, ...]]:
  """Per-split value tuples → (per-split int32 group ids, group names).

  Groups are the value combinations that occur in any split, in sorted order (so a binary
  attribute coded 0/1 keeps ids 0 and 1); a group's name is `name_of(combination)`, by default
  its values joined with SEPARATOR. The last split is the test split: each group needs an
  example there.
  """
  combos = sorted({tuple(v) for split in values for v in split})
  index = {c: i for i, c in enumerate(combos)}
  ids = [np.fromiter((index[tuple(v)] for v in split), np.int32, len(split)) for split in values]
  names = tuple((name_of or (lambda c: SEPARATOR.join(map(str, c))))(c) for c in combos)
  if len(combos) < 2:
    raise DataError(
      f"data.group_attribute={tuple(attributes)} gives one group ({names[0]!r}) in {source}; "
      "DPD and EOD compare at least 2 groups"
    )
  counts = np.bincount(ids[-1], minlength=len(combos))
  absent = [names[g] for g in np.flatnonzero(counts == 0)]
  if absent:
    raise DataError(
      f"group(s) {', '.join(map(repr, absent))} of data.group_attribute={tuple(attributes)} "
      f"have no test example in {source}; their rates cannot be measured (merge or drop them)"
    )
  return ids, names
