"""The functional core against the float64 oracle, plus its API contract."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnjax
from tests import reference as ref
from tests._helpers import randn, tol

BF16 = jnp.bfloat16


@st.composite
def bn_cases(draw):
  ndim = draw(st.integers(1, 4))
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
  n_feat = draw(st.integers(1, max(1, ndim - 1)))
  feat = draw(st.permutations(range(ndim)))[:n_feat]
  if len(feat) == ndim:  # need something to reduce over
    feat = feat[:-1] or feat
  axis = (
    feat[0] - ndim
    if len(feat) == 1 and draw(st.booleans())
    else (feat[0] if len(feat) == 1 else tuple(feat))
  )
  red = [i for i in range(ndim) if i not in feat]
  count = int(np.prod([shape[i] for i in red])) if red else 1
  if count < 2:  # training needs two values per channel
    if not red:
      return draw(bn_cases())
    shape = tuple(s + 1 if i == red[0] else s for i, s in enumerate(shape))
  dtype = draw(st.sampled_from([np.float32, np.float32, BF16, np.float16]))
  use_mask = draw(st.booleans())
  mask = None
  if use_mask:
    mshape = tuple(s if draw(st.booleans()) else 1 for s in shape)
    mask = np.random.default_rng(draw(st.integers(0, 99))).random(mshape) < 0.7
  loc = draw(st.sampled_from([0.0, 3.0, -50.0]))
  scale_ = draw(st.sampled_from([0.1, 1.0, 20.0]))
  seed = draw(st.integers(0, 2**16))
  return dict(
    shape=shape,
    axis=axis,
    dtype=dtype,
    mask=mask,
    loc=loc,
    scale=scale_,
    seed=seed,
    affine=draw(st.booleans()),
    fast=draw(st.booleans()),
    train=draw(st.booleans()),
  )


# One jitted function per static configuration, not one per example: a
# shape (and dtype, mask shape) seen before reuses its compilation.
@functools.partial(jax.jit, static_argnames=('train', 'axis', 'fast'))
def _jitted_bn(x, s, g, b, m, *, train, axis, fast):
  return bnjax.batch_norm(
    x,
    s,
    g,
    b,
    use_running_average=not train,
    axis=axis,
    momentum=0.9,
    mask=m,
    use_fast_variance=fast,
  )


@functools.partial(jax.jit, static_argnames=('axis',))
def _jitted_moments(x, m, *, axis):
  return bnjax.moments(x, axis=axis, mask=m)


@pytest.mark.heavy
@given(bn_cases())
def test_batch_norm_matches_float64_oracle(case):
  x = randn(
    case['shape'], np.float32, case['loc'], case['scale'], case['seed']
  ).astype(case['dtype'])
  feat, _ = ref.canonical_axes(x.ndim, case['axis'])
  fshape = tuple(x.shape[i] for i in feat)
  stats = bnjax.BatchStats(
    jnp.asarray(randn(fshape, seed=1)),
    jnp.asarray(1 + randn(fshape, seed=2) ** 2),
  )
  g = b = None
  if case['affine']:
    g, b = randn(fshape, seed=3), randn(fshape, seed=4)
  y, new = _jitted_bn(
    x,
    stats,
    g,
    b,
    case['mask'],
    train=case['train'],
    axis=case['axis'],
    fast=case['fast'],
  )
  ry, rm, rv = ref.batch_norm(
    np.asarray(x, np.float64),
    stats.mean,
    stats.var,
    g,
    b,
    use_running_average=not case['train'],
    axis=case['axis'],
    momentum=0.9,
    mask=case['mask'],
  )
  rtol, atol = tol(case['dtype'])
  assert y.dtype == x.dtype and y.shape == x.shape
  scale_y = 1.0 if g is None else 1.0 + np.abs(np.asarray(g)).max()
  np.testing.assert_allclose(
    np.asarray(y, np.float64), ry, rtol=rtol, atol=atol * scale_y * 10
  )
  np.testing.assert_allclose(
    new.mean, rm, rtol=2e-5, atol=2e-5 * abs(case['loc']) + 1e-6
  )
  np.testing.assert_allclose(new.var, rv, rtol=5e-5, atol=1e-6)
  chex.assert_trees_all_equal_shapes_and_dtypes(new, stats)


@pytest.mark.heavy
@given(bn_cases())
def test_moments_match_float64_oracle(case):
  x = randn(
    case['shape'], np.float32, case['loc'], case['scale'], case['seed']
  ).astype(case['dtype'])
  mean, var = _jitted_moments(x, case['mask'], axis=case['axis'])
  rm, rv, _ = ref.moments(np.asarray(x, np.float64), case['axis'], case['mask'])
  assert mean.dtype == var.dtype == jnp.float32
  np.testing.assert_allclose(
    mean, rm, rtol=1e-5, atol=1e-6 * (1 + abs(case['loc']))
  )
  np.testing.assert_allclose(var, rv, rtol=5e-5, atol=1e-6 * case['scale'] ** 2)


def test_momentum_is_flax_convention():
  x = randn((10, 3), seed=5)
  old = bnjax.BatchStats(jnp.full(3, 2.0), jnp.full(3, 3.0))
  _, new = bnjax.batch_norm(x, old, use_running_average=False, momentum=0.75)
  bm, bv, _ = ref.moments(x)
  np.testing.assert_allclose(new.mean, 0.75 * 2.0 + 0.25 * bm, rtol=1e-6)
  np.testing.assert_allclose(new.var, 0.75 * 3.0 + 0.25 * bv, rtol=1e-6)


def test_inference_returns_stats_unchanged():
  stats = bnjax.BatchStats(jnp.arange(3.0), jnp.arange(1.0, 4.0))
  x = randn((4, 3))
  y, new = bnjax.batch_norm(x, stats, use_running_average=True)
  assert new is stats
  np.testing.assert_allclose(
    y, ref.normalize(x, stats.mean, stats.var), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize('dtype', [BF16, jnp.float16])
def test_half_precision_gets_float32_stats(dtype):
  x = jnp.asarray(randn((64, 4), loc=100.0, seed=6), dtype)
  stats = bnjax.init_batch_stats(4)
  y, new = bnjax.batch_norm(x, stats, use_running_average=False)
  assert y.dtype == dtype
  assert new.mean.dtype == new.var.dtype == jnp.float32
  _, rv, _ = ref.moments(np.asarray(x, np.float64))
  np.testing.assert_allclose(new.var, 0.99 + 0.01 * rv, rtol=1e-6)
  y32, _ = bnjax.batch_norm(
    x, stats, use_running_average=False, dtype=jnp.float32
  )
  assert y32.dtype == jnp.float32


def test_stats_dtype_kept_so_jit_never_retraces():
  stats = bnjax.init_batch_stats(4, jnp.bfloat16)
  x = randn((8, 4))
  _, new = bnjax.batch_norm(x, stats, use_running_average=False)
  chex.assert_trees_all_equal_shapes_and_dtypes(new, stats)
  assert jax.tree.structure(new) == jax.tree.structure(stats)


def test_no_retrace_on_second_step():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(stats, g, b, x):
    def loss(g, b):
      y, new = bnjax.batch_norm(x, stats, g, b, use_running_average=False)
      return jnp.mean(y**2), new

    (l, new), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(g, b)
    return new, grads

  stats = bnjax.init_batch_stats(5)
  g, b = jnp.ones(5), jnp.zeros(5)
  for seed in range(3):
    stats, _ = step(stats, g, b, randn((6, 5), seed=seed))


def test_jit_equals_eager():
  x = randn((4, 3, 5), loc=2.0, seed=7)
  stats = bnjax.init_batch_stats((3,))
  args = (x, stats, jnp.full(3, 2.0), jnp.ones(3))
  kw = dict(use_running_average=False, axis=1, momentum=0.5)
  eager = bnjax.batch_norm(*args, **kw)
  jitted = jax.jit(lambda *a: bnjax.batch_norm(*a, **kw))(*args)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)


def test_vmap_over_an_ensemble():
  k = 3
  xs = randn((k, 8, 4), seed=8)
  stats = jax.vmap(lambda _: bnjax.init_batch_stats(4))(jnp.arange(k))
  gs, bs = randn((k, 4), seed=9), randn((k, 4), seed=10)
  f = lambda x, s, g, b: bnjax.batch_norm(x, s, g, b, use_running_average=False)
  ys, news = jax.vmap(f)(xs, stats, gs, bs)
  for i in range(k):
    y, new = f(xs[i], jax.tree.map(lambda a: a[i], stats), gs[i], bs[i])
    np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(news.mean[i], new.mean, rtol=1e-6)


def test_scale_and_bias_none_switch_off_the_affine():
  x = randn((6, 2), seed=11)
  s = bnjax.init_batch_stats(2)
  y0, _ = bnjax.batch_norm(x, s, use_running_average=False)
  y1, _ = bnjax.batch_norm(
    x, s, jnp.ones(2), jnp.zeros(2), use_running_average=False
  )
  np.testing.assert_allclose(y0, y1, rtol=1e-7)


def test_mask_channel_with_no_values_keeps_stats_and_is_finite():
  x = randn((6, 3), seed=12)
  mask = np.ones((6, 3), bool)
  mask[:, 1] = False
  old = bnjax.BatchStats(jnp.full(3, 5.0), jnp.full(3, 7.0))
  y, new = bnjax.batch_norm(x, old, use_running_average=False, mask=mask)
  assert np.all(np.isfinite(y))
  assert new.mean[1] == 5.0 and new.var[1] == 7.0
  grads = jax.grad(
    lambda x: jnp.sum(
      bnjax.batch_norm(x, old, use_running_average=False, mask=mask)[0] ** 2
    )
  )(x)
  assert np.all(np.isfinite(grads))


def test_running_stats_carry_no_gradient():
  x = randn((6, 3), seed=13)
  s = bnjax.init_batch_stats(3)
  g = jax.grad(
    lambda x: jnp.sum(bnjax.batch_norm(x, s, use_running_average=False)[1].var)
  )(x)
  assert np.all(g == 0)


def test_doc_pytorch_momentum_mentioned():
  for fn in (bnjax.batch_norm,):
    assert '1 - p' in fn.__doc__ and 'PyTorch' in fn.__doc__
