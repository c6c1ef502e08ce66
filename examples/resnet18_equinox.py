"""ResNet-18 in Equinox with bnjax.equinox.BatchNorm, to and from PyTorch.

torchvision's ``resnet18`` (BasicBlock, [2, 2, 2, 2]) as an Equinox model in
Equinox's per-example convention: one image ``(3, H, W)`` per call, the batch
a ``jax.vmap`` axis named ``'batch'`` that BN syncs over. Equinox's
convolutions are NCHW with torch's kernel layout, so the conversion copies
conv and fc weights as they are and BN state with
:func:`bnjax.equinox.from_torch`.

    >>> import jax, equinox as eqx
    >>> from examples import resnet18_equinox as E
    >>> model, state = E.make(jax.random.key(0), num_classes=10)
    >>> len(model.blocks)
    8

``tests/interop/test_resnet18.py`` converts a torch ResNet-18 both ways and
compares logits.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import bnjax.equinox
from bnjax import interop
from examples.resnet18 import TORCH_MOMENTUM, _has_downsample, blocks

AXIS = 'batch'


def _bn(c):
  return bnjax.equinox.BatchNorm(
    c, AXIS, momentum=interop.momentum_from_torch(TORCH_MOMENTUM)
  )


def _conv(cin, cout, k, stride, key):
  return eqx.nn.Conv2d(
    cin, cout, k, stride, padding=k // 2, use_bias=False, key=key
  )


class Block(eqx.Module):
  conv1: eqx.nn.Conv2d
  bn1: bnjax.equinox.BatchNorm
  conv2: eqx.nn.Conv2d
  bn2: bnjax.equinox.BatchNorm
  down_conv: eqx.nn.Conv2d | None
  down_bn: bnjax.equinox.BatchNorm | None

  def __init__(self, cin, cout, stride, key):
    k = jax.random.split(key, 3)
    self.conv1, self.bn1 = _conv(cin, cout, 3, stride, k[0]), _bn(cout)
    self.conv2, self.bn2 = _conv(cout, cout, 3, 1, k[1]), _bn(cout)
    self.down_conv = self.down_bn = None
    if _has_downsample(cin, cout, stride):
      self.down_conv, self.down_bn = (
        _conv(cin, cout, 1, stride, k[2]),
        _bn(cout),
      )

  def __call__(self, x, state):
    y, state = self.bn1(self.conv1(x), state)
    y, state = self.bn2(self.conv2(jax.nn.relu(y)), state)
    if self.down_conv is not None:
      x, state = self.down_bn(self.down_conv(x), state)
    return jax.nn.relu(x + y), state


class ResNet18(eqx.Module):
  conv1: eqx.nn.Conv2d
  bn1: bnjax.equinox.BatchNorm
  pool: eqx.nn.MaxPool2d
  blocks: list
  fc: eqx.nn.Linear

  def __init__(self, key, num_classes=1000):
    k = jax.random.split(key, 10)
    self.conv1, self.bn1 = _conv(3, 64, 7, 2, k[0]), _bn(64)
    self.pool = eqx.nn.MaxPool2d(3, 2, padding=1)
    self.blocks = [
      Block(cin, cout, stride, k[i + 1])
      for i, (_, _, cin, cout, stride) in enumerate(blocks())
    ]
    self.fc = eqx.nn.Linear(512, num_classes, key=k[9])

  def __call__(self, x, state):
    """One image ``(3, H, W)``; call inside ``jax.vmap(axis_name='batch')``."""
    x, state = self.bn1(self.conv1(x), state)
    x = self.pool(jax.nn.relu(x))
    for block in self.blocks:
      x, state = block(x, state)
    return self.fc(jnp.mean(x, (1, 2))), state


def make(key, num_classes=1000):
  return eqx.nn.make_with_state(ResNet18)(key, num_classes)


def logits(model, state, x):
  """Batched NCHW images to logits; training mode unless inference_mode."""
  return jax.vmap(model, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))(
    x, state
  )


def layer_map():
  """({torch BN prefix: where}, {torch conv prefix: where})."""
  bns = {'bn1': lambda m: m.bn1}
  convs = {'conv1': lambda m: m.conv1}
  for i, (prefix, _, cin, cout, stride) in enumerate(blocks()):
    block = lambda m, i=i: m.blocks[i]
    for j in (1, 2):
      bns[f'{prefix}.bn{j}'] = lambda m, b=block, j=j: getattr(b(m), f'bn{j}')
      convs[f'{prefix}.conv{j}'] = lambda m, b=block, j=j: getattr(
        b(m), f'conv{j}'
      )
    if _has_downsample(cin, cout, stride):
      bns[f'{prefix}.downsample.1'] = lambda m, b=block: b(m).down_bn
      convs[f'{prefix}.downsample.0'] = lambda m, b=block: b(m).down_conv
  return bns, convs


def from_torch(model, state, state_dict: Any):
  """(model, state) with a torchvision resnet18 state dict's weights."""
  sd = interop.load_state_dict(state_dict)
  bns, convs = layer_map()
  model, state = bnjax.equinox.from_torch(model, state, sd, bns)
  for prefix, where in convs.items():
    model = eqx.tree_at(
      lambda m, w=where: w(m).weight, model, jnp.asarray(sd[f'{prefix}.weight'])
    )
  model = eqx.tree_at(
    lambda m: (m.fc.weight, m.fc.bias),
    model,
    (jnp.asarray(sd['fc.weight']), jnp.asarray(sd['fc.bias'])),
  )
  return model, state


def to_torch(model, state) -> dict[str, np.ndarray]:
  """A torchvision resnet18 state dict (NumPy arrays)."""
  bns, convs = layer_map()
  sd = bnjax.equinox.to_torch(model, state, bns)
  for prefix, where in convs.items():
    sd[f'{prefix}.weight'] = np.asarray(where(model).weight)
  sd['fc.weight'] = np.asarray(model.fc.weight)
  sd['fc.bias'] = np.asarray(model.fc.bias)
  return sd
