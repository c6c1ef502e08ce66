"""Complex input, as flax defines it: a complex mean and a real variance
E|x - mean|^2, reduced as two real channels, so exactness, sync and the
closed-form gradient carry over (against a complex128 oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import reference
from tests._helpers import randn


@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('fast', [True, False])
def test_complex_batch_norm_matches_float64_oracle(masked, fast):
  r = np.random.default_rng(0)
  x = (
    randn((32, 3, 4), seed=1) + 1j * randn((32, 3, 4), seed=2) + (3 - 4j)
  ).astype(np.complex64)
  mask = (r.uniform(size=(32, 3, 1)) < 0.7) if masked else None
  stats = bnjax.init_batch_stats(4)
  scale = jnp.asarray(randn(4, seed=4))
  y, new = bnjax.batch_norm(
    x,
    stats,
    scale,
    None,
    use_running_average=False,
    momentum=0.9,
    mask=mask,
    use_fast_variance=fast,
  )
  ry, rm, rv = reference.batch_norm(
    x,
    np.zeros(4),
    np.ones(4),
    scale,
    use_running_average=False,
    momentum=0.9,
    mask=mask,
  )
  assert y.dtype == jnp.complex64 and new.mean.dtype == jnp.complex64
  assert new.var.dtype == jnp.float32
  np.testing.assert_allclose(y, ry, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new.mean, rm, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new.var, rv, rtol=1e-6, atol=1e-6)
  # inference with the complex running mean
  y2, _ = bnjax.batch_norm(x, new, scale, use_running_average=True)
  np.testing.assert_allclose(
    y2, reference.normalize(x, rm, rv, scale), rtol=2e-5, atol=2e-5
  )


def test_complex_exact_at_large_offset():
  x = (
    randn((4096, 2), seed=5) + 1j * randn((4096, 2), seed=6) + 1e4 * (1 + 1j)
  ).astype(np.complex64)
  mean, var = bnjax.moments(x)
  rm, rv, _ = reference.moments(x)
  np.testing.assert_allclose(var, rv, rtol=1e-5)
  np.testing.assert_allclose(
    mean - 1e4 * (1 + 1j), rm - 1e4 * (1 + 1j), atol=1e-3
  )


def test_complex_gradient_matches_float64_autodiff():
  x = (randn((16, 3), seed=7) + 1j * randn((16, 3), seed=8) + 2).astype(
    np.complex64
  )
  w = randn((16, 3), seed=9) + 1j * randn((16, 3), seed=10)
  stats = bnjax.init_batch_stats(3)

  def loss(x):
    y, _ = bnjax.batch_norm(x, stats, use_running_average=False)
    return jnp.sum(jnp.real(y * w))

  def ref(x):
    mu = x.mean(0)
    var = jnp.mean(jnp.abs(x - mu) ** 2, 0)
    return jnp.sum(jnp.real((x - mu) / jnp.sqrt(var + 1e-5) * w))

  g = jax.grad(loss)(jnp.asarray(x))
  with jax.enable_x64(True):
    g_ref = jax.grad(ref)(jnp.asarray(x, jnp.complex128))
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('sync', ['gather', 'psum'])
def test_complex_sync_equals_global(sync):
  x = (
    randn((8, 6, 3), seed=11) + 1j * randn((8, 6, 3), seed=12) + (5 + 1j)
  ).astype(np.complex64)
  # psum: a complex running mean near the data's (the psum's own branch)
  m0 = np.full(3, 5 + 1j, np.complex64) if sync == 'psum' else np.zeros(3)
  stats = bnjax.BatchStats(jnp.asarray(m0), jnp.ones(3))
  f = lambda xs: bnjax.batch_norm(
    xs, stats, use_running_average=False, axis_name='i', momentum=0.5, sync=sync
  )
  y, new = jax.vmap(f, axis_name='i', out_axes=(0, None))(jnp.asarray(x))
  y_ref, m_ref, v_ref = reference.batch_norm(
    x.reshape(48, 3), m0, np.ones(3), use_running_average=False, momentum=0.5
  )
  np.testing.assert_allclose(
    np.asarray(y).reshape(48, 3), y_ref, rtol=2e-5, atol=2e-5
  )
  np.testing.assert_allclose(new.mean, m_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new.var, v_ref, rtol=1e-6, atol=1e-6)


def test_complex_errors():
  x = jnp.ones((4, 2), jnp.complex64)
  with pytest.raises(TypeError, match='dtype must be complex, as x is'):
    bnjax.batch_norm(
      x, bnjax.init_batch_stats(2), use_running_average=False, dtype=jnp.float32
    )
  with pytest.raises(
    TypeError,
    match=r'batch_renorm: x must be a real '
    'floating array, got dtype complex64',
  ):
    bnjax.batch_renorm(
      x,
      bnjax.init_renorm_stats(2),
      use_running_average=False,
      r_max=1.0,
      d_max=0.0,
    )
  with pytest.raises(TypeError, match='var must be a real floating array'):
    bnjax.normalize(x, jnp.zeros(2), jnp.ones(2, jnp.complex64))
