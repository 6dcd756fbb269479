"""TFDS data source: a prepared TFDS image-classification dataset read without TensorFlow.

Reads `tfds.data_source(name, split=..., data_dir=..., download=False)` (random-access
ArrayRecord files; TFDS decodes the stored PNG/JPEG bytes with Pillow), in batches of records
from a small thread pool, straight into preallocated uint8 NHWC arrays (resized per record
when `image_size` is set, so CelebA never materialises at 218×178 in full).

Datasets must have an `image` feature and a ClassLabel `label` feature (cifar10, cifar100,
mnist, svhn_cropped, ...), except `celeb_a`: its label is the binary attribute
`label_attribute` (default Blond_Hair) and its sensitive group, stored in `Split.groups`, the
attribute `group_attribute` (default Male). For other datasets a `group_attribute` naming an
existing scalar feature (e.g. cifar100's `coarse_label`) becomes the groups.

`train_examples`/`test_examples` first read only the labels (images left encoded via
`tfds.decode.SkipDecoding`), pick a seeded stratified subset, and decode only that subset.

Preparing a dataset needs TensorFlow and internet, reading it does not: see
scripts/prepare_data.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import re
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from prunebias_jax.data.dataset import Dataset, Split, channel_stats
from prunebias_jax.data.groups import SEPARATOR, attribute_names, encode_groups
from prunebias_jax.data.image_folder import (
  default_num_workers,
  resize_array,
  stratified_subset,
)
from prunebias_jax.errors import DataError, one_line

CELEB_A = "celeb_a"
DEFAULT_LABEL_ATTRIBUTE = "Blond_Hair"
DEFAULT_GROUP_ATTRIBUTE = "Male"
_CHUNK = 256  # records per batched read
_LABEL_CHUNK = 4096
_PROGRESS_SECONDS = 10.0
_PROGRESS_MIN_EXAMPLES = 10_000  # smaller splits get only the final line


@dataclasses.dataclass(frozen=True)
class _Task:
  """How to turn a TFDS record into (label, group)."""

  class_names: tuple[str, ...]
  label_of: Callable[[dict], int]
  # A record's values of the group attributes (ints), and a name for each attribute's value.
  group_of: Callable[[dict], tuple[int, ...]] | None
  group_value_names: tuple[Callable[[int], str], ...] = ()


def _base_name(name: str) -> str:
  """'celeb_a/config:2.1.0' → 'celeb_a'."""
  return name.split("/")[0].split(":")[0].strip()


def _prepare_hint(name: str, data_dir) -> str:
  where = data_dir if data_dir else "DIR"
  return (
    f"prepare it on a machine with internet with `python scripts/prepare_data.py --name {name} "
    f"--data_dir {where}` and copy that folder here (set data.data_dir to it)"
  )


def _builder(tfds, name: str, data_dir):
  from tensorflow_datasets.core import registered

  try:
    return tfds.builder(name, data_dir=data_dir)
  except registered.DatasetNotFoundError as e:
    try:
      known = registered.list_imported_builders()
    except Exception:  # pylint: disable=broad-except  # only used for a suggestion
      known = []
    close = difflib.get_close_matches(_base_name(name), known, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise DataError(
      f"data.name {name!r} is not a dataset tensorflow-datasets {tfds.__version__} knows{hint}; "
      "check the name against https://www.tensorflow.org/datasets/catalog/overview"
    ) from e
  except (ValueError, KeyError, AttributeError) as e:
    raise DataError(
      f"cannot open TFDS dataset data.name={name!r}: {one_line(e, 300)}; check data.name "
      "(format 'name[/config][:version]')"
    ) from e


def _is_prepared(builder) -> bool:
  try:
    return bool(builder.is_prepared())
  except Exception:  # pylint: disable=broad-except  # treat an unreadable folder as not prepared
    return False


def _open(tfds, builder, name: str, data_dir, split: str, field: str, decoders=None):
  """The random-access data source of one split, with every failure turned into a DataError."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
  except (
    ValueError,
    NotImplementedError,
    FileNotFoundError,
    AssertionError,
    OSError,
    KeyError,
  ) as e:
    if not _is_prepared(builder):
      where = (
        f"data.data_dir={data_dir!r}"
        if data_dir
        else "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
      )
      raise DataError(
        f"TFDS dataset {name!r} is not prepared in {where} (no {builder.data_dir}); "
        f"{_prepare_hint(name, data_dir)}"
      ) from e
    splits = sorted(builder.info.splits.keys())
    if re.split(r"[\[+]", split)[0].strip() not in splits:
      raise DataError(
        f"data.{field}={split!r} is not a split of TFDS dataset {name!r}; available splits: "
        f"{', '.join(splits)} (TFDS slicing such as 'train[:90%]' is allowed)"
      ) from e
    if isinstance(e, NotImplementedError):
      raise DataError(
        f"TFDS dataset {name!r} in {builder.data_dir} is not stored as array_record (random "
        f"access is needed to read it without TensorFlow); re-{_prepare_hint(name, data_dir)}"
      ) from e
    raise DataError(
      f"cannot read TFDS dataset {name!r} split {split!r} from {builder.data_dir}: "
      f"{type(e).__name__}: {one_line(e, 300)}"
    ) from e


def _task(name: str, features, label_attribute, group_attribute) -> _Task:
  """The label/group extraction and class names for dataset `name` with `features`.

  A group attribute that is not a scalar feature of the dataset stops the run (DataError): a
  fairness study without its groups must not run as if it had them."""
  keys = list(features.keys())
  if "image" not in keys:
    raise DataError(
      f"TFDS dataset {name!r} has no 'image' feature (features: {', '.join(keys)}); "
      "only image-classification datasets are supported"
    )
  group_attributes = attribute_names(group_attribute)
  if _base_name(name) == CELEB_A:
    attrs = list(features["attributes"].keys())
    label_attribute = label_attribute or DEFAULT_LABEL_ATTRIBUTE
    group_attributes = group_attributes or (DEFAULT_GROUP_ATTRIBUTE,)
    for field, attr in [("label_attribute", label_attribute)] + [
      ("group_attribute", g) for g in group_attributes
    ]:
      if attr not in attrs:
        raise DataError(
          f"data.{field}={attr!r} is not a CelebA attribute; valid attributes: {', '.join(attrs)}"
        )
    la, gas = label_attribute, group_attributes
    return _Task(
      class_names=(f"not_{la}", la),
      label_of=lambda rec: int(bool(rec["attributes"][la])),
      group_of=lambda rec: tuple(int(bool(rec["attributes"][g])) for g in gas),
      group_value_names=tuple((lambda v, g=g: g if v else f"not_{g}") for g in group_attributes),
    )

  if "label" not in keys:
    raise DataError(
      f"TFDS dataset {name!r} has no 'label' feature (features: {', '.join(keys)}); only "
      "image-classification datasets with image/label features (or celeb_a) are supported"
    )
  label = features["label"]
  names = getattr(label, "names", None)
  if not names:
    raise DataError(
      f"the 'label' feature of TFDS dataset {name!r} is {type(label).__name__}, not a "
      "ClassLabel; only class-labelled datasets are supported"
    )
  if label_attribute:
    logging.warning(
      "data.label_attribute=%r is ignored for %s (only celeb_a uses it)", label_attribute, name
    )
  getters, value_names = [], []
  for g in group_attributes:
    if g in keys:
      feature = features[g]
      getters.append(lambda rec, g=g: rec[g])
    elif "attributes" in keys and g in features["attributes"].keys():
      feature = features["attributes"][g]
      getters.append(lambda rec, g=g: rec["attributes"][g])
    else:
      scalars = [k for k in keys if k not in ("image", "label")]
      raise DataError(
        f"data.group_attribute={g!r} is not a feature of TFDS dataset {name!r}; its other "
        f"features are: {', '.join(scalars) or 'none'}"
      )
    if tuple(getattr(feature, "shape", ())) != ():
      raise DataError(
        f"data.group_attribute={g!r} of TFDS dataset {name!r} is not a scalar "
        "feature; use a class label or boolean attribute"
      )
    labels = getattr(feature, "names", None)
    value_names.append(
      (lambda v, n=tuple(labels): n[v] if 0 <= v < len(n) else str(v))
      if labels
      else (lambda v, g=g: f"{g}={v}")
    )
  group_of = None
  if getters:
    group_of = lambda rec: tuple(int(np.asarray(get(rec))) for get in getters)
  return _Task(
    class_names=tuple(str(n) for n in names),
    label_of=lambda rec: int(rec["label"]),
    group_of=group_of,
    group_value_names=tuple(value_names),
  )


def _as_hwc(image, desc: str, key: int, image_size: int | None) -> np.ndarray:
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.dtype != np.uint8 or arr.ndim != 3:
    raise DataError(
      f"{desc}: record {key} has a {arr.dtype} image of shape {arr.shape}; only uint8 "
      "(H, W, C) images are supported"
    )
  return arr if image_size is None else resize_array(arr, image_size)


def _read_labels(src, task: _Task, desc: str) -> np.ndarray:
  """All labels of a split whose images are left encoded (cheap: no image decoding)."""
  n = len(src)
  labels = np.empty(n, np.int32)
  t0 = time.monotonic()
  for start in range(0, n, _LABEL_CHUNK):
    keys = list(range(start, min(start + _LABEL_CHUNK, n)))
    labels[start : start + len(keys)] = [task.label_of(rec) for rec in src.__getitems__(keys)]
  logging.info("%s: read %d labels in %.1f s", desc, n, time.monotonic() - t0)
  return labels


def _read_split(
  src, indices: np.ndarray, image_size: int | None, task: _Task, desc: str, num_workers: int
) -> tuple[Split, np.ndarray | None]:
  """Records `indices` of `src` as a Split, read in batches by a thread pool, and their group
  attribute values ((n, attributes) ints; None without group attributes)."""
  n = len(indices)
  first_key = int(indices[0])
  shape = _as_hwc(src[first_key]["image"], desc, first_key, image_size).shape
  images = np.empty((n,) + shape, np.uint8)
  labels = np.empty((n,), np.int32)
  # The raw values of the group attributes; `load_tfds` turns them into group ids.
  groups = None if task.group_of is None else np.empty((n, len(task.group_value_names)), np.int64)

  def work(start: int, stop: int) -> None:
    keys = [int(k) for k in indices[start:stop]]
    records = src.__getitems__(keys)
    for j, (key, rec) in enumerate(zip(keys, records)):
      img = _as_hwc(rec["image"], desc, key, image_size)
      if img.shape != shape:
        raise DataError(
          f"{desc}: images differ in size: record {first_key} is {'x'.join(map(str, shape))} "
          f"but record {key} is {'x'.join(map(str, img.shape))} (HxWxC); set data.image_size "
          "to resize every image to one size"
        )
      images[start + j] = img
      labels[start + j] = task.label_of(rec)
      if groups is not None:
        groups[start + j] = task.group_of(rec)

  t0 = last = time.monotonic()
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_workers)
  try:
    starts = range(0, n, _CHUNK)
    futures = [pool.submit(work, s, min(s + _CHUNK, n)) for s in starts]
    for s, fut in zip(starts, futures):
      fut.result()
      now = time.monotonic()
      if n >= _PROGRESS_MIN_EXAMPLES and now - last >= _PROGRESS_SECONDS:
        logging.info("%s: read %d/%d examples (%.0f s)", desc, min(s + _CHUNK, n), n, now - t0)
        last = now
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  logging.info("%s: read %d examples in %.1f s", desc, n, time.monotonic() - t0)
  num_classes = len(task.class_names)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise DataError(
      f"{desc}: labels span {labels.min()}..{labels.max()} but the dataset names "
      f"{num_classes} classes"
    )
  return Split(images, labels), groups


def load_tfds(
  name: str,
  *,
  data_dir=None,
  train_split: str = "train",
  test_split: str = "test",
  image_size: int | None = None,
  train_examples: int = 0,
  test_examples: int = 0,
  split_seed: int = 0,
  label_attribute: str | None = None,
  group_attribute: str | Sequence[str] | None = None,
  num_workers: int | None = None,
) -> Dataset:
  """The prepared TFDS dataset `name` as a Dataset (see the module docstring)."""
  import tensorflow_datasets as tfds  # local: the other sources do not need it

  nums = (train_examples, test_examples)
  if not name or not isinstance(name, str):
    raise DataError(
      f"data.name is not set (got {name!r}); give a TFDS dataset name such as 'cifar10' or "
      "'celeb_a'"
    )
  data_dir = str(data_dir) if data_dir else None
  builder = _builder(tfds, name, data_dir)
  workers = num_workers or default_num_workers()

  splits: list[Split] = []
  group_values: list[np.ndarray | None] = []
  task = None
  for k, (split, field) in enumerate(((train_split, "train_split"), (test_split, "test_split"))):
    src = _open(tfds, builder, name, data_dir, split, field)
    if task is None:  # after _open: a prepared dataset's info carries its real class names
      task = _task(name, builder.info.features, label_attribute, group_attribute)
    desc = f"TFDS {name} {split!r}"
    n = len(src)
    if n == 0:
      raise DataError(
        f"data.{field}={split!r} of TFDS dataset {name!r} is empty; choose a non-empty split"
      )
    if 0 < nums[k] < n:
      encoded = _open(
        tfds, builder, name, data_dir, split, field, decoders={"image": tfds.decode.SkipDecoding()}
      )
      indices = stratified_subset(_read_labels(encoded, task, desc), nums[k], seed=(split_seed, k))
    else:
      if nums[k] > n:
        logging.warning(
          "data.%s=%d exceeds the %d examples of %s; using all of them",
          "train_examples" if k == 0 else "test_examples",
          nums[k],
          n,
          desc,
        )
      indices = np.arange(n)
    split_data, values = _read_split(src, indices, image_size, task, desc, workers)
    splits.append(split_data)
    group_values.append(values)

  train, test = splits
  if train.images.shape[1:] != test.images.shape[1:]:
    raise DataError(
      f"TFDS {name}: {train_split!r} images are {train.images.shape[1:]} but {test_split!r} "
      f"images are {test.images.shape[1:]}; set data.image_size to resize both to one size"
    )
  group_names = None
  if task.group_of is not None:
    ids, group_names = encode_groups(
      [[tuple(v) for v in values.tolist()] for values in group_values],
      attribute_names(group_attribute) or (DEFAULT_GROUP_ATTRIBUTE,),
      f"TFDS {name}",
      name_of=lambda combo: SEPARATOR.join(f(v) for f, v in zip(task.group_value_names, combo)),
    )
    train = Split(train.images, train.labels, ids[0])
    test = Split(test.images, test.labels, ids[1])
  mean, std = channel_stats(train.images)
  return Dataset(
    name=name,
    train=train,
    test=test,
    num_classes=len(task.class_names),
    class_names=task.class_names,
    mean=mean,
    std=std,
    group_names=group_names,
  )
