"""files.py: atomic writes keep old contents on failure and give files the umask's mode."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from prunebias_jax import files
from prunebias_jax.data import image_folder


@contextlib.contextmanager
def umask(mask: int):
  old = os.umask(mask)
  try:
    yield
  finally:
    os.umask(old)


def mode(path: Path) -> int:
  return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(tmp_path, mask, expected):
  with umask(mask):
    assert files.current_umask() == mask
    files.write_atomic(tmp_path / "a.txt", "x")
    files.write_json_atomic(tmp_path / "b.json", {"a": 1})
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() gives
      f.write("x")
  assert mode(tmp_path / "plain.txt") == expected
  assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.json") == expected


def test_umask_is_read_without_changing_it():
  with umask(0o027):
    assert files.current_umask() == 0o027
    assert files.current_umask() == 0o027
    assert files.default_file_mode() == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "results.md"
  files.write_atomic(target, "old")
  with pytest.raises(RuntimeError, match="boom"):
    with files.atomic_writer(target) as f:
      f.write(b"half")
      raise RuntimeError("boom")
  assert target.read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_the_image_cache_is_readable_by_group_and_others(tmp_path):
  path = tmp_path / "cache" / "folder.npz"
  images, labels = np.zeros((2, 3, 3, 1), np.uint8), np.array([0, 1])
  with umask(0o022):
    image_folder._save_cache(path, "k", images, labels)
  assert mode(path) == 0o644
  got = image_folder._load_cache(path, "k")
  assert got is not None
  np.testing.assert_array_equal(got[0], images)
  np.testing.assert_array_equal(got[1], labels)
  assert sorted(p.name for p in path.parent.iterdir()) == ["folder.npz"]
