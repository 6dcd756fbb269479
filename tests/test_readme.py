"""The README's own-data and audit commands, run as written (bash, relative paths) on a small
folder and arrays this test builds. The run command gets `--config.runlocal=True` appended (the
one change: the full demo sweep would take minutes per cell here)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_block(heading: str) -> str:
  """The first ```bash block after `heading` in the README."""
  section = README[README.index(heading) :]
  return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
  env["XDG_CACHE_HOME"] = str(cwd / "cache")  # the image cache stays in the test's folder
  return subprocess.run(
    ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
  )


def test_the_own_data_command_runs_on_a_folder_with_an_attributes_table(tmp_path):
  rng = np.random.default_rng(0)
  rows = []
  for split, n in (("train", 80), ("test", 40)):
    for i in range(n):
      gender = ("female", "male")[i % 2]
      rel = f"{split}/{gender}/{i:04d}.png"
      (tmp_path / "faces" / split / gender).mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) // (2 if i % 2 else 1)
      Image.fromarray(pixels).save(tmp_path / "faces" / rel)
      rows.append(
        {
          "path": rel,
          "race": ("black", "asian")[(i // 2) % 2],
          "age": ("20-29", "30-39")[(i // 4) % 2],
        }
      )
  with open(tmp_path / "faces" / "attributes.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["path", "race", "age"])
    w.writeheader()
    w.writerows(rows)
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  command = bash_block("### Your own data").strip() + " --config.runlocal=True"
  proc = run(command, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "runs" / "faces"
  described = json.loads((out / "dataset.json").read_text())
  assert described["group_names"] == ["asian/20-29", "asian/30-39", "black/20-29", "black/30-39"]
  assert "## Group fairness" in (out / "results.md").read_text()


def test_the_audit_command_runs_on_arrays_saved_elsewhere(tmp_path):
  rng = np.random.default_rng(1)
  n, C = 300, 3
  y = rng.integers(0, C, n)
  np.save(tmp_path / "y.npy", y)
  dense = np.eye(C, dtype=np.float32)[np.where(rng.random(n) < 0.9, y, rng.integers(0, C, n))]
  np.save(tmp_path / "dense_logits.npy", dense + rng.normal(0, 0.1, dense.shape).astype(np.float32))
  np.save(
    tmp_path / "pruned.npy", np.where(rng.random((2, n)) < 0.7, y, rng.integers(0, C, (2, n)))
  )
  np.savez(tmp_path / "int8.npz", logits=rng.normal(size=(n, C)).astype(np.float32))
  np.save(tmp_path / "race.npy", rng.choice(["a", "b"], n))
  (tmp_path / "names.txt").write_text("cat\ndog\nemu\n")
  proc = run(bash_block("## Audit models trained elsewhere"), tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "runs" / "audit"
  records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  assert [r["method"] for r in records] == ["reference", "pruned", "pruned", "int8"]
  assert all(r["dpd"] is not None for r in records)
  assert "| pruned | 2 |" in (out / "results.md").read_text()
