"""PyTorch reference of prunebias_jax's masked CE+KD train step, for `scripts/benchmark.py` only.

Benchmark-only code (PyTorch is the optional `bench` extra, never a runtime dependency of
prunebias_jax). It mirrors, layer for layer, `prunebias_jax.models.resnet_cifar`:

* CIFAR ResNet-20 (stem 16, stages 16/32/64 of 3 basic blocks) and ResNet-18 with a CIFAR
  stem (stem 64, stages 64/128/256/512 of 2 blocks), bias-free 3x3 convolutions with padding 1,
  stride 2 at the first block of every stage but the first, 1x1-conv + BN projection shortcuts
  where the shape changes, BatchNorm (PyTorch momentum 0.1 = Flax momentum 0.9, eps 1e-5),
  global average pool, one linear `head`;
* masking semantics of `prunebias_jax.pruning.apply_masks`: the forward pass uses
  `weight * mask` (explicit multiply, so a pruned weight gets zero gradient), every prunable
  kernel (all convolutions; not the head) has a mask, and after the optimizer update the
  weights are re-masked so momentum and weight decay cannot revive a pruned weight;
* the step of `prunebias_jax.train.make_train_step(kd=True)`: uint8 NHWC images normalised
  in the step, student forward + backward in train mode, teacher forward in eval mode without
  gradient, loss (1-a)·CE + a·T²·KL(softmax(t/T) || softmax(s/T)) (batch mean), SGD with
  momentum 0.9 and L2 weight decay added to the gradient (`torch.optim.SGD` semantics = optax
  `add_decayed_weights` + `sgd(momentum)`), then re-masking. No augmentation (the JAX side of
  the comparison runs with `crop_padding=0, flip=False` too).

Written from scratch for this project.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = {
  # name: (stem width, stage widths, blocks per stage)
  "resnet20": (16, (16, 32, 64), (3, 3, 3)),
  "resnet18": (64, (64, 128, 256, 512), (2, 2, 2, 2)),
}


class MaskedConv2d(nn.Conv2d):
  """Bias-free conv whose effective kernel is `weight * mask` (mask buffer, 1 = kept)."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int):
    super().__init__(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
    self.register_buffer("mask", torch.ones_like(self.weight))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(x, self.weight * self.mask, None)


def _bn(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = MaskedConv2d(cin, cout, 3, stride), _bn(cout)
    self.conv2, self.bn2 = MaskedConv2d(cout, cout, 3, 1), _bn(cout)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(MaskedConv2d(cin, cout, 1, stride), _bn(cout))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet(nn.Module):
  """Basic-block ResNet: stem -> stages -> GAP -> head. `forward` returns (logits, features)."""

  def __init__(self, name: str, num_classes: int):
    super().__init__()
    stem, widths, blocks = ARCHS[name]
    self.stem = nn.Sequential(MaskedConv2d(3, stem, 3, 1), _bn(stem), nn.ReLU())
    layers, cin = [], stem
    for i, (w, n) in enumerate(zip(widths, blocks)):
      for j in range(n):
        layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
        cin = w
    self.blocks = nn.Sequential(*layers)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = self.blocks(self.stem(x)).mean(dim=(2, 3))
    return self.head(feats), feats


def masked_convs(model: nn.Module) -> list[MaskedConv2d]:
  return [m for m in model.modules() if isinstance(m, MaskedConv2d)]


def prune_l1_filters(model: nn.Module, sparsity: float) -> None:
  """Structured masks like the JAX benchmark's `l1_filter` pruning: per conv layer, zero the
  output filters with the smallest L1 norm (the work per step does not depend on which)."""
  with torch.no_grad():
    for conv in masked_convs(model):
      norms = conv.weight.abs().sum(dim=(1, 2, 3))
      k = int(round(sparsity * norms.numel()))
      mask = torch.ones_like(conv.weight)
      if k > 0:
        mask[norms.argsort()[:k]] = 0
      conv.mask.copy_(mask)
      conv.weight.mul_(conv.mask)


def kd_loss(
  student: torch.Tensor,
  teacher: torch.Tensor,
  labels: torch.Tensor,
  alpha: float,
  temperature: float,
) -> torch.Tensor:
  """(1-a)·CE + a·T²·KL(softmax(t/T) || softmax(s/T)), KL summed over classes, batch mean."""
  ce = F.cross_entropy(student, labels)
  kl = F.kl_div(
    F.log_softmax(student / temperature, -1),
    F.log_softmax(teacher / temperature, -1),
    reduction="batchmean",
    log_target=True,
  )
  return (1.0 - alpha) * ce + alpha * temperature**2 * kl


def build(
  name: str,
  num_classes: int = 10,
  *,
  sparsity: float = 0.5,
  channels_last: bool = False,
  lr: float = 0.05,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  seed: int = 0,
  device: str = "cpu",
):
  """(student, teacher, optimizer): a pruned student copy of a dense teacher (float32 params)."""
  torch.manual_seed(seed)
  teacher = ResNet(name, num_classes)
  student = ResNet(name, num_classes)
  student.load_state_dict(teacher.state_dict())
  prune_l1_filters(student, sparsity)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  teacher = teacher.to(device=device, memory_format=fmt).eval()
  student = student.to(device=device, memory_format=fmt).train()
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt = torch.optim.SGD(
    student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True
  )
  return student, teacher, opt


def make_step(
  student: nn.Module,
  teacher: nn.Module,
  opt: torch.optim.Optimizer,
  *,
  mean,
  std,
  channels_last: bool = False,
  compile: bool | str = False,
  alpha: float = 0.9,
  temperature: float = 4.0,
  amp_dtype=None,
) -> Callable:
  """`step(images_u8 NHWC, labels) -> loss` (a 0-d tensor; no host sync inside the step).

  compile: False (eager), True or "default" (torch.compile), or a torch.compile mode such as
  "max-autotune-no-cudagraphs".

  amp_dtype (e.g. torch.bfloat16): autocast the forward passes (float32 params, and the loss
  on float32 logits), the counterpart of `get_model(..., dtype="bfloat16")`.
  """
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  device = next(student.parameters()).device
  mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
  std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
  convs = masked_convs(student)
  weights, masks = [c.weight for c in convs], [c.mask for c in convs]

  def forward_loss(images, labels):
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    x = ((x - mean_t) / std_t).contiguous(memory_format=fmt)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
      with torch.no_grad():
        t_logits, _ = teacher(x)
      s_logits, _ = student(x)
    return kd_loss(s_logits.float(), t_logits.float(), labels, alpha, temperature)

  def update():
    opt.step()
    with torch.no_grad():
      torch._foreach_mul_(weights, masks)

  if compile:  # True: torch.compile's default mode; a string: that mode
    mode = None if compile is True or compile == "default" else compile
    forward_loss = torch.compile(forward_loss, mode=mode)
    update = torch.compile(update, mode=mode)

  def step(images, labels):
    opt.zero_grad(set_to_none=True)
    loss = forward_loss(images, labels)
    loss.backward()
    update()
    return loss.detach()

  return step


def make_eval(
  model: nn.Module, *, mean, std, channels_last: bool = False, batch: int = 500
) -> Callable:
  """`evaluate(images_u8 NHWC (n,...)) -> (logits (n,C), features (n,d))` in eval mode, by batch."""
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  device = next(model.parameters()).device
  mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
  std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
  model = model.eval()

  @torch.inference_mode()
  def evaluate(images):
    logits, feats = [], []
    for i in range(0, images.shape[0], batch):
      x = images[i : i + batch].permute(0, 3, 1, 2).float().div(255.0)
      x = ((x - mean_t) / std_t).contiguous(memory_format=fmt)
      lo, fe = model(x)
      logits.append(lo)
      feats.append(fe)
    return torch.cat(logits), torch.cat(feats)

  return evaluate
