"""Expected wall time of a sweep on 1, 8, 40, ... devices, from measured per-step times.

    python scripts/sweep_walltime.py [--config configs/paper/cifar100_imbalanced.py]
        [--sparsities 0.3,0.45,0.6,0.75,0.9] [--seeds 0,1,2,3] [--devices 1,8,40]
        [--control] [--markdown docs/sweeps.md]

Measures, on this machine's first device, the project's real jitted train steps (`make_train_
step`, with the config's augmentation) of the config's model: the teacher's CE step at the
dense batch, and the student's CE and KD steps at the fine-tuning batch (KD with the teacher's
forward pass). A cell is `finetune.epochs` × ⌈train examples / batch⌉ steps; the dense stage,
`dense.epochs` × ⌈train / dense batch⌉ teacher steps, is the serial part (every cell starts
from the teacher). On D devices the cells are scheduled as the sweep engine shards them
(`units.shard`: balanced by cost), so the wall time is dense + the largest shard.

Left out, so the figures are lower bounds: evaluation passes, checkpoints, start-up and
compilation of each worker, data loading. Pass `--teacher_ms/--ce_ms/--kd_ms` to recompute the
table from per-step times measured elsewhere (e.g. on a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
# The lines around the table in docs/sweeps.md.
BEGIN = "<!-- table: scripts/sweep_walltime.py -->"
END = "<!-- end of table -->"


def load_config(path: str, sparsities: tuple[float, ...], seeds: tuple[int, ...]):
  spec = importlib.util.spec_from_file_location("sweep_config", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.pruning.sparsities = sparsities
  cfg.seeds = seeds
  return cfg


def step_seconds(cfg, num_classes: int, batch: int, kd: bool, steps: int) -> float:
  """Seconds per step of the real train step (median of `steps` after a warm-up step)."""
  from prunebias_jax.models import get_model
  from prunebias_jax.pruning import apply_masks, prune
  from prunebias_jax.stages import distill_weights
  from prunebias_jax.train import create_state, make_optimizer, make_train_step

  model = get_model(cfg.model, num_classes, dtype=cfg.compute_dtype)
  shape = (1, 32, 32, 3)
  teacher = get_model(cfg.model, num_classes).init(jax.random.key(0), jnp.zeros(shape), train=False)
  masks = prune(teacher["params"], "l1_filter", 0.45)
  opt = make_optimizer(cfg.finetune.optim, steps_per_epoch=100, epochs=1)
  step = make_train_step(
    model,
    opt,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    crop_padding=cfg.data.crop_padding,
    flip=cfg.data.flip,
    method="kd" if kd else "ce",
    weights=distill_weights(cfg, "kd" if kd else "ce"),
    teacher_model=model,
  )
  state = create_state(
    apply_masks(teacher["params"], masks), teacher["batch_stats"], opt, masks=masks
  )
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
  labels = jax.device_put(rng.integers(0, num_classes, (batch,)).astype(np.int32))
  alpha, temperature = jnp.float32(cfg.kd.alpha), jnp.float32(cfg.kd.temperature)
  times = []
  for i in range(steps + 1):
    t = time.perf_counter()
    state, metrics = step(state, images, labels, jax.random.key(i), teacher, alpha, temperature)
    jax.block_until_ready((state, metrics))
    if i:
      times.append(time.perf_counter() - t)
  return float(np.median(times))


def largest_shard(plan: list, cell_seconds: list[float], devices: int) -> float:
  """The seconds of the slowest of `devices` shards, split as the sweep splits them
  (`units.shard`: balanced by cost, one shard per device)."""
  from prunebias_jax import units

  return max(
    sum(cell_seconds[u.index] for u in units.shard(plan, devices, i)) for i in range(devices)
  )


def duration(seconds: float) -> str:
  hours = seconds / 3600
  return f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.1f} days"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/paper/cifar100_imbalanced.py")
  p.add_argument("--sparsities", default="0.3,0.45,0.6,0.75,0.9")
  p.add_argument("--seeds", default="0,1,2,3")
  p.add_argument("--devices", default="1,8,40")
  p.add_argument("--train_examples", type=int, default=50_000)
  p.add_argument("--num_classes", type=int, default=100)
  p.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
  p.add_argument("--teacher_ms", type=float)
  p.add_argument("--ce_ms", type=float)
  p.add_argument("--kd_ms", type=float)
  p.add_argument(
    "--control",
    action="store_true",
    help="keep the config's unpruned control cells (the issue's 40 cells leave them out)",
  )
  p.add_argument(
    "--markdown",
    help=f"write the table (and how it was measured) here: between the lines {BEGIN!r} and "
    f"{END!r} of an existing file (appended to one without them)",
  )
  args = p.parse_args(argv)

  from prunebias_jax import units
  from prunebias_jax.config import resolve_config

  sparsities = tuple(float(s) for s in args.sparsities.split(","))
  seeds = tuple(int(s) for s in args.seeds.split(","))
  cfg = load_config(args.config, sparsities, seeds)
  cfg.pruning.control = bool(args.control and cfg.pruning.control)
  cfg = resolve_config(cfg)
  plan = units.plan(cfg)
  load_before = [round(x, 2) for x in os.getloadavg()]
  measured = {}
  for name, batch, kd in (
    ("teacher_ms", cfg.dense.batch_size or cfg.data.batch_size, False),
    ("ce_ms", cfg.finetune.batch_size or cfg.data.batch_size, False),
    ("kd_ms", cfg.finetune.batch_size or cfg.data.batch_size, True),
  ):
    given = getattr(args, name)
    measured[name] = (
      given if given else 1000 * step_seconds(cfg, args.num_classes, batch, kd, args.steps)
    )
    print(f"{name} (batch {batch}): {measured[name]:.1f} ms", flush=True)
  load_after = [round(x, 2) for x in os.getloadavg()]
  dense_batch = cfg.dense.batch_size or cfg.data.batch_size
  ft_batch = cfg.finetune.batch_size or cfg.data.batch_size
  dense_steps = cfg.dense.epochs * math.ceil(args.train_examples / dense_batch)
  cell_steps = cfg.finetune.epochs * math.ceil(args.train_examples / ft_batch)
  dense_s = dense_steps * measured["teacher_ms"] / 1000
  cell_s = [
    cell_steps * (measured["ce_ms"] if u.cell.distill == "ce" else measured["kd_ms"]) / 1000
    for u in plan
  ]
  device = jax.devices()[0]
  lines = [
    f"Sweep: `{args.config}` with sparsities {list(sparsities)}, seeds {list(seeds)}: "
    f"{len(plan)} cells ({cfg.model}, {cfg.finetune.epochs} fine-tuning epochs of "
    f"{cell_steps // cfg.finetune.epochs} steps at batch {ft_batch}), after the dense stage "
    f"({cfg.dense.epochs} epochs of {dense_steps // cfg.dense.epochs} steps at batch "
    f"{dense_batch}) on {args.train_examples:,} training images.",
    "",
    (
      f"Per-step times measured on {device.device_kind} ({device.platform}, jax "
      f"{jax.__version__}), median of {args.steps} steps after a warm-up, load average "
      f"{load_before} before and {load_after} after: "
      if any(getattr(args, k) is None for k in measured)
      else "Per-step times given on the command line (none measured here): "
    )
    + f"teacher CE {measured['teacher_ms']:.1f} ms, student CE {measured['ce_ms']:.1f} ms, "
    f"student KD {measured['kd_ms']:.1f} ms.",
    "",
    "| devices | dense stage (serial) | cells (largest shard) | total | speed-up vs 1 |",
    "|---|---|---|---|---|",
  ]
  one = None
  for d in (int(x) for x in args.devices.split(",")):
    cells = largest_shard(plan, cell_s, d)
    total = dense_s + cells
    one = one or total
    lines.append(
      f"| {d} | {duration(dense_s)} | {duration(cells)} | {duration(total)} | {one / total:.1f}× |"
    )
  text = "\n".join(lines) + "\n"
  print(text)
  if args.markdown:
    from benchmark import write_markdown  # scripts/benchmark.py: the same marker rule

    write_markdown(args.markdown, text, BEGIN, END, title="Sweeps: expected wall time")


if __name__ == "__main__":
  main()
