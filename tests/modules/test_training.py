"""BN inside training loops, at model level (bnjax.training, the linen
batch_moments collection): accumulation equal to one whole-batch update,
freezing with bitwise-unchanged statistics, averaging per-device statistics,
recalibration; each against an independent float64 oracle or a hand average,
with sync on 8 CPU devices where it applies."""

import functools

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.linen
import bnjax.nnx
import bnjax.training
from tests import reference as ref
from tests._helpers import randn
from tests._sync import _mesh

MOMENTS = bnjax.linen.MOMENTS
K, B, F = 4, 8, 5  # micro-batches, rows each, input features


def _xs(seed=0, loc=1.0):
  return jnp.asarray(randn((K, B, F), loc=loc, scale=2.0, seed=seed))


class Net(nn.Module):
  bn_mode: str = 'train'

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6)(x)
    x = bnjax.linen.BatchNorm(**bnjax.training.mode_fields(self.bn_mode))(x)
    x = nn.Dense(3)(nn.relu(x))
    return bnjax.linen.BatchNorm(
      **bnjax.training.mode_fields(self.bn_mode, momentum=0.9)
    )(x)


def _rel(a, b):
  return np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b))


def _pooled_oracle(inputs, old_mean, old_var, momentum):
  """One EMA step towards the float64 moments of all micro-batches' inputs."""
  mean, var, _ = ref.moments(np.concatenate(inputs))
  return (
    momentum * np.asarray(old_mean, np.float64) + (1 - momentum) * mean,
    momentum * np.asarray(old_var, np.float64) + (1 - momentum) * var,
  )


# ---- accumulation ------------------------------------------------------------


def test_linen_accumulation_is_one_update_from_every_micro_batch():
  """Each layer pools its own input over the k micro-batches (the input the
  micro-batch training produced, captured by flax) and takes one EMA step,
  with its own momentum: equal to the float64 oracle within 1e-6."""
  xs = _xs()
  model = Net()
  v = model.init(jax.random.key(0), xs[0])
  moments, inputs = {}, {0: [], 1: []}
  for x in xs:
    _, upd = model.apply(
      {**v, MOMENTS: moments},
      x,
      capture_intermediates=True,
      mutable=['batch_stats', MOMENTS, 'intermediates'],
    )
    moments = upd[MOMENTS]
    np.testing.assert_array_equal(  # batch_stats untouched while pooling
      upd['batch_stats']['BatchNorm_0']['var'],
      v['batch_stats']['BatchNorm_0']['var'],
    )
    inter = upd['intermediates']
    inputs[0].append(np.asarray(inter['Dense_0']['__call__'][0], np.float64))
    inputs[1].append(np.asarray(inter['Dense_1']['__call__'][0], np.float64))
  stats, emptied = bnjax.linen.apply_pooled(v['batch_stats'], moments)
  for i, momentum in [(0, 0.99), (1, 0.9)]:
    old = v['batch_stats'][f'BatchNorm_{i}']
    mean, var = _pooled_oracle(inputs[i], old['mean'], old['var'], momentum)
    new = stats[f'BatchNorm_{i}']
    np.testing.assert_allclose(new['mean'], mean, rtol=1e-6, atol=1e-7)
    assert _rel(new['var'], var) < 1e-6
    assert not np.any(emptied[f'BatchNorm_{i}']['count'])
  jax.tree.map(
    lambda a, b: np.testing.assert_equal(a.dtype, b.dtype),
    stats,
    v['batch_stats'],
  )


def _pool_moments(bn, v, xs):
  """The pooled moments of a linen BN over the micro-batches xs."""
  moments = {}
  for x in xs:
    _, upd = bn.apply(
      {**v, MOMENTS: moments}, x, mutable=['batch_stats', MOMENTS]
    )
    moments = upd[MOMENTS]
  return moments


def test_linen_single_layer_accumulation_equals_one_call_on_the_whole_batch():
  bn = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.8)
  xs = _xs(loc=300.0)
  v = bn.init(jax.random.key(0), xs[0])
  moments = _pool_moments(bn, v, xs)
  stats, _ = bnjax.linen.apply_pooled(v['batch_stats'], moments)
  _, whole = bn.apply(v, xs.reshape(-1, F), mutable=['batch_stats'])
  for k in ('mean', 'var'):
    assert (
      _rel(stats[k], np.asarray(whole['batch_stats'][k], np.float64)) < 1e-6
    )


def test_linen_apply_pooled_takes_frozen_dicts_and_gives_them_back():
  """flax.core.freeze'd collections (a Mapping, not a dict) apply as dicts
  do and come back FrozenDicts, so a jitted carry keeps its structure (a
  FrozenDict batch_stats was refused as 'no BatchNorm statistics')."""
  bn = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.8)
  xs = _xs()
  v = bn.init(jax.random.key(0), xs[0])
  moments = _pool_moments(bn, v, xs)
  want = bnjax.linen.apply_pooled(v['batch_stats'], moments)
  got = bnjax.linen.apply_pooled(
    flax.core.freeze(v['batch_stats']), flax.core.freeze(moments)
  )
  for g, w in zip(got, want, strict=True):
    assert isinstance(g, flax.core.FrozenDict)
    jax.tree.map(np.testing.assert_array_equal, dict(g), w)


def test_linen_accumulation_under_optax_multisteps_in_one_jitted_step():
  """optax.MultiSteps accumulates gradients over k calls of one jitted step;
  the statistics pool in the train state and are applied when the
  optimizer applies (when=..., branch-free), once per k micro-batches."""
  xs = jnp.concatenate([_xs(seed=0), _xs(seed=50)])  # 2 full steps of K
  model = Net()
  v = model.init(jax.random.key(0), xs[0])
  opt = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=K)
  params, stats = v['params'], v['batch_stats']
  moments = jax.tree.map(
    jnp.zeros_like, model.apply(v, xs[0], mutable=[MOMENTS])[1][MOMENTS]
  )
  opt_state = opt.init(params)

  @jax.jit
  def step(params, stats, moments, opt_state, x):
    def loss(params):
      y, upd = model.apply(
        {'params': params, 'batch_stats': stats, MOMENTS: moments},
        x,
        mutable=['batch_stats', MOMENTS],
      )
      return jnp.mean(y**2), upd[MOMENTS]

    grads, moments = jax.grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    applies = opt.has_updated(opt_state)
    stats, moments = bnjax.linen.apply_pooled(stats, moments, when=applies)
    return optax.apply_updates(params, updates), stats, moments, opt_state

  history = []
  for x in xs:
    params, stats, moments, opt_state = step(
      params, stats, moments, opt_state, x
    )
    history.append(stats['BatchNorm_0']['mean'])
  # Unchanged within each group of K, one step at its end.
  for i in (0, 1, 2):
    np.testing.assert_array_equal(
      history[i], v['batch_stats']['BatchNorm_0']['mean']
    )
  # The one step: towards the float64 moments of the first K micro-batches'
  # BN inputs (the parameters MultiSteps held fixed through them).
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])
  inputs = [np.asarray(x, np.float64) @ w['Dense_0']['kernel'] for x in xs[:K]]
  mean, _ = _pooled_oracle(
    [h + w['Dense_0']['bias'] for h in inputs],
    v['batch_stats']['BatchNorm_0']['mean'],
    v['batch_stats']['BatchNorm_0']['var'],
    0.99,
  )
  np.testing.assert_allclose(history[3], mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(history[4], history[3])


def test_apply_pooled_has_one_call_and_one_return_in_every_entry():
  """Issue 42: bnjax.apply_pooled returned the statistics, linen's a tuple
  and took batch_moments; now every entry takes (batch_stats, pooled, *,
  when) and returns (batch_stats, emptied pool) (the nnx entry updates
  the model in place): a traced when=False keeps statistics and pool
  bitwise in all three, when=True empties the pools and gives one update,
  the same in all three (each pooled in its own compiled program: 1e-6)
  and the float64 oracle's."""
  bn = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.8)
  xs = _xs(loc=30.0)
  v = bn.init(jax.random.key(0), xs[0])
  pool, moments = bnjax.init_pooled_stats(F), {}
  m = bnjax.nnx.BatchNorm(F, momentum=0.8, rngs=nnx.Rngs(0))
  bnjax.training.start_pooling(m)
  for x in xs:
    _, pool = bnjax.batch_norm(x, pool, use_running_average=False)
    _, upd = bn.apply(
      {**v, MOMENTS: moments}, x, mutable=['batch_stats', MOMENTS]
    )
    moments = upd[MOMENTS]
    m(x)
  old = bnjax.BatchStats(v['batch_stats']['mean'], v['batch_stats']['var'])
  l_pool_in = bnjax.PooledStats(*map(moments.get, pool._fields))
  for when in (jnp.bool_(False), jnp.bool_(True)):
    m_in = (m.mean[...], m.var[...], m.pooled_count[...], m.pooled_m2[...])
    f_stats, f_pool = jax.jit(
      lambda s, p, w: bnjax.apply_pooled(s, p, momentum=0.8, when=w)
    )(old, pool, when)
    l_stats, l_pool = jax.jit(
      lambda s, p, w: bnjax.linen.apply_pooled(s, p, when=w)
    )(v['batch_stats'], moments, when)
    nnx.jit(lambda m, w: bnjax.training.apply_pooled(m, when=w))(m, when)
    l_stats = bnjax.BatchStats(l_stats['mean'], l_stats['var'])
    l_pool = bnjax.PooledStats(*map(l_pool.get, pool._fields))
    m_out = (m.mean[...], m.var[...], m.pooled_count[...], m.pooled_m2[...])
    if not when:  # everything kept, bitwise
      for got, want in [
        (f_stats, old),
        (f_pool, pool),
        (l_stats, old),
        (l_pool, l_pool_in),
        (m_out, m_in),
      ]:
        jax.tree.map(np.testing.assert_array_equal, got, want)
      continue
    for got in (*f_pool, *l_pool, *m_out[2:]):  # emptied
      np.testing.assert_array_equal(got, np.zeros(F))
    for got in (l_stats, bnjax.BatchStats(*m_out[:2])):
      np.testing.assert_allclose(got.mean, f_stats.mean, rtol=1e-6)
      np.testing.assert_allclose(got.var, f_stats.var, rtol=1e-6)
  mean, var = _pooled_oracle(
    [np.asarray(x) for x in xs], old.mean, old.var, 0.8
  )
  assert _rel(f_stats.var, var) < 1e-6
  np.testing.assert_allclose(f_stats.mean, mean, rtol=1e-6)


def test_linen_apply_pooled_batch_moments_keyword_is_a_deprecated_alias():
  bn = bnjax.linen.BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), _xs()[0])
  _, upd = bn.apply(
    {**v, MOMENTS: {}}, _xs()[0], mutable=['batch_stats', MOMENTS]
  )
  with pytest.warns(DeprecationWarning, match=r'pass pooled='):
    old = bnjax.linen.apply_pooled(v['batch_stats'], batch_moments=upd[MOMENTS])
  new = bnjax.linen.apply_pooled(v['batch_stats'], pooled=upd[MOMENTS])
  jax.tree.map(np.testing.assert_array_equal, old, new)
  with pytest.raises(TypeError, match=r'pooled is missing'):
    bnjax.linen.apply_pooled(v['batch_stats'])


def _nnx_net(seed=0):
  class N(nnx.Module):
    def __init__(self, rngs):
      self.d0 = nnx.Linear(F, 6, rngs=rngs)
      self.bn0 = bnjax.nnx.BatchNorm(6, rngs=rngs)
      self.d1 = nnx.Linear(6, 3, rngs=rngs)
      self.bn1 = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=rngs)

    def __call__(self, x):
      h = self.d0(x)
      self.seen0 = nnx.Intermediate(h)
      h = self.d1(nnx.relu(self.bn0(h)))
      self.seen1 = nnx.Intermediate(h)
      return self.bn1(h)

  return N(nnx.Rngs(seed))


def test_nnx_accumulation_in_nnx_jit_is_one_update_from_every_micro_batch():
  model = _nnx_net()
  old = {
    n: (getattr(model, n).mean[...], getattr(model, n).var[...])
    for n in ('bn0', 'bn1')
  }
  bnjax.training.start_pooling(model)

  @nnx.jit
  def step(model, x, last):
    y = model(x)
    bnjax.training.apply_pooled(model, when=last)
    return y, model.seen0[...], model.seen1[...]

  inputs = {'bn0': [], 'bn1': []}
  for i, x in enumerate(_xs()):
    _, s0, s1 = step(model, x, i == K - 1)
    inputs['bn0'].append(np.asarray(s0, np.float64))
    inputs['bn1'].append(np.asarray(s1, np.float64))
    if i < K - 1:  # pooling: the running statistics stay put
      np.testing.assert_array_equal(model.bn0.var[...], old['bn0'][1])
  for n, momentum in [('bn0', 0.99), ('bn1', 0.9)]:
    mean, var = _pooled_oracle(inputs[n], *old[n], momentum)
    layer = getattr(model, n)
    np.testing.assert_allclose(layer.mean[...], mean, rtol=1e-6, atol=1e-7)
    assert _rel(layer.var[...], var) < 1e-6
    assert not np.any(layer.pooled_count[...])  # emptied
  bnjax.training.stop_pooling(model)
  assert not hasattr(model.bn0, 'pooled_count')
  before = model.bn0.mean[...]
  model(_xs()[0])
  assert not np.array_equal(model.bn0.mean[...], before)  # per call again


def test_nnx_pooling_errors_name_the_fix():
  flax_model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(
    TypeError,
    match=r'only bnjax.nnx.BatchNorm layers pool'
    r'.*BatchNorm.*bnjax.nnx.convert',
  ):
    bnjax.training.start_pooling(flax_model)
  model = _nnx_net()
  with pytest.raises(
    ValueError,
    match=r'no BatchNorm layer of the model is '
    r'pooling; call bnjax.training.start_pooling',
  ):
    bnjax.training.apply_pooled(model)
  bnjax.training.start_pooling(model)
  with pytest.raises(ValueError, match='pooling already'):
    bnjax.training.start_pooling(model)
  with pytest.raises(
    ValueError,
    match=r"mode must be one of \('train', "
    r"'eval', 'frozen'\), got 'test'",
  ):
    bnjax.training.set_mode(model, 'test')
  with pytest.raises(
    TypeError,
    match=r'model must be an nnx.Module, got '
    r'Net.*mode_fields',
  ):
    bnjax.training.set_mode(Net(), 'eval')


# ---- freezing ----------------------------------------------------------------


class _Mixed(nnx.Module):
  """A backbone with a flax and a bnjax BN, and a head with its own BN."""

  def __init__(self, rngs):
    self.backbone = nnx.Sequential(
      nnx.Linear(F, 6, rngs=rngs),
      nnx.BatchNorm(6, rngs=rngs),
      nnx.relu,
      nnx.Linear(6, 6, rngs=rngs),
      bnjax.nnx.BatchNorm(6, rngs=rngs),
    )
    self.head = nnx.Sequential(
      nnx.Linear(6, 2, rngs=rngs), bnjax.nnx.BatchNorm(2, rngs=rngs)
    )

  def __call__(self, x):
    return self.head(nnx.relu(self.backbone(x)))


def _train_steps(model, steps=3):
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)

  for i in range(steps):
    step(model, opt, _xs(seed=i)[0])


@pytest.mark.parametrize('mode', ['frozen', 'eval'])
def test_a_frozen_sub_model_keeps_its_statistics_bitwise(mode):
  """jax-resnet#9: freeze the backbone's BN (flax's and bnjax's alike) while
  the head's BN trains its statistics; the backbone's are bitwise unchanged
  after optimizer steps, and 'train' restores each layer's momentum."""
  model = _Mixed(nnx.Rngs(0))
  bnjax.training.set_mode(model.backbone, mode)
  frozen = jax.tree.map(np.asarray, nnx.state(model.backbone, nnx.BatchStat))
  head = np.asarray(model.head.layers[1].mean[...])
  params = np.asarray(model.backbone.layers[0].kernel[...])
  _train_steps(model)
  jax.tree.map(
    np.testing.assert_array_equal,
    frozen,
    jax.tree.map(np.asarray, nnx.state(model.backbone, nnx.BatchStat)),
  )
  assert not np.array_equal(model.head.layers[1].mean[...], head)
  assert not np.array_equal(model.backbone.layers[0].kernel[...], params)
  bnjax.training.set_mode(model, 'train')
  assert model.backbone.layers[1].momentum == 0.99
  assert model.backbone.layers[4].momentum == 0.99
  assert not model.backbone.layers[4].use_running_average


def test_frozen_mode_uses_batch_statistics_and_they_get_no_gradient():
  model = _Mixed(nnx.Rngs(0))
  bnjax.training.set_mode(
    model, 'frozen', only=lambda path, m: 'head' not in path
  )
  assert model.head.layers[1].momentum == 0.99  # not picked
  x = _xs()[0]
  bn = model.backbone.layers[4]
  h = model.backbone.layers[3](
    nnx.relu(
      model.backbone.layers[2](
        model.backbone.layers[1](model.backbone.layers[0](x))
      )
    )
  )
  mean, var, _ = ref.moments(h)
  np.testing.assert_allclose(bn(h), ref.normalize(h, mean, var), atol=2e-5)
  grads = nnx.grad(
    lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.BatchStat)
  )(model)
  assert all(not np.any(g) for g in jax.tree.leaves(grads))
  # A non-finite batch does not reach frozen statistics either (1 * old +
  # 0 * NaN would be NaN): momentum 1 returns them as they were.
  before = np.asarray(bn.var[...])
  bn(h.at[0, 0].set(jnp.nan))
  np.testing.assert_array_equal(bn.var[...], before)


def test_bn_param_mask_freezes_or_trains_only_bn_affine_with_optax():
  model = Net()
  v = model.init(jax.random.key(0), _xs()[0])
  mask = bnjax.training.bn_param_mask(v['params'], v['batch_stats'])
  assert mask['BatchNorm_1'] == {'scale': True, 'bias': True}
  assert mask['Dense_0'] == {'kernel': False, 'bias': False}
  tx = optax.chain(optax.masked(optax.set_to_zero(), mask), optax.sgd(0.5))
  grads = jax.tree.map(jnp.ones_like, v['params'])
  updates, _ = tx.update(grads, tx.init(v['params']), v['params'])
  new = optax.apply_updates(v['params'], updates)
  np.testing.assert_array_equal(
    new['BatchNorm_0']['scale'], v['params']['BatchNorm_0']['scale']
  )
  np.testing.assert_array_equal(  # SGD's step of -0.5 * a gradient of 1
    new['Dense_0']['kernel'], v['params']['Dense_0']['kernel'] - 0.5
  )
  # nnx state trees give the same mask.
  m = _nnx_net()
  mask = bnjax.training.bn_param_mask(
    nnx.state(m, nnx.Param), nnx.state(m, nnx.BatchStat)
  )
  assert mask['bn0'] == {'scale': True, 'bias': True}
  assert mask['d0'] == {'kernel': False, 'bias': False}


def test_linen_frozen_mode_keeps_statistics_bitwise_and_eval_uses_them():
  xs = _xs()
  v = Net().init(jax.random.key(0), xs[0])
  _, upd = Net().apply(v, xs[0], mutable=['batch_stats'])  # a trained state
  v = {**v, **upd}
  _, frozen = Net('frozen').apply(v, xs[1], mutable=['batch_stats'])
  jax.tree.map(
    np.testing.assert_array_equal, frozen['batch_stats'], v['batch_stats']
  )
  y = Net('eval').apply(v, xs[1])
  assert np.all(np.isfinite(y))


# ---- averaging per-device statistics -----------------------------------------


def test_average_stats_over_a_mesh_axis_count_weighted():
  """Local-BN data parallelism on 8 devices: each device's running
  statistics differ; average_stats gives every device the weighted mean
  (a hand average), one collective for the whole tree; integer counts are
  kept."""
  mesh = _mesh()
  per = {
    'bn': bnjax.BatchStats(
      jnp.asarray(randn((8, 3), seed=1)),
      jnp.asarray(randn((8, 3), seed=2)) ** 2,
    ),
    'cum': bnjax.CumulativeStats(
      jnp.asarray(randn((8, 2), seed=3)),
      jnp.ones((8, 2)),
      jnp.full((8, 2), 7, jnp.int32),
    ),
  }
  w = jnp.arange(1.0, 9.0)

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P('d'), P('d')), out_specs=P('d')
  )
  def sync(per, w):
    local = jax.tree.map(lambda v: v[0], per)
    out = bnjax.training.average_stats(local, 'd', weight=w[0])
    return jax.tree.map(lambda v: v[None], out)

  got = sync(per, w)
  want = np.sum(np.asarray(w)[:, None] * np.asarray(per['bn'].mean), 0) / 36
  for d in range(8):
    np.testing.assert_allclose(got['bn'].mean[d], want, rtol=1e-6)
  np.testing.assert_array_equal(got['cum'].count, per['cum'].count)
  # Equal weights: the plain mean; stacked statistics (no axis_name) agree.
  plain = bnjax.training.average_stats(per)
  np.testing.assert_allclose(
    plain['bn'].var, np.mean(per['bn'].var, 0), rtol=1e-6
  )
  stacked = bnjax.training.average_stats(per, weight=w)
  np.testing.assert_allclose(stacked['bn'].mean, want, rtol=1e-6)


def test_average_stats_errors_name_the_fix():
  with pytest.raises(
    ValueError,
    match=r'weight of shape \(3,\) must have '
    r'one entry per device, \(2,\)',
  ):
    bnjax.training.average_stats({'m': jnp.ones((2, 4))}, weight=jnp.ones(3))
  with pytest.raises(ValueError, match='stacked along a leading device axis'):
    bnjax.training.average_stats({'m': jnp.ones(())})


# ---- recalibration -----------------------------------------------------------


def test_recalibrate_functional_linen_and_nnx_against_the_float64_oracle():
  """The three APIs: each layer's statistics become the float64 moments of
  its input over all N batches (a single BN layer: the input itself).
  Regression: linen_batch_stats raised IndexError on a model that is one
  BatchNorm (its statistics at the top of the collection)."""
  batches = _xs(loc=20.0)
  mean, var, _ = ref.moments(np.asarray(batches, np.float64).reshape(-1, F))

  def net(stats, x):
    y, s = bnjax.batch_norm(x, stats['bn'], use_running_average=False)
    return y, {'bn': s}

  got = bnjax.training.recalibrate(
    net, batches, variables={'bn': bnjax.init_batch_stats(F)}
  )['bn']
  bn = bnjax.linen.BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), batches[0])
  lin = bnjax.training.recalibrate(bn, batches, variables=v)['batch_stats']
  m = bnjax.nnx.BatchNorm(F, rngs=nnx.Rngs(0))
  m.eval()
  assert bnjax.training.recalibrate(m, batches) is m
  assert m.use_running_average  # mode restored
  for g in (
    got,
    bnjax.BatchStats(lin['mean'], lin['var']),
    bnjax.BatchStats(m.mean[...], m.var[...]),
  ):
    np.testing.assert_allclose(g.mean, mean, rtol=1e-6)
    assert _rel(g.var, var) < 1e-6


def test_recalibrate_errors_name_the_fix():
  m = bnjax.nnx.BatchNorm(F, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'recalibrate: variables is for a'):
    bnjax.training.recalibrate(m, _xs(), variables=nnx.state(m))
  with pytest.raises(ValueError, match='pass variables='):
    bnjax.training.recalibrate(bnjax.linen.BatchNorm(), _xs())
  with pytest.raises(ValueError, match='holds no bnjax.BatchStats'):
    bnjax.training.recalibrate(lambda s, x: (x, s), _xs(), variables={})
