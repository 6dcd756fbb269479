"""The names a config value may take, in one module that imports nothing.

The modules that implement the names re-export these tuples (`pruning.METHODS`,
`data.SOURCES`, ...), so there is one list, not two. The model registry and the quantization
schemes keep their own tables (names to builders and bit widths); a test holds their names
equal to `MODELS`, `QUANTIZATION_SCHEMES` and `STATIC_SCHEMES`. The config validator reads
the names from here: a bad value is one line in well under a
second, before JAX, Orbax or TFDS is imported (that import alone takes ~4 s on a 2-core CPU).
"""

from __future__ import annotations

DATA_SOURCES = ("digits", "tfds", "image_folder")
MODELS = (
  "resnet18",
  "resnet20",
  "resnet32",
  "resnet32x4",
  "resnet56",
  "small_cnn",
  "vgg11",
  "vgg16",
)
COMPUTE_DTYPES = ("float32", "bfloat16")
PRUNING_METHODS = ("l1_filter", "global_magnitude", "layer_magnitude", "random")
PRUNING_SCHEDULES = ("one_shot", "gradual")
LR_SCHEDULES = ("cosine", "step", "constant")
NONFINITE_RULES = ("stop", "skip")
FEATURE_METHODS = ("sp", "at", "pkt", "crd", "hint")
DISTILL_METHODS = ("ce", "kd", *FEATURE_METHODS, *(f"{m}+kd" for m in FEATURE_METHODS))
ZERO_RATE_RULES = ("floor", "exclude")
CONVENTIONS = ("simon_says", "nas2022")
QUANTIZATION_SCHEMES = ("int8_weights", "int4_weights", "int8_dynamic", "int8_static")
STATIC_SCHEMES = ("int8_static",)  # activation ranges calibrated on training images
CALIBRATIONS = ("absmax", "minmax")  # the Qwix weight/activation range rules `quantization` uses
STAGES = ("all", "dense", "cells", "report")  # config.stage: the parts of a sweep a worker runs
