"""The one exception every data source raises for bad input, before any training starts."""

from __future__ import annotations


class DataError(ValueError):
  """A bad data configuration or input file, described in one line.

  The message names the offending value (a config field, a folder, a file) and what is allowed
  or how to fix it. It subclasses ValueError so callers that already catch ValueError keep
  working. Any newlines in the message (e.g. from a wrapped library error) are folded into
  spaces so the CLI prints exactly one line.
  """

  def __init__(self, message: str):
    super().__init__(one_line(message))


def one_line(text: object, limit: int = 600) -> str:
  """`text` as a single line (whitespace runs collapsed), cut to `limit` characters."""
  s = " ".join(str(text).split())
  return s if len(s) <= limit else s[: limit - 3] + "..."
