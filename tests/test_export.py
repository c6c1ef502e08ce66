"""The GPU and TPU paths lower on this CPU machine (``jax.export``).

Each train step below is exported for ``('cuda', 'rocm', 'tpu')`` at once,
so every CI run proves that bnjax's code lowers for those backends. It does
not run there: execution speed and results on accelerators are not checked.
The synced step's lowered module must hold exactly one collective in the
forward (an all-gather of every shard's partial) and one in the backward.
"""

import re

import flax.linen as nn
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

import bnjax
import bnjax.linen
import bnjax.nnx

PLATFORMS = ('cuda', 'rocm', 'tpu')
X = jax.ShapeDtypeStruct((16, 4, 4, 8), jnp.float32)


def _export(fn, *args, platforms=PLATFORMS):
  exp = jax_export.export(jax.jit(fn), platforms=platforms)(*args)
  assert tuple(exp.platforms) == platforms
  return exp.mlir_module()


def _grad_step(layer):
  """The gradient of a scalar loss of one BN layer, and its new statistics."""
  def step(x, g, b):
    def loss(x, g, b):
      y, new = layer(x, g, b)
      return jnp.sum(jnp.sin(y)), new
    return jax.grad(loss, (0, 1, 2), has_aux=True)(x, g, b)
  return step


G = B = jax.ShapeDtypeStruct((8,), jnp.float32)


@pytest.mark.parametrize('name, layer', [
    ('batch_norm', lambda x, g, b: bnjax.batch_norm(
        x, bnjax.init_batch_stats(8), g, b, use_running_average=False)),
    ('batch_norm mask', lambda x, g, b: bnjax.batch_norm(
        x, bnjax.init_batch_stats(8), g, b, use_running_average=False,
        mask=jnp.arange(16)[:, None, None, None] < 12)),
    ('batch_renorm', lambda x, g, b: bnjax.batch_renorm(
        x, bnjax.init_renorm_stats(8), g, b, use_running_average=False,
        r_max=3.0, d_max=5.0)),
    ('ghost', lambda x, g, b: bnjax.batch_norm(
        x, bnjax.init_batch_stats(8), g, b, use_running_average=False,
        virtual_batch_size=4)),
])
def test_train_step_lowers_for_gpu_and_tpu(name, layer):
  text = _export(_grad_step(layer), X, G, B)
  assert 'stablehlo' in text, name


def test_synced_step_lowers_with_one_collective_each_way():
  mesh = Mesh(np.array(jax.devices()[:8]), ('d',))
  stats = bnjax.init_batch_stats(8)

  def local(x):  # scale/bias off: their gradients need their own psum
    def loss(x):
      y, new = bnjax.batch_norm(x, stats, use_running_average=False,
                                axis_name='d')
      return jnp.sum(jnp.sin(y)), new
    return jax.grad(loss, has_aux=True)(x)
  step = jax.shard_map(local, mesh=mesh, in_specs=P('d'),
                       out_specs=(P('d'), P()))
  assert 'stablehlo' in _export(step, X)
  # One platform at a time: a multi-platform module holds a copy of each op
  # that lowers differently per platform (the all-gather does).
  for platform in PLATFORMS:
    text = _export(step, X, platforms=(platform,))
    ops = re.findall(r'stablehlo\.(all_reduce|all_gather|reduce_scatter|'
                     r'collective_permute|all_to_all)\b', text)
    assert sorted(ops) == ['all_gather', 'all_reduce'], (platform, ops)


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3))(x)
    x = bnjax.linen.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(10)(nn.relu(x).mean((1, 2)))


def test_linen_model_step_lowers():
  model = _LinenNet()
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, False),
                             X)

  def step(variables, x):
    def loss(params):
      logits, upd = model.apply({**variables, 'params': params}, x, True,
                                mutable=['batch_stats'])
      return jnp.sum(logits ** 2), upd
    return jax.grad(loss, has_aux=True)(variables['params'])
  assert 'stablehlo' in _export(step, variables, X)


def test_nnx_model_step_lowers():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(4, 8, (3, 3), rngs=rngs)
      self.bn = bnjax.nnx.BatchNorm(8, rngs=rngs)
      self.out = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((16, 4, 4, 4), jnp.float32)

  def step(state, x):
    def loss(state):
      model = nnx.merge(graphdef, state)
      out = model(x)
      return jnp.sum(out ** 2), nnx.state(model, nnx.BatchStat)
    return jax.grad(loss, has_aux=True)(state)
  assert 'stablehlo' in _export(step, state, x)
