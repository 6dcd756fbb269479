"""The errors a user can act on: each carries its exit code and a one-line message.

`main` catches `UserError` alone and prints `error: <message>`, so every module raises its
own subclass and no module formats messages for the terminal. Anything else is a bug and
keeps its traceback.

| class | raised for | exit code |
|---|---|---|
| `ConfigError` | a config value, flag or workdir that cannot run | 2 |
| `DataError` | a data source, folder or file that cannot be read | 2 |
| `CheckpointError` | a checkpoint of another model, or a damaged one | 2 |
| `StageOrderError` | a sweep stage run before the stages it needs (`config.stage`) | 2 |
| `NonFiniteLossError` | a NaN/Inf training loss with `nonfinite='stop'` | 3 |
| `DiskFullError` | no space left while writing (a rerun after freeing space resumes) | 4 |
| `Interrupted` | Ctrl-C (SIGINT); a rerun resumes from the last mid-stage checkpoint | 130 |
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_DISK_FULL = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def one_line(text: object, limit: int = 600) -> str:
  """`text` as a single line (whitespace runs collapsed), cut to `limit` characters."""
  s = " ".join(str(text).split())
  return s if len(s) <= limit else s[: limit - 3] + "..."


def printable(text: str) -> str:
  """User-named text (a class folder, a data folder) as one printable line for a heading or a
  plot: newlines, other control characters and bytes that were not UTF-8 in the file name
  (Python's surrogate escapes) are written as backslash escapes; the rest is kept as is."""
  return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class UserError(Exception):
  """Bad input or a condition the user fixes; `str(e)` is one line, `exit_code` the CLI's."""

  exit_code = EXIT_BAD_INPUT

  def __init__(self, message: object):
    super().__init__(one_line(message))


class ConfigError(UserError, ValueError):
  """A config value (or flag, or workdir) that cannot run."""


class DataError(UserError, ValueError):
  """A bad data configuration or input file; the message names the value and the fix."""


class CheckpointError(UserError, ValueError):
  """A checkpoint exists but cannot be used by this run; it is left untouched."""


class StageOrderError(UserError):
  """`config.stage` names a stage whose inputs are not there yet (cells before the dense
  stage, the report before every cell); nothing was changed."""


class NonFiniteLossError(UserError, FloatingPointError):
  """Training produced a NaN/Inf loss (with `nonfinite='stop'`); finished stages are kept."""

  exit_code = EXIT_NONFINITE


class DiskFullError(UserError, OSError):
  """No space left on the device while writing; what was written before is intact."""

  exit_code = EXIT_DISK_FULL


class Interrupted(UserError):
  """The user pressed Ctrl-C; finished models and the last mid-stage checkpoint are kept."""

  exit_code = EXIT_INTERRUPTED
