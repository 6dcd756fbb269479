"""Command line: `python -m prunebias_jax.main --config configs/default.py --workdir runs/default`.

Config values are overridden with `--config.key=value`, e.g.
`--config.pruning.sparsities='(0.5,0.9)' --config.kd.temperature=2`. Bad input (an unknown
key, a wrong type, a value out of range, an unwritable workdir, a checkpoint in the workdir
that belongs to another model or is damaged) ends the run before any training with one line
on stderr and exit code 2. A NaN/Inf training loss (with `nonfinite='stop'`) ends it with one
line and exit code 3. The config file named by --config is the only Python the run executes.
"""

from __future__ import annotations

import ast
import errno
import logging as std_logging
import os
import re
import shutil
import sys
import traceback
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from prunebias_jax.config import resolve_config, validate_config
from prunebias_jax.errors import (
  EXIT_BAD_INPUT,
  EXIT_INTERRUPTED,
  ConfigError,
  DiskFullError,
  UserError,
  one_line,
)

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")


class _QuietLibraries(std_logging.Filter):
  """Drops INFO records from inside orbax/jax/flax, and INFO/WARNING records from TFDS (which
  warns about every folder it probes; our own error line says what is missing)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname
    if "/tensorflow_datasets/" in path:
      return record.levelno >= std_logging.ERROR
    if "/orbax/" in path and record.exc_info:
      # Orbax logs the traceback of a failed read or write from each of its threads, then
      # raises: the raised error is reported (one line for a damaged checkpoint or a full
      # disk; a traceback for a bug), so the logged copies are only noise.
      return False
    return record.levelno >= std_logging.WARNING or not any(
      part in path for part in ("/orbax/", "/jax/", "/flax/")
    )


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _end_run(message: str, code: int) -> None:
  """Ends a run that failed after JAX and Orbax started: the one line, then an immediate
  exit. A failed checkpoint read or write leaves Orbax/TensorStore callbacks that, at a normal
  interpreter shutdown, print 'Event loop is closed' tracebacks after that line (13–72 lines
  for a damaged checkpoint). Every file of record is already written or was never started
  (atomic writes), so there is nothing left to flush but the streams."""
  sys.stderr.write(f"error: {message}\n")  # one write: another thread cannot split the line
  sys.stderr.flush()
  sys.stdout.flush()
  std_logging.shutdown()
  os._exit(code)


def _closed_loop_noise(unraisable: Any) -> None:
  """sys.unraisablehook that drops one known piece of library noise and forwards the rest.

  After a failed checkpoint read, TensorStore completes the read's futures on its own threads
  and their callbacks call `call_soon_threadsafe` on Orbax's event loop, already closed by then:
  the RuntimeError cannot be raised anywhere, so Python prints it (11–21 lines, in the middle
  of our one-line error under load). The failure itself is reported by the exception Orbax
  raises; every other unraisable exception is printed as usual."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def _config_path(argv: list[str]) -> str | None:
  """The --config file named in `argv` (either spelling), without a ':arg' suffix."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and what it wraps (its cause or context), outermost first."""
  chain, e = [], error
  while e is not None and len(chain) < 20:
    chain.append(e)
    e = e.__cause__ or e.__context__
  return chain


def _lines_in(error: BaseException, path: str | None) -> list[int]:
  """The line numbers of `error`'s traceback frames inside the file `path`."""
  if not path:
    return []
  target = os.path.realpath(path)
  frames = traceback.extract_tb(error.__traceback__)
  return [f.lineno for f in frames if os.path.realpath(f.filename) == target]


def config_problem(error: BaseException, path: str | None) -> str:
  """One line for a config file that failed to load: the file, the line of the file where it
  failed, and the root exception (ml_collections wraps it, with a whole traceback as text,
  in flag errors: those wrappers are skipped)."""
  chain = _chain(error)
  lines = [line for x in chain for line in _lines_in(x, path)]
  lines += [x.lineno for x in chain if isinstance(x, SyntaxError) and x.lineno]
  meaningful = [
    x
    for x in chain
    if not isinstance(x, flags.Error) and "Traceback (most recent call last)" not in str(x)
  ]
  root = meaningful[0] if meaningful else chain[-1]
  where = f"{path}, line {lines[-1]}" if path and lines else (path or "the file")
  detail = one_line(root, 300) if str(root).strip() else "(no message)"
  return f"cannot load --config {where}: {type(root).__name__}: {detail}"


def _is_override_error(error: flags.Error) -> bool:
  """A bad --config.key=value (the message names the flag), not a config file that fails."""
  return "--config=" not in str(error) and "config file" not in str(error)


_CONFIG_PATH: list[str | None] = [None]  # the --config file, for messages raised later


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """absl's parser, but a bad flag, config override or config file is one line and exit 2."""
  path = _CONFIG_PATH[0] = _config_path(argv)
  _refuse_repeated_overrides(argv)
  # config_flags warns when get_config() returns None, which the one line below says too; a
  # warning before the flags are parsed also makes absl print a line of its own.
  absl_logger = std_logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)
  try:
    return flag_values(argv)
  except SystemExit as e:  # sys.exit() inside the config file (absl's own exits pass)
    if _lines_in(e, path):
      _fail(config_problem(e, path))
    raise
  except flags.Error as e:
    _fail(one_line(e, 300) if _is_override_error(e) else config_problem(e, path))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections raises these for unknown keys and wrong types of an override, and for a
    # config file without get_config().
    if _lines_in(e, path) or "get_config" in str(e):
      _fail(config_problem(e, path))
    not_a_config = _returned(e)
    if not_a_config:  # an override applied to what get_config() returned
      _fail(f"cannot load --config {path}: {not_a_config}")
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    try:  # ml_collections passes on a KeyError's repr ("'\\'epoch\\'\\nDid you mean ...'")
      text = str(ast.literal_eval(text)) if text[:1] in "'\"" else text
    except (ValueError, SyntaxError):
      pass
    _fail(f"{type(e).__name__}: {one_line(text, 300)}")
  except Exception as e:  # the config file is user code: anything it raises is bad input
    _fail(config_problem(e, path))
  finally:
    absl_logger.setLevel(level)
  return []


def _refuse_repeated_overrides(argv: list[str]) -> None:
  """A --config.<key> override given twice is refused: ml_collections applies both, so a
  repeated tuple field is the concatenation of the two (('random',) then ('l1_filter',) runs
  both methods), not the last one, which is what a command built by appending expects."""
  seen: dict[str, list[str]] = {}
  args = argv[1:]
  for i, arg in enumerate(args):
    if arg == "--":
      break
    if not arg.startswith("--config."):
      continue
    key, eq, value = arg[len("--config.") :].partition("=")
    if not eq:  # --config.key value
      value = args[i + 1] if i + 1 < len(args) else ""
    seen.setdefault(key, []).append(value)
  for key, values in seen.items():
    if len(values) > 1:
      given = ", ".join(one_line(v, 60) for v in values)
      _fail(
        f"--config.{key} is given {len(values)} times ({given}); give each override once "
        "(ml_collections would apply every one: repeated tuples are joined, not replaced)"
      )


def _returned(error: BaseException) -> str | None:
  """What get_config() returned, described, when an override failed because it is not a
  ConfigDict (else None). config_flags applies the overrides inside its flag's `_parse`, where
  the loaded object is the local `config`; should that ever change, the error is reported as
  it is."""
  for frame, _ in traceback.walk_tb(error.__traceback__):
    if frame.f_code.co_name == "_parse" and "config_flags" in frame.f_code.co_filename:
      config = frame.f_locals.get("config", ml_collections.ConfigDict())
      if not isinstance(config, ml_collections.ConfigDict):
        return _not_a_config(config)
  return None


def _not_a_config(config: Any) -> str:
  return (
    f"get_config() returned {type(config).__name__} {one_line(repr(config), 80)}, "
    "not an ml_collections.ConfigDict"
  )


def loaded_config(flag: Any) -> ml_collections.ConfigDict:
  """The --config flag's ConfigDict (config_flags loads lazily: a config file that fails is
  surfaced here as one line and exit 2, not mid-run)."""
  try:
    config = flag.value
    if config is None and _CONFIG_PATH[0] is None:
      _fail("--config is required, e.g. --config configs/default.py")
    if hasattr(config, "to_dict"):  # config_flags defers some load errors until first use
      config.to_dict()
    if not isinstance(config, ml_collections.ConfigDict):
      _fail(f"cannot load --config {_CONFIG_PATH[0]}: {_not_a_config(config)}")
  except SystemExit as e:  # ours (_fail), or sys.exit() inside the config file
    if _lines_in(e, _CONFIG_PATH[0]):
      _fail(config_problem(e, _CONFIG_PATH[0]))
    raise
  except Exception as e:  # the config file is user code: anything it raises is bad input
    _fail(config_problem(e, _CONFIG_PATH[0]))
  return config


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]!r}; pass options as --config.key=value")
  config = loaded_config(_CONFIG)
  if not FLAGS.workdir:
    _fail("--workdir is required, e.g. --workdir runs/default")
  logging.set_verbosity(logging.INFO)
  # Orbax logs several INFO lines per checkpoint through absl; keep the console to our own lines.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _closed_loop_noise
  explicit_keys = set(config_flags.get_override_values(FLAGS["config"]))
  _check_values(config, explicit_keys)

  from prunebias_jax.distributed import maybe_initialize

  try:
    maybe_initialize(config)  # multi-host: before any other JAX call
    from prunebias_jax.experiment import run

    run(config, FLAGS.workdir, explicit_keys=explicit_keys)
  except UserError as e:  # bad input (2), a non-finite loss (3), ...; finished stages are kept
    _end_run(str(e), e.exit_code)
  except KeyboardInterrupt:  # outside a training loop (which names its stage and step)
    _end_run("interrupted; rerun the same command to resume", EXIT_INTERRUPTED)
  except Exception as e:
    full = disk_full(e, FLAGS.workdir)
    if full is not None:
      _end_run(str(full), full.exit_code)
    if isinstance(e, OSError) and e.filename:  # a path the checks before training missed
      _end_run(
        f"cannot use {e.filename}: {e.strerror or type(e).__name__}; fix it and rerun",
        EXIT_BAD_INPUT,
      )
    raise  # a bug: keep its traceback


def _check_values(config: ml_collections.ConfigDict, explicit_keys: set[str]) -> None:
  """The config's values checked before JAX is imported (the config package imports none of
  it), so a bad value is one line in well under a second instead of after a ~4 s import.
  `experiment.run` checks them again for library callers; the messages are the same."""
  try:
    validate_config(resolve_config(config, explicit_keys))
  except ConfigError as e:
    _fail(str(e), e.exit_code)


_NO_SPACE = r"No space left on device|RESOURCE_EXHAUSTED.*(?:[Ww]rit|[Ff]ailed)"
_PATH_IN_MESSAGE = r'(?:file|path) "(/[^"]+)"|"(/[^"]+)"'


def disk_full(error: BaseException, workdir: str) -> DiskFullError | None:
  """The one-line error for `error` if it (or what it wraps) is a full disk, else None:
  `disk full writing PATH (N MiB free)`. Orbax/TensorStore report ENOSPC as ValueError
  ('RESOURCE_EXHAUSTED: ... Failed writing'), Python as OSError with errno ENOSPC."""
  hit = next(
    (
      x
      for x in _chain(error)
      if getattr(x, "errno", None) == errno.ENOSPC or re.search(_NO_SPACE, str(x))
    ),
    None,
  )
  if hit is None:
    return None
  path = getattr(hit, "filename", None)
  if not path:
    m = re.search(_PATH_IN_MESSAGE, str(hit))
    path = next((g for g in m.groups() if g), None) if m else None
  try:
    free = f"{shutil.disk_usage(workdir).free / 2**20:.1f} MiB free"
  except OSError:
    free = "free space unknown"
  return DiskFullError(
    f"disk full writing {path or workdir} ({free}); what was written before is intact: free "
    "space and rerun the same command to resume"
  )


def cli() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
