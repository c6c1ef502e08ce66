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


# steady state: the running mean near the batch mean; step 0: a zero
# running mean under |mean|/std of 1e4 / 3 (the psum check fails and the
# exact gather runs); a shift of 2 std (the check passes, error grows).
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


def test_psum_forward_is_one_psum_of_2c_plus_1_floats():
  """Counted in the compiled HLO: the entry computation (the steady state,
  outside conditional branches) holds one all-reduce of 2C + 1 floats (the
  running statistics enter replicated, so shard_map's types prove every
  shard has the same shift and nothing checks it); the all-gather lives in
  the fallback branch only."""
  x, g, b, _, stats, _ = _case(2.0, 2.1)
  mesh = _mesh()
  fwd = jax.jit(lambda x: _step(mesh, stats, 'psum', False)(x, g, b)[0])
  hlo = fwd.lower(_shard(x, mesh)).compile().as_text()
  ops = _ops_by_computation(hlo)
  entry = [v for k, v in ops.items() if k.startswith('ENTRY')][0]
  assert [kind for _, kind in entry] == ['all-reduce'], ops
  ((shape, _),) = entry
  floats = int(re.match(r'f32\[(\d+)\]', shape).group(1))
  assert floats == 2 * C + 1
  branches = [
    kind for k, v in ops.items() if not k.startswith('ENTRY') for _, kind in v
  ]
  assert branches == ['all-gather'], ops
  # and the steady-state case takes the psum branch: same result as gather
  y_p = fwd(_shard(x, mesh))
  y_g = jax.jit(lambda x: _step(mesh, stats, 'gather', False)(x, g, b)[0])(
    _shard(x, mesh)
  )
  _assert_same(y_p, y_g, rtol=1e-5, atol=1e-5)


def _vmapped_psum_stats(x, per_shard):
  return jax.vmap(
    lambda xi, s: bnjax.batch_norm(
      xi, s, use_running_average=False, axis_name='v', momentum=0.0, sync='psum'
    )[1],
    axis_name='v',
  )(x, per_shard)


def test_psum_detects_shards_with_different_running_means():
  """The shift must be the same on every shard. Under vmap with per-shard
  running statistics it is not: the exact equality test in the psum catches
  it and the exact gather runs, so the statistics are still the global
  batch's, on every shard alike."""
  x = randn((D, 8, C), loc=5.0, seed=3)
  per_shard = bnjax.BatchStats(
    jnp.asarray(randn((D, C), loc=5.0, seed=4)), jnp.ones((D, C))
  )
  got = _vmapped_psum_stats(x, per_shard)
  m, v, _ = ref.moments(x.reshape(-1, C))
  for i in range(D):
    np.testing.assert_allclose(got.mean[i], m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.var[i], v, rtol=1e-5)


@pytest.mark.parametrize('bit', [0, 7, 13, 22, 31])
def test_psum_shift_test_catches_one_flipped_bit(bit):
  """Regression: the old 4-hash fingerprint let a running mean 170,397 ulps
  from another shard's through (found by search), and the psum's result was
  then 160 std off. The test is now exact (Lagrange's identity over 8-bit
  chunks of the shift's bits): a shift that differs from the others in one
  bit of one channel, whichever bit, sends the step to the exact gather."""
  x = randn((D, 8, C), loc=0.0, seed=5)
  mean = np.zeros((D, C), np.float32) + np.float32(0.5)
  bits = mean.view(np.uint32)
  bits[3, 7] ^= np.uint32(1 << bit)  # shard 3, channel 7
  per_shard = bnjax.BatchStats(jnp.asarray(mean), jnp.ones((D, C)))
  got = _vmapped_psum_stats(x, per_shard)
  m, v, _ = ref.moments(x.reshape(-1, C))
  np.testing.assert_allclose(got.var[3], v, rtol=1e-5)
  np.testing.assert_allclose(got.mean[0], m, rtol=1e-6, atol=1e-6)


def test_exact_shift_test_on_random_adversarial_patterns():
  """The equality test itself, on 2000 random sets of D shifts: it is True
  exactly when every shard's bits are equal (no false positive, no miss),
  including shifts that differ only in bits a weak hash folds together."""
  import functools

  from bnjax._moments import psum as P

  @functools.cache
  def same_everywhere(d):  # one compilation per shard count
    def f(ks):
      sums = jax.vmap(lambda k: P._chunks(k, 'v', None), axis_name='v')(ks)
      return jax.vmap(
        lambda s: P._same_everywhere(jax.lax.psum(s, 'v'), 'v', None),
        axis_name='v',
      )(sums)

    return jax.jit(f)

  rng = np.random.default_rng(0)
  for trial in range(2000):
    d = int(rng.integers(2, 9))
    base = rng.integers(0, 2**32, size=4, dtype=np.uint64).astype(np.uint32)
    shifts = np.repeat(base[None], d, axis=0)
    if trial % 2:
      i, c = rng.integers(0, d), rng.integers(0, 4)
      shifts[i, c] ^= np.uint32(rng.integers(1, 2**32, dtype=np.uint64))
    same = same_everywhere(d)(jnp.asarray(shifts.view(np.float32)))
    assert bool(same[0]) == (not trial % 2), (trial, shifts)


def test_psum_payload_without_types_carries_the_exact_test():
  """With check_vma=False nothing proves the shifts equal: the one psum
  carries 8 more floats per channel, 10C + 1, and still gives the global
  batch's statistics."""
  x, g, b, _, stats, _ = _case(2.0, 2.1)
  mesh = _mesh()

  def bn(x):
    return bnjax.batch_norm(
      x,
      stats,
      g,
      b,
      use_running_average=False,
      axis_name='d',
      momentum=0.0,
      sync='psum',
    )

  step = jax.jit(
    jax.shard_map(
      bn, mesh=mesh, in_specs=P('d'), out_specs=(P('d'), P()), check_vma=False
    )
  )
  ops = _ops_by_computation(step.lower(_shard(x, mesh)).compile().as_text())
  entry = [v for k, v in ops.items() if k.startswith('ENTRY')][0]
  assert [kind for _, kind in entry] == ['all-reduce'], ops
  ((shape, _),) = entry
  assert int(re.match(r'f32\[(\d+)\]', shape).group(1)) == 10 * C + 1
  _, new = step(_shard(x, mesh))
  m, v, _ = ref.moments(x)
  np.testing.assert_allclose(new.var, v, rtol=1e-5)


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


def test_renorm_moments_and_modules_take_sync():
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
  assert bnjax.linen.BatchNorm().sync == 'auto'
  assert bnjax.nnx.BatchNorm(3, sync='psum', rngs=nnx.Rngs(0)).sync == 'psum'
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
  assert first == {64: None, 256: 4096, 512: 2048, 1024: 1024, 2048: 256}
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
