"""Run in a subprocess with 4 faked CPU devices by tests/test_parallel.py (not a test module).

Trains the same small model from the same state on the same global batches with a 1-device
mesh and a 4-device mesh, then prints the largest differences as JSON.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from configs.default import get_config
from prunebias_jax.data import load_dataset
from prunebias_jax.data.pipeline import padded_eval_arrays, steps_per_epoch
from prunebias_jax.models import get_model
from prunebias_jax.parallel import DataParallel
from prunebias_jax.pruning import apply_masks, prune
from prunebias_jax.train import (
  create_state,
  evaluate,
  fit,
  make_eval_fn,
  make_optimizer,
  make_train_step,
)

assert jax.device_count() == 4, jax.devices()
cfg = get_config()
ds = load_dataset(cfg.data)
model = get_model("small_cnn", 10)
variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
masks = prune(variables["params"], "global_magnitude", 0.6)
opt = make_optimizer(cfg.finetune.optim, steps_per_epoch(len(ds.train), 64), 2)
results = {}
for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
  parallel = DataParallel(devices)
  for kd in (False, True):
    step = make_train_step(model, opt, mean=ds.mean, std=ds.std, crop_padding=1, flip=True, kd=kd)
    state = create_state(
      apply_masks(variables["params"], masks), variables["batch_stats"], opt, masks=masks
    )
    state, summary = fit(
      state,
      step,
      ds.train,
      stage=name,
      batch_size=64,
      epochs=2,
      seed=3,
      teacher_variables=variables if kd else None,
      alpha=0.9,
      temperature=4.0,
      progress_seconds=1e9,
      parallel=parallel,
    )
    eval_fn = make_eval_fn(model, mean=ds.mean, std=ds.std, out_shardings=parallel.replicated)
    images, _, _ = padded_eval_arrays(ds.test, 256)
    logits, feats = evaluate(
      eval_fn, state.variables, masks, images, len(ds.test), parallel=parallel
    )
    results[(name, kd)] = (jax.device_get(state.variables), summary["train_loss"], logits)

out = {}
for kd in (False, True):
  a, b = results[("one", kd)], results[("four", kd)]
  diffs = jax.tree.map(
    lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a[0], b[0]
  )
  out[f"kd={kd}"] = {
    "max_variable_diff": max(jax.tree.leaves(diffs)),
    "loss_one": a[1],
    "loss_four": b[1],
    "max_logit_diff": float(np.max(np.abs(a[2] - b[2]))),
    "argmax_disagreements": int(np.sum(a[2].argmax(-1) != b[2].argmax(-1))),
    "num_test": int(a[2].shape[0]),
  }
print("RESULT " + json.dumps(out))
