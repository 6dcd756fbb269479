"""Benchmark: a population of N students in one vmapped train step vs N sequential steps.

    python scripts/bench_population.py --model resnet20 --population 8 --batch 64

Both variants run the same CE+KD masked train step (teacher forward included) on the same
data, after a warm-up (compilation excluded); each timing is the median of `--repeats`
repetitions of `--steps` steps. Prints a markdown table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from prunebias_jax.config_defaults import sgd
from prunebias_jax.models import get_model
from prunebias_jax.pruning import apply_masks, prune
from prunebias_jax.train import create_state, make_optimizer, make_train_step


def stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--population", type=int, default=8)
  parser.add_argument("--batch", type=int, default=64, help="per-member batch size")
  parser.add_argument("--image", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  n, k, bs = args.image, args.population, args.batch
  model = get_model(args.model, 10)
  teacher = model.init(jax.random.key(0), jnp.zeros((1, n, n, 3)), train=False)
  masks = prune(teacher["params"], "l1_filter", 0.5)
  opt = make_optimizer(sgd(0.05), steps_per_epoch=100, epochs=1)
  common = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_padding=4, flip=True, kd=True)
  single = make_train_step(model, opt, **common)
  # ("map" — lax.map over members inside one step — was measured too and was slower still on
  # the CPU: 0.03× sequential for small_cnn; only the vmapped form is kept.)
  pops = {"vmap": make_train_step(model, opt, **common, population=k, shared_masks=True)}
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (k, bs, n, n, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, (k, bs), dtype=np.int32))
  keys = jax.random.split(jax.random.key(1), k)
  a, t = jnp.float32(0.9), jnp.float32(4.0)
  params = apply_masks(teacher["params"], masks)

  def run_sequential(states):
    for _ in range(args.steps):
      for j in range(k):
        states[j], m = single(states[j], images[j], labels[j], keys[j], masks, teacher, a, t)
    jax.block_until_ready(states)
    return states

  def run_population(state, impl):
    for _ in range(args.steps):
      state, m = pops[impl](state, images, labels, keys, masks, teacher, a, t)
    jax.block_until_ready(state)
    return state

  seq_states = [create_state(params, teacher["batch_stats"], opt) for _ in range(k)]
  pop_states = {impl: stack([create_state(params, teacher["batch_stats"], opt) for _ in range(k)]) for impl in pops}
  seq_states = run_sequential(seq_states)  # warm-up: compile
  pop_states = {impl: run_population(st, impl) for impl, st in pop_states.items()}
  times = {"sequential": [], "vmap": []}
  for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
    t0 = time.perf_counter()
    seq_states = run_sequential(seq_states)
    times["sequential"].append(time.perf_counter() - t0)
    for impl in pops:
      t0 = time.perf_counter()
      pop_states[impl] = run_population(pop_states[impl], impl)
      times[impl].append(time.perf_counter() - t0)
  images_per_run = args.steps * k * bs
  med = {name: statistics.median(v) for name, v in times.items()}
  result = {
      "date": datetime.date.today().isoformat(), "device": f"{jax.devices()[0].platform} × {jax.device_count()}",
      "cpu": platform.processor() or platform.machine(), "jax": jax.__version__, "model": args.model,
      "population": k, "batch_per_member": bs, "steps": args.steps, "repeats": args.repeats,
      "seconds": med, "images_per_second": {name: images_per_run / v for name, v in med.items()},
      "speedup_vs_sequential": {impl: med["sequential"] / med[impl] for impl in pops},
  }
  ips = result["images_per_second"]
  print("| model | population | batch/member | device | sequential img/s | population img/s | speedup |")
  print("|---|---|---|---|---|---|---|")
  print(f"| {args.model} | {k} | {bs} | {result['device']} | {ips['sequential']:.0f} | {ips['vmap']:.0f} | "
        f"{result['speedup_vs_sequential']['vmap']:.2f}× |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
