"""Download and prepare a TFDS dataset as ArrayRecord files, for the `tfds` data source.

    python scripts/prepare_data.py --name cifar10 --data_dir ~/tensorflow_datasets
    python scripts/prepare_data.py --name celeb_a --data_dir /data/tfds

Run it once on a machine with internet access. Preparing needs TensorFlow: TFDS builders such
as cifar10 read the raw downloads with `tf.io.gfile` and encode decoded images with
`tf.image` (tensorflow-datasets 4.9.10 fails with "No module named 'tensorflow'" without it).
Install it with `pip install tensorflow-cpu` (`pip install tensorflow` on macOS) or the
project's extra: `pip install -e '.[prepare]'`.

Reading the prepared folder afterwards does NOT need TensorFlow: the training code opens it
with `tfds.data_source` (random-access ArrayRecord, images decoded with Pillow). Copy the whole
`--data_dir` folder to the training machine and point `config.data.data_dir` at it, with
`config.data.source='tfds'` and `config.data.name=NAME`.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--name", required=True, help="TFDS dataset name, e.g. cifar10, cifar100, celeb_a"
  )
  parser.add_argument(
    "--data_dir",
    default=None,
    help="folder to write the prepared dataset to (default: the TFDS default, "
    "~/tensorflow_datasets or $TFDS_DATA_DIR)",
  )
  args = parser.parse_args(argv)

  try:
    import tensorflow  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print(
      "error: preparing a TFDS dataset needs TensorFlow; install it with "
      "`pip install tensorflow-cpu` (or `pip install -e '.[prepare]'`). Reading the prepared "
      "data later does not need it.",
      file=sys.stderr,
    )
    return 2

  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core import registered  # pylint: disable=import-outside-toplevel

  try:
    builder = tfds.builder(args.name, data_dir=args.data_dir)
  except registered.DatasetNotFoundError:
    print(
      f"error: {args.name!r} is not a TFDS dataset; see https://www.tensorflow.org/datasets/catalog/overview",
      file=sys.stderr,
    )
    return 2
  t0 = time.monotonic()
  builder.download_and_prepare(file_format="array_record")
  print(
    f"prepared {args.name} in {builder.data_dir} ({time.monotonic() - t0:.0f} s); splits: "
    + ", ".join(f"{k}={v.num_examples}" for k, v in sorted(builder.info.splits.items()))
  )
  # Check that it reads back the way training will read it (no TensorFlow involved there).
  for split in builder.info.splits:
    source = tfds.data_source(args.name, split=split, data_dir=args.data_dir, download=False)
    assert len(source) == builder.info.splits[split].num_examples, split
  print(
    f"use it with: --config.data.source=tfds --config.data.name={args.name}"
    + (f" --config.data.data_dir={args.data_dir}" if args.data_dir else "")
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
