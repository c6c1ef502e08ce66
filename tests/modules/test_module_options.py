"""The linen and nnx modules take each option of the functions (ghost,
renorm, mask, sync) and give what the function gives; their statistics keep
flax's dtypes. The functions' own facts are in tests/core."""

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from tests import reference as ref
from tests._helpers import randn

C = 3
X = jnp.asarray(randn((8, 3), loc=2.0, scale=3.0, seed=0))


def _bn(x, s, **kw):
  return bnjax.batch_norm(x, s, use_running_average=False, **kw)


def test_linen_ghost_and_renorm_modules_match_the_functions():
  v_bn = bnjax.linen.BatchNorm(virtual_batch_size=4, momentum=0.5)
  v = v_bn.init(jax.random.key(0), X, use_running_average=False)
  y, upd = v_bn.apply(v, X, use_running_average=False, mutable=['batch_stats'])
  y2, new = _bn(
    X, bnjax.init_batch_stats(3), virtual_batch_size=4, momentum=0.5
  )
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['mean'], new.mean, rtol=1e-6)

  m = bnjax.linen.BatchRenorm(use_running_average=False, r_max=2.0)
  v = m.init(jax.random.key(0), X)
  y, upd = m.apply(v, X, d_max=0.5, mutable=['batch_stats'])
  y2, new = bnjax.batch_renorm(
    X,
    bnjax.init_renorm_stats(3),
    use_running_average=False,
    r_max=2.0,
    d_max=0.5,
  )
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['std'], new.std, rtol=1e-6)


def test_nnx_ghost_and_renorm_modules_match_the_functions():
  bn = bnjax.nnx.BatchNorm(
    3, virtual_batch_size=2, momentum=0.5, rngs=nnx.Rngs(0)
  )
  y = bn(X)
  y2, new = _bn(
    X, bnjax.init_batch_stats(3), virtual_batch_size=2, momentum=0.5
  )
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], new.var, rtol=1e-6)
  m = bnjax.nnx.BatchRenorm(3, r_max=1.5, d_max=0.2, rngs=nnx.Rngs(0))
  y = m(X)
  y2, new = bnjax.batch_renorm(
    X,
    bnjax.init_renorm_stats(3),
    use_running_average=False,
    r_max=1.5,
    d_max=0.2,
  )
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_allclose(m.mean[...], new.mean, rtol=1e-6)
  m.eval()
  np.testing.assert_allclose(m(X), (X - m.mean[...]) / m.std[...], atol=1e-5)


def test_empty_masked_channel_in_linen_and_nnx_modules():
  """A channel with no masked-in value is normalized with the running
  statistics (mean 0, var 1 at init), as the functions do."""
  x = jnp.asarray(randn((8, 2), loc=3.0, seed=2))
  mask = jnp.array([[True, False]] * 8)
  lin = bnjax.linen.BatchNorm(use_running_average=False)
  v = lin.init(jax.random.key(0), x)
  y, _ = lin.apply(v, x, mask=mask, mutable=['batch_stats'])
  np.testing.assert_allclose(y[:, 1], x[:, 1] / np.sqrt(1 + 1e-5), rtol=1e-5)
  m = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
    m(x, mask=mask)[:, 1], x[:, 1] / np.sqrt(1 + 1e-5), rtol=1e-5
  )


def test_linen_and_nnx_modules_take_sync():
  """The modules default to sync='auto' and keep what they are given; a
  synced linen layer's statistics are the global batch's by either path."""
  assert bnjax.linen.BatchNorm().sync == 'auto'
  assert bnjax.nnx.BatchNorm(3, sync='psum', rngs=nnx.Rngs(0)).sync == 'psum'
  x = jnp.asarray(randn((4, 8, C), loc=3.0, seed=6))
  mean, var, _ = ref.moments(np.asarray(x).reshape(-1, C))
  for sync in ('gather', 'psum'):
    m = bnjax.linen.BatchNorm(
      use_running_average=False, axis_name='v', sync=sync, momentum=0.0
    )
    v = m.init(jax.random.key(0), x[0])
    _, upd = jax.vmap(
      lambda xi, m=m, v=v: m.apply(v, xi, mutable=['batch_stats']),
      axis_name='v',
    )(x)
    np.testing.assert_allclose(upd['batch_stats']['mean'][0], mean, rtol=1e-6)
    np.testing.assert_allclose(upd['batch_stats']['var'][0], var, rtol=1e-5)


def test_linen_keeps_float64_statistics_for_float64_input():
  """Regression: float64 input to bnjax.linen.BatchNorm stored float32
  statistics where flax keeps float64 (at 1e12 an eval output was then off
  by 4.3e3)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(26)
    x = jnp.asarray(1e12 + 1e3 * rng.standard_normal((64, C)))
    out = {}
    for name, bn in (
      ('flax', flax.linen.BatchNorm),
      ('bnjax', bnjax.linen.BatchNorm),
    ):
      m = bn(use_running_average=False, momentum=0.0)
      v = m.init(jax.random.key(0), x)
      _, upd = m.apply(v, x, mutable=['batch_stats'])
      y = bn(use_running_average=True).apply({**v, **upd}, x)
      out[name] = (upd['batch_stats'], y)
    stats, y = out['bnjax']
    assert stats['mean'].dtype == out['flax'][0]['mean'].dtype == jnp.float64
    mean, var, _ = ref.moments(np.asarray(x))
    np.testing.assert_allclose(stats['mean'], mean, rtol=1e-15)
    np.testing.assert_allclose(stats['var'], var, rtol=1e-9)
    np.testing.assert_allclose(
      y, ref.normalize(np.asarray(x), mean, var), rtol=1e-6, atol=1e-6
    )


def test_linen_float16_param_dtype_stores_float32_statistics():
  """Regression: param_dtype=float16 with force_float32_reductions=False
  stored a batch variance of 1.6e5 as float16 inf; flax's variable becomes
  float32 at the first update (float32 input) and stores it."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 3)) * 400)
  got = []
  for cls in (flax.linen.BatchNorm, bnjax.linen.BatchNorm):
    m = cls(
      use_running_average=False,
      param_dtype=jnp.float16,
      momentum=0.0,
      force_float32_reductions=False,
    )
    _, upd = m.apply(m.init(jax.random.key(0), x), x, mutable=['batch_stats'])
    got.append(upd['batch_stats'])
  assert got[1]['var'].dtype == got[0]['var'].dtype == jnp.float32
  assert np.all(np.isfinite(got[1]['var'])) and got[1]['var'].min() > 6.5e4
  np.testing.assert_allclose(got[1]['var'], got[0]['var'], rtol=1e-5)
