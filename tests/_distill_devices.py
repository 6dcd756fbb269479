"""Run in a subprocess with 4 faked CPU devices by tests/test_distill.py (not a test module).

For every fine-tuning method of `train.distill.METHODS`: the same pruned student, teacher and
fixed global batches go through two train steps on a 1-device mesh and on a 4-device mesh
(the batch sharded over the devices, state replicated); prints, per method, the loss terms of
both steps on both meshes and the largest parameter difference after them, as JSON.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunebias_jax.models import get_model
from prunebias_jax.parallel import DataParallel
from prunebias_jax.pruning import apply_masks, prune
from prunebias_jax.train import create_state, make_train_step
from prunebias_jax.train.distill import METHODS, init_crd, parse_method
from prunebias_jax.train.steps import DistillWeights

assert jax.device_count() == 4, jax.devices()
BETA = {"sp": 3000.0, "at": 1000.0, "pkt": 30000.0, "crd": 0.8, "hint": 1.0}
model = get_model("small_cnn", 10)
student = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
teacher = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
masks = prune(student["params"], "l1_filter", 0.5)
rng = np.random.default_rng(0)
n_train = 96
train_labels = np.arange(n_train) % 10
batches = [
  (
    rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
    rng.integers(0, 10, (16,)).astype(np.int32),
    np.sort(rng.choice(n_train, 16, replace=False)).astype(np.int32),
  )
  for _ in range(2)
]
opt = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))

out = {}
for method in METHODS:
  feature, _ = parse_method(method)
  weights = DistillWeights(beta=BETA.get(feature, 0.0), crd_negatives=32)
  runs = {}
  for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
    parallel = DataParallel(devices)
    step = make_train_step(
      model, opt, mean=(0.3,), std=(0.2,), crop_padding=1, flip=True, method=method, weights=weights
    )
    crd = None
    if feature == "crd":
      crd = init_crd(jax.random.key(5), train_labels, 10, 128, 128, 16, opt)
    state = create_state(
      apply_masks(student["params"], masks), student["batch_stats"], opt, masks=masks, distill=crd
    )
    state, t = parallel.replicate((state, teacher))
    terms = []
    for i, (images, labels, indices) in enumerate(batches):
      state, metrics = step(
        state,
        parallel.put_batch(images),
        parallel.put_batch(labels),
        jax.random.key(i),
        t,
        jnp.float32(0.9),
        jnp.float32(4.0),
        parallel.replicate(indices) if crd is not None else None,
      )
      terms.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    runs[name] = (terms, jax.device_get(state.params), jax.device_get(state.distill))
  (a_terms, a_params, a_distill), (b_terms, b_params, b_distill) = runs["one"], runs["four"]
  # |a − b| / (1 + |a|): absolute for weights and banks (|·| < 1), relative for CRD's Z (~10³).
  diff = lambda x, y: max(
    jax.tree.leaves(
      jax.tree.map(lambda p, q: float(np.max(np.abs(p - q) / (1.0 + np.abs(p)))), x, y)
    )
    or [0.0]
  )
  out[method] = {
    "one": a_terms,
    "four": b_terms,
    "max_param_diff": diff(a_params, b_params),
    "max_distill_state_diff": diff(a_distill, b_distill) if a_distill is not None else 0.0,
  }
print("RESULT " + json.dumps(out))
