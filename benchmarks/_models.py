"""Models the benchmarks train: ResNet-20 (CIFAR) and ResNet-50 (ImageNet).

The BN class is an argument, so the same network runs with
``flax.linen.BatchNorm`` and ``bnjax.linen.BatchNorm``. ResNet-50 is the
v1.5 architecture of flax's ImageNet example (bottleneck blocks 3-4-6-3,
stride on the 3x3 convolution, momentum 0.9, the last BN of each block
starting at scale 0), written here.
"""

from __future__ import annotations

import functools


def resnet20(
  norm_cls, widths=(16, 32, 64), blocks=3, axis_name=None, dtype=None
):
  """The CIFAR ResNet-20 of He et al. 2016: a stem, then one stage of
  ``blocks`` basic blocks per entry of ``widths`` (the first block of each
  later stage strides 2 and projects its shortcut). ``dtype``: of the
  activations (the layers' computation), parameters float32."""
  import flax.linen as nn

  norm_cls = functools.partial(norm_cls, axis_name=axis_name, dtype=dtype)
  nn = _with_dtype(nn, dtype)

  class Block(nn.Module):
    width: int
    stride: int

    @nn.compact
    def __call__(self, x, train):
      bn = lambda: norm_cls(use_running_average=not train, momentum=0.9)
      y = nn.Conv(self.width, (3, 3), self.stride, use_bias=False)(x)
      y = nn.relu(bn()(y))
      y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
      y = bn()(y)
      if x.shape != y.shape:
        x = nn.Conv(self.width, (1, 1), self.stride, use_bias=False)(x)
        x = bn()(x)
      return nn.relu(x + y)

  class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Conv(widths[0], (3, 3), use_bias=False)(x)
      x = nn.relu(norm_cls(use_running_average=not train, momentum=0.9)(x))
      for i, w in enumerate(widths):
        for j in range(blocks):
          x = Block(w, 2 if (i > 0 and j == 0) else 1)(x, train)
      return nn.Dense(10)(x.mean((1, 2)))

  return ResNet()


def resnet50(
  norm_cls,
  axis_name=None,
  num_classes=1000,
  act=None,
  norm_act_cls=None,
  stages=(3, 4, 6, 3),
  dtype=None,
):
  """ResNet-50; ``act`` (default ReLU) after each BN that has one and after
  each residual add. ``norm_act_cls``: a BN class that applies the
  activation itself (``bnjax.linen.BatchNormAct``), used for every BN + act
  pair; the BNs without an activation stay ``norm_cls``. ``stages``: blocks
  per stage (smoke runs take one each). ``dtype``: of the activations (the
  layers' computation; bfloat16 as GPU users train), parameters float32."""
  import flax.linen as nn

  nn = _with_dtype(nn, dtype)
  act = nn.relu if act is None else act
  conv = functools.partial(nn.Conv, use_bias=False)

  def norm_then_act(norm, norm_act):
    if norm_act is None:
      return lambda x: act(norm()(x))
    return lambda x: norm_act()(x)

  class Bottleneck(nn.Module):
    filters: int
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x, norm, norm_act):
      bn_act = norm_then_act(norm, norm_act)
      y = bn_act(conv(self.filters, (1, 1))(x))
      y = bn_act(conv(self.filters, (3, 3), self.strides)(y))
      y = conv(self.filters * 4, (1, 1))(y)
      y = norm(scale_init=nn.initializers.zeros_init())(y)
      if x.shape != y.shape:
        x = conv(self.filters * 4, (1, 1), self.strides, name='conv_proj')(x)
        x = norm(name='norm_proj')(x)
      return act(x + y)

  class ResNet50(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      kw = dict(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=axis_name,
        dtype=dtype,
      )
      norm = functools.partial(norm_cls, **kw)
      norm_act = (
        None if norm_act_cls is None else functools.partial(norm_act_cls, **kw)
      )
      x = conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)])(x)
      x = norm_then_act(norm, norm_act)(x)
      x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
      for i, n in enumerate(stages):
        for j in range(n):
          strides = (2, 2) if i > 0 and j == 0 else (1, 1)
          x = Bottleneck(64 * 2**i, strides)(x, norm, norm_act)
      return nn.Dense(num_classes)(x.mean((1, 2)))

  return ResNet50()


def _with_dtype(nn, dtype):
  """flax.linen with Conv and Dense computing in ``dtype`` (None: as is)."""
  if dtype is None:
    return nn
  import types

  names = {k: getattr(nn, k) for k in dir(nn) if not k.startswith('__')}
  names['Conv'] = functools.partial(nn.Conv, dtype=dtype)
  names['Dense'] = functools.partial(nn.Dense, dtype=dtype)
  return types.SimpleNamespace(**names)


def resnet18(norm_cls, axis_name=None, num_classes=1000):
  """flax's ImageNet example ResNet-18 (examples/imagenet/models.py):
  basic blocks of stages (2, 2, 2, 2), 20 BN layers."""
  import flax.linen as nn

  conv = functools.partial(nn.Conv, use_bias=False)

  class Block(nn.Module):
    filters: int
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x, norm):
      y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
      y = norm(scale_init=nn.initializers.zeros_init())(
        conv(self.filters, (3, 3))(y)
      )
      if x.shape != y.shape:
        x = conv(self.filters, (1, 1), self.strides, name='conv_proj')(x)
        x = norm(name='norm_proj')(x)
      return nn.relu(x + y)

  class ResNet18(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      norm = functools.partial(
        norm_cls,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=axis_name,
      )
      x = conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)])(x)
      x = nn.max_pool(nn.relu(norm()(x)), (3, 3), (2, 2), padding='SAME')
      for i in range(4):
        for j in range(2):
          strides = (2, 2) if i > 0 and j == 0 else (1, 1)
          x = Block(64 * 2**i, strides)(x, norm)
      return nn.Dense(num_classes)(x.mean((1, 2)))

  return ResNet18()


def train_step(model, variables, tx, axis_name=None):
  """(step, loss) of a mutable-batch_stats SGD step of a linen classifier;
  with ``axis_name``, gradients are averaged over it (data parallel)."""
  import jax
  import optax

  def loss(params, stats, x, y):
    out, new = model.apply(
      {'params': params, 'batch_stats': stats}, x, True, mutable=['batch_stats']
    )
    l = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return l, new

  def step(params, stats, opt, x, y):
    (l, new), g = jax.value_and_grad(loss, has_aux=True)(params, stats, x, y)
    if axis_name is not None:
      g = jax.lax.pmean(g, axis_name)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), new['batch_stats'], opt, l

  return step, loss
