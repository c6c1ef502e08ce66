"""Each variant's own facts: exact formulas, first steps, errors, modules, precise BN."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
import bnjax.precise
from tests import reference as ref
from tests._helpers import randn

X = jnp.asarray(randn((8, 3), loc=2.0, scale=3.0, seed=0))


def _bn(x, s, **kw):
  return bnjax.batch_norm(x, s, use_running_average=False, **kw)


# ---- cumulative average and zero-debiased EMA -------------------------------

def test_cumulative_first_step_is_the_batch_and_then_the_plain_average():
  s = bnjax.init_cumulative_stats(3)
  batches = [X, X * 2 + 1, X[:5] - 3]
  means, vars_ = [], []
  for i, x in enumerate(batches):
    _, s = _bn(x, s, momentum=0.3)  # momentum is not used by this rule
    bm, bv, _ = ref.moments(x)
    means.append(bm)
    vars_.append(bv)
    if i == 0:  # exactly the batch statistics, not a 99% pull to 0 and 1
      np.testing.assert_array_equal(s.mean, bnjax.moments(x)[0])
    np.testing.assert_allclose(s.mean, np.mean(means, 0), rtol=1e-6)
    np.testing.assert_allclose(s.var, np.mean(vars_, 0), rtol=1e-5)
  assert s.count.dtype == jnp.int32
  np.testing.assert_array_equal(s.count, [3, 3, 3])


def test_cumulative_skips_channels_with_no_valid_values():
  mask = jnp.broadcast_to(jnp.array([True, True, False]), X.shape)
  s0 = bnjax.init_cumulative_stats(3)
  _, s = _bn(X, s0, mask=mask)
  np.testing.assert_array_equal(s.count, [1, 1, 0])
  assert s.mean[2] == 0 and s.var[2] == 1


def test_debiased_first_step_is_exact_and_variance_is_not_inflated():
  """Regression: equinox starts the variance EMA at 1 but debiases it as if it
  started at 0, so after one step at momentum 0.99 its inference variance is
  about var + 99. Both hidden EMAs here start at 0."""
  s = bnjax.init_debiased_stats(3)
  pop = bnjax.population_stats(s)
  np.testing.assert_array_equal(pop.mean, 0)
  np.testing.assert_array_equal(pop.var, 1)
  _, s = _bn(X, s, momentum=0.99)
  bm, bv, _ = ref.moments(X)
  pop = bnjax.population_stats(s)
  np.testing.assert_allclose(pop.mean, bm, rtol=1e-5)
  np.testing.assert_allclose(pop.var, bv, rtol=1e-5)
  # equinox's rule (EMA from 1, debiased as if from 0) would give about
  # bv + 99 here; bnjax's variance is nowhere near it. (This compared the
  # formula with itself before, a test that could not fail.)
  equinox_var = (0.99 * 1 + 0.01 * bv) / (1 - 0.99)
  assert np.all(equinox_var - np.asarray(pop.var) > 98)
  # After t steps with a fixed momentum the weight is 1 - m**t (optax/haiku).
  for _ in range(4):
    _, s = _bn(X, s, momentum=0.99)
  np.testing.assert_allclose(s.weight, 1 - 0.99 ** 5, rtol=1e-5)
  np.testing.assert_allclose(bnjax.population_stats(s).var, bv, rtol=1e-5)


def test_inference_uses_the_population_statistics():
  s = bnjax.init_debiased_stats(3)
  _, s = _bn(X, s, momentum=0.9)
  y, same = bnjax.batch_norm(X, s, use_running_average=True, epsilon=1e-3)
  assert same is s
  bm, bv, _ = ref.moments(X)
  np.testing.assert_allclose(y, ref.normalize(X, bm, bv, epsilon=1e-3),
                             atol=2e-5, rtol=2e-5)


# ---- batch renorm -----------------------------------------------------------

def test_renorm_errors_name_the_fix():
  s = bnjax.init_renorm_stats(3)
  kw = dict(use_running_average=False)
  with pytest.raises(ValueError, match=r'r_max=0.5 must be >= 1'):
    bnjax.batch_renorm(X, s, r_max=0.5, d_max=1.0, **kw)
  with pytest.raises(ValueError, match=r'd_max=-1.0 must be >= 0'):
    bnjax.batch_renorm(X, s, r_max=2.0, d_max=-1.0, **kw)
  with pytest.raises(TypeError, match=r'RenormStats\(mean, std\), got '
                     r'BatchStats.*init_renorm_stats.*jnp.sqrt'):
    bnjax.batch_renorm(X, bnjax.init_batch_stats(3), r_max=2.0, d_max=1.0,
                       **kw)
  with pytest.raises(TypeError, match=r'got RenormStats'):
    bnjax.batch_norm(X, s, **kw)


def test_renorm_with_no_room_is_plain_bn():
  s = bnjax.RenormStats(jnp.array([5.0, -1, 0]), jnp.array([0.1, 3, 9]))
  y, _ = bnjax.batch_renorm(X, s, use_running_average=False, r_max=1.0,
                            d_max=0.0)
  y_bn, _ = _bn(X, bnjax.init_batch_stats(3))
  np.testing.assert_allclose(y, y_bn, atol=1e-6)


def test_renorm_limits_are_traced_so_a_schedule_never_retraces():
  s = bnjax.RenormStats(jnp.array([1.0, 2, 3]), jnp.array([0.5, 1, 2]))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, s, r_max, d_max):
    return bnjax.batch_renorm(x, s, use_running_average=False, r_max=r_max,
                              d_max=d_max)

  outs = [step(X, s, jnp.float32(r), jnp.float32(d))[0]
          for r, d in [(1, 0), (1.5, 0.5), (3, 5)]]
  assert not np.allclose(outs[0], outs[2])
  chex.clear_trace_counter()


def test_renorm_gradient_treats_r_and_d_as_constants():
  with jax.enable_x64(True):
    x = jnp.asarray(X, jnp.float64)
    g, b = jnp.array([1.0, 2, 0.5]), jnp.array([0.1, 0, -1])
    s = bnjax.RenormStats(jnp.array([2.2, 1.5, 2.0]),
                          jnp.array([2.5, 3.5, 3.0]))  # r, d not clipped

    def direct(x, g, b):  # the paper's formula, autodiffed
      mu, var = jnp.mean(x, 0), jnp.var(x, 0)
      sig = jnp.sqrt(var + 1e-5)
      r = jax.lax.stop_gradient(jnp.clip(sig / s.std, 1 / 3, 3))
      d = jax.lax.stop_gradient(jnp.clip((mu - s.mean) / s.std, -5, 5))
      return ((x - mu) / sig * r + d) * g + b

    ours = lambda x, g, b: bnjax.batch_renorm(
        x, s, g, b, use_running_average=False, r_max=3.0, d_max=5.0)[0]
    ct = jnp.asarray(randn(X.shape, np.float64, seed=5))
    loss = lambda f: lambda *a: jnp.vdot(f(*a), ct)
    np.testing.assert_allclose(ours(x, g, b), direct(x, g, b), rtol=1e-12)
    for a, c in zip(jax.grad(loss(ours), (0, 1, 2))(x, g, b),
                    jax.grad(loss(direct), (0, 1, 2))(x, g, b)):
      np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)


# ---- ghost batch norm -------------------------------------------------------

def test_ghost_equals_batch_norm_on_each_chunk():
  x = jnp.asarray(randn((12, 2, 3), loc=1.0, seed=3))
  s = bnjax.init_batch_stats(3)
  y, new = _bn(x, s, virtual_batch_size=4, momentum=0.5)
  chunks = [_bn(x[i:i + 4], s, momentum=0.5) for i in range(0, 12, 4)]
  np.testing.assert_allclose(y, jnp.concatenate([c[0] for c in chunks]),
                             atol=1e-6)
  np.testing.assert_allclose(new.mean, np.mean([c[1].mean for c in chunks], 0),
                             rtol=1e-6)


def test_ghost_errors():
  s = bnjax.init_batch_stats(3)
  with pytest.raises(ValueError, match=r'batch size 8 on axis 0, which '
                     r'virtual_batch_size=3 does not divide.*for example 2 or 4'):
    _bn(X, s, virtual_batch_size=3)
  with pytest.raises(ValueError, match='axis 0 is a feature axis'):
    _bn(X.T, bnjax.init_batch_stats(3), axis=0, virtual_batch_size=1)


# ---- frozen BN --------------------------------------------------------------

def test_frozen_trains_the_affine_only():
  s = bnjax.BatchStats(jnp.array([1.0, 2, 3]), jnp.array([4.0, 1, 2]))
  g, b = jnp.ones(3), jnp.zeros(3)

  def loss(g, b, s):
    y, new = bnjax.frozen_batch_norm(X, s, g, b)
    return jnp.sum(y ** 2), new

  (_, new), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(g, b, s)
  jax.tree.map(np.testing.assert_array_equal, new, s)
  assert np.all(np.abs(grads[0]) > 0) and np.all(np.abs(grads[1]) > 0)
  np.testing.assert_array_equal(grads[2].mean, 0)
  np.testing.assert_array_equal(grads[2].var, 0)


# ---- modules ----------------------------------------------------------------

def test_linen_ghost_and_renorm_modules_match_the_functions():
  v_bn = bnjax.linen.BatchNorm(virtual_batch_size=4, momentum=0.5)
  v = v_bn.init(jax.random.key(0), X, use_running_average=False)
  y, upd = v_bn.apply(v, X, use_running_average=False, mutable=['batch_stats'])
  y2, new = _bn(X, bnjax.init_batch_stats(3), virtual_batch_size=4,
                momentum=0.5)
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['mean'], new.mean, rtol=1e-6)

  m = bnjax.linen.BatchRenorm(use_running_average=False, r_max=2.0)
  v = m.init(jax.random.key(0), X)
  y, upd = m.apply(v, X, d_max=0.5, mutable=['batch_stats'])
  y2, new = bnjax.batch_renorm(X, bnjax.init_renorm_stats(3),
                               use_running_average=False, r_max=2.0, d_max=0.5)
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['std'], new.std, rtol=1e-6)


def test_nnx_ghost_and_renorm_modules_match_the_functions():
  bn = bnjax.nnx.BatchNorm(3, virtual_batch_size=2, momentum=0.5,
                           rngs=nnx.Rngs(0))
  y = bn(X)
  y2, new = _bn(X, bnjax.init_batch_stats(3), virtual_batch_size=2,
                momentum=0.5)
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], new.var, rtol=1e-6)
  m = bnjax.nnx.BatchRenorm(3, r_max=1.5, d_max=0.2, rngs=nnx.Rngs(0))
  y = m(X)
  y2, new = bnjax.batch_renorm(X, bnjax.init_renorm_stats(3),
                               use_running_average=False, r_max=1.5, d_max=0.2)
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_allclose(m.mean[...], new.mean, rtol=1e-6)
  m.eval()
  np.testing.assert_allclose(m(X), (X - m.mean[...]) / m.std[...], atol=1e-5)


# ---- precise BN -------------------------------------------------------------

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
  new = bnjax.precise.linen_batch_stats(model, v, batches, True)
  for name, (m, var) in zip(('bn1', 'bn2'), _f64_population(v['params'],
                                                            batches)):
    np.testing.assert_allclose(new['batch_stats'][name]['mean'], m, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(new['batch_stats'][name]['var'], var,
                               rtol=1e-5)
  assert new['params'] is v['params']
  with pytest.raises(ValueError, match='training mode'):
    bnjax.precise.linen_batch_stats(model, v, batches, False)


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
  bnjax.precise.update_nnx_batch_stats(net, batches)
  h = np.concatenate([np.asarray(b, np.float64) @ np.asarray(net.d.kernel[...],
                      np.float64) + np.asarray(net.d.bias[...], np.float64)
                      for b in batches])
  np.testing.assert_allclose(net.bn.mean[...], h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(net.bn.var[...], h.var(0), rtol=1e-5)
  assert net.bn.momentum == 0.9 and net.bn.use_running_average  # restored
