"""sync='psum': one constant-size psum around the running mean, with the
exact gather as its fallback; and sync='auto''s choice."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.linen
import bnjax.nnx
from bnjax import _psum
from tests import reference as ref
from tests._helpers import randn
from tests.test_sync import D, _assert_same, _global, _mesh, _shard

C = 16


def _case(loc, running_mean, seed=0, masked=False):
  x = randn((D * 8, C), loc=loc, scale=3.0, seed=seed)
  g = 1 + randn((C,), seed=seed + 1) ** 2
  b = randn((C,), seed=seed + 2)
  w = randn((D * 8, C), seed=seed + 3)
  stats = bnjax.BatchStats(jnp.full(C, running_mean, jnp.float32),
                           jnp.full(C, 9.0, jnp.float32))
  mask = None
  if masked:
    mask = np.random.default_rng(seed).random((D * 8, 1)) < 0.6
    mask[:8] = False  # an empty shard
  return x, g, b, w, stats, mask


def _step(mesh, stats, sync, masked):
  def bn(x, g, b, *m):
    return bnjax.batch_norm(x, stats, g, b, use_running_average=False,
                            axis_name='d', momentum=0.9, sync=sync,
                            mask=m[0] if m else None)
  specs = (P('d'), P(), P()) + ((P('d'),) if masked else ())
  bn = jax.shard_map(bn, mesh=mesh, in_specs=specs, out_specs=(P('d'), P()))
  return bn


# steady state: the running mean near the batch mean; step 0: a zero
# running mean under |mean|/std of 1e4 / 3 (the psum check fails and the
# exact gather runs); a shift of 2 std (the check passes, error grows).
CASES = {'steady': (2.0, 2.1), 'step0_offset_1e4': (3e4, 0.0),
         'shift_2_std': (2.0, 8.0)}


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
      _shard(x, mesh), g, b)
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
    for op in re.findall(r'= (f32\[[\d,]*\]\S*) (all-reduce|all-gather)'
                         r'(?:-start)?\(', line):
      out[name].append(op)
  return out


def test_psum_forward_is_one_psum_of_at_most_3c_plus_1_floats():
  """Counted in the compiled HLO: the entry computation (the steady state,
  outside conditional branches) holds one all-reduce of 2C + 9 floats; the
  all-gather lives in the fallback branch only."""
  x, g, b, _, stats, _ = _case(2.0, 2.1)
  mesh = _mesh()
  fwd = jax.jit(lambda x: _step(mesh, stats, 'psum', False)(x, g, b)[0])
  hlo = fwd.lower(_shard(x, mesh)).compile().as_text()
  ops = _ops_by_computation(hlo)
  entry = [v for k, v in ops.items() if k.startswith('ENTRY')][0]
  assert [kind for _, kind in entry] == ['all-reduce'], ops
  (shape, _), = entry
  floats = int(re.match(r'f32\[(\d+)\]', shape).group(1))
  assert floats == 2 * C + 9 <= 3 * C + 1
  branches = [kind for k, v in ops.items() if not k.startswith('ENTRY')
              for _, kind in v]
  assert branches == ['all-gather'], ops
  # and the steady-state case takes the psum branch: same result as gather
  y_p = fwd(_shard(x, mesh))
  y_g = jax.jit(lambda x: _step(mesh, stats, 'gather', False)(x, g, b)[0])(
      _shard(x, mesh))
  _assert_same(y_p, y_g, rtol=1e-5, atol=1e-5)


def test_psum_detects_shards_with_different_running_means():
  """The shift must be the same on every shard. Under vmap with per-shard
  running statistics it is not: the fingerprint in the psum catches it and
  the exact gather runs, so the statistics are still the global batch's."""
  x = randn((D, 8, C), loc=5.0, seed=3)
  per_shard = bnjax.BatchStats(
      jnp.asarray(randn((D, C), loc=5.0, seed=4)), jnp.ones((D, C)))
  f = lambda xi, s, sync: bnjax.batch_norm(
      xi, s, use_running_average=False, axis_name='v', momentum=0.0,
      sync=sync)[1]
  got = jax.vmap(lambda xi, s: f(xi, s, 'psum'), axis_name='v')(x, per_shard)
  m, v, _ = ref.moments(x.reshape(-1, C))
  np.testing.assert_allclose(got.mean[0], m, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got.var[0], v, rtol=1e-5)
  # and the check is what saved it: a fingerprint without it would differ
  hashes = jax.vmap(_psum._fingerprint)(per_shard.mean)
  assert len({tuple(np.asarray(h)) for h in hashes}) > 1


def test_psum_with_unequal_groups_under_pmap():
  x = randn((D, 4, C), loc=1.0, seed=5)
  groups = [[0, 1, 2], [3, 4, 5, 6, 7]]
  stats = bnjax.BatchStats(jnp.ones(C), jnp.ones(C))
  _, new = jax.pmap(lambda xi: bnjax.batch_norm(
      xi, stats, use_running_average=False, axis_name='d', momentum=0.0,
      axis_index_groups=groups, sync='psum'), axis_name='d',
      devices=jax.devices()[:D])(x)
  for grp in groups:
    m, v, _ = ref.moments(x[grp].reshape(-1, C))
    np.testing.assert_allclose(new.mean[grp[0]], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var[grp[-1]], v, rtol=1e-5)


def test_renorm_moments_and_modules_take_sync():
  x = randn((D, 8, C), loc=3.0, seed=6)
  m, v, _ = ref.moments(x.reshape(-1, C))
  for sync in ('gather', 'psum'):
    mean, var = jax.vmap(lambda xi: bnjax.moments(
        xi, axis_name='v', sync=sync), axis_name='v')(x)
    np.testing.assert_allclose(var[0], v, rtol=1e-5)
    _, st = jax.vmap(lambda xi: bnjax.batch_renorm(
        xi, bnjax.init_renorm_stats(C), use_running_average=False,
        r_max=1.0, d_max=0.0, momentum=0.0, axis_name='v', sync=sync),
        axis_name='v')(x)
    np.testing.assert_allclose(st.mean[0], m, rtol=1e-5, atol=1e-6)
  assert bnjax.linen.BatchNorm().sync == 'auto'
  assert bnjax.nnx.BatchNorm(3, sync='psum', rngs=nnx.Rngs(0)).sync == 'psum'
  with pytest.raises(ValueError, match=r"sync='all' must be one of"):
    bnjax.batch_norm(jnp.ones((4, 3)), bnjax.init_batch_stats(3),
                     use_running_average=False, sync='all')


def test_auto_follows_the_cost_model():
  # The crossovers benchmarks/README.md states: the first power-of-two D
  # from which 'auto' takes the psum, per C (None: not up to 8192).
  first = {c: next((2 ** k for k in range(1, 14)
                    if _psum.auto_uses_psum(2 ** k, c)), None)
           for c in (64, 256, 512, 1024, 2048)}
  assert first == {64: None, 256: 4096, 512: 2048, 1024: 1024, 2048: 256}
  # 'auto' at 8 devices lowers the gather alone: no psum, and no collective
  # inside a conditional
  x, g, b, _, stats, _ = _case(2.0, 2.1)
  mesh = _mesh()
  text = jax.jit(lambda x: _step(mesh, stats, 'auto', False)(x, g, b)[0]
                 ).lower(_shard(x, mesh)).as_text()
  assert re.findall(r'stablehlo\.(all_reduce|all_gather)\b', text) == [
      'all_gather']
