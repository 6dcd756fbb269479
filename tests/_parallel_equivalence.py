"""Run in a subprocess with 4 faked CPU devices by tests/test_parallel.py (not a test module).

Trains the same small model from the same state on the same global batches with a 1-device
mesh and a 4-device mesh, and prints as JSON, for CE and KD fine-tuning:
- `step`: one train step from the same trained state and batch on each mesh (the step itself:
  only the order of the cross-device sums differs);
- `eval`: the same variables evaluated on each mesh;
- `compare`: the evaluation pass that accumulates the similarity sums against a reference, on
  each mesh (the metrics from them, and whether the 4-device program reduces inside its loop
  over batches);
- `fit`: two epochs through `fit` on each mesh (and through the scanned loop on 4 devices: the
  batches gathered on the devices inside the chunk), next to the noise floor of that training, the
  difference two one-device runs show when the initial weights differ by one float32 ulp
  (nextafter up, and down). CE training here is chaotic: the ulp grows to ~1e-3 in 32 steps,
  so no fixed tolerance on the trained weights separates a sharding bug from the reduction
  order, but the floor measured in the same process does.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from configs.default import get_config
from prunebias_jax.data import load_dataset
from prunebias_jax.data.pipeline import padded_eval_arrays, steps_per_epoch, train_batches
from prunebias_jax.metrics import streaming
from prunebias_jax.models import get_model
from prunebias_jax.parallel import DataParallel
from prunebias_jax.pruning import apply_masks, prune
from prunebias_jax.records import layer_cka_of
from prunebias_jax.train import (
  compare,
  create_state,
  evaluate,
  fit,
  make_compare_fn,
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
meshes = {"one": DataParallel(jax.devices()[:1]), "four": DataParallel(jax.devices())}
ALPHA, TEMPERATURE = 0.9, 4.0


def max_diff(a, b) -> float:
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree.leaves(diffs))


def initial_state(params):
  return create_state(apply_masks(params, masks), variables["batch_stats"], opt, masks=masks)


out = {}
for kd in (False, True):
  step = make_train_step(model, opt, mean=ds.mean, std=ds.std, crop_padding=1, flip=True, kd=kd)

  def train(mesh: str, params, loop: str = "step"):
    state, summary = fit(
      initial_state(params),
      step,
      ds.train,
      stage=mesh,
      batch_size=64,
      epochs=2,
      seed=3,
      teacher_variables=variables if kd else None,
      alpha=ALPHA,
      temperature=TEMPERATURE,
      progress_seconds=1e9,
      parallel=meshes[mesh],
      loop=loop,
      scan_steps=5,  # 12 steps an epoch: chunks of 4, the batches gathered on the devices
    )
    return jax.device_get(state), summary["train_loss"]

  trained = {mesh: train(mesh, variables["params"]) for mesh in meshes}
  scanned = train("four", variables["params"], loop="scan")
  noise = [
    train(
      "one",
      jax.tree.map(lambda x: np.nextafter(np.asarray(x), np.float32(to)), variables["params"]),
    )
    for to in (np.inf, -np.inf)
  ]
  one_state, one_loss = trained["one"]

  # One more step from the one-device run's trained state (momentum and all) on each mesh.
  _, images, labels = next(train_batches(ds.train, 64, seed=3, start_epoch=2, num_epochs=1))
  stepped = {}
  for mesh, parallel in meshes.items():
    state, teacher = parallel.replicate((one_state, variables if kd else None))
    state, metrics = step(
      state,
      parallel.put_batch(images),
      parallel.put_batch(labels),
      jax.random.fold_in(jax.random.key(3), 64),
      teacher,
      jnp.float32(ALPHA),
      jnp.float32(TEMPERATURE),
      None,
    )
    stepped[mesh] = (jax.device_get(state.variables), float(metrics["loss"]))

  logits = {}
  for mesh, parallel in meshes.items():
    eval_fn = make_eval_fn(model, mean=ds.mean, std=ds.std, out_shardings=parallel.replicated)
    eval_images, _, _ = padded_eval_arrays(ds.test, 256)
    logits[mesh], _ = evaluate(
      eval_fn, one_state.variables, masks, eval_images, len(ds.test), parallel=parallel
    )

  similarity, loop_reductions = {}, None
  for mesh, parallel in meshes.items():
    compare_fn = make_compare_fn(
      model,
      model,
      mean=ds.mean,
      std=ds.std,
      out_shardings=parallel.replicated,
      partials=parallel.num_devices,
      partial_sharding=parallel.batch,
    )
    images, labels, valid = padded_eval_arrays(ds.test, 256)
    subset = (np.arange(valid.size) % 3 == 0).reshape(valid.shape).astype(np.float32)
    args = (variables, one_state.variables, masks, images, labels, valid, subset, len(ds.test))
    student_logits, (per_layer, joint, confusion) = compare(compare_fn, *args, parallel=parallel)
    counted = np.zeros((10, 10), np.int64)
    np.add.at(counted, (ds.test.labels, student_logits.argmax(-1)), 1)
    similarity[mesh] = {
      **{f"cka/{k}": streaming.linear_cka_from_stats(a) for k, (a, _) in per_layer.items()},
      **{f"svcca/{k}": streaming.svcca_from_stats(b) for k, (_, b) in per_layer.items()},
      "debiased": streaming.debiased_cka_from_stats(per_layer["features"][0]),
      "matrix": layer_cka_of(per_layer, joint).matrix.ravel().tolist(),
      "count": float(per_layer["features"][0].sums.count),
      "subset": float(per_layer["features"][1].sums.count),
      "confusion": np.asarray(confusion).tolist(),
      "confusion_matches_logits": bool(np.array_equal(confusion, counted)),
    }
    if parallel.num_devices > 1:  # any all-reduce inside the while loop's body: per batch
      put = lambda a: parallel.put_batch(a, parallel.eval_batches, axis=1)
      hlo = compare_fn.lower(*parallel.replicate(args[:3]), *map(put, args[3:7])).compile()
      text = hlo.as_text()
      bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
      blocks = re.split(r"\n(?=\S)", text)
      in_body = [b for b in blocks for name in bodies if re.match(rf"%?{re.escape(name)}\b", b)]
      loop_reductions = sum(b.count("all-reduce(") for b in in_body)
      similarity["all_reduces"] = text.count("all-reduce(")
      similarity["loops"] = len(bodies)
  similarity["loop_reductions"] = loop_reductions

  out[f"kd={kd}"] = {
    "compare": similarity,
    "step": {
      "max_variable_diff": max_diff(stepped["one"][0], stepped["four"][0]),
      "loss_one": stepped["one"][1],
      "loss_four": stepped["four"][1],
    },
    "eval": {
      "max_logit_diff": float(np.max(np.abs(logits["one"] - logits["four"]))),
      "argmax_disagreements": int(np.sum(logits["one"].argmax(-1) != logits["four"].argmax(-1))),
      "num_test": int(logits["one"].shape[0]),
    },
    "fit": {
      "max_variable_diff": max_diff(one_state.variables, trained["four"][0].variables),
      "noise_variable_diff": max(max_diff(one_state.variables, s.variables) for s, _ in noise),
      "loss_diff": abs(one_loss - trained["four"][1]),
      "noise_loss_diff": max(abs(one_loss - loss) for _, loss in noise),
      "scan_max_variable_diff": max_diff(one_state.variables, scanned[0].variables),
      "scan_loss_diff": abs(one_loss - scanned[1]),
      "scan_steps": int(scanned[0].step),
    },
  }
print("RESULT " + json.dumps(out))
