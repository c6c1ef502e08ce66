"""Gradient accumulation in the functional core: k micro-batches pooled into a
PooledStats and applied once equal one batch_norm call on the k micro-batches
concatenated, against the float64 whole-batch oracle (tests/reference.py), at
any |mean|/std, with masks, uneven micro-batches, lax.scan and sync."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref
from tests._helpers import randn
from tests._sync import _mesh

C = 4


def _micro(sizes, shape=(), loc=1.0, scale=2.0, seed=0):
  return [
    jnp.asarray(randn((n, *shape, C), loc=loc, scale=scale, seed=seed + i))
    for i, n in enumerate(sizes)
  ]


def _pool(xs, masks=None, **kw):
  pool = bnjax.init_pooled_stats(C)
  step = jax.jit(
    lambda x, p, m: bnjax.batch_norm(
      x, p, use_running_average=False, mask=m, **kw
    )
  )
  ys = []
  for i, x in enumerate(xs):
    y, pool = step(x, pool, None if masks is None else masks[i])
    ys.append(y)
  return ys, pool


def _rel(a, b):
  return np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b))


@pytest.mark.parametrize('ratio', [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize('shape', [(), (3, 3)], ids=['2d', '4d'])
def test_pool_is_the_float64_moments_of_the_concatenated_batch(ratio, shape):
  """Within 1e-6 relative of float64 at |mean|/std up to 1e6, 2-D and 4-D,
  uneven micro-batches: the pooled mean keeps its low-order part
  (mean_lo), without which the spread of the micro-batch means is lost to
  the rounding of a large mean (5.7e-5 off at 1e4 before it was kept)."""
  xs = _micro([5, 16, 3, 8], shape, loc=ratio * 2.0)
  _, pool = _pool(xs)
  whole = np.concatenate([np.asarray(x, np.float64) for x in xs])
  mean, var, n = ref.moments(whole)
  pop = bnjax.population_stats(pool)
  np.testing.assert_array_equal(pool.count, n)
  assert _rel(pop.var, var) < 1e-6
  assert np.max(
    np.abs(np.asarray(pop.mean, np.float64) - mean) / np.sqrt(var)
  ) < 1e-6 * max(1.0, ratio)


def test_one_update_equals_one_call_on_the_concatenated_batch():
  xs = _micro([8, 8, 8, 8])
  start = bnjax.BatchStats(jnp.full(C, 0.5), jnp.full(C, 2.0))
  _, pool = _pool(xs)
  got, _ = bnjax.apply_pooled(start, pool, momentum=0.9)
  _, want = bnjax.batch_norm(
    jnp.concatenate(xs), start, use_running_average=False, momentum=0.9
  )
  for g, w in zip(got, want, strict=True):
    assert _rel(g, np.asarray(w, np.float64)) < 1e-6
  # What it replaces: four EMA steps on the micro-batches.
  k_steps = start
  for x in xs:
    _, k_steps = bnjax.batch_norm(
      x, k_steps, use_running_average=False, momentum=0.9
    )
  assert _rel(k_steps.var, np.asarray(want.var, np.float64)) > 0.05


@pytest.mark.parametrize(
  'state',
  [bnjax.init_cumulative_stats, bnjax.init_debiased_stats],
  ids=['cumulative', 'debiased'],
)
def test_apply_pooled_follows_the_rule_of_the_state_type(state):
  xs = _micro([6, 10])
  _, pool = _pool(xs)
  got, _ = bnjax.apply_pooled(state(C), pool, momentum=0.9)
  _, want = bnjax.batch_norm(
    jnp.concatenate(xs), state(C), use_running_average=False, momentum=0.9
  )
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_masked_micro_batches_pool_count_weighted():
  xs = _micro([6, 9, 4])
  masks = [
    jnp.asarray(randn(x.shape, seed=20 + i) > 0.3) for i, x in enumerate(xs)
  ]
  masks[2] = masks[2].at[:, 1].set(False)  # a channel empty in one micro
  _, pool = _pool(xs, masks)
  whole = np.concatenate([np.asarray(x, np.float64) for x in xs])
  mean, var, n = ref.moments(whole, mask=np.concatenate(masks))
  np.testing.assert_array_equal(pool.count, n)
  pop = bnjax.population_stats(pool)
  np.testing.assert_allclose(pop.mean, mean, rtol=1e-6, atol=1e-6)
  assert _rel(pop.var, var) < 1e-6


def test_an_empty_pool_changes_nothing_and_normalizes_as_mean_0_var_1():
  pool = bnjax.init_pooled_stats(C)
  stats = bnjax.BatchStats(jnp.arange(C, dtype=jnp.float32), jnp.ones(C) * 3)
  np.testing.assert_array_equal(
    bnjax.apply_pooled(stats, pool, momentum=0.5)[0].mean, stats.mean
  )
  x = _micro([4])[0]
  y, _ = bnjax.batch_norm(x, pool, use_running_average=True, epsilon=1e-3)
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)


def test_inference_with_the_pool_normalizes_each_micro_batch_by_the_whole():
  """The two-pass form: pass 1 pools, pass 2 normalizes every micro-batch by
  the whole batch's statistics, exactly as one call on the whole batch."""
  xs = _micro([8, 8, 8], loc=50.0)
  _, pool = _pool(xs)
  y_whole, _ = bnjax.batch_norm(
    jnp.concatenate(xs), bnjax.init_batch_stats(C), use_running_average=False
  )
  ys = [bnjax.batch_norm(x, pool, use_running_average=True)[0] for x in xs]
  np.testing.assert_allclose(jnp.concatenate(ys), y_whole, atol=2e-5)


def test_lax_scan_over_micro_batches_with_gradients():
  """The accumulation loop as a user writes it: scan over micro-batches,
  gradients summed, statistics pooled, one update; the pooled statistics
  carry no gradient and the step never retraces."""
  xs = jnp.stack(_micro([8] * 4))
  g = jnp.ones(C)
  stats = bnjax.init_batch_stats(C)

  def loss(g, x, pool):
    y, pool = bnjax.batch_norm(x, pool, g, use_running_average=False)
    return jnp.mean(jnp.sin(y)), pool

  @jax.jit
  def step(g, stats, xs):
    def micro(carry, x):
      grads, pool = carry
      (_, pool), gr = jax.value_and_grad(loss, has_aux=True)(g, x, pool)
      return (grads + gr, pool), None

    (grads, pool), _ = jax.lax.scan(
      micro, (jnp.zeros_like(g), bnjax.init_pooled_stats(C)), xs
    )
    return grads, bnjax.apply_pooled(stats, pool, momentum=0.9)[0]

  grads, new = step(g, stats, xs)
  _, want = bnjax.batch_norm(
    xs.reshape(-1, C), stats, use_running_average=False, momentum=0.9
  )
  np.testing.assert_allclose(new.var, want.var, rtol=1e-6)
  per_micro = sum(
    jax.grad(lambda g, x: loss(g, x, bnjax.init_pooled_stats(C))[0])(g, x)
    for x in xs
  )
  np.testing.assert_allclose(grads, per_micro, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('sync', ['gather', 'psum'])
def test_synced_micro_batches_pool_the_global_batch(sync):
  """8 devices, each accumulating 3 micro-batches with axis_name: the pool
  is identical on every device and equals the global batch's moments."""
  mesh = _mesh()
  xs = jnp.stack(_micro([8 * 4] * 3, loc=30.0))  # (micro, global rows, C)

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=P(None, 'd'), out_specs=P('d')
  )
  def run(xs):
    def micro(pool, x):
      return bnjax.batch_norm(
        x, pool, use_running_average=False, axis_name='d', sync=sync
      )[1], None

    pool, _ = jax.lax.scan(micro, bnjax.init_pooled_stats(C), xs)
    return jax.tree.map(lambda v: v[None], pool)

  pools = run(xs)
  mean, var, n = ref.moments(np.asarray(xs, np.float64).reshape(-1, C))
  for d in range(8):
    pool = jax.tree.map(lambda v: v[d], pools)
    np.testing.assert_array_equal(pool.count, n)
    assert _rel(bnjax.population_stats(pool).var, var) < 1e-6


def test_errors_name_the_argument():
  pool = bnjax.init_pooled_stats(C)
  stats = bnjax.init_batch_stats(C)
  with pytest.raises(
    TypeError,
    match=r'apply_pooled: pooled must be a '
    r'bnjax.PooledStats.*init_pooled_stats',
  ):
    bnjax.apply_pooled(stats, stats)
  with pytest.raises(TypeError, match=r'batch_stats is a PooledStats'):
    bnjax.apply_pooled(pool, pool)
  bad = pool._replace(m2=-jnp.ones(C))
  with pytest.raises(ValueError, match=r'm2 is negative'):
    bnjax.batch_norm(_micro([2])[0], bad, use_running_average=True)


def test_synced_pool_is_exact_at_a_large_mean_with_either_sync_mode():
  """Regression: the psum path returned no low-order part of the mean, so a
  pool synced with sync='psum' lost the spread of the micro-batch means at
  |mean|/std 1e4 (as the local path did before mean_lo)."""
  mesh = _mesh()
  xs = jnp.stack(_micro([8 * 4] * 3, loc=2e4))
  mean, var, _ = ref.moments(np.asarray(xs, np.float64).reshape(-1, C))
  for sync in ('gather', 'psum'):

    @jax.jit
    @functools.partial(
      jax.shard_map, mesh=mesh, in_specs=(P(None, 'd'), P()), out_specs=P()
    )
    def run(xs, start):
      def micro(pool, x):
        return bnjax.batch_norm(
          x, pool, use_running_average=False, axis_name='d', sync=sync
        )[1], None

      return jax.lax.scan(micro, start, xs)[0]

    # A pool whose mean is already near the data's, so the psum path's
    # shift (the pool's mean) is trusted and the psum itself is used.
    start = bnjax.init_pooled_stats(C)._replace(
      count=jnp.full(C, 1e-30), mean=jnp.asarray(mean, jnp.float32)
    )
    pool = run(xs, start)
    assert _rel(bnjax.population_stats(pool).var, var) < 1e-6, sync


# ---- issue 44: apply_pooled checks what batch_norm checks; ghost pools -----


_S3 = bnjax.init_batch_stats(3)


def _pool3():
  x = jnp.arange(12.0).reshape(4, 3)
  return bnjax.batch_norm(
    x, bnjax.init_pooled_stats(3), use_running_average=False
  )[1]


@pytest.mark.parametrize(
  'args, kw, exc, match',
  [
    ((_S3,), {'momentum': 1.5}, ValueError, 'momentum=1.5 is outside'),
    ((_S3,), {'momentum': float('nan')}, ValueError, 'momentum=nan'),
    (
      (bnjax.init_batch_stats(1),),
      {},
      ValueError,
      r'batch_stats.mean has shape \(1,\).*pass batch_stats.mean of shape \(3,\)',
    ),
    (
      (jax.tree.map(lambda v: v.astype(jnp.float16), _S3),),
      {},
      TypeError,
      'batch_stats.mean has dtype float16, which overflows',
    ),
  ],
  ids=['momentum-1.5', 'momentum-nan', 'state-shape-1', 'float16-state'],
)
def test_apply_pooled_checks_momentum_shape_and_dtype_as_batch_norm(
  args, kw, exc, match
):
  """Regression (issue 44, 1): apply_pooled took momentum 1.5 (var -4.1),
  NaN momentum, a (1,)-shaped state (broadcast) and a float16 state (a
  pooled variance past 65504 stored as inf). batch_norm's own checks now
  run on it, with the pool's feature shape in place of x's."""
  with pytest.raises(exc, match=match):
    bnjax.apply_pooled(*args, _pool3(), **kw)


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('mean', np.nan, r'mean is not finite.*\(pooled.mean\)'),
    ('m2', -1.0, r'm2 is negative.*\(pooled.m2\)'),
    ('count', -1.0, r'count is negative.*\(pooled.count\)'),
  ],
)
def test_apply_pooled_refuses_a_corrupt_pool(field, value, match):
  """Regression (issue 44, 1): a NaN pool was applied, making the running
  mean NaN."""
  pool = _pool3()
  pool = pool._replace(**{field: jnp.full(3, value)})
  with pytest.raises(ValueError, match=match):
    bnjax.apply_pooled(_S3, pool)


def test_ghost_micro_batches_pool_to_one_ghost_call_on_the_concatenation():
  """Regression (issue 44, 4): with virtual_batch_size a pool merged each
  micro-batch's chunk averages with the spread of their means (var 25.25
  where one ghost call on the concatenation stores 0.25, the mean of the
  chunk variances, as the docs say). Masked chunks and uneven numbers of
  chunks per micro-batch too, against the float64 ghost oracle."""
  xs = _micro([4, 8, 2], loc=30.0, scale=3.0)
  xs[1] = xs[1] + 40.0  # micro-batch means far apart
  _, pool = _pool(xs, virtual_batch_size=2)
  whole = np.concatenate([np.asarray(x, np.float64) for x in xs])
  _, mean, var = ref.ghost_batch_norm(
    whole, np.zeros(C), np.ones(C), virtual_batch_size=2, momentum=0.0
  )
  pop = bnjax.population_stats(pool)
  assert _rel(pop.var, var) < 1e-6
  assert _rel(pop.mean, mean) < 1e-6
  got, _ = bnjax.apply_pooled(bnjax.init_batch_stats(C), pool, momentum=0.0)
  _, want = bnjax.batch_norm(
    jnp.concatenate(xs),
    bnjax.init_batch_stats(C),
    use_running_average=False,
    momentum=0.0,
    virtual_batch_size=2,
  )
  np.testing.assert_allclose(got.var, want.var, rtol=1e-6)
  np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6)


@pytest.mark.parametrize('ratio', [1e5, 1e7])
def test_pooling_under_vmap_without_axis_name_keeps_the_mean_low_part(ratio):
  """Issue 44, 3: pooling under jax.vmap without axis_name (an ensemble on
  the CPU statistics path, where the conditional becomes a select) must
  keep mean_lo: the report had the pooled variance 2e-3 off at |mean|/std
  1e5 and 91% at 1e7. Members on either branch of the CPU path (one
  near 0, one at the large mean), eager, vmapped and jitted, against
  float64."""
  x = np.stack([randn((4, 32, C), seed=s) for s in (1, 2)])
  x += 0.3 * np.arange(4)[None, :, None, None]  # spread of micro means
  x[0] += ratio
  x = x.astype(np.float32)

  def run(xs):
    pool = bnjax.init_pooled_stats(C)
    for i in range(xs.shape[0]):
      pool = bnjax.batch_norm(xs[i], pool, use_running_average=False)[1]
    return bnjax.population_stats(pool).var

  want = np.var(x.astype(np.float64).reshape(2, -1, C), axis=1)
  for got in (jax.vmap(run)(x), jax.jit(jax.vmap(run))(x)):
    assert _rel(got, want) < 1e-6
