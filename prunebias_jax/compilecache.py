"""JAX's persistent compilation cache, on by default (`config.compile_cache`).

    enable("auto")   -> the cache directory in use, or None when it is off

A run compiles the same train, evaluation and metric programs every time it starts (XLA:CPU
spends about half of a short run compiling); with the cache on, a rerun or a later run of the
same shapes loads the compiled executables from disk instead. A cached executable is the one
the compiler produced, so no result changes.

`config.compile_cache`:
  "auto"  $JAX_COMPILATION_CACHE_DIR when set (JAX's own variable: a cache the caller set up
          is used as it is), else `$XDG_CACHE_HOME/prunebias_jax/xla` (`~/.cache/...`);
  "off"   no persistent cache;
  a path  that directory.

A multi-process run on CPU devices (the loopback smoke test of multi-host runs) never uses the
cache: measured with jax 0.12.1, its processes hang in the first cross-process collective of an
executable loaded from the cache (gloo), while a single process, or the same run compiling
afresh, finishes.

Unless their JAX variables say otherwise, programs that took at least 0.1 s to compile are
kept (JAX's default, 1 s, would skip most of the small CPU programs that dominate a short
run), and the directory is held to 2 GiB, least recently used entries removed first.
JAX treats the directory as trusted code: do not point it at a directory others can write.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from absl import logging

OFF = "off"
AUTO = "auto"
MIN_COMPILE_SECONDS = 0.1
MAX_BYTES = 2 * 2**30


def default_dir() -> Path:
  """`$XDG_CACHE_HOME/prunebias_jax/xla`, `~/.cache/prunebias_jax/xla` without it."""
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "prunebias_jax" / "xla"


def resolve(setting: str) -> Path | None:
  """The directory `setting` (a `config.compile_cache` value) names, None for "off"."""
  if setting == OFF:
    return None
  if setting == AUTO:
    given = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return Path(given) if given else default_dir()
  return Path(setting).expanduser().absolute()


def enable(setting: str) -> Path | None:
  """Points JAX's persistent compilation cache at `resolve(setting)` (or turns it off) for
  the programs compiled from now on; returns the directory, or None when off."""
  from jax.experimental.compilation_cache import compilation_cache

  path = resolve(setting)
  if path is not None and jax.process_count() > 1 and jax.default_backend() == "cpu":
    logging.info("compilation cache: not used by a multi-process CPU run (it hangs in JAX 0.12)")
    path = None
  current = jax.config.jax_compilation_cache_dir
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
  elif current != str(path) or not jax.config.jax_enable_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
      jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  else:
    return path  # already in use: nothing to reset
  # JAX opens its cache once, at the first compilation that uses it, and keeps writing there:
  # forget the one it may have opened (another run in this process, with another setting).
  compilation_cache.reset_cache()
  return path
