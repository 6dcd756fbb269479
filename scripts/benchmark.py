"""Speed of prunebias_jax against PyTorch and NumPy baselines, measured side by side.

    python scripts/benchmark.py                       # every section, default sizes
    python scripts/benchmark.py --quick     # a fast smoke run (tiny sizes, no torch.compile)
    python scripts/benchmark.py --sections train --models resnet20 --batches 128 --repeats 7
    python scripts/benchmark.py --json runs/bench.json --markdown docs/benchmarks.md

Sections (`--sections`, comma separated):

* ``train``: the masked CE+KD train step (teacher forward included, SGD momentum + weight decay,
  masks applied in the forward pass and re-applied after the update) of
  `prunebias_jax.train.make_train_step` vs the PyTorch reference of `scripts/torch_reference.py`
  (eager NCHW, eager channels-last, `torch.compile` channels-last). Same batch (uint8 NHWC,
  normalised inside the step), no augmentation on either side, 50% l1-filter masks.
  Images/s, the ratio JAX/PyTorch, and TFLOP/s from XLA's cost analysis of the compiled JAX step
  (the same FLOP count is used for the PyTorch rows: it is the same work); against the chip's
  bf16 peak where the device kind is in `PEAK_BF16_FLOPS`.
* ``eval``: one full evaluation pass (logits + penultimate features) over `--eval-n` images:
  `make_eval_fn` vs the PyTorch model in eval mode (inference_mode), same batch size.
* ``metrics``: CEV + SDE + linear CKA on n examples x d features, C classes: the project's jnp
  kernels vs a vectorised NumPy reference (np.bincount confusion counts, feature-space CKA) vs
  the pipeline of the paper's authors (scikit-learn `confusion_matrix` per model, an n x n Gram
  CKA as in common PyTorch CKA packages, only where n x n fits: `--gram-max-n`). Time and the
  peak RSS increase of each kernel; one subprocess per n.
* ``population``: `--population` students in one vmapped step vs as many sequential steps.
* ``loop``: `fit` (per-step and scanned loop) around a no-op step with the real ResNet KD
  pytrees (the loop's own cost per step) and around the real step with the default checkpoint
  cadence, each ÷ the bare step called back to back.
* ``compile``: the runlocal sweep (`--compile-config`, `--compile-args`) in fresh processes with
  the compilation cache off, cold, warm, and warm on a finished workdir: wall time, XLA
  programs compiled, cache hits, seconds compiling.

Every timing: warm-up first (compilation excluded and reported separately), then `--repeats`
interleaved repetitions (all variants of a row one after another, so machine noise hits all
alike) of `--steps` steps each; the median is reported. `os.getloadavg()` is recorded with every
row. PyTorch is optional (`pip install .[bench]`): without it the PyTorch columns say so.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ALPHA, TEMPERATURE = 0.9, 4.0
MARK_BEGIN = "<!-- BEGIN GENERATED: scripts/benchmark.py -->"
MARK_END = "<!-- END GENERATED: scripts/benchmark.py -->"

#: Dense bf16 tensor-core peak FLOP/s by device kind (vendor datasheets, no sparsity). First
#: matching substring wins, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
  ("H100 PCIe", 756e12),
  ("H100 NVL", 835e12),
  ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
  ("H200", 989.4e12),
  ("GH200", 989.4e12),
  ("B200", 2250e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("L4", 121e12),
  ("A10G", 70e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v6 lite", 918e12),
)


# ----------------------------------------------------------------------------- environment


def peak_bf16_flops(device_kind: str) -> float | None:
  for key, value in PEAK_BF16_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def try_import_torch():
  try:
    import torch  # noqa: F401
    import torch_reference  # noqa: F401

    return torch
  except Exception as err:  # noqa: BLE001 - optional dependency
    return f"PyTorch unavailable ({type(err).__name__}: {err}); pip install '.[bench]'"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment(torch_mod) -> dict[str, Any]:
  import flax
  import optax
  import sklearn

  dev = jax.devices()[0]
  env = {
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
    "flax": flax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
    "sklearn": sklearn.__version__,
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    "peak_bf16_flops": peak_bf16_flops(dev.device_kind) if dev.platform != "cpu" else None,
  }
  try:  # the accelerator's runtime as JAX sees it (CUDA / driver on a GPU)
    env["platform_version"] = dev.client.platform_version
  except Exception:  # noqa: BLE001 - not every backend has it
    env["platform_version"] = None
  if isinstance(torch_mod, str):
    env["torch"] = torch_mod
  else:
    env["torch"] = torch_mod.__version__
    env["torch_threads"] = torch_mod.get_num_threads()
    env["torch_cuda"] = bool(torch_mod.cuda.is_available())
    env["torch_cuda_version"] = torch_mod.version.cuda
    env["cudnn"] = torch_mod.backends.cudnn.version() if env["torch_cuda"] else None
    env["cudnn_benchmark"] = bool(torch_mod.backends.cudnn.benchmark)
  return env


def load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Seconds of each fn over `repeats` rounds; in each round every fn runs once, in turn."""
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def warm_then_interleaved(
  fns: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
  """({fn: {"first_call_s": the first call's seconds (compilation)}}, `interleaved` times)."""
  first: dict[str, dict[str, float]] = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    fn()
    first[name] = {"first_call_s": time.perf_counter() - t0}
  return first, interleaved(fns, repeats)


def flops_of(compiled) -> float | None:
  """FLOPs from XLA's cost analysis of a compiled or a lowered (pre-optimisation) program; the
  compiled count may miss the work of library custom calls (cuDNN convolutions on a GPU)."""
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost["flops"])
  except Exception:  # noqa: BLE001 - cost analysis is best effort
    return None


# ----------------------------------------------------------------------------- train step


def _jax_train_setup(name: str, batch: int, dtype: str, seed: int = 0, augment: bool = False):
  from prunebias_jax.config import sgd
  from prunebias_jax.models import get_model
  from prunebias_jax.pruning import apply_masks, prune
  from prunebias_jax.train import create_state, make_optimizer, make_train_step

  model = get_model(name, 10, dtype=dtype)
  teacher = get_model(name, 10).init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)), train=False)
  masks = prune(teacher["params"], "l1_filter", 0.5)
  opt = make_optimizer(sgd(0.05), steps_per_epoch=100, epochs=1)
  step = make_train_step(
    model, opt, mean=MEAN, std=STD, crop_padding=4 if augment else 0, flip=augment, kd=True
  )
  state = create_state(
    apply_masks(teacher["params"], masks), teacher["batch_stats"], opt, masks=masks
  )
  return model, teacher, masks, opt, step, state


def bench_train(args, torch_mod, results: list[dict]) -> None:
  on_gpu = jax.devices()[0].platform == "gpu"
  for name in args.models:
    for batch in args.batches:
      rng = np.random.default_rng(0)
      images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
      labels = rng.integers(0, 10, (batch,)).astype(np.int32)
      row: dict[str, Any] = {
        "model": name,
        "batch": batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "variants": {},
        "errors": {},
        "augmentation": "none (both sides)",
      }
      fns: dict[str, Callable[[], Any]] = {}
      flops = None
      ji, jl = jax.device_put(images), jax.device_put(labels)
      a, t = jnp.float32(ALPHA), jnp.float32(TEMPERATURE)
      for dtype in args.jax_dtypes:
        vname = "jax" if dtype == "float32" else f"jax_{dtype}"
        _, teacher, masks, _, step, state = _jax_train_setup(name, batch, dtype)
        key = jax.random.key(1)
        t0 = time.perf_counter()
        lowered = step.lower(state, ji, jl, key, teacher, a, t)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        f, f_lowered = flops_of(compiled), flops_of(lowered)
        f = f_lowered if f_lowered else f  # the model's FLOPs, before XLA rewrites them
        if dtype == "float32" or flops is None:
          flops = f
        box = [state]

        def run(compiled=compiled, box=box, teacher=teacher, key=key):
          for _ in range(row["steps"]):
            box[0], metrics = compiled(box[0], ji, jl, key, teacher, a, t)
          jax.block_until_ready((box[0], metrics))

        run()
        if vname == "jax":  # steps per repetition: at least --min-repeat-seconds of work
          t0 = time.perf_counter()
          run()
          per_step = (time.perf_counter() - t0) / row["steps"]
          row["steps"] = max(args.steps, math.ceil(args.min_repeat_seconds / max(per_step, 1e-9)))
        fns[vname] = run
        row["variants"][vname] = {
          "compile_s": compile_s,
          "flops_per_step": f,
          "flops_per_step_compiled": flops_of(compiled),
        }
      if isinstance(torch_mod, str):
        row["errors"]["torch"] = torch_mod
      else:
        _add_torch_train_variants(args, torch_mod, name, images, labels, fns, row, on_gpu)
      times = interleaved(fns, args.repeats)
      row["load_after"] = load()
      _finish_rows(row, times, batch * row["steps"], flops, row["steps"])
      results.append(row)
      _print_row("train", row)


# torch_variants → torch.compile's mode (False: eager); a `_cl` suffix adds channels-last.
TORCH_COMPILE_MODES = {
  "eager": False,
  "compile": "default",
  "compile_max": "max-autotune-no-cudagraphs",
}


def _add_torch_train_variants(args, torch, name, images, labels, fns, row, on_gpu) -> None:
  import torch_reference as tr

  device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.backends.cudnn.benchmark = True  # cuDNN picks the fastest kernels for these shapes
  ti = torch.from_numpy(images.copy()).to(device)
  tl = torch.from_numpy(labels.astype(np.int64)).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  amps = [d for d in args.jax_dtypes]
  for vname in args.torch_variants:
    for amp in amps:
      full = "torch_" + vname + ("" if amp == "float32" else f"_{amp}")
      cl = vname.endswith("_cl")
      try:
        student, teacher, opt = tr.build(name, channels_last=cl, device=device)
        step = tr.make_step(
          student,
          teacher,
          opt,
          mean=MEAN,
          std=STD,
          channels_last=cl,
          compile=TORCH_COMPILE_MODES.get(vname.removesuffix("_cl"), False),
          alpha=ALPHA,
          temperature=TEMPERATURE,
          amp_dtype=None if amp == "float32" else getattr(torch, amp),
        )
        t0 = time.perf_counter()
        step(ti, tl)
        sync()
        first_s = time.perf_counter() - t0
        step(ti, tl)
        sync()
      except Exception as err:  # noqa: BLE001 - e.g. torch.compile without a working compiler
        row["errors"][full] = (
          f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        )
        traceback.print_exc()
        continue

      def run(step=step):
        for _ in range(row["steps"]):
          loss = step(ti, tl)
        sync()
        return loss

      fns[full] = run
      row["variants"][full] = {
        "compile_s": first_s if vname.startswith("compile") else None,
        "first_call_s": first_s,
      }


def _finish_rows(row, times, items_per_run, flops, steps) -> None:
  peak = (
    peak_bf16_flops(jax.devices()[0].device_kind) if jax.devices()[0].platform != "cpu" else None
  )
  med = {k: statistics.median(v) for k, v in times.items()}
  for k, v in med.items():
    d = row["variants"].setdefault(k, {})
    d["seconds_median"] = v
    d["seconds_all"] = times[k]
    d["items_per_s"] = items_per_run / v
    fl = d.get("flops_per_step") or flops
    if fl:
      d["tflops"] = fl * steps / v / 1e12
      if peak:
        d["fraction_of_bf16_peak"] = fl * steps / v / peak
  for j in [k for k in med if k.startswith("jax")]:
    row.setdefault("ratios", {})[j] = {t: med[t] / med[j] for t in med if t.startswith("torch")}


def _print_row(section, row) -> None:
  parts = [
    f"{k}={v['items_per_s']:.0f}/s" for k, v in row["variants"].items() if "items_per_s" in v
  ]
  print(
    f"[{section}] {row.get('model', '')} batch={row.get('batch', '')} load={row.get('load_after')} "
    + " ".join(parts)
    + (f" errors={row['errors']}" if row.get("errors") else ""),
    flush=True,
  )
  for j, r in row.get("ratios", {}).items():
    print("   ", j, " ".join(f"{k}:{v:.2f}x" for k, v in r.items()), flush=True)


# ----------------------------------------------------------------------------- evaluation pass


def bench_eval(args, torch_mod, results: list[dict]) -> None:
  from prunebias_jax.models import get_model
  from prunebias_jax.pruning import prune
  from prunebias_jax.train import make_eval_fn

  on_gpu = jax.devices()[0].platform == "gpu"
  for name in args.models:
    n, bs = args.eval_n, min(args.eval_batch, args.eval_n)
    n = (n // bs) * bs
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    model = get_model(name, 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    masks = prune(variables["params"], "l1_filter", 0.5)
    evaluate = make_eval_fn(model, mean=MEAN, std=STD)
    jimages = jax.device_put(images.reshape((n // bs, bs, 32, 32, 3)))
    t0 = time.perf_counter()
    compiled = jax.jit(evaluate).lower(variables, masks, jimages).compile()
    row: dict[str, Any] = {
      "model": name,
      "n": n,
      "batch": bs,
      "repeats": args.repeats,
      "variants": {},
      "errors": {},
    }
    row["variants"]["jax"] = {"compile_s": time.perf_counter() - t0}
    fns = {"jax": lambda: jax.block_until_ready(compiled(variables, masks, jimages))}
    fns["jax"]()
    if isinstance(torch_mod, str):
      row["errors"]["torch"] = torch_mod
    else:
      import torch_reference as tr

      device = "cuda" if on_gpu and torch_mod.cuda.is_available() else "cpu"
      sync = torch_mod.cuda.synchronize if device == "cuda" else (lambda: None)
      ti = torch_mod.from_numpy(images).to(device)
      for vname in args.eval_torch_variants:
        cl = vname.endswith("_cl")
        student, _, _ = tr.build(name, channels_last=cl, device=device)
        ev = tr.make_eval(student, mean=MEAN, std=STD, channels_last=cl, batch=bs)

        def run(ev=ev):
          out = ev(ti)
          sync()
          return out

        run()
        fns["torch_" + vname] = run
    times = interleaved(fns, args.repeats)
    row["load_after"] = load()
    _finish_rows(row, times, n, None, 1)
    results.append(row)
    _print_row("eval", row)


# ----------------------------------------------------------------------------- metric kernels


def numpy_rates(labels: np.ndarray, predictions: np.ndarray, num_classes: int):
  """(FPR, FNR) per class from np.bincount confusion counts (vectorised, no Python loop)."""
  cm = np.bincount(labels.astype(np.int64) * num_classes + predictions, minlength=num_classes**2)
  cm = cm.reshape(num_classes, num_classes).astype(np.float64)
  return _rates_from_cm(cm)


def _rates_from_cm(cm: np.ndarray):
  tp = np.diag(cm)
  fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
  tn = cm.sum() - tp - fp - fn
  with np.errstate(invalid="ignore", divide="ignore"):
    fpr = np.where(fp + tn > 0, fp / np.maximum(fp + tn, 1), 0.0)
    fnr = np.where(fn + tp > 0, fn / np.maximum(fn + tp, 1), 0.0)
  return fpr, fnr, fp + tn, fn + tp


def numpy_cev_sde(ref_rates, cmp_rates) -> tuple[float, float]:
  """CEV and SDE (Simon Says constants, zero_rate='floor') from (fpr, fnr, negatives, positives)."""
  ref_fpr, ref_fnr, neg, pos = ref_rates
  cmp_fpr, cmp_fnr = cmp_rates[0], cmp_rates[1]
  valid = (neg > 0) & (pos > 0)
  den_fpr = np.where(ref_fpr <= 0, 1.0 / np.maximum(neg, 1.0), ref_fpr)
  den_fnr = np.where(ref_fnr <= 0, 1.0 / np.maximum(pos, 1.0), ref_fnr)
  dfpr = (100.0 * (cmp_fpr - ref_fpr) / den_fpr)[valid]
  dfnr = (100.0 * (cmp_fnr - ref_fnr) / den_fnr)[valid]
  cev = 0.5 * (dfpr.var() + dfnr.var())
  sde = float(np.mean(np.abs(dfpr - dfnr)) / math.sqrt(2.0))
  return float(cev), sde


def numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """Feature-space linear CKA ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), O(d^2) extra memory
  beyond the centred copies (float32 BLAS, like the project's kernel)."""
  xc = x - x.mean(0, keepdims=True)
  yc = y - y.mean(0, keepdims=True)
  cross = np.linalg.norm(yc.T @ xc) ** 2
  return float(cross / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def numpy_metrics(labels, ref_pred, pred, x, y, num_classes):
  cev, sde = numpy_cev_sde(
    numpy_rates(labels, ref_pred, num_classes), numpy_rates(labels, pred, num_classes)
  )
  return cev, sde, numpy_linear_cka(x, y)


def sklearn_rates(labels, predictions, num_classes):
  from sklearn.metrics import confusion_matrix

  cm = confusion_matrix(labels, predictions, labels=np.arange(num_classes)).astype(np.float64)
  return _rates_from_cm(cm)


def gram_linear_cka(x, y, torch_mod=None) -> float:
  """CKA through the n x n Gram matrices K = X X^T, L = Y Y^T (as common PyTorch CKA packages do):
  HSIC(K, L) = <HKH, HLH>. The centring uses row/column means (O(n^2)), the same result as the
  packages' H @ K @ H products but cheaper, so this baseline is if anything flattered."""
  if torch_mod is not None and not isinstance(torch_mod, str):
    t = torch_mod
    xt, yt = t.from_numpy(x), t.from_numpy(y)

    def centred_gram(a):
      k = a @ a.T
      return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()

    k = centred_gram(xt)
    hkl = (k * centred_gram(yt)).sum()
    del k
    kk = centred_gram(xt).square().sum().sqrt()
    ll = centred_gram(yt).square().sum().sqrt()
    return float(hkl / (kk * ll))

  def centred_gram_np(a):
    k = a @ a.T
    return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()

  k = centred_gram_np(x)
  hkl = float((k * centred_gram_np(y)).sum())
  del k
  kk = float(np.sqrt((centred_gram_np(x) ** 2).sum()))
  ll = float(np.sqrt((centred_gram_np(y) ** 2).sum()))
  return hkl / (kk * ll)


def paper_metrics(labels, ref_pred, pred, x, y, num_classes, torch_mod=None, gram: bool = True):
  cev, sde = numpy_cev_sde(
    sklearn_rates(labels, ref_pred, num_classes), sklearn_rates(labels, pred, num_classes)
  )
  return cev, sde, (gram_linear_cka(x, y, torch_mod) if gram else float("nan"))


def jax_metrics_fn(num_classes: int):
  from prunebias_jax.metrics import (
    cev_from_changes,
    linear_cka,
    relative_rate_change,
    sde_from_changes,
  )

  def fn(labels, ref_pred, pred, x, y):
    change = relative_rate_change(labels, ref_pred, pred, num_classes)
    cev = cev_from_changes(change.dfpr, change.dfnr, change.valid)
    sde = sde_from_changes(change.dfpr, change.dfnr, change.valid)
    cka = linear_cka(x, y)
    cev, sde, cka = jax.block_until_ready((cev, sde, cka))
    return float(cev), float(sde), float(cka)

  return fn


def metric_inputs(n: int, d: int, num_classes: int, seed: int = 0):
  """Labels, two prediction vectors (~80% / ~75% accurate) and two correlated float32 feature
  matrices, generated in chunks so that generation never needs more than the result."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  noise = lambda p: np.where(rng.random(n) < p, rng.integers(0, num_classes, n), labels).astype(
    np.int32
  )
  ref_pred, pred = noise(0.2), noise(0.25)
  x = np.empty((n, d), np.float32)
  y = np.empty((n, d), np.float32)
  mix = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
  for i in range(0, n, 65536):
    j = min(n, i + 65536)
    x[i:j] = rng.standard_normal((j - i, d), dtype=np.float32)
    y[i:j] = x[i:j] @ mix + rng.standard_normal((j - i, d), dtype=np.float32)
  return labels, ref_pred, pred, x, y


def _rss_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_increase_mb(fn: Callable[[], Any]) -> tuple[Any, float | None]:
  """``(fn(), MB)``: how far the process's peak resident set rose above its resident set before
  the call (the kernel's high-water mark is reset first). MB is None where the kernel does not
  let the process reset it (``/proc/self/clear_refs``), rather than a peak of some earlier call."""
  gc.collect()
  base = _rss_kb("VmRSS")
  ok = _reset_peak()
  value = fn()
  peak = _rss_kb("VmHWM")
  return value, ((peak - base) / 1024 if ok else None)


def metrics_child(
  n: int, d: int, num_classes: int, repeats: int, gram_max_n: int, out: str
) -> None:
  """One n: every implementation's peak RSS increase (one call each, after warm-up), then
  interleaved timings. Runs in its own process (`--_metrics-child`)."""
  torch_mod = try_import_torch()
  labels, ref_pred, pred, x, y = metric_inputs(n, d, num_classes)
  jl, jr, jp = jax.device_put(labels), jax.device_put(ref_pred), jax.device_put(pred)
  jx, jy = jax.device_put(x), jax.device_put(y)
  jax.block_until_ready((jx, jy))
  jfn = jax_metrics_fn(num_classes)
  gram = n <= gram_max_n
  impls: dict[str, Callable[[], Any]] = {
    "jax": lambda: jfn(jl, jr, jp, jx, jy),
    "numpy": lambda: numpy_metrics(labels, ref_pred, pred, x, y, num_classes),
    "paper": lambda: paper_metrics(labels, ref_pred, pred, x, y, num_classes, torch_mod, gram=gram),
  }
  res: dict[str, Any] = {
    "n": n,
    "d": d,
    "num_classes": num_classes,
    "repeats": repeats,
    "gram_cka": gram,
    "inputs_mb": (x.nbytes + y.nbytes) / 2**20,
    "gram_backend": ("torch " + torch_mod.__version__)
    if not isinstance(torch_mod, str)
    else "numpy",
    "variants": {},
  }
  t0 = time.perf_counter()
  values = {"jax": impls["jax"]()}  # compile
  res["jax_first_call_s"] = time.perf_counter() - t0
  for name, fn in impls.items():
    values[name], mb = peak_rss_increase_mb(fn)
    res["variants"][name] = {"peak_rss_increase_mb": mb, "values": values[name]}
  times = interleaved(impls, repeats)
  for name, v in times.items():
    res["variants"][name]["seconds_median"] = statistics.median(v)
    res["variants"][name]["seconds_all"] = v
  res["load_after"] = load()
  res["ratios"] = {
    k: res["variants"][k]["seconds_median"] / res["variants"]["jax"]["seconds_median"]
    for k in impls
    if k != "jax"
  }
  with open(out, "w") as f:
    json.dump(res, f)


def bench_metrics(args, results: list[dict]) -> None:
  for n in args.metric_n:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "m.json")
      cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_metrics-child",
        str(n),
        str(args.metric_d),
        str(args.metric_classes),
        str(args.metric_repeats),
        str(args.gram_max_n),
        out,
      ]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode != 0 or not os.path.exists(out):
        row = {"n": n, "d": args.metric_d, "error": proc.stderr[-2000:]}
        print("[metrics] failed:", row["error"], flush=True)
      else:
        with open(out) as f:
          row = json.load(f)
        v = row["variants"]
        print(
          f"[metrics] n={n} load={row['load_after']} "
          + " ".join(
            f"{k}={x['seconds_median']:.3f}s/{x['peak_rss_increase_mb']}MB" for k, x in v.items()
          )
          + " ratios "
          + " ".join(f"{k}:{r:.2f}x" for k, r in row["ratios"].items()),
          flush=True,
        )
    results.append(row)


def stream_child(n: int, d: int, num_classes: int, batch: int, out: str) -> None:
  """CEV + SDE + linear CKA (and the debiased CKA and SVCCA the same sums give) with the
  features streamed: batches of `batch` rows go through `metrics.streaming` (jitted update, the
  sums on the device), so memory is O(d²) + one batch whatever n is. The batches cycle through
  a pool of 8 generated blocks held on the device (generating 10⁷ × d normals would take longer
  than the metric);
  labels and predictions (n int32 each) are in memory, as in a run. Runs in its own process
  (`--_stream-child`)."""
  from prunebias_jax.metrics import cev_from_changes, relative_rate_change, sde_from_changes
  from prunebias_jax.metrics import streaming as st

  pool = 8
  labels, ref_pred, pred, x, y = metric_inputs(pool * batch, d, num_classes)
  rng = np.random.default_rng(1)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  noise = lambda p: np.where(rng.random(n) < p, rng.integers(0, num_classes, n), labels)
  ref_pred, pred = noise(0.2).astype(np.int32), noise(0.25).astype(np.int32)
  # On the device once (an accelerator would otherwise time the host-to-device copies).
  blocks = [
    (jax.device_put(x[i * batch : (i + 1) * batch]), jax.device_put(y[i * batch : (i + 1) * batch]))
    for i in range(pool)
  ]
  update = jax.jit(st.similarity_stats_update, donate_argnums=0)
  shift = jax.jit(st.with_shift)
  total = jax.jit(st.similarity_stats_total)

  def run(rows_total: int):
    stats = shift(st.similarity_stats_init(d, d), *blocks[0])
    for i, start in enumerate(range(0, rows_total, batch)):
      bx, by = blocks[i % pool]
      rows = min(batch, rows_total - start)
      # Waited for, as metrics.streaming.similarity_stats does: queued calls would each hold
      # a copy of their batch.
      stats = jax.block_until_ready(update(stats, bx[:rows], by[:rows]))
    stats = jax.device_get(total(stats))
    change = relative_rate_change(labels, ref_pred, pred, num_classes)
    cev = float(cev_from_changes(change.dfpr, change.dfnr, change.valid))
    sde = float(sde_from_changes(change.dfpr, change.dfnr, change.valid))
    return cev, sde, st.linear_cka_from_stats(stats), st.debiased_cka_from_stats(stats)

  t0 = time.perf_counter()
  run(batch + n % batch)  # compiles the batch and the tail shapes (and the metrics)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  value, mb = peak_rss_increase_mb(lambda: run(n))
  seconds = time.perf_counter() - t0
  with open(out, "w") as f:
    json.dump(
      {
        "n": n,
        "d": d,
        "num_classes": num_classes,
        "batch": batch,
        "seconds": seconds,
        "first_call_s": first,
        "peak_rss_increase_mb": mb,
        "values": value,
        "gflops": 6.0 * n * d * d / seconds / 1e9,  # the three d × d products, 2 flops each
        "load_after": load(),
      },
      f,
    )


def bench_stream(args, results: list[dict]) -> None:
  for d in args.stream_d:
    for n in args.stream_n:
      flops = 6.0 * n * d * d
      if flops > args.stream_max_flops:
        row = {"n": n, "d": d, "skipped": f"{flops:.1e} flops above --stream-max-flops"}
        print(f"[stream] n={n} d={d}: not run ({row['skipped']})", flush=True)
        results.append(row)
        continue
      with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "s.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--_stream-child"]
        cmd += [str(n), str(d), str(args.metric_classes), str(args.stream_batch), out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
          row = {"n": n, "d": d, "error": proc.stderr[-2000:]}
          print("[stream] failed:", row["error"], flush=True)
        else:
          with open(out) as f:
            row = json.load(f)
          print(
            f"[stream] n={n} d={d} {row['seconds']:.2f}s {row['gflops']:.0f} GFLOP/s "
            f"peak +{row['peak_rss_increase_mb']} MB load={row['load_after']}",
            flush=True,
          )
      results.append(row)


# ----------------------------------------------------------------------------- population


def bench_population(args, results: list[dict]) -> None:
  k, bs, name = args.population, args.population_batch, args.population_model
  _, teacher, masks, opt, single, state = _jax_train_setup(name, bs, "float32")
  from prunebias_jax.models import get_model
  from prunebias_jax.train import create_state, make_train_step

  model = get_model(name, 10)
  kw = dict(mean=MEAN, std=STD, crop_padding=4, flip=True, kd=True, population=k)
  pop = make_train_step(model, opt, shared_masks=True, members="vmap", **kw)
  mapped = make_train_step(model, opt, shared_masks=True, members="map", **kw)
  in_turn = make_train_step(model, opt, shared_masks=True, members="sequential", **kw)
  single = make_train_step(model, opt, mean=MEAN, std=STD, crop_padding=4, flip=True, kd=True)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (k, bs, 32, 32, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, (k, bs), dtype=np.int32))
  keys = jax.random.split(jax.random.key(1), k)
  a, t = jnp.float32(ALPHA), jnp.float32(TEMPERATURE)
  params = state.params
  seq = [create_state(params, teacher["batch_stats"], opt, masks=masks) for _ in range(k)]
  stacked = jax.tree.map(
    lambda *xs: jnp.stack(xs),
    *[create_state(params, teacher["batch_stats"], opt) for _ in range(k)],
  ).replace(masks=jax.tree.map(jnp.array, masks))  # shared masks: one unstacked set

  def run_sequential():  # `seq` is updated in place, one member state per slot
    for _ in range(args.steps):
      for j in range(k):
        seq[j], m = single(seq[j], images[j], labels[j], keys[j], teacher, a, t)
    jax.block_until_ready(seq)

  def population_run(step, state):
    box = {"state": state}

    def run():
      for _ in range(args.steps):
        box["state"], m = step(box["state"], images, labels, keys, teacher, a, t)
      jax.block_until_ready(box["state"])

    return run

  runs = {
    "sequential": run_sequential,
    "vmap": population_run(pop, stacked),
    "map": population_run(mapped, jax.tree.map(jnp.array, stacked)),
    "population_sequential": population_run(in_turn, jax.tree.map(jnp.array, stacked)),
  }
  runs = {k: v for k, v in runs.items() if k == "sequential" or k in args.population_variants}
  first_call, times = warm_then_interleaved(runs, args.repeats)
  row: dict[str, Any] = {
    "model": name,
    "population": k,
    "batch_per_member": bs,
    "steps": args.steps,
    "repeats": args.repeats,
    "augmentation": "crop 4 + flip (in the step)",
    "variants": first_call,
  }
  row["load_after"] = load()
  _finish_rows(row, times, k * bs * args.steps, None, args.steps)
  seconds = lambda v: row["variants"][v]["seconds_median"] if v in runs else None
  speedup = lambda v: seconds("sequential") / seconds(v) if v in runs else None
  row["speedup_vs_sequential"] = speedup("vmap")
  row["map_speedup_vs_sequential"] = speedup("map")
  # population_step='sequential' (the member steps through the population's split and join)
  row["in_turn_speedup_vs_sequential"] = speedup("population_sequential")
  results.append(row)
  print(
    f"[population] {name} K={k} batch/member={bs} load={row['load_after']} "
    + " ".join(f"{v}={row['variants'][v]['items_per_s']:.0f}/s" for v in runs)
    + f" speedup vmap={_fmt(row['speedup_vs_sequential'], '.2f')}x "
    f"map={_fmt(row['map_speedup_vs_sequential'], '.2f')}x "
    f"in turn={_fmt(row['in_turn_speedup_vs_sequential'], '.2f')}x",
    flush=True,
  )


# ----------------------------------------------------------------------------- training loop


def _noop_step():
  """A TrainStep whose body does no training: it counts the step and reports zero metrics, so
  `fit` around it times the loop alone (batch gather, RNG, dispatch, sums, syncs) over the
  real pytrees it is given."""
  from prunebias_jax.train.steps import TrainStep

  def body(state, images, labels, rng, teacher, alpha, temperature, indices=None):
    zero = jnp.float32(0.0)
    metrics = {"loss": zero, "ce": zero, "accuracy": zero, "nonfinite": jnp.int32(0)}
    return state.replace(step=state.step + 1), metrics

  return TrainStep(jax.jit(body, donate_argnums=(0,)), body)


def bench_loop(args, results: list[dict]) -> None:
  """`fit` around a no-op step (host overhead per step, real ResNet KD pytrees) and around the
  real step with the config's checkpoint cadence, both ÷ the bare step, per loop
  ('step': host batches one step at a time; 'scan': the split on the device, chunks of
  `scan_steps` in one lax.scan). On the CPU the scanned real step is not run: XLA:CPU runs a
  convolution inside a loop ~30x slower (jax-ml/jax#12868)."""
  from prunebias_jax.checkpoint import StageCheckpoint
  from prunebias_jax.config import base_config
  from prunebias_jax.data.dataset import Split
  from prunebias_jax.train import fit

  on_cpu = jax.default_backend() == "cpu"
  name, batch, per_epoch = args.loop_model, args.loop_batch, args.loop_steps
  _, teacher, _, _, step, state = _jax_train_setup(name, batch, "float32", augment=True)
  rng = np.random.default_rng(0)
  n = per_epoch * batch
  split = Split(
    rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
    rng.integers(0, 10, (n,)).astype(np.int32),
  )
  cadence = base_config().checkpoint
  states = {}

  def fitted(step_fn, loop: str, epochs: int, checkpoints: bool):
    def run():
      directory = tempfile.mkdtemp(prefix="bench-loop-") if checkpoints else None
      ckpt = (
        StageCheckpoint(
          directory,
          cadence.every_steps,
          every_seconds=cadence.every_seconds,
          background=not on_cpu,  # checkpoint.background=auto
        )
        if checkpoints
        else None
      )
      key = (id(step_fn), loop)
      start = states.pop(key, None) or jax.tree.map(jnp.array, state)
      try:
        out, _ = fit(
          start,
          step_fn,
          split,
          stage="bench",
          batch_size=batch,
          epochs=epochs,
          seed=0,
          teacher_variables=teacher,
          alpha=ALPHA,
          temperature=TEMPERATURE,
          progress_seconds=10.0,
          checkpoint=ckpt,
          loop=loop,
          scan_steps=args.scan_steps,
        )
        jax.block_until_ready(out)
      finally:
        if ckpt is not None:
          ckpt.close()
          shutil.rmtree(directory, ignore_errors=True)
      states[key] = out.replace(step=jnp.zeros_like(out.step))  # the next repetition's start

    return run

  noop = _noop_step()
  ji = jax.device_put(split.images[:batch])
  jl = jax.device_put(split.labels[:batch])
  a, t, key = jnp.float32(ALPHA), jnp.float32(TEMPERATURE), jax.random.key(1)

  def bare(step_fn, steps: int):
    box = [jax.tree.map(jnp.array, state)]

    def run():
      for _ in range(steps):
        box[0], m = step_fn(box[0], ji, jl, key, teacher, a, t)
      jax.block_until_ready(box[0])

    return run

  # 1. The loop alone: a no-op step over `loop_epochs` epochs.
  noop_steps = per_epoch * args.loop_epochs
  runs = {
    "bare_noop": bare(noop, noop_steps),
    "fit_step_noop": fitted(noop, "step", args.loop_epochs, False),
    "fit_scan_noop": fitted(noop, "scan", args.loop_epochs, False),
  }
  first, times = warm_then_interleaved(runs, args.repeats)
  row: dict[str, Any] = {
    "model": name,
    "batch": batch,
    "steps": noop_steps,
    "scan_steps": args.scan_steps,
    "repeats": args.repeats,
    "what": "no-op step (real state + teacher pytrees)",
    "variants": first,
  }
  row["load_after"] = load()
  _finish_rows(row, times, batch * noop_steps, None, noop_steps)
  for variant in runs:
    v = row["variants"][variant]
    v["ms_per_step"] = 1e3 * v["seconds_median"] / noop_steps
  results.append(row)
  print(
    f"[loop] no-op step, {noop_steps} steps, load={row['load_after']}: "
    + ", ".join(f"{k} {v['ms_per_step']:.3f} ms/step" for k, v in row["variants"].items()),
    flush=True,
  )

  # 2. The real step through fit() (checkpoint cadence of the default config) ÷ bare step.
  real_steps = per_epoch * args.fit_epochs
  runs = {
    "bare": bare(step, real_steps),
    "fit_step": fitted(step, "step", args.fit_epochs, True),
  }
  if not on_cpu:
    runs["fit_scan"] = fitted(step, "scan", args.fit_epochs, True)
  first, times = warm_then_interleaved(runs, args.repeats)
  row = {
    "model": name,
    "batch": batch,
    "steps": real_steps,
    "scan_steps": args.scan_steps,
    "repeats": args.repeats,
    "what": "masked CE+KD step, crop+flip; checkpoints every "
    f"{cadence.every_steps} steps / {cadence.every_seconds:.0f} s",
    "variants": first,
  }
  if on_cpu:
    row["errors"] = {"fit_scan": "not run on the CPU (jax-ml/jax#12868: ~30x slower there)"}
  row["load_after"] = load()
  _finish_rows(row, times, batch * real_steps, None, real_steps)
  bare_rate = row["variants"]["bare"]["items_per_s"]
  for variant in runs:
    v = row["variants"][variant]
    v["vs_bare"] = v["items_per_s"] / bare_rate
  results.append(row)
  print(
    f"[loop] {name} b{batch}, {real_steps} steps, load={row['load_after']}: "
    + ", ".join(
      f"{k} {v['items_per_s']:.0f} img/s ({v['vs_bare']:.2f}x bare)"
      for k, v in row["variants"].items()
    ),
    flush=True,
  )


# ----------------------------------------------------------------------------- compilation


_FINISHED = re.compile(r"Finished XLA compilation of (.+?) in ([0-9.eE+-]+) sec")


def bench_compile(args, results: list[dict]) -> None:
  """The command on `--compile-config` (default: the runlocal sweep) four times in fresh
  processes: cache off, cache cold (a new directory being filled), cache warm, and a warm
  rerun on the finished workdir; wall time, XLA programs compiled (JAX's `jax_log_compiles`
  lines), persistent-cache hits and the seconds spent compiling."""
  root = os.path.dirname(HERE)
  cache = tempfile.mkdtemp(prefix="bench-xla-cache-")
  workdirs: list[str] = []
  rows = []
  plan = [("cache off", "off", True), ("cache cold", cache, True), ("cache warm", cache, True)]
  plan.append(("cache warm, rerun", cache, False))
  try:
    for what, setting, fresh in plan:
      if fresh:
        workdirs.append(tempfile.mkdtemp(prefix="bench-compile-run-"))
      command = [
        sys.executable,
        "-m",
        "prunebias_jax.main",
        "--config",
        args.compile_config,
        *args.compile_args,
        f"--config.compile_cache={setting}",
        f"--workdir={workdirs[-1]}",
      ]
      env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
      env["JAX_LOG_COMPILES"] = "1"
      t0 = time.perf_counter()
      proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
      wall = time.perf_counter() - t0
      finished = _FINISHED.findall(proc.stderr)
      row = {
        "run": what,
        "command": " ".join(command[1:]),
        "returncode": proc.returncode,
        "wall_s": wall,
        "programs": len(finished),
        "cache_hits": proc.stderr.count("Persistent compilation cache hit"),
        "compile_s": sum(float(sec) for _, sec in finished),
        "load_after": load(),
      }
      if proc.returncode:
        row["error"] = proc.stderr[-2000:]
      rows.append(row)
      print(
        f"[compile] {what}: {wall:.1f} s, {row['programs']} programs "
        f"({row['cache_hits']} from the cache, {row['compile_s']:.1f} s compiling), "
        f"exit {proc.returncode}, load={row['load_after']}",
        flush=True,
      )
  finally:
    for path in (cache, *workdirs):
      shutil.rmtree(path, ignore_errors=True)
  off = rows[0]["wall_s"]
  for row in rows:
    row["vs_cache_off"] = row["wall_s"] / off
  results.append({"config": args.compile_config, "args": args.compile_args, "runs": rows})


# ----------------------------------------------------------------------------- output


def _md_row(*cells) -> str:
  """One markdown table row."""
  return "| " + " | ".join(str(c) for c in cells) + " |"


def _fmt(x, spec=".0f", none="–"):
  return none if x is None else format(x, spec)


def markdown(report: dict) -> str:
  env = report["environment"]
  dev = f"{env['platform']} ({env['device_kind']}) × {env['device_count']}" + (
    f", CPU {env['cpu']}, {env['cpu_count']} cores" if env["platform"] == "cpu" else ""
  )
  lines = [
    f"### Run of {env['date']} on {dev}",
    "",
    f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}, numpy {env['numpy']}, "
    f"scikit-learn {env['sklearn']}, torch {env['torch']}"
    + (f" ({env.get('torch_threads')} threads)" if "torch_threads" in env else "")
    + f", Python {env['python']}; XLA_FLAGS=`{env['XLA_FLAGS'] or '(none)'}`; "
    f"command: `{report['command']}`. "
    f"Load average (1/5/15 min) at start {report['load_start']}, per row below.",
    "",
  ]
  peak = env.get("peak_bf16_flops")
  if report.get("train"):
    lines += [
      "#### Masked CE+KD train step (teacher forward included; no augmentation on either side)",
      "",
      _md_row(
        "model",
        "batch",
        "variant",
        "img/s",
        "ms/step",
        "TFLOP/s",
        "% bf16 peak",
        "JAX ÷ this (speed ratio)",
        "compile / first call s",
        "load",
      ),
      "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["train"]:
      jax_name = next((k for k in row["variants"] if k == "jax"), None)
      for name, v in row["variants"].items():
        if "items_per_s" not in v:
          continue
        ratio = (
          row.get("ratios", {}).get(jax_name or "", {}).get(name)
          if name.startswith("torch")
          else None
        )
        if name.startswith("jax") and name != "jax" and name.endswith("bfloat16"):
          ratio = None
        tfl = v.get("tflops")
        peak_pct = 100 * v["fraction_of_bf16_peak"] if v.get("fraction_of_bf16_peak") else None
        lines.append(
          _md_row(
            row["model"],
            row["batch"],
            name,
            f"{v['items_per_s']:.0f}",
            f"{1000 * v['seconds_median'] / row['steps']:.1f}",
            _fmt(tfl, ".3f"),
            _fmt(peak_pct, ".1f"),
            _fmt(ratio, ".2f") + "×" if ratio else "",
            _fmt(v.get("compile_s") or v.get("first_call_s"), ".1f"),
            row["load_after"],
          )
        )
      for k, e in row.get("errors", {}).items():
        lines.append(f"| {row['model']} | {row['batch']} | {k} | error: {e} | | | | | | |")
    lines += [
      "",
      "`JAX ÷ this` = (PyTorch seconds per step) / (JAX float32 seconds per step): > 1 means "
      "JAX is faster. "
      "TFLOP/s use XLA's cost analysis of the compiled JAX step (the same FLOP count for every row"
      + ("" if peak else "; no peak is given for a CPU")
      + ").",
      "",
    ]
  if report.get("eval"):
    lines += [
      "#### Full evaluation pass (logits + penultimate features)",
      "",
      "| model | n | batch | variant | img/s | s/pass | JAX ÷ this | load |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["eval"]:
      for name, v in row["variants"].items():
        if "items_per_s" not in v:
          continue
        ratio = row.get("ratios", {}).get("jax", {}).get(name)
        lines.append(
          f"| {row['model']} | {row['n']} | {row['batch']} | {name} | {v['items_per_s']:.0f} | "
          f"{v['seconds_median']:.2f} | {_fmt(ratio, '.2f') + '×' if ratio else ''} | "
          f"{row['load_after']} |"
        )
      for k, e in row.get("errors", {}).items():
        lines.append(f"| {row['model']} | {row['n']} | {row['batch']} | {k} | error: {e} | | | |")
    lines.append("")
  if report.get("metrics"):
    lines += [
      "#### Metric kernels: CEV + SDE + linear CKA (one reference and one compared model)",
      "",
      _md_row(
        "n",
        "d",
        "C",
        "implementation",
        "seconds",
        "peak RSS increase MB",
        "implementation ÷ JAX time",
        "CKA",
        "load",
      ),
      "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {
      "jax": "prunebias_jax (jnp)",
      "numpy": "vectorised NumPy",
      "paper": "sklearn confusion_matrix + n×n Gram CKA",
    }
    for row in report["metrics"]:
      if "error" in row:
        lines.append(f"| {row['n']} | {row['d']} | | error | {row['error'][-200:]!r} | | | | |")
        continue
      for name, v in row["variants"].items():
        label = labels[name]
        if name == "paper" and not row["gram_cka"]:
          gb = row["n"] ** 2 * 4 / 2**30
          label = f"sklearn confusion_matrix only (n×n Gram = {gb:.0f} GiB per matrix: not run)"
        elif name == "paper":
          label += f" ({row['gram_backend']})"
        ratio = row["ratios"].get(name)
        cka = v["values"][2]
        lines.append(
          _md_row(
            row["n"],
            row["d"],
            row["num_classes"],
            label,
            f"{v['seconds_median']:.4f}",
            _fmt(v["peak_rss_increase_mb"], ".0f"),
            _fmt(ratio, ".2f") + "×" if ratio else "",
            _fmt(cka, ".5f", "n/a") if not math.isnan(cka) else "n/a",
            row["load_after"],
          )
        )
    lines += [
      "",
      "Peak RSS increase: VmHWM − VmRSS around one call (after warm-up), inputs excluded "
      "(inputs: 2 × n × d float32). One subprocess per n.",
      "",
    ]
  if report.get("stream"):
    lines += [
      "#### Metric kernels, streamed: CEV + SDE + linear CKA (+ debiased CKA) from d × d sums",
      "",
      _md_row("n", "d", "seconds", "GFLOP/s (6·n·d²)", "peak RSS increase MB", "CKA", "load"),
      "|---|---|---|---|---|---|---|",
    ]
    for row in report["stream"]:
      if "error" in row or "skipped" in row:
        why = row.get("skipped") or f"error: {row['error'][-200:]!r}"
        lines.append(f"| {row['n']} | {row['d']} | not run: {why} | | | | |")
        continue
      lines.append(
        _md_row(
          row["n"],
          row["d"],
          f"{row['seconds']:.2f}",
          f"{row['gflops']:.0f}",
          _fmt(row["peak_rss_increase_mb"], ".0f"),
          _fmt(row["values"][2], ".5f", "n/a"),
          row["load_after"],
        )
      )
    lines.append("")
  if report.get("population"):
    lines += [
      "#### Population: K students in one step (vmapped, or mapped one after the other) vs K "
      "sequential steps (CE+KD, crop+flip)",
      "",
      "| model | K | batch/member | sequential img/s | vmapped img/s | speedup | mapped img/s "
      "| speedup | in turn (population_step=sequential) img/s | speedup | load |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["population"]:
      v = row["variants"]
      rate = lambda name: _fmt(v[name]["items_per_s"] if name in v else None, ".0f", "not run")
      times = lambda x: _fmt(x, ".2f", "–") + ("×" if x is not None else "")
      lines.append(
        _md_row(
          row["model"],
          row["population"],
          row["batch_per_member"],
          rate("sequential"),
          rate("vmap"),
          times(row["speedup_vs_sequential"]),
          rate("map"),
          times(row["map_speedup_vs_sequential"]),
          rate("population_sequential"),
          times(row["in_turn_speedup_vs_sequential"]),
          row["load_after"],
        )
      )
    lines.append("")
  if report.get("loop"):
    lines += [
      "#### The training loop: `fit` ÷ the bare step (the same steps called back to back on one "
      "device-resident batch)",
      "",
      "| model | batch | what | steps | variant | ms/step | img/s | ÷ bare | load |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["loop"]:
      bare = row["variants"].get("bare_noop") or row["variants"].get("bare")
      for variant, v in row["variants"].items():
        lines.append(
          _md_row(
            row["model"],
            row["batch"],
            row["what"],
            row["steps"],
            variant.replace("_", " "),
            f"{1e3 * v['seconds_median'] / row['steps']:.3f}",
            f"{v['items_per_s']:.0f}",
            f"{v['items_per_s'] / bare['items_per_s']:.2f}×",
            row["load_after"],
          )
        )
      for variant, why in row.get("errors", {}).items():
        lines.append(_md_row(row["model"], row["batch"], row["what"], "", variant, why, "", "", ""))
    lines.append("")
  for block in report.get("compile", []):
    lines += [
      f"#### Compilation: `{block['config']}` {' '.join(block['args'])}, each run a fresh "
      "process (Python start-up and imports included)",
      "",
      "| run | wall s | ÷ cache off | XLA programs | from the cache | s compiling | load |",
      "|---|---|---|---|---|---|---|",
    ]
    for row in block["runs"]:
      lines.append(
        _md_row(
          row["run"] + (f" (exit {row['returncode']})" if row["returncode"] else ""),
          f"{row['wall_s']:.1f}",
          f"{row['vs_cache_off']:.2f}",
          row["programs"],
          row["cache_hits"],
          f"{row['compile_s']:.1f}",
          row["load_after"],
        )
      )
    lines.append("")
  return "\n".join(lines) + "\n"


def write_markdown(
  path: str, text: str, begin: str = MARK_BEGIN, end: str = MARK_END, title: str = "Benchmarks"
) -> None:
  """Replace the generated block of an existing file (between the `begin` and `end` lines),
  else write one (appended to a file without them; a new file gets `title`)."""
  block = f"{begin}\n{text}{end}\n"
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if begin in old and end in old:
      head, rest = old.split(begin, 1)
      tail = rest.split(end, 1)[1].lstrip("\n")
      new = head + block + ("\n" + tail if tail else "")
    else:
      new = old.rstrip("\n") + "\n\n" + block
  else:
    new = f"# {title}\n\n" + block
  with open(path, "w") as f:
    f.write(new)


# ----------------------------------------------------------------------------- CLI


def _ints(s: str) -> list[int]:
  return [int(float(x)) for x in s.split(",") if x]


def _strs(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def parse_args(argv=None):
  on_gpu = jax.devices()[0].platform == "gpu"
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--sections",
    type=_strs,
    default=["train", "eval", "metrics", "stream", "population", "loop", "compile"],
  )
  p.add_argument(
    "--quick", action="store_true", help="tiny sizes, 2 repeats, no torch.compile: a smoke run"
  )
  p.add_argument("--models", type=_strs, default=["resnet20", "resnet18"])
  p.add_argument("--batches", type=_ints, default=[128, 512])
  p.add_argument("--steps", type=int, default=2, help="train steps per timed repetition (at least)")
  p.add_argument(
    "--min-repeat-seconds",
    type=float,
    default=0.1,
    help="more steps per repetition until one JAX repetition takes this long: a few ms of "
    "GPU work per repetition would time the launch and the sync, not the step",
  )
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument(
    "--jax-dtypes",
    type=_strs,
    default=["float32", "bfloat16"] if on_gpu else ["float32"],
    help="compute dtypes of the JAX step (bfloat16: bf16 compute, float32 params and loss); "
    "PyTorch rows use autocast to the same dtype",
  )
  p.add_argument(
    "--torch-variants",
    type=_strs,
    default=["eager", "eager_cl", "compile_cl"],
    help="eager | eager_cl | compile | compile_cl | compile_max | compile_max_cl (cl = "
    "channels-last; compile: torch.compile's default mode, compile_max: "
    "max-autotune-no-cudagraphs)",
  )
  p.add_argument("--eval-n", type=int, default=10000)
  p.add_argument("--eval-batch", type=int, default=500)
  p.add_argument("--eval-torch-variants", type=_strs, default=["eager", "eager_cl"])
  p.add_argument("--metric-n", type=_ints, default=[10_000, 100_000, 1_000_000])
  p.add_argument("--metric-d", type=int, default=512)
  p.add_argument("--metric-classes", type=int, default=100)
  p.add_argument("--metric-repeats", type=int, default=5)
  p.add_argument(
    "--gram-max-n", type=int, default=10_000, help="largest n for the n x n Gram CKA baseline"
  )
  p.add_argument("--population", type=int, default=8)
  p.add_argument("--population-model", default="resnet20")
  p.add_argument("--population-batch", type=int, default=64, help="per-member batch")
  p.add_argument(
    "--population-variants",
    type=_strs,
    default=["vmap", "map", "population_sequential"],
    help="beside the sequential reference: vmap | map | population_sequential",
  )
  p.add_argument("--loop-model", default="resnet20")
  p.add_argument("--loop-batch", type=int, default=128)
  p.add_argument("--loop-steps", type=int, default=64, help="steps per epoch of the loop rows")
  p.add_argument("--loop-epochs", type=int, default=4, help="epochs of the no-op loop rows")
  p.add_argument(
    "--fit-epochs",
    type=int,
    default=0,
    help="epochs of the real-step rows (0: 1 on the CPU, 8 else)",
  )
  p.add_argument("--scan-steps", type=int, default=32, help="the scanned loop's chunk length")
  p.add_argument("--compile-config", default="configs/default.py")
  p.add_argument(
    "--compile-args",
    type=lambda x: x.split(),
    default=["--config.runlocal=True"],
    help="extra arguments of the compile section's command (space separated)",
  )
  p.add_argument("--json", default="", help="write the full results (every timing) as JSON here")
  p.add_argument(
    "--markdown", default="", help="write/refresh the generated tables in this markdown file"
  )
  p.add_argument("--_metrics-child", nargs=6, default=None, help=argparse.SUPPRESS)
  p.add_argument("--stream-n", type=_ints, default=[100_000, 1_000_000, 10_000_000])
  p.add_argument("--stream-d", type=_ints, default=[512, 2048])
  p.add_argument("--stream-batch", type=int, default=4096, help="rows per streamed batch")
  p.add_argument(
    "--stream-max-flops",
    type=float,
    default=3e13,
    help="skip a streamed (n, d) whose 6·n·d² flops exceed this (the row says so)",
  )
  p.add_argument("--_stream-child", nargs=5, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if not args.fit_epochs:
    args.fit_epochs = 8 if on_gpu else 1
  if args.quick:
    args.models, args.batches, args.steps, args.repeats = ["resnet20"], [16], 1, 2
    args.min_repeat_seconds = 0.0
    args.torch_variants = [v for v in args.torch_variants if not v.startswith("compile")]
    args.eval_n, args.eval_batch = 256, 128
    args.metric_n, args.metric_d, args.metric_classes, args.metric_repeats = [2000], 64, 10, 2
    args.gram_max_n = 2000
    args.population, args.population_model, args.population_batch = 2, "small_cnn", 8
    args.stream_n, args.stream_d, args.stream_batch = [5000], [32], 1024
    args.loop_model, args.loop_batch, args.loop_steps, args.loop_epochs = "resnet20", 16, 8, 2
    args.fit_epochs, args.scan_steps = 1, 4
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args._stream_child:
    n, d, c, b, out = args._stream_child
    stream_child(int(n), int(d), int(c), int(b), out)
    return {}
  if args._metrics_child:
    n, d, c, r, g, out = args._metrics_child
    metrics_child(int(n), int(d), int(c), int(r), int(g), out)
    return {}
  torch_mod = try_import_torch() if ({"train", "eval"} & set(args.sections)) else "not needed"
  report: dict[str, Any] = {
    "environment": environment(torch_mod),
    "load_start": load(),
    "command": " ".join(
      ["python scripts/benchmark.py"] + (argv if argv is not None else sys.argv[1:])
    ),
    "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
  }
  print(json.dumps(report["environment"]), flush=True)
  if "train" in args.sections:
    report["train"] = []
    bench_train(args, torch_mod, report["train"])
  if "eval" in args.sections:
    report["eval"] = []
    bench_eval(args, torch_mod, report["eval"])
  if "metrics" in args.sections:
    report["metrics"] = []
    bench_metrics(args, report["metrics"])
  if "stream" in args.sections:
    report["stream"] = []
    bench_stream(args, report["stream"])
  if "population" in args.sections:
    report["population"] = []
    bench_population(args, report["population"])
  if "loop" in args.sections:
    report["loop"] = []
    bench_loop(args, report["loop"])
  if "compile" in args.sections:
    report["compile"] = []
    bench_compile(args, report["compile"])
  report["load_end"] = load()
  text = markdown(report)
  print(text)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, default=str)
  if args.markdown:
    write_markdown(args.markdown, text)
  return report


if __name__ == "__main__":
  main()
