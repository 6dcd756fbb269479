"""Command line: `python -m prunebias_jax.main --config configs/default.py --workdir runs/default`.

Config values are overridden with `--config.key=value`, e.g.
`--config.pruning.sparsities='(0.5,0.9)' --config.kd.temperature=2`. Bad input (an unknown
key, a wrong type, a value out of range, an unwritable workdir, a checkpoint in the workdir
that belongs to another model or is damaged) ends the run before any training with one line
on stderr and exit code 2. A NaN/Inf training loss (with `nonfinite='stop'`) ends it with one
line and exit code 3. The config file named by --config is the only Python the run executes.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from prunebias_jax.errors import EXIT_BAD_INPUT, UserError, one_line

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
    return record.levelno >= std_logging.WARNING or not any(
      part in path for part in ("/orbax/", "/jax/", "/flax/")
    )


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """absl's parser, but a bad flag or config override is one line and exit code 2."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    _fail(one_line(e))
  except (KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError) as e:
    # ml_collections raises these for unknown keys, wrong types, or a config file that fails
    # to load.
    _fail(f"{type(e).__name__}: {one_line(e)}")
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]!r}; pass options as --config.key=value")
  try:
    config = _CONFIG.value
    if config is None:
      _fail("--config is required, e.g. --config configs/default.py")
    config.to_dict()  # config_flags loads lazily: surface a load failure here, not mid-run
  except (OSError, ImportError, SyntaxError, AttributeError) as e:
    detail = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f"cannot load --config: {detail[-1] if detail else type(e).__name__}")
  if not FLAGS.workdir:
    _fail("--workdir is required, e.g. --workdir runs/default")
  logging.set_verbosity(logging.INFO)
  # Orbax logs several INFO lines per checkpoint through absl; keep the console to our own lines.
  logging.get_absl_handler().addFilter(_QuietLibraries())

  from prunebias_jax.distributed import maybe_initialize

  try:
    maybe_initialize(config)  # multi-host: before any other JAX call
    from prunebias_jax.experiment import run

    run(config, FLAGS.workdir, explicit_keys=set(config_flags.get_override_values(FLAGS["config"])))
  except UserError as e:  # bad input (2) or a non-finite loss (3); finished stages are kept
    _fail(str(e), e.exit_code)


def cli() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
