"""Recalibration (precise BN, ``bnjax.training.recalibrate``): the
statistics of a fixed model over many batches, against the float64
population moments of each BN input. Its other properties (pooling by
count, unreached channels, errors) are tested in test_training.py and
test_training_rigour.py, in this folder; the deprecated ``bnjax.precise``
aliases in tests/badinput/test_precise.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax.linen
import bnjax.nnx
import bnjax.training
from tests import reference as ref
from tests._helpers import randn


class _TwoBN(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4, name='d1')(x)
    x = bnjax.linen.BatchNorm(use_running_average=not train, name='bn1')(x)
    x = nn.Dense(3, name='d2')(nn.relu(x))
    return bnjax.linen.BatchNorm(use_running_average=not train, name='bn2')(x)


def _f64_population(params, batches):
  """Each BN input's pooled moments, by running the fixed model in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h1s, h2s = [], []
  for xb in np.asarray(batches, np.float64):
    h1 = xb @ p['d1']['kernel'] + p['d1']['bias']
    m, v, _ = ref.moments(h1)
    a = ref.normalize(h1, m, v, p['bn1']['scale'], p['bn1']['bias'])
    h2 = np.maximum(a, 0) @ p['d2']['kernel'] + p['d2']['bias']
    h1s.append(h1)
    h2s.append(h2)
  pool = lambda hs: (np.concatenate(hs).mean(0), np.concatenate(hs).var(0))
  return pool(h1s), pool(h2s)


def test_precise_linen_equals_f64_population_moments():
  batches = jnp.asarray(randn((6, 16, 5), loc=1.0, scale=2.0, seed=4))
  model = _TwoBN()
  v = model.init(jax.random.key(0), batches[0], True)
  new = bnjax.training.recalibrate(model, batches, True, variables=v)
  for name, (m, var) in zip(
    ('bn1', 'bn2'), _f64_population(v['params'], batches), strict=True
  ):
    np.testing.assert_allclose(
      new['batch_stats'][name]['mean'], m, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(new['batch_stats'][name]['var'], var, rtol=1e-5)
  assert new['params'] is v['params']
  with pytest.raises(ValueError, match='training mode'):
    bnjax.training.recalibrate(model, batches, False, variables=v)


def test_precise_nnx_equals_f64_population_moments():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.d = nnx.Linear(5, 4, rngs=rngs)
      self.bn = bnjax.nnx.BatchNorm(4, momentum=0.9, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.d(x))

  batches = jnp.asarray(randn((5, 8, 5), loc=-1.0, scale=3.0, seed=6))
  net = Net(nnx.Rngs(0))
  net.eval()
  bnjax.training.recalibrate(net, batches)
  h = np.concatenate(
    [
      np.asarray(b, np.float64) @ np.asarray(net.d.kernel[...], np.float64)
      + np.asarray(net.d.bias[...], np.float64)
      for b in batches
    ]
  )
  np.testing.assert_allclose(net.bn.mean[...], h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(net.bn.var[...], h.var(0), rtol=1e-5)
  assert net.bn.momentum == 0.9 and net.bn.use_running_average  # restored


def test_recalibrate_refuses_zero_batches_in_every_entry():
  """N = 0 stacked batches: the nnx entry kept every statistic silently,
  the function and linen entries blamed the model's mode."""
  empty = jnp.zeros((0, 8, 3))
  bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  lbn = bnjax.linen.BatchNorm(use_running_average=False)
  net = lambda s, x: (x, s)
  for model, kw in [
    (bn, {}),
    (lbn, {'variables': lbn.init(jax.random.key(0), jnp.zeros((8, 3)))}),
    (net, {'variables': {'bn': bnjax.init_batch_stats(3)}}),
  ]:
    with pytest.raises(ValueError, match='batches holds 0 batches'):
      bnjax.training.recalibrate(model, empty, **kw)
