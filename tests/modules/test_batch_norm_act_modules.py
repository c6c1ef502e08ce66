"""BatchNormAct (linen, nnx, Equinox): a drop-in for the framework's
BatchNorm followed by the activation, with the same variables."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.equinox
import bnjax.linen
import bnjax.nnx
from tests._helpers import randn

C = 4
X = jnp.asarray(randn((8, 3, C), loc=1.0, scale=2.0))
W = jnp.asarray(randn((8, 3, C), seed=1))


def _close(a, b, rtol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    u, v = np.asarray(u), np.asarray(v)
    assert np.max(np.abs(u - v)) <= rtol * max(np.max(np.abs(v)), 1e-6)


@pytest.mark.parametrize(
  'activation, fn',
  [('leaky_relu', nn.leaky_relu), ('elu', nn.elu), ('identity', lambda y: y)],
)
def test_linen_equals_flax_batch_norm_then_activation(activation, fn):
  ours = bnjax.linen.BatchNormAct(momentum=0.9, activation=activation)
  flax_bn = nn.BatchNorm(momentum=0.9)
  v = flax_bn.init(jax.random.key(0), X, use_running_average=True)
  v = {
    'params': {'scale': 1.0 + jnp.arange(C) / 4, 'bias': jnp.arange(C) / 8},
    'batch_stats': v['batch_stats'],
  }
  assert jax.tree.structure(
    ours.init(jax.random.key(0), X, use_running_average=True)
  ) == jax.tree.structure(v)

  def loss(module, post):
    def f(params, x):
      y, upd = module.apply(
        {**v, 'params': params},
        x,
        use_running_average=False,
        mutable=['batch_stats'],
      )
      return jnp.sum(W * post(y)), upd

    return jax.grad(f, (0, 1), has_aux=True)(v['params'], X)

  got = loss(ours, lambda y: y)
  want = loss(flax_bn, fn)
  _close(got, want)
  for train in (True, False):
    y = ours.apply(v, X, use_running_average=not train, mutable=True)[0]
    y0 = flax_bn.apply(v, X, use_running_average=not train, mutable=True)[0]
    _close(y, fn(y0))


def test_nnx_equals_batch_norm_then_leaky_relu_under_nnx_jit():
  ours = bnjax.nnx.BatchNormAct(C, momentum=0.9, rngs=nnx.Rngs(0))
  plain = bnjax.nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))

  @nnx.jit(static_argnums=1)
  def step(model, post):
    def f(model):
      return jnp.sum(W * post(model(X)))

    return nnx.grad(f)(model)

  g = step(ours, lambda y: y)
  g0 = step(plain, nnx.leaky_relu)
  _close(nnx.state(g, nnx.Param), nnx.state(g0, nnx.Param))
  _close(nnx.state(ours, nnx.BatchStat), nnx.state(plain, nnx.BatchStat))
  ours.eval()
  plain.eval()
  _close(ours(X), nnx.leaky_relu(plain(X)))
  graphdef, state = nnx.split(ours)
  assert nnx.merge(graphdef, state).activation == bnjax.LeakyReLU(0.01)


def test_equinox_equals_batch_norm_then_elu_under_vmap():
  kw = dict(axis_name='batch', momentum=0.9)
  ours, state = eqx.nn.make_with_state(bnjax.equinox.BatchNormAct)(
    C, activation='elu', **kw
  )
  plain, state0 = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, **kw)
  x = X.reshape(8, 3 * C // C, C).transpose(0, 2, 1)  # (batch, C, 3)

  def loss(model, state, post):
    def f(model):
      y, new = jax.vmap(
        model, axis_name='batch', in_axes=(0, None), out_axes=(0, None)
      )(x, state)
      return jnp.sum(jnp.sin(post(y))), new

    return eqx.filter_grad(f, has_aux=True)(model)

  g, new = loss(ours, state, lambda y: y)
  g0, new0 = loss(plain, state0, jax.nn.elu)
  _close((g.weight, g.bias), (g0.weight, g0.bias))
  _close(new.get(ours.state_index), new0.get(plain.state_index))


@pytest.mark.parametrize(
  'make',
  [
    lambda **kw: bnjax.linen.BatchNormAct(**kw).init(
      jax.random.key(0), X, use_running_average=False
    ),
    lambda **kw: bnjax.nnx.BatchNormAct(C, rngs=nnx.Rngs(0), **kw),
    lambda **kw: bnjax.equinox.BatchNormAct(C, **kw),
  ],
  ids=['linen', 'nnx', 'equinox'],
)
def test_modules_refuse_relu_and_bad_parameters(make):
  with pytest.raises(ValueError, match='BatchNormAct: .*leaky'):
    make(activation='relu')
  with pytest.raises(ValueError, match='negative_slope=-0.1 must be'):
    make(activation=bnjax.LeakyReLU(-0.1))
  with pytest.raises(TypeError, match='scale_floor must be a Python number'):
    make(scale_floor=jnp.float32(1e-3) + jnp.zeros(()))


def test_modules_refuse_complex_input():
  x = X.astype(jnp.complex64)
  with pytest.raises(TypeError, match='BatchNormAct'):
    bnjax.linen.BatchNormAct().init(
      jax.random.key(0), x, use_running_average=False
    )


def test_nnx_attributes_changed_after_construction_are_checked_again():
  """Regression (hostile review): nnx attributes are public; setting
  scale_floor to 0 after construction gave silent NaN gradients, and
  activation='relu' a bare "'str' object is not callable"."""
  bn = bnjax.nnx.BatchNormAct(3, rngs=nnx.Rngs(0))
  x = jnp.arange(24.0).reshape(8, 3)
  bn.scale_floor = 0.0
  with pytest.raises(ValueError, match='scale_floor=0.0'):
    bn(x)
  bn.scale_floor, bn.activation = 1e-3, 'relu'
  with pytest.raises(ValueError, match='leaky'):
    bn(x)
