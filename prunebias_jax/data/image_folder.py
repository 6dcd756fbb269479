"""Image-folder data source: `root/<split>/<class>/*.png|jpg|jpeg`, decoded once and cached.

Layout::

    root/train/<class>/*.png|*.jpg|*.jpeg
    root/test/<class>/*

Class names are the sorted sub-folder names of the training split (the test split must have
the same set); class index = position in that order. Files are listed (with their sizes and
modification times) on every load, which is cheap; decoding is done with Pillow in a thread
pool and only for the files a run needs: `train_examples`/`test_examples` pick a seeded
stratified subset of the *file list* before anything is decoded. The decoded uint8 arrays are
cached as an uncompressed `.npz` in a cache directory outside the data folder, keyed by a hash
of the absolute root, the selected relative file names, their sizes and mtimes and the decode
settings, so any change to the selected files (added, removed, touched) invalidates the cache.

This module also holds the Pillow resize and stratified-subset helpers that the TFDS source
shares.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import stat
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image

from prunebias_jax.data.dataset import Dataset, Split, channel_stats
from prunebias_jax.data.groups import (
  ATTRIBUTE_TABLES,
  PATH_COLUMN,
  attribute_names,
  find_table,
  folder_groups,
)
from prunebias_jax.errors import DataError, one_line, printable
from prunebias_jax.files import atomic_writer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Pillow modes that carry a single intensity channel (decoded as 'L').
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_CACHE_FORMAT = 1  # bump when the cached content or decoding changes meaning
_CHUNK = 256  # files per decode task
_PROGRESS_SECONDS = 10.0


# ----------------------------------------------------------------------------------------------
# Helpers shared with the TFDS source.


def stratified_subset(labels: np.ndarray, num_examples: int, seed) -> np.ndarray:
  """Sorted indices of a seeded subset of `num_examples` with the classes' proportions kept.

  Each class c with n_c of N examples gets floor(num·n_c/N) picks, and the remaining picks go
  to the classes with the largest remainders (ties: lower class first), so a balanced split
  gives exactly num/K per class. 0 or num ≥ N selects everything.
  """
  labels = np.asarray(labels)
  total = labels.size
  if num_examples <= 0 or num_examples >= total:
    return np.arange(total)
  classes, counts = np.unique(labels, return_counts=True)
  alloc = counts * num_examples // total
  remainder = counts * num_examples % total
  order = np.lexsort((classes, -remainder))  # largest remainder first, then lower class
  alloc[order[: num_examples - int(alloc.sum())]] += 1
  rng = np.random.default_rng(seed)
  picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, alloc)]
  return np.sort(np.concatenate(picks))


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
  """A uint8 (H, W, C) image resized to (size, size, C) with Pillow's antialiased bilinear
  filter (area-like when shrinking). C must be 1, 3 or 4; an image already that size is
  returned as is."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  channels = image.shape[2]
  if channels not in (1, 3, 4):
    raise DataError(
      f"cannot resize images with {channels} channels; data.image_size supports 1, 3 "
      "or 4 channels (set data.image_size=None to keep the stored size)"
    )
  pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if channels == 1 else image))
  out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
  return out[..., None] if channels == 1 else out


def decode_image(path: str, image_size: int | None = None) -> np.ndarray:
  """One image file as uint8 (H, W, 1) if its mode is greyscale, else (H, W, 3) RGB (alpha and
  palettes are dropped/expanded by Pillow), resized if `image_size` is set.

  Raises DataError naming the file when Pillow cannot read it (corrupt, truncated, not an
  image)."""
  try:
    with Image.open(path) as im:
      grey = im.mode in _GREY_MODES
      im = im.convert("L" if grey else "RGB")  # forces the full decode
      if image_size is not None and im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
      arr = np.asarray(im, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    raise DataError(
      f"cannot decode image file {path}: {type(e).__name__}: {one_line(e, 200)}; "
      "delete or replace the file"
    ) from e
  return arr[..., None] if grey else arr


def default_cache_dir() -> Path:
  """$XDG_CACHE_HOME/prunebias_jax, else ~/.cache/prunebias_jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "prunebias_jax"


def default_num_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------
# Listing.


@dataclasses.dataclass(frozen=True)
class _Listing:
  """The image files of one split, ordered by (class, file name)."""

  rel_paths: list[str]  # relative to the root, posix separators
  labels: np.ndarray  # int32
  sizes: list[int]
  mtimes: list[int]  # st_mtime_ns


def _entries(folder: Path) -> list[os.DirEntry]:
  """The visible entries of `folder`, by name; a folder that cannot be listed is a DataError."""
  try:
    with os.scandir(folder) as it:
      return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
  except OSError as e:
    raise DataError(_unreadable(folder, e)) from e


def _unreadable(path, error: OSError) -> str:
  return (
    f"cannot read {printable(str(path))}: {error.strerror or type(error).__name__}; "
    "fix or remove it (a link loop, a broken link or missing permissions)"
  )


def _is_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()  # follows links: a link loop raises ELOOP here
  except OSError as e:
    raise DataError(_unreadable(entry.path, e)) from e


def _class_folders(split_dir: Path) -> list[str]:
  return [e.name for e in _entries(split_dir) if _is_dir(e)]


def _list_split(
  root: Path, split: str, class_names: Sequence[str], both: tuple[str, str]
) -> _Listing:
  rel_paths, labels, sizes, mtimes = [], [], [], []
  ignored = 0
  for c, cls in enumerate(class_names):
    cls_dir = root / split / cls
    n_before = len(rel_paths)
    for e in _entries(cls_dir):
      if not e.name.lower().endswith(IMAGE_SUFFIXES):
        ignored += 1
        continue
      try:
        st = e.stat()  # follows links, as decoding will
      except OSError as err:
        raise DataError(_unreadable(e.path, err)) from err
      if not stat.S_ISREG(st.st_mode):  # an image name on a folder: never silently skipped
        raise DataError(
          f"{printable(e.path)} is named like an image but is not a file; rename or remove it"
        )
      rel_paths.append(f"{split}/{cls}/{e.name}")
      labels.append(c)
      sizes.append(int(st.st_size))
      mtimes.append(int(st.st_mtime_ns))
    if len(rel_paths) == n_before:
      raise DataError(
        f"class folder {cls_dir} has no .png/.jpg/.jpeg images; add images to it or delete "
        f"the class folder {cls!r} from both {both[0]!r} and {both[1]!r}"
      )
  if ignored:
    logging.info(
      "image folder %s/%s: ignored %d entries that are not .png/.jpg/.jpeg files",
      root,
      split,
      ignored,
    )
  return _Listing(rel_paths, np.asarray(labels, np.int32), sizes, mtimes)


def _check_root(root, train_split: str, test_split: str) -> Path:
  layout = f"expected {train_split}/<class>/*.png|jpg|jpeg and {test_split}/<class>/* inside it"
  if root is None or str(root) == "":
    raise DataError(f"data.dir is not set; point it at an image folder ({layout})")
  try:
    path = Path(os.path.expanduser(str(root))).resolve()
    is_dir = path.is_dir()
  except (OSError, RuntimeError) as e:  # a link loop: RuntimeError up to Python 3.12
    raise DataError(
      f"data.dir {str(root)!r} cannot be resolved ({one_line(e, 200)}); {layout}"
    ) from e
  if not is_dir:
    raise DataError(f"data.dir {str(root)!r} ({path}) does not exist or is not a folder; {layout}")
  for split, field in ((train_split, "train_split"), (test_split, "test_split")):
    if not (path / split).is_dir():
      raise DataError(
        f"image folder {path} has no {split!r} split: missing folder {path / split} "
        f"(data.{field}={split!r}); {layout}"
      )
  return path


# ----------------------------------------------------------------------------------------------
# Cache.


def _cache_key(root: Path, selected: Sequence[tuple[str, int, int]], image_size: int | None) -> str:
  payload = json.dumps(
    {"format": _CACHE_FORMAT, "root": str(root), "image_size": image_size, "files": selected},
    separators=(",", ":"),
  )
  return hashlib.sha256(payload.encode()).hexdigest()


def _cache_base(cache_dir, root: Path) -> Path:
  """The cache folder (checked to lie outside the data folder)."""
  base = (
    default_cache_dir() if cache_dir in (None, "") else Path(os.path.expanduser(str(cache_dir)))
  )
  base = base.resolve()
  if base == root or base.is_relative_to(root):
    raise DataError(
      f"data.cache_dir {base} is inside the data folder {root}; choose a cache folder "
      "outside the data (default: $XDG_CACHE_HOME/prunebias_jax or ~/.cache/prunebias_jax)"
    )
  return base


def _load_cache(path: Path, key: str):
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["key"]) != key:
        return None
      return z["images"], z["labels"]
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    logging.warning(
      "ignoring unreadable image-folder cache %s (%s); decoding again", path, one_line(e, 200)
    )
    return None


def _save_cache(path: Path, key: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Atomically writes the cache (`files.atomic_writer`: readable as the umask allows); a cache
  that cannot be written only costs a re-decode next time, so failures are logged, not raised."""
  try:
    with atomic_writer(path) as f:
      np.savez(f, key=np.asarray(key), images=images, labels=labels)
  except OSError as e:
    logging.warning("could not write image-folder cache %s: %s", path, one_line(e, 200))


# ----------------------------------------------------------------------------------------------
# Decoding.


def _decode_all(
  paths: Sequence[str], image_size: int | None, num_workers: int, desc: str
) -> np.ndarray:
  """Decodes `paths` in parallel into one uint8 (N, H, W, C) array (C=1 only if every image is
  greyscale). Without `image_size` every image must have the first one's size."""
  n = len(paths)
  if image_size is not None:
    height = width = image_size
  else:
    try:
      with Image.open(paths[0]) as im:
        width, height = im.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
      raise DataError(
        f"cannot decode image file {paths[0]}: {type(e).__name__}: {one_line(e, 200)}; "
        "delete or replace the file"
      ) from e
  out = np.empty((n, height, width, 3), np.uint8)

  def work(start: int, stop: int) -> bool:
    all_grey = True
    for i in range(start, stop):
      arr = decode_image(paths[i], image_size)  # module global: tests may replace it
      if arr.shape[:2] != (height, width):
        raise DataError(
          f"images differ in size: {paths[0]} is {height}x{width} (HxW) but {paths[i]} is "
          f"{arr.shape[0]}x{arr.shape[1]}; set data.image_size to resize every image to one size"
        )
      out[i] = arr  # a (H, W, 1) greyscale image broadcasts into the 3 channels
      all_grey &= arr.shape[2] == 1
    return all_grey

  t0 = last = time.monotonic()
  done = 0
  all_grey = True
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_workers)
  try:
    starts = range(0, n, _CHUNK)
    futures = [pool.submit(work, s, min(s + _CHUNK, n)) for s in starts]
    for s, fut in zip(starts, futures):  # in order, so the first bad file in order is reported
      all_grey &= fut.result()
      done = min(s + _CHUNK, n)
      now = time.monotonic()
      if now - last >= _PROGRESS_SECONDS:
        logging.info("%s: decoded %d/%d images (%.0f s)", desc, done, n, now - t0)
        last = now
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  logging.info(
    "%s: decoded %d images in %.1f s (%d threads)", desc, n, time.monotonic() - t0, num_workers
  )
  return np.ascontiguousarray(out[..., :1]) if all_grey else out


# ----------------------------------------------------------------------------------------------
# The source.


def load_image_folder(
  root,
  *,
  train_split: str = "train",
  test_split: str = "test",
  image_size: int | None = None,
  train_examples: int = 0,
  test_examples: int = 0,
  split_seed: int = 0,
  cache_dir=None,
  num_workers: int | None = None,
  attributes: str | None = None,
  group_attribute: str | Sequence[str] | None = None,
) -> Dataset:
  """The image folder at `root` as a Dataset (see the module docstring for layout and caching).

  `group_attribute` names columns of the folder's attributes table (`attributes`, or
  attributes.csv / attributes.jsonl at the root; see `data.groups`): the splits' groups are
  their value combinations. Checked before anything is decoded.
  """
  path = _check_root(root, train_split, test_split)
  group_columns = attribute_names(group_attribute)
  table = find_table(path, attributes)
  if group_columns and table is None:
    raise DataError(
      f"data.group_attribute={group_columns} needs an attributes table, but {path} has neither "
      f"{' nor '.join(ATTRIBUTE_TABLES)}; add one (a {PATH_COLUMN!r} column and one column per "
      "attribute) or set data.attributes=PATH"
    )
  cache_base = _cache_base(cache_dir, path)

  class_names = _class_folders(path / train_split)
  if not class_names:
    raise DataError(
      f"split folder {path / train_split} has no class sub-folders; expected "
      f"{train_split}/<class>/*.png|jpg|jpeg"
    )
  if len(class_names) < 2:
    raise DataError(
      f"split folder {path / train_split} has one class sub-folder ({class_names[0]!r}); a "
      "classifier and every per-class metric need at least 2 classes"
    )
  test_classes = _class_folders(path / test_split)
  if set(test_classes) != set(class_names):
    missing = sorted(set(class_names) - set(test_classes))
    extra = sorted(set(test_classes) - set(class_names))
    raise DataError(
      f"class folders of {path / test_split} differ from {path / train_split}: missing "
      f"in {test_split!r}: {missing or 'none'}, only in {test_split!r}: {extra or 'none'}; "
      "both splits need the same class sub-folders"
    )

  listings, selections = [], []
  for split, num, k in ((train_split, train_examples, 0), (test_split, test_examples, 1)):
    listing = _list_split(path, split, class_names, (train_split, test_split))
    if num > len(listing.labels):
      logging.warning(
        "data.%s=%d exceeds the %d images of %s/%s; using all of them",
        "train_examples" if k == 0 else "test_examples",
        num,
        len(listing.labels),
        path,
        split,
      )
    listings.append(listing)
    selections.append(stratified_subset(listing.labels, num, seed=(split_seed, k)))

  selected = [
    (lst.rel_paths[i], lst.sizes[i], lst.mtimes[i])
    for lst, sel in zip(listings, selections)
    for i in sel
  ]
  labels = np.concatenate([lst.labels[sel] for lst, sel in zip(listings, selections)]).astype(
    np.int32
  )
  n_train = len(selections[0])
  group_ids, group_names = [None, None], None
  if group_columns:
    rel = [[lst.rel_paths[i] for i in sel] for lst, sel in zip(listings, selections)]
    group_ids, group_names = folder_groups(
      table, group_columns, ((train_split, rel[0]), (test_split, rel[1]))
    )
  key = _cache_key(path, selected, image_size)
  cache_file = cache_base / f"image_folder-{path.name}-{key[:24]}.npz"
  desc = f"image folder {printable(str(path))}"

  t0 = time.monotonic()
  cached = _load_cache(cache_file, key)
  if cached is not None and np.array_equal(cached[1], labels):
    images = cached[0]
    logging.info(
      "%s: loaded %d images from cache %s in %.1f s",
      desc,
      len(labels),
      cache_file,
      time.monotonic() - t0,
    )
  else:
    paths = [str(path / rel) for rel, _, _ in selected]
    images = _decode_all(paths, image_size, num_workers or default_num_workers(), desc)
    _save_cache(cache_file, key, images, labels)

  train = Split(images[:n_train], labels[:n_train], group_ids[0])
  test = Split(images[n_train:], labels[n_train:], group_ids[1])
  mean, std = channel_stats(train.images)
  return Dataset(
    name=f"image_folder:{path.name}",
    train=train,
    test=test,
    num_classes=len(class_names),
    class_names=tuple(class_names),
    mean=mean,
    std=std,
    group_names=group_names,
  )
