"""Sweeps shared by many workers: units and shards, locks that a SIGKILL frees, per-cell record
files, and runs by two concurrent workers, by shards, by stages and on a real local Ray
cluster, each byte-identical to one process.

The end-to-end cases run the CLI as subprocesses on one workdir (real files, real locks, real
kills); the reference is one single-process run of the same config, made once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import filelock
import numpy as np
import pytest

from prunebias_jax import cellfiles, claims, history, units
from prunebias_jax.config import ConfigError, resolve_config, shard_index, validate_config
from prunebias_jax.files import owner, remove_stale_temporaries, temporary_owner, write_atomic
from prunebias_jax.records import LayerCKA, Outputs

ROOT = Path(__file__).resolve().parents[1]
# 2 methods × 2 sparsities × CE/KD = 8 cells of one seed, 2 dense epochs, 1 fine-tuning epoch.
ARGS = [
  "--config",
  "configs/default.py",
  "--config.dense.epochs=2",
  "--config.finetune.epochs=1",
  "--config.pruning.methods=('l1_filter','random')",
  "--config.pruning.sparsities=(0.5,0.9)",
  "--config.checkpoint.every_steps=5",
  "--config.progress_seconds=1000",
  "--config.analysis.bootstrap_resamples=0",
  "--config.analysis.correlation_resamples=20",
  "--config.analysis.permutations=50",
]
RESULTS = ("results.jsonl", "cells.jsonl", "correlations.jsonl", "results.md")
CELLS = 8


def _env(kill_at: str | None = None, **extra: str) -> dict:
  drop = ("PRUNEBIAS_JAX_KILL_AT", "SLURM_ARRAY_TASK_ID", "PRUNEBIAS_SHARD_INDEX")
  env = {k: v for k, v in os.environ.items() if k not in drop}
  if kill_at:
    env["PRUNEBIAS_JAX_KILL_AT"] = kill_at
  return {**env, **extra}


def _start(workdir: Path, *extra: str, kill_at: str | None = None, **env) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "prunebias_jax.main", *ARGS, *extra, f"--workdir={workdir}"]
  return subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=_env(kill_at, **env),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(proc: subprocess.Popen, timeout: int = 900) -> tuple[int, str]:
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def _ok(workdir: Path, *extra: str, **env) -> str:
  code, err = _finish(_start(workdir, *extra, **env))
  assert code == 0, err[-4000:]
  return err


def _same_results(workdir: Path, reference: Path) -> None:
  for name in RESULTS:
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), name


def _trained(workdir: Path) -> Counter:
  return Counter(line["stage"] for line in history.read(workdir) if line["action"] == "trained")


def _assert_no_lock_held(workdir: Path) -> None:
  locks = sorted((workdir / claims.LOCKS).rglob("*.lock"))
  assert locks
  for path in locks:
    lock = filelock.FileLock(path, preserve_lock_file=True)
    lock.acquire(timeout=0)  # filelock.Timeout if any worker still held it
    lock.release()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
  """One process, every stage: what every other way of running the sweep must reproduce."""
  workdir = tmp_path_factory.mktemp("sweep_reference")
  _ok(workdir)
  return workdir


# ------------------------------------------------------------------------ units and shards
def _config(**overrides):
  from configs.default import get_config

  cfg = get_config()
  cfg.pruning.methods = ("l1_filter", "random")
  cfg.pruning.sparsities = (0.5, 0.9)
  cfg.seeds = (0, 1, 2)
  cfg.kd.temperatures = (2.0, 4.0)
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return resolve_config(cfg)


def test_the_plan_is_every_cell_of_every_seed_group_in_sweep_order():
  plan = units.plan(_config())
  # 3 seeds × 2 methods × 2 sparsities × (CE + KD at T=2 and T=4)
  assert len(plan) == 3 * 2 * 2 * 3
  assert [u.index for u in plan] == list(range(len(plan)))
  assert len({u.name for u in plan}) == len(plan)
  assert plan[0].name == "l1_filter_s0.5_ce_seed0"
  assert plan[1].name == "l1_filter_s0.5_kd_T2_seed0"  # a swept temperature is named
  assert plan[2].name == "l1_filter_s0.5_kd_seed0"  # kd.temperature (4) is not
  assert plan[-1].name == "random_s0.9_kd_seed2"
  assert units.DENSE not in {u.name for u in plan}


def test_a_population_is_one_unit_named_like_its_stage():
  plan = units.plan(_config(population=3, seeds=(0,)))
  assert len(plan) == 2 * 2 * 3
  assert plan[0].seeds == (0, 1, 2) and plan[0].name == "l1_filter_s0.5_ce_seed0+2"
  assert plan[0].checkpoints == [f"l1_filter_s0.5_ce_seed{s}" for s in (0, 1, 2)]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 36, 50])
def test_shards_are_disjoint_cover_the_plan_and_are_balanced(count):
  plan = units.plan(_config())
  shards = [units.shard(plan, count, i) for i in range(count)]
  names = [u.name for s in shards for u in s]
  assert sorted(names) == sorted(u.name for u in plan)  # every unit exactly once
  for s in shards:
    assert [u.index for u in s] == sorted(u.index for u in s)  # plan order within a shard
  costs = [sum(u.cost for u in s) for s in shards]
  # Greedy costliest-first: no shard exceeds another by more than the largest unit.
  assert max(costs) - min(costs) <= max(u.cost for u in plan) + 1e-9
  if count <= len(plan):
    assert min(len(s) for s in shards) >= 1
  assert shards == [units.shard(plan, count, i) for i in range(count)]  # deterministic


def test_shard_costs_weigh_kd_above_ce():
  plan = units.plan(_config(seeds=(0,)))
  ce = next(u for u in plan if u.cell.distill == "ce")
  kd = next(u for u in plan if u.cell.distill == "kd")
  assert (ce.cost, kd.cost) == (1.0, 1.5)
  two = [units.shard(plan, 2, i) for i in range(2)]
  # 4 CE (1.0) + 8 KD (1.5) = 16: an even split is possible and found.
  assert [sum(u.cost for u in s) for s in two] == [8.0, 8.0]


def test_shard_refuses_an_index_outside_the_count():
  with pytest.raises(ValueError, match="shard 3 of 3"):
    units.shard(units.plan(_config()), 3, 3)


def test_the_shard_index_comes_from_the_config_then_the_environment(monkeypatch):
  monkeypatch.delenv("PRUNEBIAS_SHARD_INDEX", raising=False)
  monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
  assert shard_index(_config()) == 0  # one shard: no index needed
  monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
  assert shard_index(_config()) == 0  # one shard: the array's index is not this run's
  assert shard_index(_config(**{"shard.count": 8})) == 7
  monkeypatch.setenv("PRUNEBIAS_SHARD_INDEX", "3")  # ours comes first
  assert shard_index(_config(**{"shard.count": 8})) == 3
  assert shard_index(_config(**{"shard.count": 8, "shard.index": 5})) == 5  # the config wins
  monkeypatch.setenv("PRUNEBIAS_SHARD_INDEX", "8")
  with pytest.raises(ConfigError, match=r"PRUNEBIAS_SHARD_INDEX='8' .* \[0, 7\] .*--array=0-7"):
    shard_index(_config(**{"shard.count": 8}))
  monkeypatch.delenv("PRUNEBIAS_SHARD_INDEX")
  monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
  with pytest.raises(ConfigError, match=r"shard.count=8 needs .*shard.index=<0..7>"):
    shard_index(_config(**{"shard.count": 8}))


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"stage": "cell"}, r"config.stage='cell' is not allowed; expected one of: all, dense"),
    ({"shard.count": 0}, r"config.shard.count=0 is not allowed; expected an integer >= 1"),
    ({"shard.count": 2, "shard.index": 2}, r"config.shard.index=2 is not allowed; .*\[0, 1\]"),
    ({"shard.index": -2}, r"config.shard.index=-2 is not allowed"),
  ],
)
def test_bad_stage_and_shard_values_are_refused(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate_config(_config(**overrides))


# ------------------------------------------------------------------------ locks and files
_HOLD = """
import sys, time
from pathlib import Path
from prunebias_jax import claims
w = claims.Worker(Path(sys.argv[1]))
w.start()
with w.holding(sys.argv[2]):
  print("held", flush=True)
  time.sleep(600)
"""


def _holder(workdir: Path, name: str) -> subprocess.Popen:
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(workdir), name],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
    env=_env(JAX_PLATFORMS="cpu"),
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_sigkilled_holder_frees_its_lock_and_its_liveness(tmp_path):
  proc = _holder(tmp_path, "some_cell")
  me = claims.Worker(tmp_path)
  me.start()
  who = f"{owner().rsplit('-', 1)[0]}-{proc.pid}"
  assert me.alive(who)
  with me.holding("some_cell", wait=False) as waited:
    assert waited is None  # taken: the block must do nothing
  assert me.holder("some_cell").startswith(who)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not me.alive(who)
  with me.holding("some_cell", wait=False) as waited:
    assert waited is False  # free again: the kernel released the dead holder's lock
  assert me.alive(me.owner)


def test_holding_waits_for_the_worker_that_holds_the_stage(tmp_path):
  proc = _holder(tmp_path, "dense")
  me = claims.Worker(tmp_path)
  killer = subprocess.Popen(["sh", "-c", f"sleep 1.5; kill -9 {proc.pid}"])
  t = time.perf_counter()
  with me.holding("dense") as waited:
    assert waited is True
  assert time.perf_counter() - t >= 1.0
  killer.wait()
  proc.wait()


def test_cleanup_keeps_a_live_workers_temporaries(tmp_path):
  live = subprocess.Popen(["sleep", "600"])
  dead = subprocess.Popen(["true"])
  dead.wait()
  host = owner().rsplit("-", 1)[0]
  keep = tmp_path / f".results.jsonl~{host}-{live.pid}~abc.tmp"
  gone = tmp_path / f".results.jsonl~{host}-{dead.pid}~abc.tmp"
  old = tmp_path / "sub" / ".cells.jsonl.xyz.tmp"  # named before temporaries had owners
  for p in (keep, gone, old):
    p.parent.mkdir(exist_ok=True)
    p.write_text("partial")
  assert temporary_owner(keep) == f"{host}-{live.pid}" and temporary_owner(old) is None
  alive = {f"{host}-{live.pid}"}.__contains__
  assert sorted(remove_stale_temporaries(tmp_path, alive)) == sorted([gone, old])
  assert keep.exists()
  live.kill()


def test_an_atomic_write_names_its_owner(tmp_path, monkeypatch):
  seen = []
  real = os.replace
  monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b)))
  write_atomic(tmp_path / "x.json", "{}")
  assert temporary_owner(seen[0]) == owner()


def test_a_cell_file_round_trips_and_is_used_only_under_its_key(tmp_path):
  rng = np.random.default_rng(0)
  outs = [
    Outputs(
      rng.integers(0, 10, 50).astype(np.int32),
      rng.normal(size=(50, 10)).astype(np.float32),
      None,
      LayerCKA(["stage1", "features"], rng.random((2, 2))) if j == 0 else None,
      {"stage1": rng.normal(size=(6, 2, 2, 4)).astype(np.float32)} if j == 0 else None,
    )
    for j in range(2)
  ]
  records = [{"seed": j, "cev": 0.1 + j, "cev_ci": [None, 1.5], "kd": True} for j in range(2)]
  cellfiles.write(tmp_path, "unit", "k1", records, outs)
  got = cellfiles.read(tmp_path, "unit", "k1")
  assert got.records == records
  for a, b in zip(got.outputs, outs):
    assert a.predictions.dtype == np.int32 and np.array_equal(a.predictions, b.predictions)
    assert np.array_equal(a.logits, b.logits)
    assert a.similarity is None  # the sums are not stored: the records hold what they give
    assert (a.layer_cka is None) == (b.layer_cka is None)
    assert (a.maps is None) == (b.maps is None)
  assert np.array_equal(got.outputs[0].maps["stage1"], outs[0].maps["stage1"])
  assert got.outputs[0].layer_cka.names == ["stage1", "features"]
  assert np.array_equal(got.outputs[0].layer_cka.matrix, outs[0].layer_cka.matrix)
  assert cellfiles.read(tmp_path, "unit", "k2") is None  # another config's file
  assert cellfiles.read(tmp_path, "missing", "k1") is None
  cellfiles.path(tmp_path, "unit").write_bytes(b"PK\x03\x04 cut short")
  assert cellfiles.read(tmp_path, "unit", "k1") is None  # unreadable: recomputed


def test_the_cell_key_ignores_the_sweep_axes_and_reporting_but_not_the_metrics():
  models = {"dense": {"a": 1}}
  base = cellfiles.key(_config(), "u", models, None)
  assert cellfiles.key(_config(seeds=(0, 5)), "u", models, None) == base
  assert cellfiles.key(_config(**{"shard.count": 3, "stage": "cells"}), "u", models, None) == base
  assert cellfiles.key(_config(**{"report.format": "pdf"}), "u", models, None) == base
  assert cellfiles.key(_config(**{"metrics.zero_rate": "exclude"}), "u", models, None) != base
  assert cellfiles.key(_config(), "u", {"dense": {"a": 2}}, None) != base
  assert cellfiles.key(_config(), "v", models, None) != base


# ------------------------------------------------------------------------ whole sweeps
def test_two_concurrent_workers_train_everything_once_and_match_one_process(reference, tmp_path):
  workers = [_start(tmp_path), _start(tmp_path)]
  for proc in workers:
    code, err = _finish(proc)
    assert code == 0, err[-4000:]
  _same_results(tmp_path, reference)
  lines = history.read(tmp_path)
  assert _trained(tmp_path) == Counter({units.DENSE: 1, **{n: 1 for n in _names(reference)}})
  assert not [line for line in lines if line["action"] == "failed"]
  assert len({line["worker"] for line in lines}) == 2  # both took part
  waited = [line for line in lines if line["action"] == "waited"]
  assert any(line["stage"] == units.DENSE for line in waited)  # one waited for the teacher
  for line in lines:
    assert line["jax"] and line["flax"] and line["device_kind"] and line["device_count"] >= 1
  assert "seconds" not in (tmp_path / "results.jsonl").read_text()  # no timings in results
  _assert_no_lock_held(tmp_path)


def _names(reference: Path) -> list[str]:
  return sorted(p.stem for p in (reference / cellfiles.DIR).glob("*.npz") if p.stem != "dense")


def test_shards_one_after_another_match_one_process(reference, tmp_path):
  assert len(_names(reference)) == CELLS
  for i in range(3):
    err = _ok(tmp_path, "--config.shard.count=3", SLURM_ARRAY_TASK_ID=str(i))
    if i < 2:
      assert not (tmp_path / "results.jsonl").exists()
      assert "the last shard to finish writes the report" in err
  _same_results(tmp_path, reference)
  assert _trained(tmp_path) == Counter({units.DENSE: 1, **{n: 1 for n in _names(reference)}})
  assert [line["stage"] for line in history.read(tmp_path) if line["action"] == "written"] == [
    "report"
  ]


_SBATCH = """#!/usr/bin/env python3
import json, os, sys
log = os.environ["SBATCH_LOG"]
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
with open(log, "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{1000 + n};cluster")
"""


def _jobs(log: Path) -> list[dict]:
  """The recorded sbatch calls as {option: value} (the `--wrap` command included)."""
  jobs = []
  for line in log.read_text().splitlines():
    args, job = json.loads(line), {}
    for i, arg in enumerate(args):
      if arg.startswith("--") and "=" in arg:
        key, value = arg.split("=", 1)
        job[key] = value
      elif arg in ("--wrap", "--output"):
        job[arg] = args[i + 1]
    jobs.append(job)
  return jobs


def _job(job: dict, **env: str) -> tuple[int, str]:
  proc = subprocess.run(
    ["bash", "-c", job["--wrap"]], cwd=ROOT, env=_env(**env), capture_output=True, text=True
  )
  return proc.returncode, proc.stderr


def test_the_slurm_recipe_runs_dense_then_a_cell_array_then_the_report(reference, tmp_path):
  """scripts/slurm_sweep.sh with a recording stand-in for sbatch (SLURM cannot run here): the
  three jobs and their dependencies as submitted, then each job's command run as SLURM would
  run it (array tasks with $SLURM_ARRAY_TASK_ID), out of order first."""
  bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text(_SBATCH)
  (bin_dir / "sbatch").chmod(0o755)
  workdir = tmp_path / "run"
  env = _env(SBATCH_LOG=str(log), PYTHON=sys.executable, PATH=f"{bin_dir}:{os.environ['PATH']}")
  proc = subprocess.run(
    ["bash", "scripts/slurm_sweep.sh", *ARGS[1:2], str(workdir), "2", *ARGS[2:]],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  assert "submitted: dense 1000; cells 1001 (array 0-1); report 1002" in proc.stdout
  dense, cells, report = _jobs(log)
  assert "--dependency" not in dense and dense["--job-name"] == "prunebias-dense"
  assert cells["--array"] == "0-1" and cells["--dependency"] == "afterok:1000"
  assert report["--dependency"] == "afterany:1001"
  assert dense["--gres"] == "gpu:1" and "--gres" not in report
  code, err = _job(cells, SLURM_ARRAY_TASK_ID="0")  # before the dense stage: refused
  assert code == 2 and "needs the dense stage" in err.strip().splitlines()[-1], err[-2000:]
  assert _job(dense)[0] == 0
  assert not (workdir / "results.jsonl").exists()
  assert _job(cells, SLURM_ARRAY_TASK_ID="1")[0] == 0
  code, err = _job(report)  # shard 0 missing: one line naming what is not done
  assert code == 2 and "needs every cell" in err.strip().splitlines()[-1], err[-2000:]
  assert not (workdir / "results.jsonl").exists()
  assert _job(cells, SLURM_ARRAY_TASK_ID="0")[0] == 0
  assert _job(report)[0] == 0
  _same_results(workdir, reference)
  assert _trained(workdir) == Counter({units.DENSE: 1, **{n: 1 for n in _names(reference)}})


def test_a_worker_killed_mid_cell_leaves_no_lock_and_the_other_finishes(reference, tmp_path):
  first = "l1_filter_s0.5_ce_seed0"
  killed = _start(tmp_path, kill_at=f"{first}:step8")
  deadline = time.time() + 600
  while units.DENSE not in _trained(tmp_path):  # the teacher is done: it goes for `first`
    assert killed.poll() is None and time.time() < deadline, killed.stderr.read()[-3000:]
    time.sleep(0.2)
  other = _start(tmp_path)
  code, _ = _finish(killed)
  assert code == -signal.SIGKILL
  code, err = _finish(other)
  assert code == 0, err[-4000:]
  assert f"{first}: resumed from the mid-stage checkpoint at step 5/" in err
  _same_results(tmp_path, reference)
  trained = _trained(tmp_path)
  assert trained == Counter({units.DENSE: 1, **{n: 1 for n in _names(reference)}})
  for path in (tmp_path / cellfiles.DIR).iterdir():  # every record file is whole
    assert not path.name.startswith(".") or path.name.endswith(".tmp"), path
    if path.suffix == ".npz":
      with np.load(path) as z:
        json.loads(str(z["meta"]))
  _assert_no_lock_held(tmp_path)


def test_the_ray_engine_on_a_local_cluster_matches_one_process(reference, tmp_path):
  pytest.importorskip("ray")
  cmd = [
    sys.executable,
    "-m",
    "prunebias_jax.sweep",
    *ARGS,
    f"--workdir={tmp_path}",
    "--engine=ray",
    "--cpus_per_cell=1",
  ]
  proc = subprocess.run(
    cmd, cwd=ROOT, env=_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=1200
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert f"[{CELLS}/{CELLS}]" in proc.stdout and "[1/1] report: done" in proc.stdout
  _same_results(tmp_path, reference)
  assert _trained(tmp_path) == Counter({units.DENSE: 1, **{n: 1 for n in _names(reference)}})
  assert len({line["worker"] for line in history.read(tmp_path)}) >= 2  # Ray's worker processes


class _ScriptedEngine:
  """Stands in for Ray to check the driver's bookkeeping: fails `flaky` once, `broken`
  always (retriable), `bad` once without retry (bad input), and records the submissions."""

  def __init__(self, flaky=(), broken=(), bad=()):
    self.flaky, self.broken, self.bad = set(flaky), set(broken), set(bad)
    self.submitted: list[tuple[str, tuple]] = []

  def submit(self, stage, only, args):
    self.submitted.append((stage, tuple(only or ())))
    return len(self.submitted) - 1

  def wait(self, handles):
    from prunebias_jax.sweep import Failure

    h = handles[0]
    stage, only = self.submitted[h]
    name = only[0] if only else stage
    if name in self.broken:
      return h, Failure(f"RuntimeError: {name} broke", retriable=True)
    if name in self.bad:
      return h, Failure(f"ConfigError: {name} is bad", retriable=False)
    if name in self.flaky:
      self.flaky.discard(name)
      return h, Failure(f"RuntimeError: {name} flaked", retriable=True)
    return h, {"worker": "w-1", "seconds": 1.0, "models": 1}


def test_the_sweep_driver_retries_failed_cells_and_ends_with_those_that_still_fail():
  from prunebias_jax.sweep import sweep

  cfg = _config(seeds=(0,))
  names = [u.name for u in units.plan(cfg)]
  said: list[str] = []
  engine = _ScriptedEngine(flaky=[names[0]], broken=[names[1]], bad=[names[2]])
  failed = sweep(engine, cfg, "/unused", (), retries=2, say=said.append)
  assert failed == [names[1], names[2]]
  counts = Counter(only[0] for stage, only in engine.submitted if stage == "cells")
  assert counts[names[0]] == 2  # failed once, retried once, done
  assert counts[names[1]] == 3  # 1 + 2 retries, then given up
  assert counts[names[2]] == 1  # bad input: never retried
  assert all(counts[n] == 1 for n in names[3:])
  assert ("report", ()) not in engine.submitted  # the report needs every cell
  assert f"{names[0]}: failed (RuntimeError: {names[0]} flaked); retry 1/2" in said
  assert f"2 of {len(names)} cells failed; the report needs every cell:" in said
  assert f"  {names[1]}: RuntimeError: {names[1]} broke" in said
  assert sum(line.startswith(f"[{len(names) - 2}/{len(names)}]") for line in said) == 1

  said.clear()
  engine = _ScriptedEngine()
  assert sweep(engine, cfg, "/unused", (), retries=2, say=said.append) == []
  assert [s for s, _ in engine.submitted] == ["dense"] + ["cells"] * len(names) + ["report"]

  engine = _ScriptedEngine(broken=["dense"])
  assert sweep(engine, cfg, "/unused", (), retries=1, say=said.append) == ["dense"]
  assert [s for s, _ in engine.submitted] == ["dense", "dense"]  # no cell without a teacher
