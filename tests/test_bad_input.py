"""Bad input everywhere: fuzzed config values, foreign and damaged checkpoints, NaN losses,
and nothing from data or checkpoints is ever executed or unpickled."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from prunebias_jax import distributed, main, records, stages
from prunebias_jax.checkpoint import CheckpointError, ModelCheckpoint
from prunebias_jax.config import (
  ConfigError,
  base_config,
  check_schema,
  resolve_config,
  validate_against_dataset,
  validate_config,
)
from prunebias_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _fields(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key in cfg.keys():
    if isinstance(cfg[key], ml_collections.ConfigDict):
      out += _fields(cfg[key], f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


FIELDS = _fields(base_config())
# A value given for one field can be reported against its partner (a pair must agree).
PARTNERS = {
  "data.source": ("data.name", "data.dir"),
  "data.imbalance.classes": ("data.imbalance.keep_fractions",),
  "data.imbalance.keep_fractions": ("data.imbalance.classes",),
  "seeds": ("population",),
  "data.batch_size": ("dense.batch_size", "finetune.batch_size"),
  "data.imbalance.apply_to_dense": ("data.imbalance.keep_fractions",),
  "num_processes": ("process_id",),
}

_scalar = st.one_of(
  st.integers(-(10**9), 10**9),
  st.floats(allow_nan=True, allow_infinity=True),
  st.booleans(),
  st.sampled_from(
    [
      "None",
      "",
      "0",
      "-1",
      "1e400",
      "nan",
      "inf",
      "resnet20",
      "tfds",
      "cifar10",
      "shared",
      "skip",
      "bfloat16",
      "(",
      "'",
      "l1_filter",
      "cosine",
      "exclude",
    ]
  ),
  st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
)
_value = st.one_of(
  _scalar, st.lists(_scalar, max_size=4).map(lambda xs: "(" + ",".join(map(str, xs)) + ",)")
)


def _parse(
  argv: list[str], config_file: str | Path | None = None
) -> tuple[ml_collections.ConfigDict | None, str, int | None]:
  """The CLI's own parsing (main.parse_flags) on fresh flags: (config, stderr, exit code)."""
  config_file = config_file or ROOT / "configs/default.py"
  argv = ["prunebias_jax", "--config", str(config_file), *argv]
  # config_flags loads every file as the module 'config_config' through load_module(), which
  # reuses a module already in sys.modules: without this, a file without get_config() would
  # find the previous file's (the CLI loads one file per process).
  sys.modules.pop("config_config", None)
  fv = flags.FlagValues()
  # config_flags finds the --config.* overrides in sys_argv (main's FLAGS: sys.argv).
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  err = io.StringIO()
  with redirect_stderr(err):
    try:
      main.parse_flags(argv, fv)
      config = main.loaded_config(fv["config"])
    except SystemExit as e:
      return None, err.getvalue(), e.code
  return config, err.getvalue(), None


@pytest.mark.parametrize(
  "argv,key",
  [
    (
      ["--config.pruning.methods=('random',)", "--config.pruning.methods=('l1_filter',)"],
      "pruning.methods",
    ),
    (["--config.seed=1", "--config.dense.epochs=2", "--config.seed", "2"], "seed"),
  ],
)
def test_an_override_given_twice_is_refused_not_joined(argv, key):
  """ml_collections applies both: the two tuples above would run ('random', 'l1_filter')."""
  config, err, code = _parse(argv)
  assert code == 2 and config is None
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: --config.{key} is given 2 times"), err
  once, err, code = _parse(argv[:1])
  assert code is None and err == "", err


@settings(
  max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(field=st.sampled_from(FIELDS), value=_value)
# Found by the fuzz in CI: the batch-size error did not name the field that shrank the split.
@example(field="data.train_examples", value=1)
@example(field="data.test_examples", value=1)
def test_fuzzed_config_value_starts_or_exits_2_naming_the_field(field, value):
  """Any value for any field, as typed on the command line: the run either gets past every
  check done before training (and the model/data set-up), or stops with exit code 2 and one
  line that names the field — never a traceback."""
  config, err, code = _parse([f"--config.{field}={value}"])
  if config is None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err
    assert field.split(".")[-1] in lines[0] or str(value)[:20] in lines[0], lines[0]
    return
  with tempfile.TemporaryDirectory() as workdir:
    try:
      distributed._arguments(config)  # what main checks before initialising JAX
      stages.prepare(config, workdir)
    except UserError as e:  # ConfigError, or DataError for a data source that cannot be read
      message = str(e)
      assert "\n" not in message
      names = (field,) + PARTNERS.get(field, ())
      assert any(n in message for n in names), (field, value, message)


# ------------------------------------------------------------------ integer fields at their dtypes
def test_an_eval_batch_beyond_the_test_split_holds_no_padding(tmp_path):
  """data.eval_batch_size has no upper bound to check: a batch larger than the test split is
  cut to it (10^12 used to allocate 10^12 padded images before training)."""
  cfg = base_config()
  cfg.data.eval_batch_size = 10**12
  ctx = stages.prepare(cfg, tmp_path)
  assert ctx.eval_images.shape[:2] == (1, len(ctx.data.test))


def _get_field(cfg: ml_collections.ConfigDict, field: str):
  for part in field.split("."):
    cfg = cfg[part]
  return cfg


def _set_field(cfg: ml_collections.ConfigDict, field: str, value) -> None:
  *path, last = field.split(".")
  node = cfg
  for part in path:
    node = node[part]
  node[last] = value


INT_FIELDS = [f for f in FIELDS if type(_get_field(base_config(), f)) is int]  # not bools
SEED_TUPLES = ("seeds", "analysis.dense_seeds")
BOUNDARIES = (-1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**63, 10**30)
DIGITS = dict(num_classes=10, teacher_train_size=1078, finetune_train_size=1078, test_size=719)


def _run_seeds(cfg: ml_collections.ConfigDict) -> tuple[list[int], list[int]]:
  """(seeds that reach jax.random, seeds that reach NumPy) of a run with `cfg`, derived with
  the pipeline's own functions: the dense seeds, every population member, the students'
  re-pruning seeds (seed + 1000 · epoch) and the data seeds."""
  members = [s for group in stages.seed_groups(cfg) for s in group]
  to_jax = stages.dense_seeds(cfg) + members
  to_numpy = [cfg.data.split_seed, cfg.data.imbalance.seed]
  to_numpy += [s + 1000 * cfg.finetune.epochs for s in members]
  return to_jax, to_numpy


@pytest.mark.parametrize("field", INT_FIELDS + list(SEED_TUPLES))
def test_integer_field_boundaries_are_refused_or_fit_the_dtypes_they_reach(field):
  """Each integer field at the edges of int32, uint32, int64 and beyond: refused before
  training with one line naming the field, or every value the run derives from it fits the
  dtype it reaches (seeds: uint32 key arrays and int32; resample and permutation ids and the
  step counter: int32) without wrapping."""
  int32 = np.iinfo(np.int32).max
  for value in BOUNDARIES:
    cfg = base_config()
    _set_field(cfg, field, (value,) if field in SEED_TUPLES else value)
    try:
      validate_config(cfg)
      validate_against_dataset(cfg, **DIGITS, image_shape=(8, 8, 1))
    except ConfigError as e:
      assert field in str(e) and "\n" not in str(e), (field, value, str(e))
      continue
    to_jax, to_numpy = _run_seeds(cfg)
    as_keys = np.asarray(jnp.asarray(to_jax, jnp.uint32)).tolist()
    assert as_keys == to_jax and max(to_jax) <= int32, (field, value)
    assert max(to_numpy) <= int32, (field, value)
    for stage in ("dense", "finetune"):
      steps = cfg[stage].epochs * -(-DIGITS["teacher_train_size"] // cfg.data.batch_size)
      assert steps <= int32, (field, value, stage)
    for resampled in ("bootstrap_resamples", "correlation_resamples", "permutations"):
      assert cfg.analysis[resampled] <= int32, (field, value)


_EXCEPTIONS = (
  "RuntimeError",
  "ValueError",
  "KeyError",
  "TypeError",
  "ZeroDivisionError",
  "ImportError",
  "AssertionError",
  "OSError",
  "AttributeError",
  "NotImplementedError",
  "Exception",
)
_message = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
_config_file = st.one_of(
  st.tuples(st.just("raise_in_get_config"), st.sampled_from(_EXCEPTIONS), _message),
  st.tuples(st.just("raise_at_import"), st.sampled_from(_EXCEPTIONS), _message),
  st.tuples(
    st.just("syntax"), st.sampled_from(["def get_config(:", "x = (", "  bad indent"]), _message
  ),
  st.tuples(st.just("missing_import"), st.just("no_such_module_qq"), _message),
  st.tuples(
    st.just("returns"),
    st.sampled_from(["None", "5", "'x'", "[1]", "{'a': 1}", "object()"]),
    _message,
  ),
  st.tuples(st.just("wrong_type"), st.sampled_from(FIELDS), _value),
  st.tuples(st.just("new_field"), st.sampled_from(FIELDS), _value),
  st.tuples(st.just("no_get_config"), st.just(""), _message),
  st.tuples(st.just("exits"), st.sampled_from(["0", "1", "'bye'", "None"]), _message),
)


def _write_config_file(path: Path, case: tuple) -> None:
  kind, what, text = case
  base = "from configs.default import get_config as _base\n"
  body = {
    "raise_in_get_config": f"{base}def get_config():\n  cfg = _base()\n  raise {what}({text!r})\n",
    "raise_at_import": f"raise {what}({text!r})\ndef get_config():\n  return None\n",
    "syntax": f"{what}\ndef get_config():\n  return None\n",
    "missing_import": f"import {what}\ndef get_config():\n  return None\n",
    "returns": f"def get_config():\n  return {what}\n",
    "wrong_type": f"{base}def get_config():\n  cfg = _base()\n  cfg.{what} = {text!r}\n"
    "  return cfg\n",
    "new_field": f"{base}def get_config():\n  cfg = _base()\n  cfg.{what}_x = {text!r}\n"
    "  return cfg\n",
    "no_get_config": "X = 1\n",
    "exits": f"import sys\ndef get_config():\n  sys.exit({what})\n",
  }[kind]
  path.write_text(body)


@settings(
  max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")) // 3,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=_config_file)
def test_fuzzed_config_files_end_in_one_line_naming_the_file(case):
  """A config file that raises anything, does not parse, imports what is missing, returns
  something else than a ConfigDict, sets a wrong type or a field that does not exist: exit 2
  with one line naming the file (and the line, where it failed in the file) — or, when the
  value is a legal one, a run that gets past every check."""
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "my_config.py"
    _write_config_file(path, case)
    config, err, code = _parse([], config_file=path)
    if config is None:
      lines = [line for line in err.splitlines() if line.strip()]
      assert code == 2 and len(lines) == 1, err
      assert lines[0].startswith("error: cannot load --config ") and str(path) in lines[0], err
      if case[0] in ("raise_in_get_config", "raise_at_import", "syntax", "missing_import", "exits"):
        assert f"{path}, line " in lines[0], err
      return
    assert case[0] in ("wrong_type", "new_field"), (case, "loaded")
    try:
      stages.prepare(config, Path(tmp) / "w")
    except UserError as e:
      assert "\n" not in str(e) and case[1] in str(e), (case, str(e))


@pytest.mark.parametrize("returned", ["None", "5", "[1]", "{'dense': {'epochs': 3}}", "object()"])
def test_config_file_returning_no_configdict_is_named_with_overrides_too(returned, tmp_path):
  """With a --config.* override, ml_collections applies it to whatever get_config() returned
  and fails inside (a TypeError about list indices, a KeyError): the line still names the
  file and what it returned."""
  path = tmp_path / "returns.py"
  _write_config_file(path, ("returns", returned, ""))
  config, err, code = _parse(["--config.dense.epochs=1"], config_file=path)
  lines = [line for line in err.splitlines() if line.strip()]
  assert config is None and code == 2 and len(lines) == 1, err
  assert lines[0].startswith(f"error: cannot load --config {path}: get_config() returned "), err
  assert lines[0].endswith("not an ml_collections.ConfigDict"), err


@pytest.mark.parametrize(
  "field,value,expected",
  [
    ("dense.epochs", "3.5", "dense.epochs"),
    ("dense.optim.learning_rate", "inf", "learning_rate=inf"),
    ("kd.temperature", "nan", "kd.temperature=nan"),
    ("nonfinite", "ignore", "nonfinite='ignore'"),
    ("compute_dtype", "float16", "compute_dtype='float16'"),
    ("checkpoint.every_steps", "-1", "checkpoint.every_steps=-1"),
    ("checkpoint.keep", "0", "checkpoint.keep=0"),
    ("checkpoint.every_seconds", "-5.0", "checkpoint.every_seconds=-5.0"),
    ("checkpoint.every_seconds", "nan", "checkpoint.every_seconds=nan"),
    ("checkpoint.background", "maybe", "checkpoint.background='maybe' is not allowed; expected"),
    ("population_step", "pmap", "population_step='pmap' is not allowed; expected one of: auto"),
    ("population_step", "serial", "expected one of: auto, vmap, map, sequential"),
    ("train_loop", "jit", "train_loop='jit' is not allowed; expected one of: auto, scan, step"),
    ("scan_steps", "0", "scan_steps=0"),
    ("data.label_attribute", "", "data.label_attribute"),
    # Once accepted: every digit resized to 10 GB before the first step (the fuzz found it by
    # running the machine out of memory).
    ("data.image_size", "100000", "data.image_size=100000"),
    # Accepted once, then duplicate records and correlations over repeated points.
    ("pruning.sparsities", "(0.5,0.5)", "0.5 is repeated"),
    ("pruning.methods", "('random','l1_filter','random')", "'random' is repeated"),
    ("kd.temperatures", "(2.0,4.0,2.0)", "2.0 is repeated"),
    ("analysis.dense_seeds", "(1,1)", "1 is repeated"),
    # Once failed only after the dense model was trained, or never ended.
    ("seed", "2147483648", "seed=2147483648"),
    ("seeds", "(0,4294967296)", "seeds=(0, 4294967296)".replace(")", "")),
    ("dense.epochs", "100000000000000000000000", "dense.epochs=100000000000000000000000"),
    ("data.test_examples", "1", "data.test_examples=1"),
    ("population", "100000000", "population=100000000"),
    ("analysis.svcca_conv_size", "0", "analysis.svcca_conv_size=0"),
    ("analysis.svcca_conv_size", "65", "analysis.svcca_conv_size=65"),
    ("report.format", "jpeg", "report.format='jpeg' is not allowed; expected one of: png, pdf"),
    ("report.cka_cell", "l1_filter,0.3,kd", "sparsities 0.5, 0.7, 0.9, 0.95, 0.98"),
    ("report.cka_cell", "l1_filter,0.5", "report.cka_cell='l1_filter,0.5'"),
    ("monitor.every_steps", "-1", "monitor.every_steps=-1"),
    ("data.attributes", "t.csv", "data.attributes='t.csv'"),
    ("data.imbalance.classes", "(3,3,5)", "expected distinct values (3 is repeated"),
    ("distill.method", "sq", "distill.method='sq' is not allowed; expected one of: ce, kd, sp"),
    ("distill.method", "('ce','sp+kd','ce')", "expected distinct values ('ce' is repeated"),
    ("distill.method", "()", "expected a method name or a tuple of names of: ce, kd, sp"),
    ("distill.weights.sp", "-1.0", "distill.weights.sp=-1.0 is not allowed"),
    ("distill.weights.at", "nan", "distill.weights.at=nan"),
    ("distill.weights.crd", "inf", "distill.weights.crd=inf"),
    ("distill.kl_weight", "-0.5", "distill.kl_weight=-0.5"),
    ("distill.crd.negatives", "0", "distill.crd.negatives=0"),
    ("distill.learning_rate.at", "0.0", "distill.learning_rate.at=0.0"),
    ("quantization.schemes", "('int8',)", "quantization.schemes='int8' is not allowed; expected"),
    ("quantization.schemes", "('int4_weights','int4_weights')", "'int4_weights' is repeated"),
    ("quantization.prune_first", "('random',)", "without quantization.schemes"),
    ("quantization.calibration_examples", "0", "quantization.calibration_examples=0"),
    ("quantization.act_calibration", "rms", "quantization.act_calibration='rms' is not allowed"),
    ("pruning.methods", "()", "or none with quantization.schemes"),
  ],
)
def test_specific_bad_values_name_the_field(tmp_path, field, value, expected):
  config, err, code = _parse([f"--config.{field}={value}"])
  if config is None:
    assert code == 2 and expected.split("=")[0].split(".")[-1] in err
    return
  with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
    stages.prepare(config, tmp_path)


def test_a_misspelt_field_in_a_config_file_is_refused():
  cfg = base_config()
  cfg.dense.epoch = 3  # ml_collections accepts new fields silently
  with pytest.raises(ConfigError, match=r"config\.dense\.epoch is not a known field"):
    check_schema(cfg)
  cfg = base_config()
  cfg.runlocal_overrides = (("dense.epoch", 1),)
  with pytest.raises(ConfigError, match=r"runlocal_overrides='dense\.epoch'"):
    resolve_config(cfg)


def test_a_model_that_cannot_take_the_images_is_refused_before_training(tmp_path, monkeypatch):
  import flax.linen as nn

  class NeedsLargeImages(nn.Module):
    """A head flattened to a fixed 32×32×3 input, given 8×8×1 digits: the shape error only
    shows when the model is traced."""

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(4, (3, 3))(x)
      return nn.Dense(10)(x.reshape((x.shape[0], 32 * 32 * 3)))

  monkeypatch.setattr(stages, "get_model", lambda name, num_classes, dtype: NeedsLargeImages())
  cfg = base_config()
  with pytest.raises(ConfigError, match=r"config\.model='small_cnn' cannot take 8×8×1 images"):
    stages.prepare(cfg, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
  "field,values",
  [
    ("bootstrap_resamples", (0, 1, 2)),
    ("correlation_resamples", (0, 1, 2)),
    ("permutations", (0, 1)),
    ("svcca_examples", (0, 1, 2)),
    ("confidence", (1e-9, 0.999999)),
    ("fdr_q", (1e-9, 0.99999)),
  ],
)
def test_every_analysis_value_the_validator_accepts_runs(field, values):
  """The boundary values of the analysis settings: refused with ConfigError, or the analysis
  runs with them (a value that passes validation must not crash hours later)."""
  from prunebias_jax import records as analysis
  from prunebias_jax.records import Outputs

  rng = np.random.default_rng(0)
  n, C = 40, 10
  labels = rng.integers(0, C, n)
  ref = np.where(rng.random(n) < 0.2, 0, labels)
  preds = [np.where(rng.random(n) < 0.3, rng.integers(0, C, n), labels) for _ in range(2)]
  for value in values:
    cfg = base_config()
    cfg.analysis[field] = value
    try:
      validate_config(cfg)
    except ConfigError as e:
      assert f"analysis.{field}" in str(e)
      continue
    analysis.bootstrap_intervals(labels, ref, preds[0], None, C, 0, cfg.analysis, cfg.metrics, 0)
    analysis.cell_analysis(labels, [ref, preds[1]], preds, C, cfg.analysis, seed=0)
    rows = [
      {
        "method": "m",
        "sparsity": s,
        "kd": kd,
        "temperature": None,
        "seed": 0,
        "accuracy": 0.5,
        "agreement": 0.5,
        **{k: float(rng.random()) for k in ("cev", "sde", "cka", "svcca", "cka_debiased")},
      }
      for s in (0.5, 0.7, 0.9)
      for kd in (False, True)
    ]
    analysis.correlations(rows, [], cfg.analysis, 0)
    layers = {
      name: rng.normal(size=(n, d)).astype(np.float32)
      for name, d in (("features", 16), ("logits", C))
    }
    out = Outputs(ref, layers["logits"])
    teacher = analysis.reference(labels, None, C, out, cfg.analysis.svcca_examples)
    sim, _ = analysis.similarity_of(layers, layers, teacher.svcca_index)
    out = dataclasses.replace(out, similarity=sim)
    analysis.similarity_by_layer(out, out, teacher.svcca_index, cfg.analysis.svcca_rule)


# ------------------------------------------------------------------------------- checkpoints
def _tree_hash(directory: Path) -> str:
  h = hashlib.sha256()
  for p in sorted(directory.rglob("*")):
    h.update(str(p.relative_to(directory)).encode())
    if p.is_file():
      h.update(p.read_bytes())
  return h.hexdigest()


def _tiny(workdir: Path) -> ml_collections.ConfigDict:
  from configs.default import get_config

  cfg = get_config()  # the demo's data: its imbalanced fine-tuning split (12 steps an epoch)
  cfg.dense.epochs = 1
  cfg.progress_seconds = 1e9
  return cfg


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
  foreign = ModelCheckpoint(
    tmp_path / "checkpoints" / "dense", expect={"model": "resnet20", "num_classes": 10}
  )
  foreign.save(100, {"params": {"w": jnp.ones((3, 3))}}, {"steps": 100})
  foreign.close()
  before = _tree_hash(tmp_path / "checkpoints")
  with pytest.raises(
    CheckpointError, match=r"model='resnet20', this run has model='small_cnn'.*left untouched"
  ):
    stages.prepare(_tiny(tmp_path), tmp_path)
  assert _tree_hash(tmp_path / "checkpoints") == before


def test_checkpoint_without_metadata_of_other_shapes_is_refused_and_kept(tmp_path):
  # As written by an older version: no model name or array signature in the metadata.
  manager = ocp.CheckpointManager(
    tmp_path / "checkpoints" / "dense",
    options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
  )
  manager.save(
    16,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(
        {
          "params": {"w": np.ones((3, 3), np.float32)},
          "batch_stats": {"m": np.zeros(2, np.float32)},
        }
      ),
      meta=ocp.args.JsonSave({"steps": 16}),
    ),
  )
  manager.wait_until_finished()
  manager.close()
  before = _tree_hash(tmp_path / "checkpoints")
  # Nothing shows how it was trained (no identity, no config.json): refused before training.
  with pytest.raises(CheckpointError, match=r"dense was written before checkpoints recorded"):
    stages.prepare(_tiny(tmp_path), tmp_path)
  assert _tree_hash(tmp_path / "checkpoints") == before
  # With the config.json of this very config it may be restored, and its shapes are checked.
  (tmp_path / "config.json").write_text(resolve_config(_tiny(tmp_path)).to_json())
  ctx = stages.prepare(_tiny(tmp_path), tmp_path)
  with pytest.raises(CheckpointError, match=r"checkpoint .*dense.16 cannot be used by this run"):
    stages.train_dense(ctx, ctx.config.seed)
  assert _tree_hash(tmp_path / "checkpoints") == before


@pytest.fixture(scope="module")
def trained_dense(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("dense")
  ctx = stages.prepare(_tiny(workdir), workdir)
  stages.train_dense(ctx, ctx.config.seed)
  return workdir


def _copy(src: Path, dst: Path) -> Path:
  import shutil

  shutil.copytree(src, dst)
  return dst


def test_damaged_checkpoint_metadata_is_refused_before_training(trained_dense, tmp_path):
  workdir = _copy(trained_dense, tmp_path / "w")
  (meta,) = (workdir / "checkpoints" / "dense").glob("*/meta/metadata")
  meta.write_bytes(b"\x00\x01 not json")
  before = _tree_hash(workdir / "checkpoints")
  with pytest.raises(CheckpointError, match="metadata is unreadable"):
    stages.prepare(_tiny(workdir), workdir)
  assert _tree_hash(workdir / "checkpoints") == before


def test_damaged_checkpoint_arrays_are_refused_and_kept(trained_dense, tmp_path):
  workdir = _copy(trained_dense, tmp_path / "w")
  state_dir = next((workdir / "checkpoints" / "dense").glob("*/state"))
  for f in state_dir.rglob("*"):
    if f.is_file() and f.parent.name == "d":  # the array data files
      f.write_bytes(b"garbage")
  before = _tree_hash(workdir / "checkpoints")
  ctx = stages.prepare(_tiny(workdir), workdir)
  with pytest.raises(CheckpointError, match="restoring failed"):
    stages.train_dense(ctx, ctx.config.seed)
  assert _tree_hash(workdir / "checkpoints") == before


def test_restoring_a_good_checkpoint_still_works(trained_dense, tmp_path):
  workdir = _copy(trained_dense, tmp_path / "w")
  ctx = stages.prepare(_tiny(workdir), workdir)
  model = stages.train_dense(ctx, ctx.config.seed)
  assert set(model.variables) == {"params", "batch_stats"} and model.masks is None
  assert model.training["steps"] > 0 and model.training["nonfinite_steps"] == 0


def _cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
  cmd = [
    sys.executable,
    "-m",
    "prunebias_jax.main",
    "--config",
    "configs/default.py",
    f"--workdir={workdir}",
    "--config.dense.epochs=1",
    "--config.finetune.epochs=1",
    "--config.pruning.methods=('random',)",
    "--config.pruning.sparsities=(0.5,)",
    *args,
  ]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_foreign_checkpoint_exits_2_with_one_line(tmp_path):
  foreign = ModelCheckpoint(
    tmp_path / "checkpoints" / "dense", expect={"model": "resnet20", "num_classes": 10}
  )
  foreign.save(100, {"params": {"w": jnp.ones((3, 3))}}, {"steps": 100})
  foreign.close()
  proc = _cli(tmp_path)
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("I", "W"))]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and "resnet20" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ["truncated manifest", "garbage arrays"])
def test_cli_damaged_checkpoint_is_one_line_without_orbax_noise(trained_dense, tmp_path, damage):
  """Refused and kept, and stderr holds nothing but the one line (Orbax and TensorStore used
  to add 13–72 lines of tracebacks, some at interpreter shutdown)."""
  workdir = _copy(trained_dense, tmp_path / "w")
  state = next((workdir / "checkpoints" / "dense").glob("*/state"))
  if damage == "truncated manifest":
    with open(state / "manifest.ocdbt", "r+b") as f:
      f.truncate(10)
  else:
    for f in sorted(p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"):
      f.write_bytes(np.random.default_rng(0).bytes(200))
  before = _tree_hash(workdir / "checkpoints")
  proc = _cli(workdir, "--config.progress_seconds=1e9")
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("I1", "W1"))]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and "cannot be used by this run" in lines[0], lines[:5]
  assert _tree_hash(workdir / "checkpoints") == before


def test_cli_nonfinite_loss_exits_3_with_stage_and_step(tmp_path):
  proc = _cli(tmp_path, "--config.dense.optim.learning_rate=1e30", "--config.progress_seconds=1000")
  assert proc.returncode == 3, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: dense: non-finite loss at step") and "last finite loss" in last
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "checkpoints" / "dense").exists() or not any(
    (tmp_path / "checkpoints" / "dense").iterdir()
  )


# ------------------------------------------------------------------------------------ safety
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def test_no_code_runs_from_data_or_checkpoints():
  """No module of the package imports a pickle-like loader, calls eval/exec, or loads NumPy
  files with allow_pickle=True (config files, loaded by ml_collections from the path the user
  names, are the only Python a run executes)."""
  problems = []
  for path in sorted((ROOT / "prunebias_jax").rglob("*.py")):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
      where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
      if isinstance(node, ast.Import):
        problems += [
          f"{where} imports {a.name}"
          for a in node.names
          if a.name.split(".")[0] in FORBIDDEN_MODULES
        ]
      elif (
        isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES
      ):
        problems.append(f"{where} imports from {node.module}")
      elif isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name in FORBIDDEN_CALLS:
          problems.append(f"{where} calls {name}")
        if name in ("load", "loads") and any(
          k.arg == "allow_pickle"
          and not (isinstance(k.value, ast.Constant) and k.value.value is False)
          for k in node.keywords
        ):
          problems.append(f"{where} loads with allow_pickle")
        if (
          name == "load"
          and isinstance(node.func, ast.Attribute)
          and getattr(node.func.value, "id", "") == "np"
        ):
          if not any(k.arg == "allow_pickle" for k in node.keywords):
            problems.append(f"{where} np.load without allow_pickle=False")
  assert not problems, problems


def test_the_image_cache_never_unpickles(tmp_path):
  from prunebias_jax.data import image_folder

  path = tmp_path / "cache.npz"
  np.savez(path, key=np.asarray("k"), images=np.array([object()], dtype=object), labels=np.zeros(1))
  assert image_folder._load_cache(path, "k") is None  # refused (and re-decoded), not unpickled


def test_undefined_metrics_are_recorded_with_the_reason_never_silently(caplog):
  record = {"cev": "nan", "sde": 12.5, "cka": 0.9, "svcca": None, "cka_debiased": 0.4}
  records.note_undefined(record, "random s=0.9 CE seed 0")
  assert set(record["undefined_metrics"]) == {"cev", "svcca"}
  assert "zero_rate='exclude'" in record["undefined_metrics"]["cev"]
  fine = {"cev": 1.0, "sde": 2.0, "cka": 0.5}
  records.note_undefined(fine, "x")
  assert "undefined_metrics" not in fine


@pytest.mark.parametrize("rule", ["floor", "exclude"])
def test_a_class_absent_from_the_test_set_gives_no_nan(rule):
  """Class 2 never occurs in the labels (its FNR has a zero denominator) but is predicted
  sometimes; the dense model never errs on class 0 (zero reference rates): the rule of
  docs/metrics.md
  applies and every output is finite."""
  from prunebias_jax import metrics as pm

  labels = jnp.asarray([0, 0, 0, 1, 1, 1, 3, 3, 3, 3])
  reference = jnp.asarray([0, 0, 0, 1, 2, 1, 3, 3, 1, 3])
  compressed = jnp.asarray([0, 2, 0, 1, 2, 2, 3, 0, 1, 3])
  rates = pm.per_class_rates(labels, compressed, 4)
  assert np.all(np.isfinite(rates.fpr)) and np.all(np.isfinite(rates.fnr))
  change = pm.relative_rate_change(labels, reference, compressed, 4, zero_rate=rule)
  assert np.all(np.isfinite(change.dfpr)) and np.all(np.isfinite(change.dfnr))
  # Class 0 (reference FPR and FNR 0) and class 3 (reference FPR 0) hit the rule; class 2 is
  # undefined (no example), never counted, and invalid under both rules.
  assert int(change.num_zero_rate_classes) == 2
  expected_valid = [True, True, False, True] if rule == "floor" else [False, True, False, False]
  assert np.asarray(change.valid).tolist() == expected_valid
  cev = pm.cev_from_changes(change.dfpr, change.dfnr, change.valid)
  sde = pm.sde_from_changes(change.dfpr, change.dfnr, change.valid)
  assert np.isfinite(float(cev)) and np.isfinite(float(sde))


def test_disk_full_is_recognised_in_what_orbax_and_python_raise(tmp_path):
  import errno as errno_lib

  orbax = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file '
    '"/data/run/checkpoints/dense/12.orbax-checkpoint-tmp/state/": Failed writing: "x"'
  )
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = orbax
  got = main.disk_full(wrapped, str(tmp_path))
  assert got is not None and got.exit_code == 4
  assert str(got).startswith(
    "disk full writing /data/run/checkpoints/dense/12.orbax-checkpoint-tmp/state/ ("
  )
  assert "MiB free" in str(got) and "\n" not in str(got)
  python = OSError(errno_lib.ENOSPC, "No space left on device", "/data/run/results.md")
  assert str(main.disk_full(python, str(tmp_path))).startswith(
    "disk full writing /data/run/results.md"
  )
  assert main.disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory"), str(tmp_path)) is None
  assert main.disk_full(KeyError("x"), str(tmp_path)) is None


def test_skipped_steps_are_recorded_and_an_untrained_model_is_marked(tmp_path):
  """nonfinite=skip with a fine-tuning rate that blows the weights up after the first step:
  the students record how many steps were skipped and results.md names them; a model whose
  every step was skipped is flagged and its row marked ‼."""
  from prunebias_jax import experiment, report

  cfg = _tiny(tmp_path)
  cfg.finetune.epochs = 1
  cfg.pruning.methods = ("random",)
  cfg.pruning.sparsities = (0.5,)
  cfg.analysis.bootstrap_resamples = 0
  cfg.nonfinite = "skip"
  cfg.finetune.optim.learning_rate = 1e38
  records = experiment.run(cfg, tmp_path / "w")
  dense, students = records[0], records[1:]
  assert "nonfinite_steps" not in dense
  for r in students:
    assert 1 <= r["nonfinite_steps"] < 12 and r["every_step_skipped"] is False, r
  text = (tmp_path / "w" / "results.md").read_text()
  assert "Steps skipped for a non-finite loss (nonfinite='skip'): random s=0.5 CE seed 0 (" in text
  assert "‼ every training step" not in text
  # A model that never applied an update: its checkpoint says so; the record and the table too.
  never = {**students[0], "nonfinite_steps": 12, "every_step_skipped": True}
  assert report.skipped_notes([dense, never])[0].startswith(
    "‼ every training step of these models had a non-finite loss"
  )
  table = report.results_table(dense, [], flagged={("random", 0.5)})
  assert "random ‼" not in table  # no cell rows given
  cells = [json.loads(line) for line in (tmp_path / "w" / "cells.jsonl").read_text().splitlines()]
  table = report.results_table(dense, cells, flagged={("random", 0.5)})
  assert "| random ‼ | 0.5 |" in table


@pytest.mark.parametrize("then", ["repaired", "removed", "left damaged"])
def test_a_mid_stage_checkpoint_being_written_by_another_worker_is_read_again(
  tmp_path, monkeypatch, then
):
  """A sweep worker's setup reads every checkpoint while other workers may be saving theirs: a
  mid-stage step it cannot read yet is read again (and one that is discarded meanwhile is
  fine); one that stays unreadable is still refused."""
  import threading

  from prunebias_jax import workdir as wd
  from prunebias_jax.checkpoint import StageCheckpoint

  monkeypatch.setattr(wd, "PARTIAL_READ_WAIT_S", 0.05)
  stage = tmp_path / "checkpoints" / "partial" / "l1_filter_s0.5_kd_seed0"
  ckpt = StageCheckpoint(stage, every_steps=5)
  ckpt.save(5, {"w": jnp.ones(3)})
  ckpt.close()
  (meta,) = stage.glob("5/meta/metadata")
  good = meta.read_bytes()
  meta.write_bytes(b"\x00 being written")
  fix = {"repaired": lambda: meta.write_bytes(good), "removed": lambda: shutil.rmtree(stage)}
  timer = threading.Timer(0.2, fix.get(then, lambda: None))
  timer.start()
  try:
    check = lambda: wd.check_checkpoints(tmp_path, {}, {}, True, False, delete=False)
    if then == "left damaged":
      with pytest.raises(CheckpointError, match="metadata is unreadable"):
        check()
    else:
      check()
  finally:
    timer.join()
