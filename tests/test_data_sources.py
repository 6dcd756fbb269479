"""Real data sources: TFDS (mocked, and a tiny dataset prepared here without TensorFlow), image
folders (decode, cache, subsets, errors) and the shared CIFAR-10 folder when it is present."""

from __future__ import annotations

import io
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from prunebias_jax.config import ConfigError, base_config, validate_config
from prunebias_jax.data import SOURCES, DataError, image_folder, load_dataset

CIFAR10_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10").resolve()
CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The schema's `data` block (every field at its default) without imbalance, with
  `overrides` set."""
  data = base_config().data
  data.imbalance.classes = ()
  data.imbalance.keep_fractions = ()
  for key, value in overrides.items():
    data[key] = value
  return data


def test_sources_in_order():
  assert SOURCES == ("digits", "tfds", "image_folder")


def test_unknown_source_is_a_data_error():
  with pytest.raises(DataError, match="unknown data.source 'nope'.*digits, tfds, image_folder"):
    load_dataset(data_config(source="nope"))


# ---------------------------------------------------------------------------------------------
# TFDS


@pytest.fixture()
def tfds_mock(monkeypatch):
  """`tfds.testing.mock_data(policy=USE_CODE)`, which works without TensorFlow for
  `tfds.data_source` (AUTO falls back to USE_CODE too; USE_FILES needs metadata files).

  tensorflow-datasets 4.9.10's mock installs its batched `__getitems__` as an unbound partial,
  so `source.__getitems__(keys)` raises TypeError (`_getitems() missing ... 'record_keys'`);
  the loader reads in batches, so the mock's helper is replaced by a correct one here.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  def getitems(record_keys, generator, serialized=False):
    assert not serialized
    return [generator[k] for k in record_keys]

  monkeypatch.setattr(mocking, "_getitems", getitems)

  def mock(num_examples):
    return tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
    )

  return mock


def test_tfds_cifar10_mocked(tfds_mock):
  import tensorflow_datasets as tfds

  with tfds_mock(24):
    ds = load_dataset(data_config(source="tfds", name="cifar10"))
    names = tuple(tfds.builder("cifar10").info.features["label"].names)
  assert ds.name == "cifar10" and ds.num_classes == 10
  # Without prepared metadata (USE_CODE) ClassLabel names are '0'..'9'; a prepared cifar10 has
  # airplane..truck in its dataset_info (see the prepared-dataset test for real names).
  assert ds.class_names == names and len(names) == 10
  for split in (ds.train, ds.test):
    assert split.images.shape == (24, 32, 32, 3) and split.images.dtype == np.uint8
    assert split.labels.dtype == np.int32 and split.labels.min() >= 0 and split.labels.max() < 10
    assert split.groups is None
  assert len(ds.mean) == len(ds.std) == 3 and ds.dense_train is None


def test_tfds_celeb_a_mocked_attribute_labels_and_groups(tfds_mock):
  import tensorflow_datasets as tfds

  with tfds_mock(16):
    ds = load_dataset(
      data_config(source="tfds", name="celeb_a", image_size=16, label_attribute="Eyeglasses")
    )
    records = [tfds.data_source("celeb_a", split="train")[i] for i in range(16)]
    # '' / 0 mean "unset" (None fields cannot be overridden from the command line).
    default = load_dataset(
      data_config(
        source="tfds",
        name="celeb_a",
        image_size=8,
        test_split="validation",
        data_dir="",
        label_attribute="",
        group_attribute="",
        train_examples=0,
      )
    )
  expected_labels = np.array([int(r["attributes"]["Eyeglasses"]) for r in records])
  expected_groups = np.array([int(r["attributes"]["Male"]) for r in records])
  assert ds.class_names == ("not_Eyeglasses", "Eyeglasses") and ds.num_classes == 2
  assert (
    ds.train.images.shape == (16, 16, 16, 3) and ds.train.images.dtype == np.uint8
  )  # resized from 218x178
  np.testing.assert_array_equal(ds.train.labels, expected_labels)
  np.testing.assert_array_equal(ds.train.groups, expected_groups)
  assert ds.test.groups is not None and ds.test.groups.dtype == np.int32
  assert default.class_names == ("not_Blond_Hair", "Blond_Hair")
  assert default.train.images.shape == (16, 8, 8, 3)
  np.testing.assert_array_equal(
    default.train.labels, [int(r["attributes"]["Blond_Hair"]) for r in records]
  )


def test_tfds_celeb_a_bad_attribute_lists_valid_ones(tfds_mock):
  with tfds_mock(4), pytest.raises(DataError) as err:
    load_dataset(data_config(source="tfds", name="celeb_a", label_attribute="Blonde"))
  msg = str(err.value)
  assert (
    "data.label_attribute='Blonde'" in msg
    and "Blond_Hair" in msg
    and "Male" in msg
    and "\n" not in msg
  )
  with tfds_mock(4), pytest.raises(DataError, match="data.group_attribute='Gender'.*Male"):
    load_dataset(data_config(source="tfds", name="celeb_a", group_attribute="Gender"))


def test_tfds_unknown_name():
  with pytest.raises(
    DataError,
    match=r"data.name 'cifar11' is not a dataset.*did you mean .*'cifar10'.*check the name",
  ):
    load_dataset(data_config(source="tfds", name="cifar11"))


def test_tfds_data_dir_without_the_dataset(tmp_path):
  with pytest.raises(DataError) as err:
    load_dataset(data_config(source="tfds", name="cifar10", data_dir=str(tmp_path)))
  msg = str(err.value)
  assert "'cifar10' is not prepared" in msg and str(tmp_path) in msg
  assert f"python scripts/prepare_data.py --name cifar10 --data_dir {tmp_path}" in msg


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _tiny_builder_cls():
  """A TFDS builder whose examples carry PNG bytes, so it prepares without TensorFlow."""
  import tensorflow_datasets as tfds

  class PrunebiasTinyShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(6, 6, 3)),
            "label": tfds.features.ClassLabel(names=["circle", "square", "star"]),
            "colour": tfds.features.ClassLabel(names=["red", "blue"]),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(30, 0), "test": self._generate_examples(12, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield (
          i,
          {
            "image": _png(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)),
            "label": i % 3,
            "colour": i % 2,
          },
        )

  return PrunebiasTinyShapes


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _tiny_builder_cls()(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
  return str(data_dir)


def test_tfds_prepared_dataset_reads_without_tensorflow(tiny_tfds_dir):
  import tensorflow_datasets as tfds

  cfg = data_config(
    source="tfds", name="prunebias_tiny_shapes", data_dir=tiny_tfds_dir, group_attribute="colour"
  )
  ds = load_dataset(cfg)
  assert ds.class_names == ("circle", "square", "star") and ds.num_classes == 3
  assert ds.train.images.shape == (30, 6, 6, 3) and ds.test.images.shape == (12, 6, 6, 3)
  source = tfds.data_source("prunebias_tiny_shapes", split="train", data_dir=tiny_tfds_dir)
  for i in (0, 17, 29):  # record order is the prepared (shuffled) order; compare by index
    np.testing.assert_array_equal(ds.train.images[i], source[i]["image"])
    assert ds.train.labels[i] == source[i]["label"] and ds.train.groups[i] == source[i]["colour"]
  assert np.array_equal(ds.train.class_counts(3), [10, 10, 10])

  # A stratified subset reads the labels first, then decodes only the chosen records.
  sub = load_dataset(
    data_config(
      source="tfds",
      name="prunebias_tiny_shapes",
      data_dir=tiny_tfds_dir,
      train_examples=9,
      test_examples=6,
      image_size=4,
    )
  )
  assert np.array_equal(sub.train.class_counts(3), [3, 3, 3]) and np.array_equal(
    sub.test.class_counts(3), [2, 2, 2]
  )
  assert sub.train.images.shape == (9, 4, 4, 3)


def test_tfds_unknown_split(tiny_tfds_dir):
  cfg = data_config(
    source="tfds", name="prunebias_tiny_shapes", data_dir=tiny_tfds_dir, test_split="validation"
  )
  with pytest.raises(
    DataError, match="data.test_split='validation' is not a split.*available splits: test, train"
  ):
    load_dataset(cfg)


# ---------------------------------------------------------------------------------------------
# Image folder


def write_folder(
  root: Path, spec: dict[str, dict[str, int]], size=(5, 4), fmt="png", mode="RGB", seed=0
):
  """Writes `spec[split][class]` random images of `size` (W, H); returns {path: pixels as saved}."""
  rng = np.random.default_rng(seed)
  pixels = {}
  for split, classes in spec.items():
    for cls, n in classes.items():
      folder = root / split / cls
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        path = folder / f"img{i:03d}.{fmt}"
        Image.fromarray(arr).save(path)
        pixels[path] = arr
  return pixels


SPEC = {"train": {"zebra": 4, "ant": 3, "moth": 5}, "test": {"zebra": 2, "ant": 2, "moth": 1}}


def folder_config(root: Path, cache: Path, **kw):
  return data_config(source="image_folder", dir=str(root), cache_dir=str(cache), **kw)


def test_image_folder_pixels_classes_and_cache(tmp_path, monkeypatch):
  root, cache = tmp_path / "shapes", tmp_path / "cache"
  pixels = write_folder(root, SPEC)
  ds = load_dataset(folder_config(root, cache))
  assert (
    ds.name == "image_folder:shapes"
    and ds.class_names == ("ant", "moth", "zebra")
    and ds.num_classes == 3
  )
  assert ds.train.images.shape == (12, 4, 5, 3) and ds.train.images.dtype == np.uint8
  assert ds.train.labels.dtype == np.int32 and ds.test.images.shape == (5, 4, 5, 3)
  # Order: class index, then file name; PNG round-trips exactly.
  for split_name, split in (("train", ds.train), ("test", ds.test)):
    expected = [
      (c, p)
      for c, cls in enumerate(ds.class_names)
      for p in sorted((root / split_name / cls).iterdir())
    ]
    assert split.labels.tolist() == [c for c, _ in expected]
    for img, (_, p) in zip(split.images, expected):
      np.testing.assert_array_equal(img, pixels[p])
  np.testing.assert_allclose(ds.mean, ds.train.images.reshape(-1, 3).mean(0) / 255.0)

  # The cache lives under cache_dir, never in the data folder.
  cached = list(cache.glob("*.npz"))
  assert len(cached) == 1
  assert sorted(p for p in root.rglob("*") if p.is_file()) == sorted(pixels)

  # Second load: from the cache, no decoding at all.
  def no_decode(*args, **kwargs):
    raise AssertionError("decoded although cached")

  monkeypatch.setattr(image_folder, "decode_image", no_decode)
  again = load_dataset(folder_config(root, cache))
  np.testing.assert_array_equal(again.train.images, ds.train.images)
  np.testing.assert_array_equal(again.test.labels, ds.test.labels)
  assert again.mean == ds.mean

  # Touching a file (new mtime) or adding one invalidates the cache.
  monkeypatch.undo()
  calls = []
  original = image_folder.decode_image

  def counting(path, image_size=None):
    calls.append(path)
    return original(path, image_size)

  monkeypatch.setattr(image_folder, "decode_image", counting)
  some = sorted(pixels)[0]
  st = os.stat(some)
  os.utime(some, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
  touched = load_dataset(folder_config(root, cache))
  assert len(calls) == 17
  np.testing.assert_array_equal(touched.train.images, ds.train.images)
  write_folder(root / "extra", {"x": {"y": 1}})  # outside train/test: ignored, cache still valid
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "train" / "ant" / "new.png")
  calls.clear()
  grown = load_dataset(folder_config(root, cache))
  assert len(calls) == 18 and len(grown.train) == 13
  calls.clear()
  load_dataset(folder_config(root, cache))
  assert not calls
  assert len(list(cache.glob("*.npz"))) == 3


def test_image_folder_jpeg_greyscale_and_resize(tmp_path):
  root = tmp_path / "jpg"
  write_folder(root, SPEC, fmt="jpg", size=(8, 6))
  ds = load_dataset(folder_config(root, tmp_path / "c"))
  first = sorted((root / "train" / "ant").iterdir())[0]
  np.testing.assert_array_equal(ds.train.images[0], np.asarray(Image.open(first).convert("RGB")))
  resized = load_dataset(folder_config(root, tmp_path / "c", image_size=4))
  assert resized.train.images.shape == (12, 4, 4, 3)
  expected = np.asarray(Image.open(first).convert("RGB").resize((4, 4), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(resized.train.images[0], expected)

  grey = tmp_path / "grey"
  pixels = write_folder(grey, SPEC, mode="L")
  gds = load_dataset(folder_config(grey, tmp_path / "c"))
  assert gds.train.images.shape == (12, 4, 5, 1) and len(gds.mean) == 1
  np.testing.assert_array_equal(
    gds.train.images[0, ..., 0], pixels[sorted((grey / "train" / "ant").iterdir())[0]]
  )


def test_image_folder_subset_is_stratified_and_decodes_only_the_subset(tmp_path, monkeypatch):
  root = tmp_path / "many"
  write_folder(
    root, {"train": {"a": 10, "b": 10, "c": 10}, "test": {"a": 4, "b": 4, "c": 4}}, size=(2, 2)
  )
  calls = []
  original = image_folder.decode_image
  monkeypatch.setattr(
    image_folder, "decode_image", lambda p, s=None: calls.append(p) or original(p, s)
  )
  ds = load_dataset(folder_config(root, tmp_path / "c", train_examples=6, test_examples=3))
  assert len(calls) == 9
  assert ds.train.class_counts(3).tolist() == [2, 2, 2] and ds.test.class_counts(3).tolist() == [
    1,
    1,
    1,
  ]
  same = load_dataset(folder_config(root, tmp_path / "c", train_examples=6, test_examples=3))
  assert len(calls) == 9  # its own cache entry
  np.testing.assert_array_equal(same.train.images, ds.train.images)
  other = load_dataset(
    folder_config(root, tmp_path / "c", train_examples=6, test_examples=3, split_seed=1)
  )
  assert not np.array_equal(other.train.images, ds.train.images)
  uneven = load_dataset(folder_config(root, tmp_path / "c", train_examples=7))
  assert sorted(uneven.train.class_counts(3).tolist()) == [2, 2, 3] and len(uneven.test) == 12


def test_image_folder_with_imbalance(tmp_path):
  root = tmp_path / "imb"
  write_folder(
    root, {"train": {"a": 10, "b": 10, "c": 10}, "test": {"a": 2, "b": 2, "c": 2}}, size=(2, 2)
  )
  cfg = folder_config(root, tmp_path / "c")
  cfg.imbalance.classes = (1,)
  cfg.imbalance.keep_fractions = (0.3,)
  ds = load_dataset(cfg)
  assert ds.train.class_counts(3).tolist() == [10, 3, 10]
  assert ds.teacher_train.class_counts(3).tolist() == [10, 10, 10]
  assert ds.test.class_counts(3).tolist() == [2, 2, 2]
  # Classes by name: the same subset as by index.
  cfg.imbalance.classes = ("b",)
  by_name = load_dataset(cfg)
  np.testing.assert_array_equal(by_name.train.labels, ds.train.labels)
  np.testing.assert_array_equal(by_name.train.images, ds.train.images)
  # A class the dataset does not have, by index or by name, is refused when the dataset is
  # known (before any training), naming what is allowed.
  cfg.imbalance.classes = (3,)
  with pytest.raises(DataError, match=r"data\.imbalance\.classes has 3; .*\[0, 2\] or class names"):
    load_dataset(cfg)
  cfg.imbalance.classes = ("d",)
  with pytest.raises(DataError, match=r"names 'd', .* classes are 'a', 'b', 'c'"):
    load_dataset(cfg)
  cfg.imbalance.classes = (1, "b")
  with pytest.raises(DataError, match=r"names a class twice"):
    load_dataset(cfg)


def test_image_folder_errors(tmp_path):
  cache = tmp_path / "cache"
  with pytest.raises(DataError, match="data.dir .*nowhere.* does not exist"):
    load_dataset(folder_config(tmp_path / "nowhere", cache))

  root = tmp_path / "no_test"
  write_folder(root, {"train": SPEC["train"]})
  with pytest.raises(DataError, match=f"has no 'test' split: missing folder {root / 'test'}"):
    load_dataset(folder_config(root, cache))

  root = tmp_path / "classes"
  write_folder(root, {"train": SPEC["train"], "test": {"ant": 1, "zebra": 1, "wasp": 1}})
  with pytest.raises(DataError, match=r"missing in 'test': \['moth'\], only in 'test': \['wasp'\]"):
    load_dataset(folder_config(root, cache))

  root = tmp_path / "corrupt"
  write_folder(root, SPEC)
  bad = root / "train" / "moth" / "img002.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  with pytest.raises(DataError, match=f"cannot decode image file {bad}"):
    load_dataset(folder_config(root, cache))

  root = tmp_path / "mixed"
  write_folder(root, SPEC)
  odd = root / "test" / "zebra" / "img001.png"
  Image.fromarray(np.zeros((7, 3, 3), np.uint8)).save(odd)
  with pytest.raises(DataError) as err:
    load_dataset(folder_config(root, cache))
  msg = str(err.value)
  assert str(root / "train" / "ant" / "img000.png") in msg and "4x5" in msg
  assert str(odd) in msg and "7x3" in msg and "data.image_size" in msg
  assert load_dataset(folder_config(root, cache, image_size=3)).test.images.shape == (5, 3, 3, 3)

  root = tmp_path / "empty_class"
  write_folder(root, SPEC)
  (root / "train" / "wasp").mkdir()
  (root / "test" / "wasp").mkdir()
  (root / "train" / "wasp" / "notes.txt").write_text("no images here")
  with pytest.raises(
    DataError,
    match=f"class folder {root / 'train' / 'wasp'} has no .png/.jpg/.jpeg images; "
    "add images to it or delete the class folder 'wasp' from both 'train' and 'test'",
  ):
    load_dataset(folder_config(root, cache))

  root = tmp_path / "inside"
  write_folder(root, SPEC)
  with pytest.raises(DataError, match="cache_dir .* is inside the data folder"):
    load_dataset(folder_config(root, root / "cache"))

  # Bad sizes are config values: the validator refuses them before any data is read.
  for field, value in (("image_size", -2), ("train_examples", -1)):
    full = base_config()
    full.data = folder_config(tmp_path / "inside", cache, **{field: value})
    with pytest.raises(ConfigError, match=f"data.{field}={value}"):
      validate_config(full)


def test_image_folder_refuses_one_class_and_unreadable_entries_with_one_line(tmp_path):
  """Every entry the listing cannot use is a DataError naming its path (never an OSError
  traceback, never an example silently dropped)."""
  cache = tmp_path / "cache"

  def refused(root: Path, *expected: str) -> None:
    with pytest.raises(DataError) as err:
      load_dataset(folder_config(root, cache))
    message = str(err.value)
    assert "\n" not in message and all(e in message for e in expected), message

  root = tmp_path / "one"
  write_folder(root, {"train": {"ant": 3}, "test": {"ant": 2}})
  refused(root, "one class sub-folder ('ant')", "at least 2 classes")

  cases = {
    "loop_class": ("train/loop", "loop", "Too many levels of symbolic links"),
    "loop_image": ("train/ant/x.png", "x.png", "Too many levels of symbolic links"),
    "dangling": ("test/moth/gone.png", "nowhere.png", "No such file or directory"),
    "folder_as_image": ("train/zebra/up.png", "..", "is named like an image but is not a file"),
  }
  for name, (link, target, why) in cases.items():
    root = tmp_path / name
    write_folder(root, SPEC)
    os.symlink(target, root / link)
    refused(root, str(root / link), why)

  os.symlink("self", tmp_path / "self")
  refused(tmp_path / "self", "data.dir", "cannot be resolved")


def test_unusual_names_reach_tables_and_plots_intact(tmp_path):
  """Class and folder names are the user's: '$' (Matplotlib's mathtext), newlines, '|' and
  bytes that are not UTF-8 must not break the CIE grid or results.md after a whole run."""
  from prunebias_jax.errors import printable
  from prunebias_jax.report import write_cie_grid

  names = ["$x^$", "a$\\frac$|b", "c\nd", os.fsdecode(b"\xff\xfe"), "é <b>"]
  root = tmp_path / "we|ird\nname $\\alpha"
  write_folder(root, {"train": {n: 2 for n in names}, "test": {n: 1 for n in names}})
  ds = load_dataset(folder_config(root, tmp_path / "cache"))
  assert sorted(ds.class_names) == sorted(names)
  assert printable(ds.name) == "image_folder:we|ird\\nname $\\alpha"
  assert printable(os.fsdecode(b"\xff")) == "\\udcff" and printable("é <b>") == "é <b>"
  labels = ds.test.labels
  n = write_cie_grid(
    tmp_path / "grid.png",
    ds.test.images,
    np.arange(len(labels)),
    labels,
    labels[::-1],
    labels,
    ds.class_names,
  )
  assert n == len(names) and (tmp_path / "grid.png").stat().st_size > 0


def test_default_cache_dir_honours_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert image_folder.default_cache_dir() == tmp_path / "xdg" / "prunebias_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert image_folder.default_cache_dir() == tmp_path / "home" / ".cache" / "prunebias_jax"


def test_digits_unchanged_and_subset_fields():
  base = load_dataset(data_config())
  assert len(base.train) + len(base.test) == 1797 and base.image_shape == (8, 8, 1)
  sub = load_dataset(data_config(train_examples=100, test_examples=50, image_size=6))
  assert len(sub.train) == 100 and len(sub.test) == 50 and sub.image_shape == (6, 6, 1)
  assert sub.train.class_counts(10).tolist() == [10] * 10


# ---------------------------------------------------------------------------------------------
# The shared CIFAR-10 image folder


@pytest.mark.skipif(
  not CIFAR10_DIR.is_dir(),
  reason=f"shared CIFAR-10 image folder not found at {CIFAR10_DIR} "
  "(only the project's development machines have it)",
)
def test_shared_cifar10_subset(tmp_path):
  ds = load_dataset(
    folder_config(CIFAR10_DIR, tmp_path / "cache", train_examples=2000, test_examples=1000)
  )
  assert ds.name == "image_folder:cifar10" and ds.class_names == CIFAR10_CLASSES
  assert ds.train.images.shape == (2000, 32, 32, 3) and ds.test.images.shape == (1000, 32, 32, 3)
  assert ds.train.images.dtype == np.uint8
  assert ds.train.class_counts(10).tolist() == [200] * 10
  assert ds.test.class_counts(10).tolist() == [100] * 10
  assert all(0.3 < m < 0.6 for m in ds.mean) and all(0.15 < s < 0.35 for s in ds.std)


def test_prepare_data_script_explains_that_preparing_needs_tensorflow(tmp_path, capsys):
  import importlib.util

  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed here; preparing would try to download")
  script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"
  spec = importlib.util.spec_from_file_location("prepare_data", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.main(["--name", "cifar10", "--data_dir", str(tmp_path)]) == 2
  assert "needs TensorFlow" in capsys.readouterr().err and not any(tmp_path.iterdir())
