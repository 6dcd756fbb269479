"""Config checks that run before any data is read or any model is trained.

Every failure raises `ConfigError` with one line naming the field, the bad value and what is
allowed; `main` prints that line and exits with code 2.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import ml_collections

# Only `choices` (no JAX): a bad value is reported before the ~4 s import of JAX and the rest.
from prunebias_jax.choices import (
  CALIBRATIONS,
  COMPUTE_DTYPES,
  CONVENTIONS,
  DISTILL_METHODS,
  MODELS,
  NONFINITE_RULES,
  PRUNING_SCHEDULES,
  QUANTIZATION_SCHEMES,
  STAGES,
  STATIC_SCHEMES,
  ZERO_RATE_RULES,
)
from prunebias_jax.choices import DATA_SOURCES as SOURCES
from prunebias_jax.choices import LR_SCHEDULES as SCHEDULES
from prunebias_jax.choices import PRUNING_METHODS as METHODS
from prunebias_jax.config.schema import base_config
from prunebias_jax.errors import ConfigError

MAX_IMAGE_SIZE = 1024
# Seeds reach jax.random.key and uint32 key arrays (population training): keep every seed,
# and the students' re-pruning seeds (seed + 1000 · epoch), inside int32.
MAX_SEED = 2**30 - 1
MAX_EPOCHS = 10**6  # also keeps seed + 1000 · epoch below 2^31
MAX_STEPS = 2**31 - 1  # the train state's step counter is int32
# A population is trained in one vmapped step on one device; with a single seed it expands to
# seeds s..s+population-1 before training (a fuzzed 10^8 once took 22 GB to enumerate them).
MAX_POPULATION = 1024
# Bootstrap resamples and permutations are drawn from fold_in(key, b) with an int32 b, and a
# million already puts a p-value's resolution at 1e-6 (a 95% interval needs ~10^4).
MAX_RESAMPLES = 10**6
MAX_SVCCA_CONV_SIZE = 64  # 64 × 64 positions: 4,096 SVCCAs per layer and model
SVCCA_RULES = ("anatome", "centered")
CLASSWISE_STATISTICS = ("normalized_recall", "accuracy")
BOOTSTRAP_INTERVALS = ("percentile", "bca", "basic")
FDR_METHODS = ("bh",)
CIE_TIE_RULES = ("disjoint_modes",)


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  """A finite real number (NaN and ±Inf are never a meaningful setting)."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is not allowed; expected {allowed}")


def _positive_int(cfg, field: str) -> None:
  v = _get(cfg, field)
  _require(_is_int(v) and v >= 1, field, v, "an integer >= 1")


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def _choice(cfg, field: str, allowed: Sequence[str]) -> None:
  v = _get(cfg, field)
  _require(v in allowed, field, v, "one of: " + ", ".join(allowed))


def _sequence(cfg, field: str) -> tuple:
  v = _get(cfg, field)
  _require(isinstance(v, (tuple, list)), field, v, "a tuple, e.g. '(0.5,0.9)'")
  return tuple(v)


def _distinct(values: tuple, field: str) -> None:
  """A sweep axis with a repeated value would train and report the same point twice (and
  weigh it twice in every correlation)."""
  seen = [v for i, v in enumerate(values) if v in values[:i]]
  _require(not seen, field, values, f"distinct values ({seen[0]!r} is repeated)" if seen else "")


def _optim(cfg, prefix: str) -> None:
  lr = _get(cfg, f"{prefix}.learning_rate")
  _require(_is_real(lr) and lr > 0, f"{prefix}.learning_rate", lr, "a number > 0")
  m = _get(cfg, f"{prefix}.momentum")
  _require(_is_real(m) and 0 <= m < 1, f"{prefix}.momentum", m, "a number in [0, 1)")
  wd = _get(cfg, f"{prefix}.weight_decay")
  _require(_is_real(wd) and wd >= 0, f"{prefix}.weight_decay", wd, "a number >= 0")
  _choice(cfg, f"{prefix}.schedule", SCHEDULES)
  for e in _sequence(cfg, f"{prefix}.decay_epochs"):
    _require(_is_real(e) and e >= 0, f"{prefix}.decay_epochs", e, "epochs >= 0")
  f = _get(cfg, f"{prefix}.decay_factor")
  _require(_is_real(f) and 0 < f <= 1, f"{prefix}.decay_factor", f, "a number in (0, 1]")


_TYPE_NAMES = {
  bool: "True or False",
  int: "an integer",
  float: "a finite number",
  str: "a string",
  tuple: "a tuple, e.g. '(1,2)'",
}


def _type_ok(value, kind: type) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return _is_int(value)
  if kind is float:
    return _is_real(value)
  if kind is str:
    return isinstance(value, str)
  if kind in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, kind)


def check_schema(
  cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict | None = None, prefix: str = ""
) -> None:
  """Every field of `cfg` is a field of the schema (`base_config()`), of the schema's type.

  A field whose default is None (`placeholder(type)`) may be None or of that type; floats must
  be finite. Catches a misspelt field in a config file (`config.dense.epoch = 3`), which
  ml_collections would otherwise accept silently.
  """
  if schema is None:
    schema = base_config()
  for key in cfg.keys():
    if key not in schema:
      known = ", ".join(sorted(schema.keys()))
      group = f" of config.{prefix[:-1]}" if prefix else ""
      raise ConfigError(
        f"config.{prefix}{key} is not a known field; the fields{group} are: {known}"
      )
  for key in schema.keys():
    dotted = f"{prefix}{key}"
    if key not in cfg:
      raise ConfigError(
        f"config.{dotted} is missing; start config files from prunebias_jax.config.base_config()"
      )
    default, value = schema[key], cfg[key]
    if isinstance(default, ml_collections.ConfigDict):
      _require(
        isinstance(value, (ml_collections.ConfigDict, dict)), dotted, value, "a group of fields"
      )
      check_schema(
        ml_collections.ConfigDict(value) if isinstance(value, dict) else value,
        default,
        dotted + ".",
      )
      continue
    kind = schema.get_ref(key).get_type()
    if default is None:  # a placeholder: None or its type
      _require(
        value is None or _type_ok(value, kind),
        dotted,
        value,
        f"None or {_TYPE_NAMES.get(kind, kind.__name__)}",
      )
    else:
      _require(_type_ok(value, kind), dotted, value, _TYPE_NAMES.get(kind, kind.__name__))


def check_runlocal_overrides(cfg: ml_collections.ConfigDict) -> None:
  """`runlocal_overrides` is a tuple of (dotted field, value) pairs naming known fields."""
  schema = base_config()
  overrides = cfg.get("runlocal_overrides", ())
  _require(
    isinstance(overrides, (tuple, list)),
    "runlocal_overrides",
    overrides,
    "a tuple of (dotted field, value) pairs",
  )
  for item in overrides:
    _require(
      isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str),
      "runlocal_overrides",
      item,
      "(dotted field, value) pairs, e.g. ('dense.epochs', 1)",
    )
    node = schema
    for part in item[0].split("."):
      _require(
        isinstance(node, ml_collections.ConfigDict) and part in node,
        "runlocal_overrides",
        item[0],
        "known dotted fields, e.g. 'dense.epochs'",
      )
      node = node[part]


SHARD_INDEX_VARIABLES = ("PRUNEBIAS_SHARD_INDEX", "SLURM_ARRAY_TASK_ID")


def shard_index(cfg: ml_collections.ConfigDict) -> int:
  """The shard this process runs: config.shard.index, or with -1 the first of
  SHARD_INDEX_VARIABLES that is set (0 when shard.count is 1)."""
  count, index = cfg.shard.count, cfg.shard.index
  if index != -1:
    return index
  if count == 1:
    return 0
  for name in SHARD_INDEX_VARIABLES:
    value = os.environ.get(name)
    if value is None:
      continue
    if not value.strip().isdigit() or int(value) >= count:
      raise ConfigError(
        f"${name}={value!r} is not a shard index for config.shard.count={count}; expected an "
        f"integer in [0, {count - 1}] (a SLURM array runs --array=0-{count - 1})"
      )
    return int(value)
  raise ConfigError(
    f"config.shard.count={count} needs the shard this process runs: pass "
    f"--config.shard.index=<0..{count - 1}> or set ${' or $'.join(SHARD_INDEX_VARIABLES)}"
  )


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first value that cannot run."""
  check_schema(cfg)
  _choice(cfg, "model", MODELS)
  _choice(cfg, "data.source", SOURCES)
  _positive_int(cfg, "data.batch_size")
  _positive_int(cfg, "data.eval_batch_size")
  if cfg.data.source == "tfds":
    _require(
      isinstance(cfg.data.name, str) and cfg.data.name != "",
      "data.name",
      cfg.data.name,
      "a TFDS dataset name with data.source=tfds, e.g. --config.data.name=cifar10",
    )
  if cfg.data.source == "image_folder":
    _require(
      isinstance(cfg.data.dir, str) and cfg.data.dir != "",
      "data.dir",
      cfg.data.dir,
      "a folder with train/<class>/* and test/<class>/* with data.source=image_folder",
    )
  for field in ("train_examples", "test_examples"):
    v = cfg.data[field]
    _require(_is_int(v) and v >= 0, f"data.{field}", v, "an integer >= 0 (0 = all)")
  size = cfg.data.image_size
  # The upper bound keeps a typo from resizing every image to gigabytes before the first
  # step (a 10^5-pixel side is 10 GB per grey image): past 1024 px, resize the data offline.
  _require(
    size is None or (_is_int(size) and 8 <= size <= MAX_IMAGE_SIZE),
    "data.image_size",
    size,
    f"None or an integer in [8, {MAX_IMAGE_SIZE}]",
  )
  tf = cfg.data.test_fraction
  _require(_is_real(tf) and 0 < tf < 1, "data.test_fraction", tf, "a number in (0, 1)")
  cp = cfg.data.crop_padding
  _require(_is_int(cp) and cp >= 0, "data.crop_padding", cp, "an integer >= 0")
  classes = _sequence(cfg, "data.imbalance.classes")
  fracs = _sequence(cfg, "data.imbalance.keep_fractions")
  _require(
    len(classes) == len(fracs),
    "data.imbalance.keep_fractions",
    fracs,
    f"one fraction per class in data.imbalance.classes ({len(classes)})",
  )
  for c in classes:
    _require(
      (_is_int(c) and c >= 0) or (isinstance(c, str) and c != ""),
      "data.imbalance.classes",
      c,
      "class indices >= 0 or class names",
    )
  _distinct(classes, "data.imbalance.classes")
  group = cfg.data.group_attribute
  names = (group,) if isinstance(group, str) else group
  _require(
    group is None
    or isinstance(group, str)  # '' is unset (a None field cannot be set from the command line)
    or (
      isinstance(names, (tuple, list))
      and len(names) > 0
      and all(isinstance(n, str) and n.strip() for n in names)
    ),
    "data.group_attribute",
    group,
    "None, an attribute name, or a tuple of names (intersectional groups), e.g. "
    "\"('race','gender')\"",
  )
  if group is not None and not isinstance(group, str):
    _distinct(tuple(group), "data.group_attribute")
  attributes = cfg.data.attributes
  _require(
    attributes is None or (cfg.data.source == "image_folder" and attributes.strip() != ""),
    "data.attributes",
    attributes,
    "None, or the path of an attributes table with data.source='image_folder' (TFDS datasets "
    "carry their attributes)",
  )
  for f in fracs:
    _require(_is_real(f) and 0 < f <= 1, "data.imbalance.keep_fractions", f, "fractions in (0, 1]")

  for stage in ("dense", "finetune"):
    _positive_int(cfg, f"{stage}.epochs")
    e = cfg[stage].epochs
    _require(e <= MAX_EPOCHS, f"{stage}.epochs", e, f"an integer in [1, {MAX_EPOCHS:,}]")
    if cfg[stage].batch_size is not None:
      _positive_int(cfg, f"{stage}.batch_size")
    _optim(cfg, f"{stage}.optim")

  methods = _sequence(cfg, "pruning.methods")
  _quantization(cfg)
  _require(
    len(methods) > 0 or len(cfg.quantization.schemes) > 0,
    "pruning.methods",
    methods,
    "at least one of: " + ", ".join(METHODS) + " (or none with quantization.schemes)",
  )
  for m in methods:
    _require(m in METHODS, "pruning.methods", m, "one of: " + ", ".join(METHODS))
  _distinct(methods, "pruning.methods")
  sparsities = _sequence(cfg, "pruning.sparsities")
  _require(len(sparsities) > 0, "pruning.sparsities", sparsities, "at least one sparsity in [0, 1)")
  for s in sparsities:
    _require(_is_real(s) and 0 <= s < 1, "pruning.sparsities", s, "sparsities in [0, 1)")
  _distinct(sparsities, "pruning.sparsities")

  _choice(cfg, "pruning.schedule", PRUNING_SCHEDULES)
  s0 = cfg.pruning.initial_sparsity
  _require(_is_real(s0) and 0 <= s0 < 1, "pruning.initial_sparsity", s0, "a number in [0, 1)")
  _positive_int(cfg, "pruning.frequency_epochs")
  ef = cfg.pruning.end_fraction
  _require(_is_real(ef) and 0 < ef <= 1, "pruning.end_fraction", ef, "a number in (0, 1]")

  seeds = _sequence(cfg, "seeds")
  _require(
    len(seeds) > 0 and all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds),
    "seeds",
    seeds,
    f"a non-empty tuple of integers in [0, {MAX_SEED}]",
  )
  _distinct(seeds, "seeds")
  _require(
    _is_int(cfg.seed) and 0 <= cfg.seed <= MAX_SEED,
    "seed",
    cfg.seed,
    f"an integer in [0, {MAX_SEED}]",
  )
  pop = cfg.population
  _require(
    _is_int(pop) and 1 <= pop <= MAX_POPULATION,
    "population",
    pop,
    f"an integer in [1, {MAX_POPULATION}] (the models trained together in one vmapped step)",
  )
  _require(
    len(seeds) == 1 or len(seeds) % pop == 0,
    "population",
    pop,
    f"a divisor of the number of seeds ({len(seeds)}), or pass a single seed to train seeds "
    f"s..s+{pop}-1",
  )
  _choice(cfg, "population_masks", ("per_seed", "shared"))

  t = cfg.kd.temperature
  _require(_is_real(t) and t > 0, "kd.temperature", t, "a number > 0")
  a = cfg.kd.alpha
  _require(_is_real(a) and 0 <= a <= 1, "kd.alpha", a, "a number in [0, 1]")

  temperatures = _sequence(cfg, "kd.temperatures")
  for t in temperatures:
    _require(_is_real(t) and t > 0, "kd.temperatures", t, "temperatures > 0")
  _distinct(temperatures, "kd.temperatures")
  _distill(cfg)
  dense_seeds = _sequence(cfg, "analysis.dense_seeds")
  for s in dense_seeds:
    _require(
      _is_int(s) and 0 <= s <= MAX_SEED, "analysis.dense_seeds", s, f"integers in [0, {MAX_SEED}]"
    )
  _distinct(dense_seeds, "analysis.dense_seeds")
  v = cfg.analysis.cie_grid_images
  _require(_is_int(v) and v >= 0, "analysis.cie_grid_images", v, "an integer >= 0 (0 = off)")
  for field, low in (("bootstrap_resamples", 0), ("correlation_resamples", 1), ("permutations", 1)):
    v = cfg.analysis[field]
    allowed = f"an integer in [{low}, {MAX_RESAMPLES:,}]{' (0 = off)' if low == 0 else ''}"
    _require(_is_int(v) and low <= v <= MAX_RESAMPLES, f"analysis.{field}", v, allowed)
  v = cfg.analysis.svcca_examples
  _require(
    _is_int(v) and (v == 0 or v >= 2),
    "analysis.svcca_examples",
    v,
    "0 (the whole test set) or an integer >= 2 (SVCCA needs two examples)",
  )
  v = cfg.analysis.svcca_conv_size
  _require(
    _is_int(v) and 1 <= v <= MAX_SVCCA_CONV_SIZE,
    "analysis.svcca_conv_size",
    v,
    f"an integer in [1, {MAX_SVCCA_CONV_SIZE}] (the pooled maps' side)",
  )
  for field in ("confidence", "fdr_q"):
    v = cfg.analysis[field]
    _require(_is_real(v) and 0 < v < 1, f"analysis.{field}", v, "a number in (0, 1)")
  _choice(cfg, "analysis.svcca_rule", SVCCA_RULES)
  _choice(cfg, "analysis.classwise_statistic", CLASSWISE_STATISTICS)
  _choice(cfg, "analysis.bootstrap_interval", BOOTSTRAP_INTERVALS)
  _choice(cfg, "analysis.fdr", FDR_METHODS)
  _choice(cfg, "analysis.cie_tie_rule", CIE_TIE_RULES)
  _choice(cfg, "metrics.zero_rate", ZERO_RATE_RULES)
  _choice(cfg, "metrics.convention", CONVENTIONS)
  _choice(cfg, "stage", STAGES)
  _positive_int(cfg, "shard.count")
  v = cfg.shard.index
  _require(
    _is_int(v) and -1 <= v < cfg.shard.count,
    "shard.index",
    v,
    f"an integer in [0, {cfg.shard.count - 1}] (shard.count={cfg.shard.count}), or -1: from "
    f"${' or $'.join(SHARD_INDEX_VARIABLES)}",
  )
  shard_index(cfg)
  cache = cfg.compile_cache
  _require(
    isinstance(cache, str)
    and cache.strip() != ""
    and (cache in ("auto", "off") or not os.path.isfile(os.path.expanduser(cache))),
    "compile_cache",
    cache,
    "'auto' ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/prunebias_jax/xla), 'off', or a directory",
  )
  ps = cfg.progress_seconds
  _require(_is_real(ps) and ps > 0, "progress_seconds", ps, "a number > 0")
  _choice(cfg, "nonfinite", NONFINITE_RULES)
  _choice(cfg, "compute_dtype", COMPUTE_DTYPES)
  every = cfg.checkpoint.every_steps
  _require(
    _is_int(every) and every >= 0,
    "checkpoint.every_steps",
    every,
    "an integer >= 0 (0 = only finished models)",
  )
  seconds = cfg.checkpoint.every_seconds
  _require(
    _is_real(seconds) and seconds >= 0,
    "checkpoint.every_seconds",
    seconds,
    "a number of seconds >= 0 (0 = no time-based saves)",
  )
  _choice(cfg, "checkpoint.background", ("auto", "on", "off"))
  _choice(cfg, "population_step", ("auto", "vmap", "map", "sequential"))
  _choice(cfg, "train_loop", ("auto", "scan", "step"))
  _positive_int(cfg, "scan_steps")
  if cfg.train_loop == "scan" and cfg.population_step == "sequential" and cfg.population > 1:
    raise ConfigError(
      "config.train_loop='scan' cannot run population_step='sequential' (one program per "
      "member); use population_step='vmap', 'map' or 'auto', or train_loop='step' or 'auto'"
    )
  _positive_int(cfg, "checkpoint.keep")
  _choice(cfg, "report.format", ("png", "pdf", "svg"))
  _cka_cell(cfg)
  every = cfg.monitor.every_steps
  _require(
    _is_int(every) and 0 <= every <= MAX_STEPS,
    "monitor.every_steps",
    every,
    f"an integer in [0, {MAX_STEPS}] (0 = no metrics.jsonl)",
  )
  for field in ("data.split_seed", "data.imbalance.seed"):  # NumPy seeds: the same range
    v = _get(cfg, field)
    _require(_is_int(v) and 0 <= v <= MAX_SEED, field, v, f"an integer in [0, {MAX_SEED}]")
  for field in ("data.train_split", "data.test_split", "data.label_attribute"):
    v = _get(cfg, field)
    _require(isinstance(v, str) and v.strip() != "", field, v, "a non-empty string")


def distill_methods(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """distill.method as a tuple of names (one name is a one-method run)."""
  method = cfg.distill.method
  return (method,) if isinstance(method, str) else tuple(method)


def stage_settings(
  cfg: ml_collections.ConfigDict, stage: str, method: str = "ce"
) -> tuple[ml_collections.ConfigDict, int, str]:
  """(optimizer config, batch size, the field that sets the batch size) of training `stage`
  ('dense' or 'finetune' with the fine-tuning `method`): <stage>.optim and <stage>.batch_size
  (else data.batch_size), with a feature method's distill.learning_rate / distill.batch_size
  in their place when set."""
  optim = cfg[stage].optim
  if stage == "finetune":
    feature = method.removesuffix("+kd")
    lr = cfg.distill.learning_rate.get(feature)
    if lr is not None:
      optim = ml_collections.ConfigDict({**optim.to_dict(), "learning_rate": lr})
    own = cfg.distill.batch_size.get(feature)
    if own:
      return optim, own, f"distill.batch_size.{feature}"
  if cfg[stage].batch_size:
    return optim, cfg[stage].batch_size, f"{stage}.batch_size"
  return optim, cfg.data.batch_size, "data.batch_size"


def _distill(cfg: ml_collections.ConfigDict) -> None:
  """distill.*: known method names, each once; weights finite and >= 0; CRD sizes."""
  method = cfg.distill.method
  names = distill_methods(cfg) if isinstance(method, (str, tuple, list)) else ()
  _require(
    len(names) > 0,
    "distill.method",
    method,
    f"a method name or a tuple of names of: {', '.join(DISTILL_METHODS)}",
  )
  for name in names:
    _require(
      name in DISTILL_METHODS, "distill.method", name, "one of: " + ", ".join(DISTILL_METHODS)
    )
  _distinct(names, "distill.method")
  _require(
    not cfg.kd.temperatures or "kd" in names,
    "kd.temperatures",
    cfg.kd.temperatures,
    f"() when distill.method {names} has no 'kd' (the sweep trains KD students)",
  )
  for field in ("ce_weight", "kl_weight", *(f"weights.{m}" for m in cfg.distill.weights)):
    v = _get(cfg, f"distill.{field}")
    _require(_is_real(v) and v >= 0, f"distill.{field}", v, "a finite number >= 0")
  for m in cfg.distill.learning_rate:
    v = cfg.distill.learning_rate[m]
    _require(v is None or (_is_real(v) and v > 0), f"distill.learning_rate.{m}", v, "None or > 0")
  for m in cfg.distill.batch_size:
    v = cfg.distill.batch_size[m]
    _require(
      v is None or (_is_int(v) and v >= 1), f"distill.batch_size.{m}", v, "None or an integer >= 1"
    )
  crd = cfg.distill.crd
  for field in ("feat_dim", "negatives"):
    _require(
      _is_int(crd[field]) and crd[field] >= 1, f"distill.crd.{field}", crd[field], "an integer >= 1"
    )
  _require(
    _is_real(crd.temperature) and crd.temperature > 0,
    "distill.crd.temperature",
    crd.temperature,
    "a number > 0",
  )
  _require(
    _is_real(crd.momentum) and 0 <= crd.momentum < 1,
    "distill.crd.momentum",
    crd.momentum,
    "a number in [0, 1)",
  )


def _quantization(cfg: ml_collections.ConfigDict) -> None:
  """quantization.*: known schemes and pruning methods, each once; a known range rule; a
  calibration size that can be drawn (its upper bound: `validate_against_dataset`)."""
  q = cfg.quantization
  schemes = _sequence(cfg, "quantization.schemes")
  for name in schemes:
    _require(
      name in QUANTIZATION_SCHEMES,
      "quantization.schemes",
      name,
      "one of: " + ", ".join(QUANTIZATION_SCHEMES),
    )
  _distinct(schemes, "quantization.schemes")
  first = _sequence(cfg, "quantization.prune_first")
  for m in first:
    _require(m in METHODS, "quantization.prune_first", m, "pruning methods: " + ", ".join(METHODS))
  _distinct(first, "quantization.prune_first")
  _require(
    not first or schemes,
    "quantization.prune_first",
    first,
    "() without quantization.schemes (each pruning method is combined with every scheme)",
  )
  _require(
    q.ptq or q.qat or not schemes,
    "quantization.qat",
    q.qat,
    "True when quantization.ptq is False (a scheme needs a PTQ or a QAT model)",
  )
  for field in ("weight_calibration", "act_calibration"):
    _choice(cfg, f"quantization.{field}", CALIBRATIONS)
  _positive_int(cfg, "quantization.calibration_examples")


def quantization_methods(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The quantized compression methods of a run: every scheme, then every
  '<pruning method>+<scheme>' of quantization.prune_first."""
  schemes = tuple(cfg.quantization.schemes)
  return schemes + tuple(f"{m}+{s}" for m in cfg.quantization.prune_first for s in schemes)


def _cka_cell(cfg: ml_collections.ConfigDict) -> None:
  """report.cka_cell names a cell the run trains: 'method,sparsity,<distill method>' or ''."""
  value = cfg.report.cka_cell
  if value == "":
    return
  parts = value.split(",") if isinstance(value, str) else []
  methods = list(cfg.pruning.methods) + (["none"] if cfg.pruning.control else [])
  methods += quantization_methods(cfg)
  zero = cfg.pruning.control or cfg.quantization.schemes
  sparsities = list(cfg.pruning.sparsities) + ([0.0] if zero else [])
  tunings = distill_methods(cfg) + (("ptq",) if cfg.quantization.schemes else ())
  ok = len(parts) == 3 and parts[0] in methods and parts[2] in tunings
  try:
    ok = ok and any(abs(float(parts[1]) - s) < 1e-12 for s in sparsities)
  except ValueError:
    ok = False
  _require(
    ok,
    "report.cka_cell",
    value,
    "'' or 'method,sparsity,ce|kd|...' of a cell this run trains (methods "
    f"{', '.join(methods)}; sparsities {', '.join(f'{s:g}' for s in sparsities)}; "
    f"fine-tuning {'|'.join(tunings)})",
  )


def _made_by(cfg: ml_collections.ConfigDict, split: str) -> str:
  """What shrank a split ('dense', 'finetune' or 'test'), so that a size error names the
  fields to change (the imbalance shrinks the dense split only with `apply_to_dense`)."""
  d = cfg.data
  causes = []
  if d.source == "digits":
    causes.append(f"config.data.test_fraction={d.test_fraction}")
  subset = d.test_examples if split == "test" else d.train_examples
  if subset:
    causes.append(f"config.data.{split if split == 'test' else 'train'}_examples={subset}")
  if d.imbalance.classes and (
    split == "finetune" or (split == "dense" and d.imbalance.apply_to_dense)
  ):
    causes.append(f"config.data.imbalance.keep_fractions={tuple(d.imbalance.keep_fractions)}")
  return f", after {' and '.join(causes)}" if causes else ""


def validate_against_dataset(
  cfg: ml_collections.ConfigDict,
  num_classes: int,
  teacher_train_size: int,
  finetune_train_size: int,
  test_size: int | None = None,
  image_shape: Sequence[int] | None = None,
) -> None:
  """Checks that need the dataset's size (still before any training)."""
  if image_shape is not None:  # a padding beyond the image makes crops of padding alone
    side = min(image_shape[:2])
    cp = cfg.data.crop_padding
    _require(cp <= side, "data.crop_padding", cp, f"at most the image side ({side} pixels)")
  _require(
    num_classes >= 2,
    "data.source",
    cfg.data.source,
    f"a dataset with at least 2 classes (this one has {num_classes}); CEV, SDE and every "
    "per-class comparison need two",
  )
  if test_size is not None:
    _require(
      test_size >= 2,
      "data.test_examples",
      cfg.data.test_examples,
      f"a test split of at least 2 examples (this one has {test_size}{_made_by(cfg, 'test')}; "
      "SVCCA and every comparison need two)",
    )
  if any(name in STATIC_SCHEMES for name in cfg.quantization.schemes):
    n = cfg.quantization.calibration_examples
    _require(
      n <= finetune_train_size,
      "quantization.calibration_examples",
      n,
      f"at most the fine-tuning training split size ({finetune_train_size}"
      f"{_made_by(cfg, 'finetune')}; the static ranges are calibrated on its images)",
    )
  stages = [("dense", teacher_train_size, "ce")]
  stages += [("finetune", finetune_train_size, m) for m in distill_methods(cfg)]
  checks = []
  for stage, size, method in stages:
    _, bs, field = stage_settings(cfg, stage, method)
    checks.append((stage, size, field, bs))
  # Once per batch-size field: the methods without a batch size of their own share one.
  for stage, size, field, bs in dict.fromkeys(checks):
    _require(
      bs <= size,
      field,
      bs,
      f"at most the {stage} training split size ({size}{_made_by(cfg, stage)})",
    )
    steps = cfg[stage].epochs * -(-size // bs)
    _require(
      steps <= MAX_STEPS,
      f"{stage}.epochs",
      cfg[stage].epochs,
      f"at most {MAX_STEPS // -(-size // bs):,} epochs of {-(-size // bs)} steps (the step counter "
      "is int32)",
    )
