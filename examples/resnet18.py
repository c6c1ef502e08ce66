"""ResNet-18 in Flax (linen and nnx) with bnjax BatchNorm, to and from PyTorch.

The architecture is torchvision's ``resnet18`` (BasicBlock, [2, 2, 2, 2]),
NHWC instead of NCHW. Module names follow torch's state dict, with the block
index joined by an underscore (``layer1.0.bn1`` is ``layer1_0/bn1``), so the
conversion is a renaming plus :mod:`bnjax.interop`'s kernel and BatchNorm
converters. linen and nnx models have the same variable trees, so one
conversion serves both.

    >>> import jax.numpy as jnp
    >>> from examples import resnet18
    >>> v = resnet18.ResNet18(num_classes=10).init(
    ...     jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)
    >>> sorted(v)
    ['batch_stats', 'params']

``tests/interop/test_resnet18.py`` converts a torch ResNet-18 both ways and compares
logits; ``benchmarks/fold.py`` times it with BN folded into the convolutions
(:func:`bnjax.fold`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from bnjax import interop

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, first stride)
BLOCKS = 2
TORCH_MOMENTUM = 0.1
EPS = 1e-5


def blocks():
  """(torch prefix, flax name, in channels, out channels, stride) per block."""
  cin = 64
  for s, (cout, stride) in enumerate(STAGES, 1):
    for b in range(BLOCKS):
      yield f'layer{s}.{b}', f'layer{s}_{b}', cin, cout, stride if b == 0 else 1
      cin = cout


def _has_downsample(cin, cout, stride):
  return stride != 1 or cin != cout


# ----------------------------------------------------------------- linen ---


class _Block(nn.Module):
  cout: int
  stride: int
  downsample: bool
  fold: bool = False  # BN folded into the convolutions: convs with bias

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=self.fold)
    bn = functools.partial(
      bnjax.linen.BatchNorm,
      use_running_average=not train,
      momentum=1 - TORCH_MOMENTUM,
      epsilon=EPS,
    )

    def norm(y, name):
      return y if self.fold else bn(name=name)(y)

    s, p = (self.stride, self.stride), ((1, 1), (1, 1))
    y = conv(self.cout, (3, 3), s, p, name='conv1')(x)
    y = nn.relu(norm(y, 'bn1'))
    y = conv(self.cout, (3, 3), (1, 1), p, name='conv2')(y)
    y = norm(y, 'bn2')
    if self.downsample:
      x = conv(self.cout, (1, 1), s, 'VALID', name='downsample_conv')(x)
      x = norm(x, 'downsample_bn')
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """torchvision's resnet18 as a linen module (NHWC input)."""

  num_classes: int = 1000
  fold: bool = False  # see bnjax.fold: BN folded into the convolutions

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(
      64, (7, 7), (2, 2), ((3, 3), (3, 3)), use_bias=self.fold, name='conv1'
    )(x)
    if not self.fold:
      x = bnjax.linen.BatchNorm(
        use_running_average=not train,
        momentum=1 - TORCH_MOMENTUM,
        epsilon=EPS,
        name='bn1',
      )(x)
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), ((1, 1), (1, 1)))
    for _, name, cin, cout, stride in blocks():
      down = _has_downsample(cin, cout, stride)
      x = _Block(cout, stride, down, self.fold, name=name)(x, train)
    return nn.Dense(self.num_classes, name='fc')(x.mean((1, 2)))


# ------------------------------------------------------------------- nnx ---


class _NnxBlock(nnx.Module):
  def __init__(self, cin, cout, stride, *, rngs):
    conv = functools.partial(nnx.Conv, use_bias=False, rngs=rngs)
    bn = functools.partial(
      bnjax.nnx.BatchNorm, momentum=1 - TORCH_MOMENTUM, epsilon=EPS, rngs=rngs
    )
    s = (stride, stride)
    pad = ((1, 1), (1, 1))
    self.conv1 = conv(cin, cout, (3, 3), s, padding=pad)
    self.bn1 = bn(cout)
    self.conv2 = conv(cout, cout, (3, 3), padding=pad)
    self.bn2 = bn(cout)
    self.downsample = _has_downsample(cin, cout, stride)
    if self.downsample:
      self.downsample_conv = conv(cin, cout, (1, 1), s, padding='VALID')
      self.downsample_bn = bn(cout)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.downsample:
      x = self.downsample_bn(self.downsample_conv(x))
    return nnx.relu(x + y)


class NnxResNet18(nnx.Module):
  """torchvision's resnet18 as an nnx module (NHWC input); its variable tree
  is :class:`ResNet18`'s."""

  def __init__(self, num_classes: int = 1000, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(
      3, 64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, rngs=rngs
    )
    self.bn1 = bnjax.nnx.BatchNorm(
      64, momentum=1 - TORCH_MOMENTUM, epsilon=EPS, rngs=rngs
    )
    for _, name, cin, cout, stride in blocks():
      setattr(self, name, _NnxBlock(cin, cout, stride, rngs=rngs))
    self.fc = nnx.Linear(512, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for _, name, *_ in blocks():
      x = getattr(self, name)(x)
    return self.fc(x.mean((1, 2)))


def nnx_from_variables(
  variables: Mapping[str, Any], num_classes: int = 1000
) -> NnxResNet18:
  """An :class:`NnxResNet18` holding these linen-shaped variables (built
  abstractly, so no random initialization runs)."""
  model = nnx.eval_shape(lambda: NnxResNet18(num_classes, rngs=nnx.Rngs(0)))
  nnx_set_variables(model, variables)
  return model


def nnx_set_variables(model: nnx.Module, variables: Mapping[str, Any]) -> None:
  """Loads a linen-shaped ``{'params', 'batch_stats'}`` tree into the nnx
  model (same names)."""
  for coll, kind in (('params', nnx.Param), ('batch_stats', nnx.BatchStat)):
    state = nnx.state(model, kind)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, variables[coll]))
    nnx.update(model, state)


def nnx_variables(model: nnx.Module) -> dict[str, Any]:
  """The nnx model's variables as a linen-shaped tree."""
  return {
    'params': nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    'batch_stats': nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
  }


# ------------------------------------------------------------ conversion ---


def layer_map() -> tuple[dict[str, str], dict[str, str]]:
  """(torch BN prefix -> flax path, torch conv prefix -> flax path)."""
  bns, convs = {'bn1': 'bn1'}, {'conv1': 'conv1'}
  for prefix, name, cin, cout, stride in blocks():
    for i in (1, 2):
      bns[f'{prefix}.bn{i}'] = f'{name}/bn{i}'
      convs[f'{prefix}.conv{i}'] = f'{name}/conv{i}'
    if _has_downsample(cin, cout, stride):
      bns[f'{prefix}.downsample.1'] = f'{name}/downsample_bn'
      convs[f'{prefix}.downsample.0'] = f'{name}/downsample_conv'
  return bns, convs


def from_torch(state_dict: Any) -> dict[str, Any]:
  """Flax variables of :class:`ResNet18` from a torchvision state dict."""
  sd = interop.load_state_dict(state_dict)
  bns, convs = layer_map()
  v = interop.from_torch(sd, bns)
  for prefix, path in convs.items():
    kernel = interop.conv_kernel_from_torch(sd[f'{prefix}.weight'])
    _node(v['params'], path, create=True)['kernel'] = kernel
  v['params']['fc'] = {
    'kernel': interop.dense_kernel_from_torch(sd['fc.weight']),
    'bias': jnp.asarray(sd['fc.bias']),
  }
  return v


def to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A torchvision resnet18 state dict (NumPy arrays) from Flax variables."""
  bns, convs = layer_map()
  sd = interop.to_torch(variables, bns)
  for prefix, path in convs.items():
    k = np.asarray(_node(variables['params'], path)['kernel'])
    sd[f'{prefix}.weight'] = np.ascontiguousarray(
      np.moveaxis(k, (-1, -2), (0, 1))
    )
  fc = variables['params']['fc']
  sd['fc.weight'] = np.array(np.asarray(fc['kernel']).T)
  sd['fc.bias'] = np.array(fc['bias'])
  return sd


def fold_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Variables of ``ResNet18(fold=True)``: every BN folded into its conv."""
  bns, _ = layer_map()
  out: dict[str, Any] = {'fc': variables['params']['fc']}
  for path in bns.values():
    head, _, bn = path.rpartition('/')
    conv = (
      'downsample_conv' if bn == 'downsample_bn' else bn.replace('bn', 'conv')
    )
    conv_path = f'{head}/{conv}' if head else conv
    bn_p = _node(variables['params'], path)
    kernel, bias = bnjax.fold(
      _node(variables['params'], conv_path)['kernel'],
      None,
      bnjax.BatchStats(**_node(variables['batch_stats'], path)),
      bn_p['scale'],
      bn_p['bias'],
      epsilon=EPS,
    )
    _node(out, conv_path, create=True).update(kernel=kernel, bias=bias)
  return {'params': out}


def _node(tree, path: str, create: bool = False):
  for p in path.split('/'):
    tree = tree.setdefault(p, {}) if create else tree[p]
  return tree


# ---------------------------------------------------------- torch model ---


def torch_resnet18(num_classes: int = 1000):
  """torchvision's ``resnet18(weights=None)``; where torchvision cannot be
  imported, the same architecture with the same state-dict keys in plain
  torch (see tests/interop/test_resnet18.py, which checks the keys agree)."""
  try:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=num_classes)
  except Exception:  # not installed, or built for another torch
    return _plain_torch_resnet18(num_classes)


def _plain_torch_resnet18(num_classes: int):
  import torch
  from torch import nn as tnn

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(cout)
      self.relu = tnn.ReLU(inplace=True)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(cout)
      self.downsample = None
      if _has_downsample(cin, cout, stride):
        self.downsample = tnn.Sequential(
          tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
        )

    def forward(self, x):
      y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
      if self.downsample is not None:
        x = self.downsample(x)
      return self.relu(x + y)

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(64)
      self.relu = tnn.ReLU(inplace=True)
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
      cin = 64
      for s, (cout, stride) in enumerate(STAGES, 1):
        layer = tnn.Sequential(
          *[
            Block(cin if b == 0 else cout, cout, stride if b == 0 else 1)
            for b in range(BLOCKS)
          ]
        )
        setattr(self, f'layer{s}', layer)
        cin = cout
      self.avgpool = tnn.AdaptiveAvgPool2d(1)
      self.fc = tnn.Linear(512, num_classes)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      for s in range(1, 5):
        x = getattr(self, f'layer{s}')(x)
      return self.fc(torch.flatten(self.avgpool(x), 1))

  return Net()
