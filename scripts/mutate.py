"""Mutation testing of the core modules (mutmut) → docs/mutation.md.

    make mutate                                   # a seeded sample of 300 mutants (~45 min)
    make mutate MUTATE_ARGS="--sample 0"          # every mutant (hours on 2 cores)
    python scripts/mutate.py --sample 200 --seed 1 --markdown /tmp/m.md
    python scripts/mutate.py --rerun-survivors    # after adding tests: the survivors only

What is mutated and against which tests is `[tool.mutmut]` in pyproject.toml: the metrics,
the losses, the train and eval steps and pruning, against their fast unit tests only.
mutmut copies the project to `mutants/`, makes every mutant of those files, records which
tests reach which function, then runs each chosen mutant against the tests that reach it.

A uniform random sample (seeded) estimates the score of all mutants without running them
all; the report gives the Wilson 95% interval of that estimate. A mutant counts as killed
when a test fails or the tests run out of time (a mutant that hangs the suite is found).
Every survivor must be either killed by a new test or listed, with the reason it cannot be
killed, in docs/mutation-justified.json; the script exits 1 while any survivor is
unexplained, so the report cannot quietly drift.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

try:  # exit code → status, mutmut's own table (unknown codes: 'suspicious')
  from mutmut.stats import status_by_exit_code
except ImportError:
  sys.exit("error: mutmut is not installed; `make mutate` installs it (the .[mutate] extra)")

ROOT = Path(__file__).resolve().parents[1]
JUSTIFIED = ROOT / "docs" / "mutation-justified.json"
# The sample and its results, for --rerun-survivors and --report-only.
LAST = ROOT / "mutants" / "mutate-last-run.json"
MUTMUT = str(Path(sys.executable).with_name("mutmut"))  # the one installed beside this Python
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def _mutmut(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([MUTMUT, *args], cwd=ROOT, capture_output=True, text=True)


def _results() -> dict[str, int | None]:
  """mutant name → exit code, from mutmut's per-file meta files."""
  out: dict[str, int | None] = {}
  for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
    out.update(json.loads(meta.read_text())["exit_code_by_key"])
  return out


def _module(name: str) -> str:
  return re.sub(r"\.x[_ǁ].*$", "", name)


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  if n == 0:
    return (math.nan, math.nan)
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return centre - half, centre + half


def _run(names: list[str], max_children: int, cache: str) -> None:
  # One mutmut invocation for all names: each one re-runs the clean tests of its mutants.
  # Every worker shares one XLA compilation cache: an executable is keyed by its program, so
  # a mutant that changes a kernel compiles its own, and the unchanged ones compile once.
  env = os.environ | {
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
  }
  proc = subprocess.run(
    [MUTMUT, "run", "--max-children", str(max_children), *names], cwd=ROOT, env=env
  )
  if proc.returncode != 0:
    sys.exit(f"error: mutmut run failed (exit {proc.returncode}); its output is above")
  done = sum(1 for n in names if _results().get(n) is not None)
  print(f"\nmutate: {done}/{len(names)} mutants checked", flush=True)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sample", type=int, default=300, help="mutants to run (0: every mutant)")
  p.add_argument("--seed", type=int, default=0, help="seed of the sample")
  p.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
  p.add_argument("--markdown", default=str(ROOT / "docs" / "mutation.md"))
  p.add_argument(
    "--report-only", action="store_true", help="rewrite the report from the last run's results"
  )
  p.add_argument(
    "--rerun-survivors",
    action="store_true",
    help="run again only the last run's surviving mutants (after adding tests); a killed\n"
    "mutant stays killed, since tests were only added",
  )
  args = p.parse_args(argv)
  if args.sample < 0:
    p.error(f"--sample must be >= 0 (0: every mutant), got {args.sample}")
  last = json.loads(LAST.read_text()) if LAST.exists() else None
  if (args.rerun_survivors or args.report_only) and last is None:
    sys.exit(f"error: no earlier run to continue ({LAST.relative_to(ROOT)} is missing)")
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="prunebias-jax-mutate-xla-") as cache:
    if not args.report_only:
      # Makes every mutant and the test → function map; runs one mutant (mutmut needs one).
      _run(["prunebias_jax.train.losses.x_cross_entropy__mutmut_1"], args.max_children, cache)
    every = sorted(_results())
    if not every:
      sys.exit("error: no mutants found under mutants/ (run without --report-only first)")
    if last is not None and (args.rerun_survivors or args.report_only):
      chosen, codes = last["chosen"], last["codes"]
      args.seed, passes = last["seed"], last["passes"]
      again = [n for n in chosen if status_by_exit_code[codes[n]] not in KILLED]
    else:
      chosen = every
      if 0 < args.sample < len(every):
        chosen = sorted(random.Random(args.seed).sample(every, args.sample))
      codes, passes, again = {}, [], chosen
    if not args.report_only:
      _run(again, args.max_children, cache)
      results = _results()
      codes |= {n: results.get(n) for n in again}
      passes.append({"mutants": len(again), "minutes": (time.monotonic() - start) / 60})
      passes[-1]["load"] = os.getloadavg()[0]
  LAST.write_text(
    json.dumps({"seed": args.seed, "chosen": chosen, "codes": codes, "passes": passes})
  )
  status = {n: status_by_exit_code[codes[n]] for n in chosen}
  justified = json.loads(JUSTIFIED.read_text()) if JUSTIFIED.exists() else {}
  survivors = sorted(n for n, s in status.items() if s not in KILLED)
  unexplained = [n for n in survivors if n not in justified]
  text = _report(args, every, chosen, status, survivors, justified, passes)
  Path(args.markdown).write_text(text)
  killed = sum(s in KILLED for s in status.values())
  print(f"mutate: {killed}/{len(chosen)} killed; {len(unexplained)} survivor(s) unexplained")
  print(f"mutate: wrote {args.markdown}")
  return 1 if unexplained or any(status[n] == "not checked" for n in chosen) else 0


def _report(args, every, chosen, status, survivors, justified, passes) -> str:
  n, killed = len(chosen), sum(s in KILLED for s in status.values())
  equivalent = [s for s in survivors if s in justified]
  lo, hi = _wilson(killed, n)
  lines = [
    "# Mutation testing",
    "",
    "Written by `make mutate` (`scripts/mutate.py`), which rewrites the whole file: edit the",
    "script or docs/mutation-justified.json, not this page.",
    "",
    "mutmut makes small wrong versions (mutants) of the core modules, one line each: an",
    "operator, a constant, a comparison, an argument or a name changed. Each mutant runs",
    "against the fast unit tests that reach the changed function (`[tool.mutmut]` in",
    "pyproject.toml); it is *killed* when one of them fails, or runs out of time (a mutant",
    "that hangs the suite is found). A mutant that survives either gets a test that kills it",
    "or is explained below (docs/mutation-justified.json): an equivalent mutant, with the",
    "reason no test can tell it from the original. Not mutated: the text of `raise`,",
    "`warnings.warn` and log statements (their words are checked by the slower bad-input and",
    "CLI tests); the conditions that raise are mutated. The run is a uniform random sample",
    "(its seed below) of all mutants; the Wilson interval is the uncertainty of the sample's",
    "score as an estimate of the score of every mutant. A second pass, when listed under wall",
    "time, reran only the first pass's survivors after tests were added (a killed mutant stays",
    "killed: tests were only added, none changed to pass).",
    "",
    f"- mutants of the core: **{len(every)}**; run: **{n}**"
    + (f" (uniform sample, seed {args.seed})" if n < len(every) else " (all)"),
    f"- killed (a test failed or timed out): **{killed}/{n} = {killed / n:.1%}**"
    + (f", Wilson 95% interval {lo:.1%}–{hi:.1%} for all mutants" if n < len(every) else ""),
    f"- survived: {len(survivors)}, of which {len(equivalent)} explained below as equivalent"
    f" or out of reach; score without the explained ones: "
    f"{killed / max(1, n - len(equivalent)):.1%}",
    "- wall time: "
    + "; then ".join(
      f"{x['mutants']} mutants in {x['minutes']:.1f} min (load {x['load']:.2f} at the end)"
      for x in passes
    )
    + f", {args.max_children} workers",
    "",
    "| module | run | killed | timeout | survived | no tests |",
    "|---|---|---|---|---|---|",
  ]
  by_module: dict[str, Counter] = {}
  for name in chosen:
    by_module.setdefault(_module(name), Counter())[status[name]] += 1
  for module, c in sorted(by_module.items()):
    lines.append(
      f"| `{module}` | {sum(c.values())} | {c['killed'] + c['segfault']} | {c['timeout']} | "
      f"{c['survived']} | {c['no tests']} |"
    )
  lines += ["", "## Survivors", ""]
  if not survivors:
    lines.append("None.")
  for name in survivors:
    diff = _mutmut("show", name).stdout.strip().splitlines()
    body = [l for l in diff if l.startswith(("+", "-")) and not l.startswith(("+++", "---"))]
    lines.append(f"- `{name}` ({status[name]}): {justified.get(name, '**unexplained**')}")
    lines += ["  ```diff", *(f"  {l}" for l in body[:8]), "  ```"]
  lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
