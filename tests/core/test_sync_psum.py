"""sync='psum': exact partials merged by a pmax of the shards' shifts and
one constant-size psum around it, with no branch; and sync='auto''s
choice."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax._moments import psum as _psum  # noqa: F401
from tests import reference as ref
from tests._helpers import randn
from tests._sync import D, _assert_same, _global, _mesh, _shard

C = 16


def _case(loc, running_mean, seed=0, masked=False):
  x = randn((D * 8, C), loc=loc, scale=3.0, seed=seed)
  g = 1 + randn((C,), seed=seed + 1) ** 2
  b = randn((C,), seed=seed + 2)
  w = randn((D * 8, C), seed=seed + 3)
  stats = bnjax.BatchStats(
    jnp.full(C, running_mean, jnp.float32), jnp.full(C, 9.0, jnp.float32)
  )
  mask = None
  if masked:
    mask = np.random.default_rng(seed).random((D * 8, 1)) < 0.6
    mask[:8] = False  # an empty shard
  return x, g, b, w, stats, mask


def _step(mesh, stats, sync, masked):
  def bn(x, g, b, *m):
    return bnjax.batch_norm(
      x,
      stats,
      g,
      b,
      use_running_average=False,
      axis_name='d',
      momentum=0.9,
      sync=sync,
      mask=m[0] if m else None,
    )

  specs = (P('d'), P(), P()) + ((P('d'),) if masked else ())
  bn = jax.shard_map(bn, mesh=mesh, in_specs=specs, out_specs=(P('d'), P()))
  return bn


# The running mean no longer enters the psum path; these are the cases that
# broke its former running-mean shift: near the batch mean (steady state),
# a zero running mean at |mean|/std of 1e4 (step 0), 2 std away.
CASES = {
  'steady': (2.0, 2.1),
  'step0_offset_1e4': (3e4, 0.0),
  'shift_2_std': (2.0, 8.0),
}


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('sync', ['gather', 'psum'])
@pytest.mark.parametrize('masked', [False, True])
def test_both_paths_equal_global_bn(case, sync, masked):
  x, g, b, w, stats, mask = _case(*CASES[case], masked=masked)
  mesh = _mesh()
  bn = _step(mesh, stats, sync, masked)
  extra = (_shard(mask, mesh),) if masked else ()

  def loss(x, g, b):
    y, new = bn(x, g, b, *extra)
    return jnp.mean(w * y), (y, new)

  grads, (y, new) = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(
    _shard(x, mesh), g, b
  )
  y0, new0, grads0 = _global(x, g, b, w, stats, mask)
  loc = CASES[case][0]
  if loc > 1e3:
    # The statistics meet the 1e-5 bar. Outputs and gradients carry float32's
    # own rounding of x - mean at this offset: ulp(3e4) / std = 6.5e-4 of a
    # normalized value, times the scale, whatever the statistics.
    rv = (np.asarray(new0.var) - 0.9 * 9.0) / 0.1
    got = (np.asarray(new.var, np.float64) - 0.9 * 9.0) / 0.1
    assert np.max(np.abs(got / rv - 1)) <= 1e-5 * (1 + 8.1 / 0.1 / rv.min())
    _assert_same(new.mean, new0.mean, rtol=1e-6, atol=0)
    atol = 2 * np.spacing(np.float32(loc)) / 3.0 * float(np.max(g))
    _assert_same((y, grads), (y0, grads0), rtol=1e-3, atol=atol)
  else:
    _assert_same((y, new, grads), (y0, new0, grads0))


def _ops_by_computation(hlo: str):
  """{computation name: [collective op kinds]} of compiled HLO text."""
  out, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if m:
      name = ('ENTRY ' if line.startswith('ENTRY') else '') + m.group(1)
      out[name] = []
    for op in re.findall(
      r'= (f32\[[\d,]*\]\S*) (all-reduce|all-gather)'
      r'(?:-start)?\(',
      line,
    ):
      out[name].append(op)
  return out


def _entry_collectives(hlo):
  ops = _ops_by_computation(hlo)
  (entry,) = [v for k, v in ops.items() if k.startswith('ENTRY')]
  return ops, entry


def test_psum_forward_is_a_pmax_of_c_and_psums_of_c_plus_1_and_2c_floats():
  """Counted in the compiled HLO: three all-reduces, C floats (the shared
  reference, a max), C + 1 (the count and the first moments around it) and
  2C (the sums around the mean that gives), no all-gather, no
  conditional."""
  x, g, b, _, stats, _ = _case(2.0, 2.1)
  mesh = _mesh()
  fwd = jax.jit(lambda x: _step(mesh, stats, 'psum', False)(x, g, b)[0])
  hlo = fwd.lower(_shard(x, mesh)).compile().as_text()
  ops, entry = _entry_collectives(hlo)
  sizes = sorted(int(re.match(r'f32\[(\d+)\]', s).group(1)) for s, _ in entry)
  assert [kind for _, kind in entry] == ['all-reduce'] * 3, ops
  assert sizes == [C, C + 1, 2 * C], ops
  assert 'maximum' in hlo
  assert not re.search(r'\bconditional\(', hlo)
  assert all(not v for k, v in ops.items() if not k.startswith('ENTRY')), ops


def _vmapped_psum_stats(x, per_shard):
  return jax.vmap(
    lambda xi, s: bnjax.batch_norm(
      xi, s, use_running_average=False, axis_name='v', momentum=0.0, sync='psum'
    )[1],
    axis_name='v',
  )(x, per_shard)


def test_psum_with_different_running_means_per_shard():
  """The running mean is not the shift any more: shards holding different
  running statistics (vmap with per-shard state) get the global batch's
  statistics, on every shard alike."""
  x = randn((D, 8, C), loc=5.0, seed=3)
  per_shard = bnjax.BatchStats(
    jnp.asarray(randn((D, C), loc=5.0, seed=4)), jnp.ones((D, C))
  )
  got = _vmapped_psum_stats(x, per_shard)
  m, v, _ = ref.moments(x.reshape(-1, C))
  for i in range(D):
    np.testing.assert_allclose(got.mean[i], m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.var[i], v, rtol=1e-5)


def test_x64_psum_with_float64_running_means_near_1e8():
  """Regression (issue 44, item 15): under x64 the psum path's exact shift
  test compared float32 casts of float64 running means: at 1e8 with means
  mu + 0.3 i the shards agreed on a shift they did not share, and the mean
  came out 1.05 std off, the variance 62%, different on each shard."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(15)
    x = 1e8 + rng.standard_normal((D, 8, C))
    per_shard = bnjax.BatchStats(
      jnp.asarray(1e8 + 0.3 * np.arange(D)[:, None] + np.zeros((D, C))),
      jnp.ones((D, C)),
    )
    got = _vmapped_psum_stats(jnp.asarray(x), per_shard)
    m, v, _ = ref.moments(x.reshape(-1, C))
    assert got.mean.dtype == jnp.float64
    for i in range(D):
      np.testing.assert_allclose(got.mean[i], m, rtol=1e-15, atol=1e-9)
      np.testing.assert_allclose(got.var[i], v, rtol=1e-9)


def test_psum_under_shard_map_with_per_device_running_statistics():
  """Regression (issue 44, item 16): sync='psum' under jax.shard_map (types
  checked) with running statistics that differ per device (in_specs
  P('d')) failed inside bnjax's lax.cond: "cond branches must have equal
  output types". There is no conditional now."""
  x = randn((D * 8, C), loc=3.0, seed=16)
  stats = bnjax.BatchStats(
    jnp.asarray(randn((D, C), loc=3.0, seed=17)), jnp.ones((D, C))
  )
  mesh = _mesh()

  def bn(x, s):
    s = jax.tree.map(lambda v: v[0], s)
    _, new = bnjax.batch_norm(
      x, s, use_running_average=False, axis_name='d', momentum=0.0, sync='psum'
    )
    return jax.tree.map(lambda v: v[None], new)

  new = jax.jit(
    jax.shard_map(bn, mesh=mesh, in_specs=(P('d'), P('d')), out_specs=P('d'))
  )(_shard(x, mesh), stats)
  m, v, _ = ref.moments(x)
  for i in range(D):
    np.testing.assert_allclose(new.mean[i], m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var[i], v, rtol=1e-5)


@pytest.mark.parametrize('ratio', [1e2, 1e4, 1e6])
@pytest.mark.parametrize('layout', ['sorted', 'outlier_first', 'shuffled'])
def test_psum_variance_within_1e6_of_float64_on_adversarial_shards(
  ratio, layout
):
  """|mean|/std from 1e2 to 1e6, with the batch sorted across shards (the
  shard means far apart), an outlier on the first row, or shuffled: the
  psum path's variance is within 1e-6 of float64, as the gather's."""
  rng = np.random.default_rng(int(np.log10(ratio)))
  x = rng.standard_normal((D * 64, C))
  if layout == 'sorted':
    x = np.sort(x, axis=0)
  elif layout == 'outlier_first':
    x[0] = 40.0
  x = (ratio + x).astype(np.float32)
  _, v, _ = ref.moments(x.astype(np.float64))
  stats = bnjax.init_batch_stats(C)
  for sync in ('psum', 'gather'):
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
    )(x.reshape(D, 64, C))
    err = np.max(np.abs(np.asarray(new.var[0], np.float64) / v - 1))
    assert err <= 1e-6, (sync, err)


def test_psum_with_unequal_groups_under_pmap():
  x = randn((D, 4, C), loc=1.0, seed=5)
  groups = [[0, 1, 2], [3, 4, 5, 6, 7]]
  stats = bnjax.BatchStats(jnp.ones(C), jnp.ones(C))
  _, new = jax.pmap(
    lambda xi: bnjax.batch_norm(
      xi,
      stats,
      use_running_average=False,
      axis_name='d',
      momentum=0.0,
      axis_index_groups=groups,
      sync='psum',
    ),
    axis_name='d',
    devices=jax.devices()[:D],
  )(x)
  for grp in groups:
    m, v, _ = ref.moments(x[grp].reshape(-1, C))
    np.testing.assert_allclose(new.mean[grp[0]], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var[grp[-1]], v, rtol=1e-5)


def test_renorm_and_moments_take_sync():
  x = randn((D, 8, C), loc=3.0, seed=6)
  m, v, _ = ref.moments(x.reshape(-1, C))
  for sync in ('gather', 'psum'):
    mean, var = jax.vmap(
      lambda xi: bnjax.moments(xi, axis_name='v', sync=sync), axis_name='v'
    )(x)
    np.testing.assert_allclose(var[0], v, rtol=1e-5)
    _, st = jax.vmap(
      lambda xi: bnjax.batch_renorm(
        xi,
        bnjax.init_renorm_stats(C),
        use_running_average=False,
        r_max=1.0,
        d_max=0.0,
        momentum=0.0,
        axis_name='v',
        sync=sync,
      ),
      axis_name='v',
    )(x)
    np.testing.assert_allclose(st.mean[0], m, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"sync='all' must be one of"):
    bnjax.batch_norm(
      jnp.ones((4, 3)),
      bnjax.init_batch_stats(3),
      use_running_average=False,
      sync='all',
    )


def test_auto_follows_the_cost_model():
  # The crossovers benchmarks/README.md states: the first power-of-two D
  # from which 'auto' takes the psum, per C (None: not up to 8192).
  first = {
    c: next((2**k for k in range(1, 14) if _psum.auto_uses_psum(2**k, c)), None)
    for c in (64, 256, 512, 1024, 2048)
  }
  assert first == {64: None, 256: None, 512: 8192, 1024: 4096, 2048: 2048}
  # 'auto' at 8 devices lowers the gather alone: no psum, and no collective
  # inside a conditional
  x, g, b, _, stats, _ = _case(2.0, 2.1)
  mesh = _mesh()
  text = (
    jax.jit(lambda x: _step(mesh, stats, 'auto', False)(x, g, b)[0])
    .lower(_shard(x, mesh))
    .as_text()
  )
  assert re.findall(r'stablehlo\.(all_reduce|all_gather)\b', text) == [
    'all_gather'
  ]
