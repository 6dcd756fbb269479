"""The persistent compilation cache that runs turn on (`config.compile_cache`): where it goes,
that compiled programs land there and are loaded back, and that "off" writes nothing.

The JAX side runs in fresh interpreters: the test session has its own cache (conftest.py), and
JAX decides once per process whether a cache is used. The compile count of a run (issue 15)
is read from JAX's own compile log in fresh interpreters too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from prunebias_jax import compilecache
from prunebias_jax.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_auto_is_jax_variable_then_the_user_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "given"))
  assert compilecache.resolve("auto") == tmp_path / "given"
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilecache.resolve("auto") == tmp_path / "xdg" / "prunebias_jax" / "xla"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compilecache.resolve("auto") == tmp_path / "home" / ".cache" / "prunebias_jax" / "xla"
  assert compilecache.resolve("off") is None
  assert compilecache.resolve("~/x") == tmp_path / "home" / "x"
  assert compilecache.resolve("/abs/dir") == Path("/abs/dir")
  monkeypatch.chdir(tmp_path)
  assert compilecache.resolve("rel") == tmp_path / "rel"  # fixed before a chdir can move it


# One jitted program compiled after a plain op already initialised the backend (as a run
# loads data before it compiles), then the settings JAX ended up with.
_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from prunebias_jax import compilecache
jnp.ones(3).block_until_ready()
path = compilecache.enable(sys.argv[1])
y = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((64, 64)))
print(json.dumps({
  "path": str(path) if path else None, "value": float(y.sum()),
  "enabled": jax.config.jax_enable_compilation_cache,
  "min_seconds": jax.config.jax_persistent_cache_min_compile_time_secs,
  "max_bytes": jax.config.jax_compilation_cache_max_size,
}))
"""


def _python(script: str, *args: str, **env: str) -> str:
  """`script` in a fresh interpreter with none of this session's JAX variables; its stdout."""
  clean = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  proc = subprocess.run(
    [sys.executable, "-c", script, *args],
    cwd=ROOT,
    env={**clean, "JAX_PLATFORMS": "cpu", **env},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _probe(setting: str, **env: str) -> dict:
  return json.loads(_python(_PROBE, setting, **env).splitlines()[-1])


def _entries(directory: Path) -> list[Path]:
  """The cached programs (JAX's size-limited cache also keeps a `.lockfile` there)."""
  if not directory.exists():
    return []
  return [p for p in directory.rglob("*") if p.is_file() and p.name != ".lockfile"]


def test_a_directory_fills_and_a_second_process_loads_from_it(tmp_path):
  cache = tmp_path / "cache"
  defaults = _probe(str(cache))
  assert defaults["path"] == str(cache) and defaults["enabled"]
  assert defaults["min_seconds"] == compilecache.MIN_COMPILE_SECONDS
  assert defaults["max_bytes"] == compilecache.MAX_BYTES
  # The probe's program compiles in well under 0.1 s: keep every program to see it cached.
  first = _probe(str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  # The size-limited cache keeps each program in `<key>-cache` and its last use in `<key>-atime`.
  programs = {p: p.stat().st_mtime_ns for p in _entries(cache) if p.name.endswith("-cache")}
  used = {p: p.stat().st_mtime_ns for p in _entries(cache) if p.name.endswith("-atime")}
  assert programs and len(used) == len(programs), "no compiled program was written"
  second = _probe(str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  assert second["value"] == first["value"] == defaults["value"]
  # Loaded, not compiled again: the same programs, none rewritten, each one read again.
  assert {p: p.stat().st_mtime_ns for p in _entries(cache) if p.name.endswith("-cache")} == programs
  assert all(p.stat().st_mtime_ns > t for p, t in used.items())


def test_a_second_run_in_one_process_writes_to_its_own_directory(tmp_path):
  """A library user's two runs with two settings: JAX keeps the cache it opened first unless
  `enable` makes it open the new one."""
  script = """
import sys, jax, jax.numpy as jnp
from prunebias_jax import compilecache
compilecache.enable(sys.argv[1])
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(5)).block_until_ready()
compilecache.enable(sys.argv[2])
jax.jit(lambda x: jnp.cos(x) * 3)(jnp.ones(7)).block_until_ready()
"""
  a, b = tmp_path / "a", tmp_path / "b"
  _python(script, str(a), str(b), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  lambdas = lambda d: sorted(p.name for p in _entries(d) if p.name.startswith("jit__lambda"))
  assert len(lambdas(a)) == 2 and len(lambdas(b)) == 2  # one program each (-cache, -atime)
  assert not set(lambdas(a)) & set(lambdas(b))


def test_off_writes_nothing_even_with_jax_variable_set(tmp_path):
  cache = tmp_path / "cache"
  got = _probe("off", JAX_COMPILATION_CACHE_DIR=str(cache))
  assert got["path"] is None and not got["enabled"]
  assert _entries(cache) == []


def test_auto_uses_the_user_cache_dir_and_respects_jax_own_variables(tmp_path):
  got = _probe(
    "auto",
    XDG_CACHE_HOME=str(tmp_path / "xdg"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="5",
    JAX_COMPILATION_CACHE_MAX_SIZE="1000",
  )
  assert got["path"] == str(tmp_path / "xdg" / "prunebias_jax" / "xla")
  assert (got["min_seconds"], got["max_bytes"]) == (5.0, 1000)
  assert _entries(tmp_path / "xdg") == []  # nothing took 5 s to compile


@pytest.mark.parametrize("value", ["", "  "])
def test_a_bad_value_is_refused(tiny_config, value):
  with tiny_config.unlocked():
    tiny_config.compile_cache = value
  with pytest.raises(
    ConfigError, match=r"config\.compile_cache=.* is not allowed; expected 'auto'"
  ):
    validate_config(tiny_config)


def test_a_file_is_not_a_cache_directory(tiny_config, tmp_path):
  (tmp_path / "f").write_text("x")
  tiny_config.compile_cache = str(tmp_path / "f")
  with pytest.raises(ConfigError, match=r"config\.compile_cache=.*/f' is not allowed"):
    validate_config(tiny_config)
  tiny_config.compile_cache = str(tmp_path / "new")  # need not exist yet
  validate_config(tiny_config)


def _compiled_functions(workdir, sparsities: str) -> Counter:
  """{function: how many times XLA compiled it} in one CLI run of `sparsities` (JAX's own
  compile log: a program loaded from the tests' persistent cache is logged as compiled too,
  before the cache hit, so the count is the same with the cache and without it)."""
  env = {**os.environ, "JAX_LOG_COMPILES": "1", "JAX_PLATFORMS": "cpu"}
  args = [
    "--config",
    "configs/default.py",
    "--config.runlocal=True",
    "--config.pruning.methods=('l1_filter',)",
    f"--config.pruning.sparsities={sparsities}",
    f"--workdir={workdir}",
  ]
  proc = subprocess.run(
    [sys.executable, "-m", "prunebias_jax.main", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return Counter(re.findall(r"Compiling jit\(([^)]+)\)", proc.stderr))


# What may compile again for more cells: the run-level analysis over all cells (bootstrap and
# permutation statistics, percentiles) takes arrays whose length is the number of cells, and
# the small element-wise ops around it. Training, evaluation and the per-model metrics must
# not: their shapes do not depend on the cells.
RUN_LEVEL = {
  "_bootstrap_distribution_jit",
  "_cluster_bootstrap_jit",
  "nanpercentile",
  "convert_element_type",
  "broadcast_in_dim",
}


def test_more_cells_compile_nothing_more_but_the_run_level_analysis(tmp_path):
  """One sparsity, then four (same model and batch shapes): every training, evaluation and
  per-model function compiles as often in both runs; only the run-level analysis recompiles."""
  one = _compiled_functions(tmp_path / "one", "(0.5,)")
  four = _compiled_functions(tmp_path / "four", "(0.5,0.6,0.7,0.8)")
  grew = {name: (one[name], four[name]) for name in one | four if four[name] > one[name]}
  assert set(grew) <= RUN_LEVEL, grew
  assert sum(four.values()) - sum(one.values()) <= 12, (sum(one.values()), sum(four.values()))
  for heavy in ("step", "compare"):  # the train step, the evaluation pass with the metrics
    assert one[heavy] == four[heavy] >= 1, (heavy, one[heavy], four[heavy])
  assert one["evaluate"] == four["evaluate"]  # the monitor's test-accuracy pass, if on
