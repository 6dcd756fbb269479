"""Run by tests/test_multihost.py in 2 processes × 2 faked CPU devices (not a test module):
`python tests/_scan_multihost.py COORDINATOR PROCESS_ID OUT`.

Trains the dense-only model of tests/test_loop_scan.py for two epochs through `fit` on the
4-device mesh of both processes, once with the per-step loop and once with the scanned loop
(the split and the epochs' batch indices put on every device from each process's own copy),
and writes process 0's results as JSON: whether the two final states are bit for bit equal,
the largest difference, the steps run."""

import json
import sys

import jax

jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), cluster_detection_method="deactivate")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from test_loop_scan import BATCH, Dense  # noqa: E402

from configs.default import get_config  # noqa: E402
from prunebias_jax.config import base_config  # noqa: E402
from prunebias_jax.data import load_dataset  # noqa: E402
from prunebias_jax.parallel import DataParallel  # noqa: E402
from prunebias_jax.train import create_state, fit, make_optimizer, make_train_step  # noqa: E402

data = load_dataset(get_config().data)
model = Dense(data.num_classes)
variables = model.init(jax.random.key(0), jnp.zeros((1,) + data.image_shape), train=False)
optimizer = make_optimizer(base_config().finetune.optim, 12, 2)
step = make_train_step(
  model, optimizer, mean=data.mean, std=data.std, crop_padding=1, flip=True, kd=True
)
parallel = DataParallel()
teacher = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
states = {}
for loop in ("step", "scan"):
  state = create_state(variables["params"], variables["batch_stats"], optimizer)
  state, _ = fit(
    state,
    step,
    data.train,
    stage=loop,
    batch_size=BATCH,
    epochs=2,
    seed=3,
    teacher_variables=teacher,
    alpha=0.5,
    temperature=4.0,
    parallel=parallel,
    progress_seconds=1e9,
    loop=loop,
    scan_steps=5,
  )
  # Replicated: every process holds the whole state; its local copy is the value.
  states[loop] = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state)
pairs = list(zip(jax.tree.leaves(states["step"]), jax.tree.leaves(states["scan"])))
out = {
  "devices": jax.device_count(),
  "processes": jax.process_count(),
  "steps": int(states["scan"].step),
  "equal": all(np.array_equal(a, b) for a, b in pairs),
  "max_diff": max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in pairs if a.size),
}
if jax.process_index() == 0:
  with open(sys.argv[3], "w") as f:
    json.dump(out, f)
