"""Gradients: closed-form custom_jvp checked in float64, both modes, order 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bnjax
from tests._helpers import full_size_residuals, randn

CONFIGS = [
  dict(shape=(5, 3), axis=-1, mask=None, affine=True),
  dict(shape=(2, 3, 4), axis=1, mask=None, affine=True),
  dict(shape=(3, 2, 2, 3), axis=(1, 3), mask=None, affine=False),
  dict(shape=(6, 3), axis=-1, mask='rows', affine=True),
  dict(shape=(4, 2, 3), axis=-1, mask='full', affine=True),
]


def _mask(cfg):
  rng = np.random.default_rng(0)
  if cfg['mask'] == 'rows':
    return rng.random((cfg['shape'][0], 1)) < 0.6
  if cfg['mask'] == 'full':
    m = rng.random(cfg['shape']) < 0.7
    m[0] = True
    return m
  return None


def _problem(cfg):
  x = randn(cfg['shape'], np.float64, loc=1.5, scale=2.0, seed=1)
  feat = tuple(
    sorted(a % len(cfg['shape']) for a in np.atleast_1d(cfg['axis']))
  )
  fshape = tuple(cfg['shape'][a] for a in feat)
  g = 1 + randn(fshape, np.float64, seed=2) ** 2
  b = randn(fshape, np.float64, seed=3)
  w = randn(cfg['shape'], np.float64, seed=4)
  stats = bnjax.init_batch_stats(fshape, jnp.float64)
  mask = _mask(cfg)

  def f(x, g, b, eps):
    y, _ = bnjax.batch_norm(
      x,
      stats,
      g if cfg['affine'] else None,
      b if cfg['affine'] else None,
      use_running_average=False,
      axis=cfg['axis'],
      mask=mask,
      epsilon=eps,
    )
    return jnp.sum(w * y + 0.5 * jnp.sin(2.0 * y))

  return f, (x, g, b, jnp.float64(1e-3))


@pytest.mark.parametrize('cfg', CONFIGS)
def test_check_grads_order2_fwd_and_rev(cfg):
  with jax.enable_x64(True):
    f, (x, g, b, _) = _problem(cfg)
    # check_grads steps every argument by ~1e-4; keep epsilon large next to it.
    args = (x, g, b, jnp.float64(0.5))
    # jitted: the un-jitted check ran every derivative op by op (twice the time).
    check_grads(
      jax.jit(f), args, order=2, modes=('fwd', 'rev'), atol=1e-5, rtol=1e-5
    )


def _central_difference(f, x):
  """Richardson-extrapolated central differences (error O(h^4))."""
  flat = np.array(x, np.float64).ravel()
  h = min(1e-4, 0.02 * float(np.max(np.abs(flat))))
  out = np.empty_like(flat)
  for i in range(flat.size):

    def at(d):
      z = flat.copy()
      z[i] += d
      return float(f(z.reshape(np.shape(x))))

    d1 = (at(h) - at(-h)) / (2 * h)
    d2 = (at(h / 2) - at(-h / 2)) / h
    out[i] = (4 * d2 - d1) / 3
  return out.reshape(np.shape(x))


@pytest.mark.parametrize('cfg', CONFIGS)
def test_gradient_matches_central_difference_to_1e9(cfg):
  with jax.enable_x64(True):
    f, (x, g, b, eps) = _problem(cfg)
    fj = jax.jit(f)
    gx, gg, gb, geps = jax.grad(fj, (0, 1, 2, 3))(x, g, b, eps)
    for got, wrt in [(gx, 0), (gg, 1), (gb, 2), (geps, 3)]:
      args = [x, g, b, eps]

      def fi(v, wrt=wrt):
        a = list(args)
        a[wrt] = jnp.asarray(v)
        return fj(*a)

      num = _central_difference(fi, args[wrt])
      if not cfg['affine'] and wrt in (1, 2):
        assert np.all(np.asarray(got) == 0)
        continue
      err = np.max(np.abs(np.asarray(got) - num)) / np.max(np.abs(num))
      assert err <= 1e-9, (wrt, err)


def test_forward_mode_jvp_jacfwd_hessian():
  with jax.enable_x64(True):
    f, (x, g, b, eps) = _problem(CONFIGS[0])
    jr = jax.jacrev(f)(x, g, b, eps)
    jf = jax.jacfwd(f)(x, g, b, eps)
    np.testing.assert_allclose(jf, jr, rtol=1e-10, atol=1e-12)
    h = jax.hessian(f)(x, g, b, eps)
    np.testing.assert_allclose(
      h.reshape(15, 15), h.reshape(15, 15).T, atol=1e-9
    )
    v = randn(x.shape, np.float64, seed=9)
    _, t = jax.jvp(lambda x: f(x, g, b, eps), (x,), (v,))
    np.testing.assert_allclose(t, np.sum(jr * v), rtol=1e-10)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_backward_keeps_one_full_size_residual(dtype):
  # Flax keeps two full-size arrays; bnjax keeps x (in its own dtype) only.
  x = jnp.asarray(randn((8, 4, 4, 6)), dtype)
  s = bnjax.init_batch_stats(6)

  def f(x, g, b):
    return bnjax.batch_norm(x, s, g, b, use_running_average=False)[0]

  res = full_size_residuals(f, x, jnp.ones(6), jnp.zeros(6))
  assert len(res) == 1, res
  assert res[0][0].dtype == dtype


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_a_masked_out_nan_reaches_nothing(jit, bad):
  """Regression (the where double-branch trap): a NaN or inf in a masked-out
  entry gave a NaN gradient in its channel. The masked-in outputs, the
  statistics and every gradient of a loss over the masked-in outputs equal
  those with a 0 there (a masked-out output is unspecified, as in flax)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((8, 3)) * 2 + 1, jnp.float32)
  m = jnp.ones((8, 3), bool).at[0, 1].set(False).at[5, 2].set(False)
  stats = bnjax.init_batch_stats(3)

  def loss(x, g, b):
    y, new = bnjax.batch_norm(x, stats, g, b, use_running_average=False, mask=m)
    w = jnp.where(m, jnp.arange(1.0, 25.0).reshape(8, 3), 0.0)
    return jnp.sum(jnp.where(m, jnp.sin(y), 0.0) * w), (jnp.where(m, y, 0), new)

  f = jax.grad(loss, (0, 1, 2), has_aux=True)
  f = jax.jit(f) if jit else f
  g, b = jnp.full(3, 1.5), jnp.full(3, 0.1)
  got = f(x.at[0, 1].set(bad).at[5, 2].set(-bad), g, b)
  want = f(x.at[0, 1].set(0.0).at[5, 2].set(0.0), g, b)
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-6)
