"""Model train steps built from the linen and nnx modules lower for GPU and
TPU on this CPU machine (``jax.export``), and a 20-layer conv + BN step holds
no data-dependent conditional on an accelerator, synced or not, in any sync
mode. The functions' own train steps: tests/core/test_export.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax.linen
import bnjax.nnx
from bnjax._moments import dispatch
from tests._hlo import conditionals
from tests._hlo import export as _export

X = jax.ShapeDtypeStruct((16, 4, 4, 8), jnp.float32)


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3))(x)
    x = bnjax.linen.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(10)(nn.relu(x).mean((1, 2)))


def test_linen_model_step_lowers():
  model = _LinenNet()
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, False), X
  )

  def step(variables, x):
    def loss(params):
      logits, upd = model.apply(
        {**variables, 'params': params}, x, True, mutable=['batch_stats']
      )
      return jnp.sum(logits**2), upd

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
      return jnp.sum(out**2), nnx.state(model, nnx.BatchStat)

    return jax.grad(loss, has_aux=True)(state)

  assert 'stablehlo' in _export(step, state, x)


class _Deep(nn.Module):
  """20 conv + BN layers, optionally synced over a mesh axis."""

  axis_name: str | None = None
  sync: str = 'gather'

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(20):
      x = nn.Conv(8, (3, 3), use_bias=False)(x)
      x = nn.relu(
        bnjax.linen.BatchNorm(
          use_running_average=not train,
          axis_name=self.axis_name,
          sync=self.sync,
        )(x)
      )
    return x.mean((1, 2)).sum(-1)


def _deep_step(axis_name, sync='gather', devices=8):
  """The train step, under shard_map over 8 devices, or (devices > 8) under
  a vmap of that many shards, which exports the same synced program for
  a device count this machine does not have."""
  model = _Deep(axis_name, sync)
  v = jax.eval_shape(lambda x: _Deep().init(jax.random.key(0), x, False), X)

  def step(v, x):
    def loss(p):
      out, upd = model.apply(
        {**v, 'params': p}, x, True, mutable=['batch_stats']
      )
      return out.sum(), upd

    return jax.grad(loss, has_aux=True)(v['params'])

  if axis_name is None:
    return step, v
  if devices > 8:
    shards = jax.vmap(step, in_axes=(None, 0), axis_name='d')
    return lambda v, x: shards(v, x.reshape((devices, -1) + x.shape[1:])), v
  mesh = Mesh(np.array(jax.devices()[:8]), (axis_name,))
  return jax.shard_map(
    step, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=P()
  ), v


@pytest.mark.parametrize('synced', [False, True])
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_accelerator_step_has_no_data_dependent_conditional(platform, synced):
  """A 20-layer conv + BN train step exported for one accelerator holds 0
  stablehlo.case/if whose index depends on data. What remains are the
  constant-index cases of lax.platform_dependent (one pair per shared
  statistics and tangent function, not per layer), which XLA removes
  before compiling. On the CPU the flax-formula path keeps its cond."""
  step, v = _deep_step('d' if synced else None)
  text = _export(step, v, X, platforms=(platform,))
  counts = conditionals(text)
  assert counts['data'] == 0, counts
  assert counts['platform'] <= 6, counts
  cpu = conditionals(_export(step, v, X, platforms=('cpu',)))
  forced = dispatch.forced_path() == 'accelerator'  # the CI's kernel runs
  assert cpu['data'] == (0 if synced or forced else 1), cpu


@pytest.mark.parametrize('devices', [8, 1024])
@pytest.mark.parametrize('sync', ['gather', 'psum', 'auto'])
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_synced_step_has_no_data_dependent_conditional_in_any_mode(
  platform, sync, devices
):
  """Regression (issue 39): sync='psum' put a data-dependent conditional
  in every BN layer on GPU and TPU (its fallback to the gather), 20 in a
  20-layer step. No sync mode branches now, at 8 or at 1024 shards."""
  step, v = _deep_step('d', sync, devices)
  x = jax.ShapeDtypeStruct((devices * 2,) + X.shape[1:], X.dtype)
  counts = conditionals(_export(step, v, x, platforms=(platform,)))
  assert counts['data'] == 0, counts
