"""Hostile-user sweep through the real command line: every case must end as the README promises.

    python scripts/adversarial_sweep.py                     # every case, 2 at a time
    python scripts/adversarial_sweep.py --only data,files   # some groups
    python scripts/adversarial_sweep.py --only values --match 'seed|epochs'   # some cases
    python scripts/adversarial_sweep.py --json runs/adversarial.json --workers 1

Each case runs `python -m prunebias_jax.main` in a subprocess on the embedded digits data
(tiny epochs) and is judged on what a user sees:

* a refusal (bad input, exit 2; non-finite loss, 3; disk full, 4; interrupt, 130) must print
  exactly one line on stderr besides absl's log lines, and no traceback;
* a run expected to finish must exit 0 without a traceback;
* nothing already written may change when a run is refused (a hash of the workdir's
  checkpoints before and after), and a changed training config must never restore a model
  trained with the old values ('silent restore': checked from the checkpoints' identities).

Groups: `values` (every config field with a wrong type and an out-of-range value), `files`
(config files that raise, do not parse, return the wrong thing), `workdir` (files and folders
swapped, link loops, immutable folders, a full 2 MiB tmpfs where mounting is allowed), `data`
(image folders: one class, link loops, broken links, unusual names), `trained` (a finished
workdir: damaged checkpoints, config.json deleted with other training values, NaN loss,
SIGINT/SIGTERM/SIGKILL and rerun), `fresh` (a NaN loss, then each piece of the advice it
prints, which must work without retraining the teacher). The table and a JSON file list
every case with its exit code, stderr line count and verdict; the script exits 1 if any case
fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prunebias_jax.config import base_config  # noqa: E402

TINY = (
  "--config.dense.epochs=1",
  "--config.finetune.epochs=1",
  "--config.pruning.methods=('random',)",
  "--config.pruning.sparsities=(0.5,)",
  "--config.analysis.bootstrap_resamples=0",
  "--config.progress_seconds=1e9",
)
LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl: I1201 16:20:50.123 ...
REFUSALS = (2, 3, 4, 130)


@dataclass
class Case:
  group: str
  name: str
  args: tuple[str, ...] = ()
  expect: str = "refused"  # 'refused' | 'ok'
  setup: object = None  # callable(workdir: Path) -> None, run before the command
  check: object = None  # callable(workdir: Path, proc) -> str | None (a problem)
  config: str = "configs/default.py"
  interrupt: tuple[float, int] | None = None  # (seconds after start, signal)
  rerun: bool = False  # then rerun (the same command, or `rerun_args`), expect exit 0
  rerun_args: tuple[str, ...] | None = None  # replaces `args` in the rerun
  result: dict = field(default_factory=dict)


def _slug(group: str, name: str) -> str:
  """The case's folder name (its workdir; its config file and image folder sit beside it)."""
  return re.sub(r"[^A-Za-z0-9_-]", "_", f"{group}-{name}")[:120]


def _tree_hash(path: Path) -> str:
  h = hashlib.sha256()
  if path.exists():
    for p in sorted(path.rglob("*")):
      if p.is_file() and not p.is_symlink():
        h.update(str(p.relative_to(path)).encode() + p.read_bytes())
  return h.hexdigest()


def _stderr_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def _command(case: Case, workdir: Path) -> list[str]:
  cfg = (
    ["--config", case.config] if case.config.startswith("configs/") else ["--config", case.config]
  )
  return [
    sys.executable,
    "-m",
    "prunebias_jax.main",
    *cfg,
    f"--workdir={workdir}",
    *_merged(TINY, case.args),
  ]


def _merged(base: tuple[str, ...], args: tuple[str, ...]) -> list[str]:
  """`base` with a case's own --config.key=value in place of the base's value of that key
  (the CLI refuses an override given twice)."""
  key = lambda a: a.split("=", 1)[0] if a.startswith("--config.") else None
  own = {key(a) for a in args} - {None}
  return [a for a in base if key(a) not in own] + list(args)


def _run(cmd: list[str], interrupt: tuple[float, int] | None = None) -> subprocess.CompletedProcess:
  if interrupt is None:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  after, sig = interrupt
  # A background job ignores SIGINT; the child must not inherit that.
  proc = subprocess.Popen(
    cmd,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  deadline = time.monotonic() + after
  while time.monotonic() < deadline and proc.poll() is None:
    time.sleep(0.2)
  if proc.poll() is None:
    proc.send_signal(sig)
  out, err = proc.communicate(timeout=900)
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_case(case: Case, base: Path, trained: Path | None) -> Case:
  workdir = base / _slug(case.group, case.name)
  if case.group == "trained":
    shutil.copytree(trained, workdir)
  if case.setup is not None:
    case.setup(workdir)
  before = _tree_hash(workdir / "checkpoints")
  t = time.monotonic()
  proc = _run(_command(case, workdir), case.interrupt)
  problems = []
  lines = _stderr_lines(proc.stderr)
  traceback = "Traceback (most recent call last)" in proc.stderr
  if traceback:
    problems.append("traceback on stderr")
  if case.interrupt is not None and case.interrupt[1] != signal.SIGINT:
    pass  # SIGTERM and SIGKILL end the process unhandled: the rerun is what counts
  elif case.expect == "ok" or (case.expect == "any" and proc.returncode == 0):
    if proc.returncode != 0:
      problems.append(f"exit {proc.returncode}, expected 0")
  else:
    if proc.returncode not in REFUSALS:
      problems.append(f"exit {proc.returncode}, expected one of {REFUSALS}")
    if len(lines) != 1:
      problems.append(f"{len(lines)} stderr lines, expected 1")
    elif (
      proc.returncode == 2  # bad input: nothing trained, nothing overwritten (README)
      and "--config.overwrite=True" not in case.args  # overwrite deletes what differs
      and _tree_hash(workdir / "checkpoints") != before
    ):
      problems.append("checkpoints changed by a refused run")
  if case.check is not None and not problems:
    problem = case.check(workdir, proc)
    if problem:
      problems.append(problem)
  if case.rerun and not problems:
    args = case.args if case.rerun_args is None else case.rerun_args
    dense = _tree_hash(workdir / "checkpoints" / "dense")
    again = _run(_command(dataclasses.replace(case, args=args), workdir))
    if again.returncode != 0 or "Traceback" in again.stderr:
      last = (_stderr_lines(again.stderr) or [""])[-1]
      problems.append(f"rerun exit {again.returncode}: {last}")
    elif case.rerun_args is not None and _tree_hash(workdir / "checkpoints" / "dense") != dense:
      problems.append("the rerun retrained the teacher, which the changed value does not affect")
  case.result = {
    "group": case.group,
    "case": case.name,
    "exit": proc.returncode,
    "stderr_lines": len(lines),
    "line": (lines[-1] if lines else "")[:300],
    "seconds": round(time.monotonic() - t, 1),
    "verdict": "; ".join(problems) or "ok",
  }
  return case


# ------------------------------------------------------------------------------------ cases
def _fields(cfg, prefix: str = "") -> list[tuple[str, object]]:
  out = []
  for key in cfg.keys():
    value = cfg[key]
    if hasattr(value, "keys"):
      out += _fields(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def _bad_values(value: object) -> list[str]:
  """A wrong type and an out-of-range value for a field whose default is `value`."""
  if isinstance(value, bool):
    return ["maybe", "2"]
  if isinstance(value, int):
    return ["banana", "-7", str(10**30)]
  if isinstance(value, float):
    return ["banana", "nan", "-1e400"]
  if isinstance(value, str):
    return ["12", "'no_such_choice_qq'"]
  if isinstance(value, tuple):
    return ["banana", "(-1,)", "()"]
  return ["banana", "-1"]


def value_cases() -> list[Case]:
  cases = []
  for name, default in _fields(base_config()):
    for bad in _bad_values(default):
      # A value that is valid for this field (e.g. a free-form string) may start a run: the
      # sweep then only requires no traceback and a clean exit.
      cases.append(Case("values", f"{name}={bad}", (f"--config.{name}={bad}",), expect="any"))
  return cases


def _config_file(body: str):
  def setup(workdir: Path) -> None:
    workdir.parent.mkdir(parents=True, exist_ok=True)
    (workdir.parent / f"{workdir.name}.py").write_text(body)

  return setup


def file_cases(base: Path) -> list[Case]:
  head = (
    "import sys\nsys.path.insert(0, %r)\nfrom configs.default import get_config as _base\n"
    % str(ROOT)
  )
  bodies = {
    "raises ValueError": head + "def get_config():\n  raise ValueError('no')\n",
    "raises at import": "raise KeyError('x')\n",
    "syntax error": "def get_config(:\n",
    "missing import": "import no_such_module_qq\ndef get_config():\n  return None\n",
    "no get_config": "X = 1\n",
    "returns a list": "def get_config():\n  return [1]\n",
    "returns None": "def get_config():\n  return None\n",
    "wrong type inside": head
    + "def get_config():\n  c = _base()\n  c.dense.epochs = 'ten'\n  return c\n",
    "unknown field": head + "def get_config():\n  c = _base()\n  c.dense.epochz = 3\n  return c\n",
    "sys.exit(0) inside": "import sys\ndef get_config():\n  sys.exit(0)\n",
  }
  cases = []
  for name, body in bodies.items():
    path = base / f"{_slug('files', name)}.py"
    cases.append(Case("files", name, setup=_config_file(body), config=str(path)))
  cases.append(Case("files", "missing file", config=str(base / "nowhere.py")))
  return cases


def _swap(rel: str, kind: str):
  def setup(workdir: Path) -> None:
    target = workdir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
      target.write_text("in the way\n")
    elif kind == "dir":
      target.mkdir()
    elif kind == "loop":
      os.symlink(target.name, target)
    elif kind == "immutable":
      target.mkdir()
      subprocess.run(["chattr", "+i", str(target)], check=True)

  return setup


def _can_chattr(base: Path) -> bool:
  probe = base / "chattr_probe"
  probe.mkdir(exist_ok=True)
  ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
  subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
  return ok


def workdir_cases(base: Path) -> list[Case]:
  cases = [
    Case("workdir", "workdir is a file", setup=lambda w: w.write_text("x")),
    Case("workdir", "workdir is a link loop", setup=lambda w: os.symlink(w.name, w)),
  ]
  for rel in ("results.jsonl", "results.md", "config.json", "plots/cie_grid.png"):
    cases.append(Case("workdir", f"{rel} is a folder", setup=_swap(rel, "dir")))
  for rel in ("plots", "checkpoints", "checkpoints/dense"):
    cases.append(Case("workdir", f"{rel} is a file", setup=_swap(rel, "file")))
    cases.append(Case("workdir", f"{rel} is a link loop", setup=_swap(rel, "loop")))
  if _can_chattr(base):
    for rel in ("plots", "checkpoints"):
      cases.append(Case("workdir", f"{rel} is immutable", setup=_swap(rel, "immutable")))
  return cases


def _folder(spec: dict[str, dict[str, int]], extra=None):
  def setup(workdir: Path) -> None:
    rng = np.random.default_rng(0)
    root = workdir.parent / (workdir.name + "-images")
    for split, classes in spec.items():
      for cls, n in classes.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
          Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if extra is not None:
      extra(root)

  return setup


def data_cases(base: Path) -> list[Case]:
  two = {"train": {"a": 20, "b": 20}, "test": {"a": 5, "b": 5}}
  weird = ["$x^$", "a$\\frac$|b", "c\nd", os.fsdecode(b"\xff\xfe"), "é <b>"]
  layouts = {
    "one class": ({"train": {"a": 20}, "test": {"a": 5}}, None, "refused"),
    "no test split": ({"train": {"a": 20, "b": 20}}, None, "refused"),
    "class only in train": (
      {"train": {"a": 9, "b": 9, "c": 9}, "test": {"a": 3, "b": 3}},
      None,
      "refused",
    ),
    "empty class": (
      two,
      lambda r: (r / "train" / "c").mkdir() or (r / "test" / "c").mkdir(),
      "refused",
    ),
    "link loop in split": (two, lambda r: os.symlink("loop", r / "train" / "loop"), "refused"),
    "link loop image": (two, lambda r: os.symlink("x.png", r / "train" / "a" / "x.png"), "refused"),
    "broken link image": (
      two,
      lambda r: os.symlink("nowhere.png", r / "test" / "b" / "g.png"),
      "refused",
    ),
    "folder named .png": (two, lambda r: (r / "train" / "a" / "d.png").mkdir(), "refused"),
    "corrupt png": (
      two,
      lambda r: (r / "train" / "a" / "0.png").write_bytes(b"\x89PNG junk"),
      "refused",
    ),
    "unusual class names": (
      {"train": {n: 16 for n in weird}, "test": {n: 4 for n in weird}},
      None,
      "ok",
    ),
  }
  cases = []
  for name, (spec, extra, expect) in layouts.items():
    images = base / f"{_slug('data', name)}-images"
    args = (
      "--config.data.source=image_folder",
      f"--config.data.dir={images}",
      f"--config.data.cache_dir={base / 'cache'}",
      "--config.data.batch_size=8",
      "--config.data.imbalance.classes=(1,)",
      "--config.data.imbalance.keep_fractions=(0.5,)",
    )
    cases.append(Case("data", name, args, expect=expect, setup=_folder(spec, extra)))
  cases.append(
    Case(
      "data",
      "data.dir is a link loop",
      ("--config.data.source=image_folder", f"--config.data.dir={base / 'loop'}"),
      setup=lambda w: os.path.lexists(base / "loop") or os.symlink("loop", base / "loop"),
    )
  )
  return cases


def trained_cases() -> list[Case]:
  def truncate(w: Path) -> None:
    state = next((w / "checkpoints" / "dense").glob("*/state"))
    with open(state / "manifest.ocdbt", "r+b") as f:
      f.truncate(10)

  def garbage(w: Path) -> None:
    state = next((w / "checkpoints" / "dense").glob("*/state"))
    for f in sorted(p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"):
      f.write_bytes(np.random.default_rng(0).bytes(200))

  def bad_meta(w: Path) -> None:
    next((w / "checkpoints" / "dense").glob("*/meta/metadata")).write_bytes(b"\x00 not json")

  def no_config(w: Path) -> None:
    (w / "config.json").unlink()

  def dense_hash(w: Path) -> None:
    (w.parent / f"{w.name}.dense").write_text(_tree_hash(w / "checkpoints" / "dense"))

  def teacher(kept: bool):
    def check(w: Path, proc) -> str | None:
      same = (w.parent / f"{w.name}.dense").read_text() == _tree_hash(w / "checkpoints" / "dense")
      if same != kept:
        return (
          "teacher retrained though only fine-tuning changed"
          if kept
          else ("teacher restored though its training changed (silent restore)")
        )
      return None

    return check

  def teacher_case(name, args, kept: bool, expect: str = "ok", setup=dense_hash) -> Case:
    """A rerun of the trained workdir that must keep (or retrain) the dense teacher."""
    return Case("trained", name, args, expect=expect, setup=setup, check=teacher(kept))

  long_finetune = ("--config.finetune.epochs=300", "--config.overwrite=True")
  return [
    Case("trained", "truncated manifest", setup=truncate),
    Case("trained", "garbage arrays", setup=garbage),
    Case("trained", "unreadable metadata", setup=bad_meta),
    Case(
      "trained",
      "config.json deleted, other training values",
      ("--config.dense.epochs=2", "--config.finetune.optim.learning_rate=0.5"),
      setup=no_config,
    ),
    Case("trained", "other dense epochs", ("--config.dense.epochs=2",)),
    Case("trained", "other fine-tune lr", ("--config.finetune.optim.learning_rate=0.5",)),
    teacher_case(
      "other fine-tune lr + overwrite (teacher kept)",
      ("--config.finetune.optim.learning_rate=0.5", "--config.overwrite=True"),
      kept=True,
    ),
    teacher_case(
      "config.json deleted, other dense epochs + overwrite (teacher retrained)",
      ("--config.dense.epochs=2", "--config.overwrite=True"),
      kept=False,
      setup=lambda w: (no_config(w), dense_hash(w)),
    ),
    teacher_case("only an analysis value changed", ("--config.analysis.permutations=500",), True),
    teacher_case(
      "nan loss with overwrite (teacher kept)",
      ("--config.finetune.optim.learning_rate=1e30", "--config.overwrite=True"),
      kept=True,
      expect="refused",
    ),
    Case("trained", "SIGINT during fine-tuning", long_finetune, interrupt=(20.0, signal.SIGINT)),
  ] + [
    Case(
      "trained",
      f"{sig.name} during fine-tuning, then rerun",
      ("--config.finetune.epochs=30", "--config.overwrite=True"),
      interrupt=(15.0, sig),
      rerun=True,
    )
    for sig in (signal.SIGTERM, signal.SIGKILL)
  ]


def fresh_cases() -> list[Case]:
  """From an empty workdir: the advice printed after a failure can be followed."""
  nan = ("--config.finetune.optim.learning_rate=1e30",)
  return [
    Case(
      "fresh",
      "fine-tuning nan loss, then the advised lower learning rate",
      nan,
      rerun=True,
      rerun_args=("--config.finetune.optim.learning_rate=0.05",),
    ),
    Case(
      "fresh",
      "fine-tuning nan loss, then nonfinite=skip",
      nan,
      rerun=True,
      rerun_args=(*nan, "--config.nonfinite=skip"),
    ),
  ]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="values,files,workdir,data,trained,fresh")
  parser.add_argument("--match", default="", help="only cases whose name matches this regex")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--json", default="")
  parser.add_argument("--keep", action="store_true", help="keep the case folders")
  args = parser.parse_args()
  groups = args.only.split(",")
  base = Path(tempfile.mkdtemp(prefix="adversarial-"))
  cases: list[Case] = []
  builders = {
    "values": value_cases,
    "files": lambda: file_cases(base),
    "workdir": lambda: workdir_cases(base),
    "data": lambda: data_cases(base),
    "trained": trained_cases,
    "fresh": fresh_cases,
  }
  for g in groups:
    cases += [c for c in builders[g]() if re.search(args.match, c.name)]
  trained = None
  if any(c.group == "trained" for c in cases):
    trained = base / "trained-source"
    print(f"training the shared tiny workdir {trained} ...", flush=True)
    proc = _run(_command(Case("setup", "setup", expect="ok"), trained))
    if proc.returncode != 0:
      print(proc.stderr[-3000:])
      return 1
  load = os.getloadavg()
  t0 = time.monotonic()
  print(f"{len(cases)} cases, {args.workers} at a time (load {load[0]:.2f})", flush=True)
  failed = 0
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    futures = [pool.submit(run_case, c, base, trained) for c in cases]
    for fut in futures:
      r = fut.result().result
      failed += r["verdict"] != "ok"
      mark = "ok  " if r["verdict"] == "ok" else "FAIL"
      said = r["verdict"] if r["verdict"] != "ok" else r["line"][:90]
      print(f"{mark} {r['group']:8} exit {r['exit']:>3}  {r['case'][:60]!r:62}  {said}", flush=True)
  results = [c.result for c in cases]
  summary = {
    "cases": len(cases),
    "failed": failed,
    "seconds": round(time.monotonic() - t0),
    "load_before": load,
    "load_after": os.getloadavg(),
    "results": results,
  }
  print(
    f"== {len(cases) - failed}/{len(cases)} cases as promised in {summary['seconds']} s "
    f"(load {load[0]:.2f} before, {summary['load_after'][0]:.2f} after)"
  )
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1, ensure_ascii=True) + "\n")
  if not args.keep:
    subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
