"""The gather path's merge: what it sends, and its reference.

Without a mask every shard's count is the layout's, a constant: it stays
out of the all-gather, the merge's count arithmetic folds, and the merge's
reference is the plain mean of the shards' shifts. With a mask, or unequal
groups, the counts travel and the reference is count-weighted.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref
from tests._sync import D, _mesh, _shard

C = 16
ROWS = 64  # per shard


def _outlier_batch(ratio, where, seed, d=D):
  """|mean|/std = ratio; one shard's values 3000 std above the others'."""
  x = np.random.default_rng(seed).standard_normal((d * ROWS, C))
  if where == 'first':
    x[:ROWS] += 3000.0
  else:
    x[-ROWS:] += 3000.0
  return (ratio + x).astype(np.float32)


@pytest.mark.parametrize('ratio', [1e4, 1e6])
@pytest.mark.parametrize('where', ['first', 'last'])
@pytest.mark.parametrize('sync, d', [('gather', D), ('psum', D), ('psum', 64)])
def test_variance_within_1e6_with_an_outlier_shard(ratio, where, sync, d):
  """Regression: a merge around one shard's own shift (the first's, to
  save the reduction for the reference) left up to D times the between-
  shard term to cancel: 2.2e-6 relative error at 1e6 with the first shard
  an outlier. Around the plain mean of the shifts: below 4e-7. The psum's
  one pass of sums around the largest shift (sync='psum' before) had the
  same flaw: 2.6e-6 at 8 shards, 3.3e-5 at 64; its second pass around the
  first pass's mean: 1.6e-7 and 4.0e-7."""
  stats = bnjax.init_batch_stats(C)
  for seed in range(3):
    x = _outlier_batch(ratio, where, seed, d)
    _, v, _ = ref.moments(x.astype(np.float64))
    _, new = jax.vmap(
      lambda xi: bnjax.batch_norm(
        xi,
        stats,
        use_running_average=False,
        axis_name='v',
        momentum=0.0,
        sync=sync,
      ),
      axis_name='v',
    )(x.reshape(d, ROWS, C))
    err = np.max(np.abs(np.asarray(new.var[0], np.float64) / v - 1))
    assert err <= 1e-6, (seed, err)


def _gathered_floats(masked):
  mesh = _mesh()
  x = np.ones((D * 4, C), np.float32)
  mask = np.ones((D * 4, 1), bool)

  def bn(x, *m):
    return bnjax.batch_norm(
      x,
      bnjax.init_batch_stats(C),
      use_running_average=False,
      axis_name='d',
      sync='gather',
      mask=m[0] if m else None,
    )[0]

  specs = (P('d'),) * (2 if masked else 1)
  f = jax.shard_map(bn, mesh=mesh, in_specs=specs, out_specs=P('d'))
  args = (_shard(x, mesh),) + ((_shard(mask, mesh),) if masked else ())
  text = jax.jit(f).lower(*args).as_text()
  return [
    int(n)
    for n in re.findall(
      r'"stablehlo\.all_gather"\(%\S+\).*?\(tensor<1x(\d+)xf32>\)', text, re.S
    )
  ]


def test_unmasked_gather_sends_no_count_and_masked_sends_one_per_channel():
  """Without a mask the count is the same constant on every shard: the
  all-gather carries (shift, s1, m2), 3C floats; with one, 4C."""
  assert _gathered_floats(masked=False) == [3 * C]
  assert _gathered_floats(masked=True) == [4 * C]


def test_unequal_groups_send_the_count_and_weigh_empty_rows_zero():
  """Groups of 3 and 5 under pmap: the smaller group's psum-gather rows
  beyond its size are zero, so the count travels (the merge must weigh
  them 0): each group's statistics are its own batch's."""
  x = np.random.default_rng(3).standard_normal((D, 4, C)).astype(np.float32)
  x += 100.0 * np.arange(D, dtype=np.float32)[:, None, None]
  groups = [[0, 1, 2], [3, 4, 5, 6, 7]]
  new = jax.pmap(
    lambda xi: bnjax.batch_norm(
      xi,
      bnjax.init_batch_stats(C),
      use_running_average=False,
      axis_name='d',
      axis_index_groups=groups,
      momentum=0.0,
      sync='gather',
    )[1],
    axis_name='d',
    devices=jax.devices()[:D],
  )(x)
  for grp in groups:
    m, v, _ = ref.moments(x[grp].reshape(-1, C).astype(np.float64))
    np.testing.assert_allclose(new.mean[grp[0]], m, rtol=1e-6)
    np.testing.assert_allclose(new.var[grp[-1]], v, rtol=1e-5)


def test_uniform_shards_is_none_only_for_unequal_groups():
  sizes = jax.pmap(
    lambda x: (
      jnp.asarray(
        [
          bnjax._moments.uniform_shards('d', g) or 0
          for g in (
            None,
            [[0, 1, 2, 3], [4, 5, 6, 7]],
            [[0, 1, 2], [3, 4, 5, 6, 7]],
          )
        ]
      )
      + 0 * x
    ),
    axis_name='d',
    devices=jax.devices()[:D],
  )(np.zeros(D))
  assert sizes[0].tolist() == [D, 4, 0]


@pytest.mark.parametrize('mapping', ['pmap', 'shard_map'])
def test_backward_terms_are_stacked_only_where_they_are_cast(mapping):
  """Under shard_map the per-channel backward terms are cast to varying
  stacked, so their transpose is one psum; under pmap nothing is cast, and
  a stack there would only add a pad and a slice per term to the backward."""
  got = []

  def f(x):
    v = (jnp.ones(C), jnp.zeros(C))
    out = bnjax._moments.as_varying_stacked(v, 'd', like=x)
    got.append(all(a is b for a, b in zip(out, v, strict=True)))
    return x

  if mapping == 'pmap':
    jax.pmap(f, axis_name='d', devices=jax.devices()[:D])(np.zeros((D, C)))
  else:
    jax.shard_map(f, mesh=_mesh(), in_specs=P('d'), out_specs=P('d'))(
      np.zeros((D, C), np.float32)
    )
  assert got == [mapping == 'pmap']


def test_backward_count_follows_the_axis_size():
  """The backward's count is a constant (the layout's times the shards'):
  the tangent jitted at 8 shards must not serve 4 shards of the same
  per-shard shape."""
  rng = np.random.default_rng(11)
  stats = bnjax.init_batch_stats(C)

  def grad(xs):
    f = lambda x: jnp.sum(
      jnp.sin(
        bnjax.batch_norm(x, stats, use_running_average=False, axis_name='v')[0]
      )
    )
    return jax.vmap(jax.grad(f), axis_name='v')(xs)

  def global_grad(x):
    f = lambda x: jnp.sum(
      jnp.sin(bnjax.batch_norm(x, stats, use_running_average=False)[0])
    )
    return jax.grad(f)(x)

  for shards in (D, D // 2):
    x = rng.standard_normal((shards, 4, C)).astype(np.float32)
    np.testing.assert_allclose(
      grad(x).reshape(-1, C),
      global_grad(x.reshape(-1, C)),
      rtol=1e-5,
      atol=1e-6,
    )
