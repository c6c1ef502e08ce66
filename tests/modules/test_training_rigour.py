"""bnjax.training and bnjax.precise held to the core's rigour (issue 44):
nothing silent in freezing, masks for optax, averaging, recalibration and
linen pooling; each a regression test of one reported defect, against the
float64 oracle where a number is computable."""

import functools

import equinox as eqx
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.equinox
import bnjax.linen
import bnjax.nnx
import bnjax.precise
import bnjax.training
from tests._helpers import randn
from tests._sync import _mesh


def _rel(a, b):
  b = np.asarray(b, np.float64)
  return np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b))


# ---- freezing -----------------------------------------------------------------


def test_frozen_flax_batchnorm_keeps_statistics_bitwise_through_a_nan_batch():
  """Regression (issue 44, 5): 'frozen' set flax's own nnx.BatchNorm to
  momentum 1, and flax stores 1 * old + 0 * batch: a NaN batch made the
  "bitwise unchanged" statistics NaN. 'train' afterwards updates again."""
  model = nnx.Sequential(
    nnx.Linear(3, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  )
  bn = model.layers[1]
  bn.mean[...] = jnp.arange(3.0)
  bnjax.training.set_mode(model, 'frozen')
  step = nnx.jit(lambda m, x: m(x))
  step(model, jnp.ones((4, 3)).at[0, 0].set(jnp.nan))
  step(model, jnp.asarray(randn((4, 3))))
  np.testing.assert_array_equal(bn.mean[...], np.arange(3.0))
  np.testing.assert_array_equal(bn.var[...], np.ones(3))
  assert isinstance(bn, nnx.BatchNorm) and not bn.use_running_average
  bnjax.training.set_mode(model, 'train')
  assert type(bn) is nnx.BatchNorm
  x = randn((4, 3))
  step(model, jnp.asarray(x))
  lin = model.layers[0]
  h = np.asarray(x, np.float64) @ np.asarray(lin.kernel[...], np.float64)
  h += np.asarray(lin.bias[...], np.float64)
  np.testing.assert_allclose(  # flax's EMA at momentum 0.99 again
    bn.mean[...], 0.99 * np.arange(3.0) + 0.01 * h.mean(0), rtol=1e-5
  )


def test_set_mode_only_that_is_not_a_filter_names_the_argument():
  """Regression (issue 44, 17): only=5 failed inside flax with "Invalid
  format specifier '!r'"."""
  bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  for bad in (5, 2.5, object()):
    with pytest.raises(
      TypeError, match=r'set_mode: only must be an nnx Filter.*got'
    ):
      bnjax.training.set_mode(bn, 'frozen', only=bad)
  bnjax.training.set_mode(bn, 'frozen', only=bnjax.nnx.BatchNorm)  # a type


# ---- masks for optax ----------------------------------------------------------


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(4)(x)
    return bnjax.linen.BatchNorm(use_running_average=not train)(x)


def _frozen_recipe(mask, opt):
  """The guide's recipe: BN's affine frozen, the rest trains with opt."""
  labels = jax.tree.map(lambda bn: 'frozen' if bn else 'train', mask)
  return optax.multi_transform(
    {'train': opt, 'frozen': optax.set_to_zero()}, labels
  )


@pytest.mark.parametrize('freeze', [flax.core.freeze, lambda v: v])
def test_bn_param_mask_freezes_bn_affine_with_adamw_and_frozen_dicts(freeze):
  """Regression (issue 44, 6): on FrozenDict params bn_param_mask returned
  False (the documented freeze froze nothing); and the guide's freeze,
  a mask before the optimizer, moved BN's scale and bias once the optimizer
  was adamw (weight decay runs after the mask). The documented recipe
  (optax.multi_transform, or masking after the optimizer) keeps them."""
  v = freeze(_Net().init(jax.random.key(0), jnp.ones((2, 3))))
  mask = bnjax.training.bn_param_mask(v['params'], v['batch_stats'])
  assert type(mask) is type(v['params'])
  assert dict(mask['BatchNorm_0']) == {'scale': True, 'bias': True}
  assert dict(mask['Dense_0']) == {'kernel': False, 'bias': False}
  opt = optax.adamw(1e-2, weight_decay=0.1)
  after = optax.chain(opt, optax.masked(optax.set_to_zero(), mask))
  for tx in (_frozen_recipe(mask, opt), after):
    params, state = v['params'], tx.init(v['params'])
    for _ in range(3):
      grads = jax.tree.map(jnp.ones_like, params)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    jax.tree.map(
      np.testing.assert_array_equal,
      params['BatchNorm_0'],
      v['params']['BatchNorm_0'],
    )
    # The rest trains as opt alone trains it (adamw is elementwise).
    want, st = v['params'], opt.init(v['params'])
    for _ in range(3):
      upd, st = opt.update(jax.tree.map(jnp.ones_like, want), st, want)
      want = optax.apply_updates(want, upd)
    np.testing.assert_allclose(
      params['Dense_0']['kernel'], want['Dense_0']['kernel'], rtol=1e-6
    )


def test_bn_param_mask_on_nnx_state_drives_nnx_optimizer():
  """Regression (issue 44, 6): on nnx.State it returned a dict that
  nnx.Optimizer rejected with a pytree error."""

  class M(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      self.bn = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.bn(self.lin(x))

  m = M()
  mask = bnjax.training.bn_param_mask(
    nnx.state(m, nnx.Param), nnx.state(m, nnx.BatchStat)
  )
  assert isinstance(mask, nnx.State)
  tx = _frozen_recipe(mask, optax.adamw(1e-2, weight_decay=0.1))
  opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
  kernel = np.asarray(m.lin.kernel[...])
  x = jnp.asarray(randn((4, 3)))
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m)
  opt.update(m, grads)
  np.testing.assert_array_equal(m.bn.scale[...], np.ones(2))
  np.testing.assert_array_equal(m.bn.bias[...], np.zeros(2))
  adamw = optax.adamw(1e-2, weight_decay=0.1)  # the kernel's own step
  step, _ = adamw.update(grads.lin.kernel[...], adamw.init(kernel), kernel)
  np.testing.assert_allclose(m.lin.kernel[...], kernel + step, rtol=1e-6)


def test_bn_param_mask_names_a_tree_that_is_not_a_mapping():
  with pytest.raises(TypeError, match=r'bn_param_mask: params must be'):
    bnjax.training.bn_param_mask([1.0], {})


# ---- averaging ---------------------------------------------------------------


_PER_DEVICE = bnjax.BatchStats(jnp.ones((2, 3)), jnp.ones((2, 3)))


@pytest.mark.parametrize(
  'weight, match',
  [
    (jnp.zeros(2), 'weights sum to 0'),
    (jnp.array([1.0, jnp.nan]), r'finite and >= 0.*nan'),
    (jnp.array([1.0, -1.0]), r'finite and >= 0.*-1.0'),
    (jnp.array([1.0, jnp.inf]), r'finite and >= 0.*inf'),
  ],
  ids=['zeros', 'nan', 'negative', 'inf'],
)
def test_average_stats_refuses_weights_that_make_nan_or_nonsense(weight, match):
  """Regression (issue 44, 7): weight=jnp.zeros(2) gave NaN statistics; a
  NaN or negative weight was used."""
  with pytest.raises(ValueError, match=match):
    bnjax.training.average_stats(_PER_DEVICE, weight=weight)


def test_average_stats_of_pools_is_the_union_of_the_devices_batches():
  """Regression (issue 44, 8): PooledStats were averaged field by field
  (population var 2.25 where the union's is 27.25). A pool is exact
  moments: the average is the pool of the union, count-weighted, here at
  |mean|/std 1e5 and with uneven counts, against float64."""
  xs = [randn((n, 3), loc=1e5, seed=i) + 10 * i for i, n in enumerate([5, 9])]
  pools = [
    bnjax.batch_norm(
      jnp.asarray(x), bnjax.init_pooled_stats(3), use_running_average=False
    )[1]
    for x in xs
  ]
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *pools)
  got = bnjax.training.average_stats({'bn': stacked})['bn']
  whole = np.concatenate(xs).astype(np.float64)
  pop = bnjax.population_stats(got)
  np.testing.assert_array_equal(got.count, 14)
  assert _rel(pop.var, whole.var(0)) < 1e-6
  # The report's numbers: {0, 3} and {10, 13}, 2 values each.
  hand = bnjax.PooledStats(
    jnp.full((2, 1), 2.0),
    jnp.array([[1.5], [11.5]]),
    jnp.zeros((2, 1)),
    jnp.full((2, 1), 4.5),
  )
  got = bnjax.training.average_stats(hand)
  np.testing.assert_allclose(bnjax.population_stats(got).var, [27.25])


def test_average_stats_of_pools_over_a_mesh_axis_is_the_union():
  """Issue 44, 8, under axis_name: every device gets the union's pool (one
  gather of the pools), with a weighted BatchStats beside it."""
  mesh = _mesh()
  xs = jnp.asarray(randn((8, 6, 3), loc=1e4)) + jnp.arange(8.0)[:, None, None]

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=P('d'), out_specs=P('d')
  )
  def run(x):
    pool = bnjax.batch_norm(
      x[0], bnjax.init_pooled_stats(3), use_running_average=False
    )[1]
    stats = {'pool': pool, 'ema': bnjax.BatchStats(x[0, 0], x[0, 1])}
    out = bnjax.training.average_stats(stats, 'd', weight=1.0)
    return jax.tree.map(lambda v: v[None], out)

  out = run(xs)
  whole = np.asarray(xs, np.float64).reshape(-1, 3)
  for d in range(8):
    pool = jax.tree.map(lambda v: v[d], out['pool'])
    np.testing.assert_array_equal(pool.count, 48)
    assert _rel(bnjax.population_stats(pool).var, whole.var(0)) < 1e-6
  np.testing.assert_allclose(
    out['ema'].mean[0], np.asarray(xs)[:, 0].mean(0), rtol=1e-6
  )


# ---- recalibration -----------------------------------------------------------


def test_recalibrate_function_keeps_layers_it_does_not_train():
  """Regression (issue 44, 9): recalibrate(function, ...) reset every layer
  the function did not train to mean 0, var 1; nnx and linen keep them, and
  all three raise when no layer trains."""

  def net(stats, x):
    y, a = bnjax.batch_norm(x, stats['a'], use_running_average=False)
    return y, {'a': a, 'b': stats['b']}

  kept = bnjax.BatchStats(jnp.array([5.0]), jnp.array([7.0]))
  batches = jnp.arange(8.0).reshape(4, 2, 1)
  out = bnjax.training.recalibrate(
    net, batches, variables={'a': bnjax.init_batch_stats(1), 'b': kept}
  )
  np.testing.assert_array_equal(out['b'].mean, kept.mean)
  np.testing.assert_array_equal(out['b'].var, kept.var)
  np.testing.assert_allclose(out['a'].var, np.var(np.arange(8.0)))

  def evaluate(stats, x):
    y, a = bnjax.batch_norm(x, stats['a'], use_running_average=True)
    return y, stats

  with pytest.raises(ValueError, match=r'no BatchStats.*training mode'):
    bnjax.training.recalibrate(
      evaluate, batches, variables={'a': bnjax.init_batch_stats(1)}
    )


@pytest.mark.filterwarnings('ignore:bnjax.precise:DeprecationWarning')
@pytest.mark.parametrize('entry', ['recalibrate', 'precise'])
def test_nnx_recalibration_is_exact_at_a_large_mean(entry):
  """Regression (issue 44, 10): nnx recalibration merged float32 (mean,
  var) pairs with weight 1 each (4.2e-3 off at |mean|/std 5e5) where the
  function and linen paths pool exact moments (1e-7); it pools them now,
  count-weighted, also over uneven masked batches."""
  x = randn((4, 32, 3), loc=5e5) + 0.3 * np.arange(4)[:, None, None]
  x = x.astype(np.float32)
  bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  bn.eval()
  if entry == 'recalibrate':
    bnjax.training.recalibrate(bn, jnp.asarray(x))
  else:  # the deprecated alias: the same route
    with pytest.warns(DeprecationWarning, match='recalibrate'):
      bnjax.precise.update_nnx_batch_stats(bn, jnp.asarray(x))
  whole = x.astype(np.float64).reshape(-1, 3)
  assert _rel(bn.var[...], whole.var(0)) < 1e-6
  assert bn.use_running_average and not hasattr(bn, 'pooled_count')
  # Count-weighted: batches with different numbers of values.
  mask = np.arange(32)[None, :, None] < np.array([4, 32, 8, 16])[:, None, None]
  mask = np.broadcast_to(mask, x.shape)
  bnjax.training.recalibrate(_Masked(bn), (jnp.asarray(x), jnp.asarray(mask)))
  assert (
    _rel(bn.var[...], x.astype(np.float64)[mask].reshape(-1, 3).var(0)) < 1e-6
  )


class _Masked(nnx.Module):
  def __init__(self, bn):
    self.bn = bn

  def __call__(self, xm):
    return self.bn(xm[0], mask=xm[1])


class _MaskedLinen(nn.Module):
  @nn.compact
  def __call__(self, xm):
    return bnjax.linen.BatchNorm(use_running_average=False)(xm[0], mask=xm[1])


def _recalibrate_masked(entry, batches):
  """(mean, var) that recalibrate gives each API's one-layer model on
  batches = (x, mask) stacked: the one route, every entry."""
  x0 = batches[0][0]
  if entry == 'function':
    net = lambda s, xm: bnjax.batch_norm(
      xm[0], s, use_running_average=False, mask=xm[1]
    )
    return bnjax.training.recalibrate(
      net, batches, variables=bnjax.init_batch_stats(3)
    )
  if entry == 'linen':
    v = _MaskedLinen().init(jax.random.key(0), (x0, batches[1][0]))
    s = bnjax.training.recalibrate(_MaskedLinen(), batches, variables=v)
    s = s['batch_stats']['BatchNorm_0']
    return s['mean'], s['var']
  if entry == 'nnx':
    bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    bnjax.training.recalibrate(_Masked(bn), batches)
    return bn.mean[...], bn.var[...]
  layer, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    3, batch_axis=0
  )
  state = bnjax.training.recalibrate(
    lambda st, xm: layer(xm[0], st, mask=xm[1]), batches, variables=state
  )
  return state.get(layer.state_index)


@pytest.mark.parametrize('entry', ['function', 'linen', 'nnx', 'equinox'])
def test_recalibration_pools_by_count_in_every_entry(entry):
  """Regression (issue 42, one pooling rule): nnx precise BN merged each
  batch with weight 1 (on 0d9df22^ its variance is 0.51 off here),
  where linen and the function pooled by count. Every entry of the one
  route now gives the float64 mean and biased variance of the masked-in
  values of all batches concatenated, batches of 2, 32, 8 and 16 values,
  at |mean|/std 1e4."""
  x = randn((4, 32, 3), loc=1e4) + 3.0 * np.arange(4)[:, None, None]
  x = x.astype(np.float32)
  sizes = np.array([2, 32, 8, 16])
  mask = np.arange(32)[None, :, None] < sizes[:, None, None]
  mask = np.broadcast_to(mask, x.shape)
  mean, var = _recalibrate_masked(entry, (jnp.asarray(x), jnp.asarray(mask)))
  whole = x.astype(np.float64)[mask].reshape(-1, 3)
  assert _rel(mean, whole.mean(0)) < 1e-7
  assert _rel(var, whole.var(0)) < 1e-6


@pytest.mark.parametrize('entry', ['function', 'linen', 'nnx', 'equinox'])
def test_recalibration_keeps_channels_the_batches_never_reach(entry):
  """Regression (issue 42, one write-back): linen recalibration wrote mean
  0 and var 1 into a channel no batch reached (every value masked out)
  where the function and nnx paths kept its statistics; all keep them."""
  x = jnp.asarray(randn((3, 8, 3)))
  mask = jnp.broadcast_to(jnp.array([True, True, False]), x.shape)
  if entry == 'function':
    old = bnjax.BatchStats(
      jnp.full(3, 2.0, jnp.float32), jnp.full(3, 5.0, jnp.float32)
    )
    mean, var = bnjax.training.recalibrate(
      lambda s, xm: bnjax.batch_norm(
        xm[0], s, use_running_average=False, mask=xm[1]
      ),
      (x, mask),
      variables=old,
    )
  elif entry == 'linen':
    v = _MaskedLinen().init(jax.random.key(0), (x[0], mask[0]))
    stats = {
      'BatchNorm_0': {
        'mean': jnp.full(3, 2.0, jnp.float32),
        'var': jnp.full(3, 5.0, jnp.float32),
      }
    }
    v = {**v, 'batch_stats': stats}
    s = bnjax.training.recalibrate(_MaskedLinen(), (x, mask), variables=v)
    mean, var = s['batch_stats']['BatchNorm_0'].values()
  elif entry == 'nnx':
    bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    bn.mean[...], bn.var[...] = (
      jnp.full(3, 2.0, jnp.float32),
      jnp.full(3, 5.0, jnp.float32),
    )
    bnjax.training.recalibrate(_Masked(bn), (x, mask))
    mean, var = bn.mean[...], bn.var[...]
  else:
    layer, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
      3, batch_axis=0
    )
    old = bnjax.BatchStats(
      jnp.full(3, 2.0, jnp.float32), jnp.full(3, 5.0, jnp.float32)
    )
    state = state.set(layer.state_index, old)
    state = bnjax.training.recalibrate(
      lambda st, xm: layer(xm[0], st, mask=xm[1]), (x, mask), variables=state
    )
    mean, var = state.get(layer.state_index)
  np.testing.assert_array_equal(mean[2], 2.0)
  np.testing.assert_array_equal(var[2], 5.0)
  whole = np.asarray(x, np.float64).reshape(-1, 3)[:, :2]
  assert _rel(var[:2], whole.var(0)) < 1e-6


def test_nnx_recalibration_keeps_layers_the_batches_never_reach():
  class TwoPaths(nnx.Module):
    def __init__(self):
      self.a = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
      self.b = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.a(x)

  m = TwoPaths()
  m.b.mean[...] = jnp.array([3.0, 4.0])
  bnjax.training.recalibrate(m, jnp.asarray(randn((3, 4, 2))))
  np.testing.assert_array_equal(m.b.mean[...], [3.0, 4.0])
  np.testing.assert_array_equal(m.b.var[...], [1.0, 1.0])


# ---- linen pooling -----------------------------------------------------------


def test_linen_pooling_stores_float16_statistics_as_float32():
  """Regression (issue 44, 2): linen pooling kept float16 batch_stats
  (param_dtype=float16, force_float32_reductions=False), so a pooled
  variance of 1.6e5 was stored as inf; a plain training step stores
  float32, and so does apply_pooled now."""
  bn = bnjax.linen.BatchNorm(
    use_running_average=False,
    param_dtype=jnp.float16,
    force_float32_reductions=False,
    momentum=0.0,
  )
  x = jnp.array([[0.0], [800.0]])
  v = bn.init(jax.random.key(0), x)
  _, upd = bn.apply(
    {**v, bnjax.linen.MOMENTS: {}},
    x,
    mutable=['batch_stats', bnjax.linen.MOMENTS],
  )
  stats, _ = bnjax.linen.apply_pooled(
    v['batch_stats'], upd[bnjax.linen.MOMENTS]
  )
  _, plain = bn.apply(v, x, mutable=['batch_stats'])
  for k in ('mean', 'var'):
    assert stats[k].dtype == plain['batch_stats'][k].dtype == jnp.float32
    np.testing.assert_array_equal(stats[k], plain['batch_stats'][k])
  assert stats['var'][0] == 160000.0


def test_apply_pooled_when_is_a_bool_scalar_in_linen_and_nnx():
  """A per-channel or float ``when`` broadcast silently into the update; a
  string failed inside jnp.where. Both helpers check it the same way."""
  bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  bnjax.training.start_pooling(bn)
  for bad in ('yes', jnp.ones(3, bool), jnp.float32(1)):
    with pytest.raises(TypeError, match=r'when must be a bool or a 0-d bool'):
      bnjax.training.apply_pooled(bn, when=bad)
    with pytest.raises(
      TypeError, match=r'linen.apply_pooled: when must be a bool'
    ):
      bnjax.linen.apply_pooled({}, {}, when=bad)
  jax.jit(lambda w: bnjax.linen.apply_pooled({}, {}, when=w))(True)
