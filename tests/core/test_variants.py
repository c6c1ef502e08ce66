"""Variants: one property suite over a registry, then each variant's own facts.

Every variant (EMA, cumulative, debiased, pooled, batch renorm, ghost BN,
frozen BN)
passes the same properties as the core: the float64 oracle, jit equals eager,
vmap over an ensemble, gradient checks, state invariants with no retrace, and
sync over k shards equals one call on the concatenated batch. After the
registry: each variant's exact formulas, first steps and errors. The linen
and nnx modules of each variant are tested in tests/modules, and precise BN
in tests/modules/test_recalibration.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bnjax
from tests import reference as ref
from tests._helpers import randn

C = 3
EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  init: Callable  # C -> state (already stepped once where useful)
  apply: Callable  # (x, state, g, b, train, **kw) -> (y, new)
  oracle: Callable  # (x, state, g, b, train) -> (y, new fields)
  sync: bool = True
  batch: int = 8


def _stepped(init):
  """A state that has seen one batch, so every rule is past its first step."""

  def make(c):
    s = init(c)
    x = jnp.asarray(randn((6, c), loc=1.0, scale=2.0, seed=9))
    return bnjax.batch_norm(x, s, use_running_average=False, momentum=0.7)[1]

  return make


def _bn_oracle(update):
  def oracle(x, s, g, b, train):
    pop = bnjax.population_stats(s)
    if not train:
      return ref.normalize(x, pop.mean, pop.var, g, b, -1, EPS), tuple(s)
    bm, bv, _ = ref.moments(x)
    y = ref.normalize(x, bm, bv, g, b, -1, EPS)
    return y, update(s, bm, bv)

  return oracle


def _bn_apply(x, s, g, b, train, **kw):
  return bnjax.batch_norm(
    x, s, g, b, use_running_average=not train, momentum=0.7, epsilon=EPS, **kw
  )


def _np(s):
  return [np.asarray(v, np.float64) for v in s]


def _renorm_init(c):
  # Far enough from the batch that r and d are clipped in every channel: the
  # stop-gradient is then the true derivative, so check_grads applies.
  # test_renorm_gradient_treats_r_and_d_as_constants covers the unclipped case.
  assert c == 3
  return bnjax.RenormStats(
    jnp.array([-3.0, 4.0, 30.0]), jnp.array([0.2, 0.3, 10.0])
  )


def _renorm_apply(x, s, g, b, train, **kw):
  return bnjax.batch_renorm(
    x,
    s,
    g,
    b,
    use_running_average=not train,
    r_max=1.5,
    d_max=0.3,
    momentum=0.7,
    epsilon=EPS,
    **kw,
  )


def _renorm_oracle(x, s, g, b, train):
  y, m, sd = ref.batch_renorm(
    x,
    *_np(s),
    g,
    b,
    use_running_average=not train,
    r_max=1.5,
    d_max=0.3,
    momentum=0.7,
    epsilon=EPS,
  )
  return y, (m, sd)


def _ghost_apply(x, s, g, b, train, **kw):
  return bnjax.batch_norm(
    x,
    s,
    g,
    b,
    use_running_average=not train,
    momentum=0.7,
    epsilon=EPS,
    virtual_batch_size=4,
    **kw,
  )


def _ghost_oracle(x, s, g, b, train):
  if not train:
    return ref.normalize(x, s.mean, s.var, g, b, -1, EPS), tuple(s)
  y, m, v = ref.ghost_batch_norm(
    x, *_np(s), g, b, virtual_batch_size=4, momentum=0.7, epsilon=EPS
  )
  return y, (m, v)


def _pooled_oracle(x, s, g, b, train):
  """Each batch normalized by its own statistics; the pool is the float64
  mean and sum of squares of everything pooled (Chan's merge by hand)."""
  count, mean, lo, m2 = _np(s)
  if not train:
    var = np.where(count > 0, m2 / np.maximum(count, 1), 1)
    return ref.normalize(x, mean + lo, var, g, b, -1, EPS), tuple(s)
  bm, bv, n = ref.moments(x)
  total = count + n
  delta = bm - (mean + lo)
  return ref.normalize(x, bm, bv, g, b, -1, EPS), (
    total,
    mean + lo + delta * n / total,
    0 * total,
    m2 + n * bv + delta**2 * count * n / total,
  )


def _frozen_apply(x, s, g, b, train, **kw):
  del train, kw  # frozen: always the stored statistics
  return bnjax.frozen_batch_norm(x, s, g, b, epsilon=EPS)


def _frozen_oracle(x, s, g, b, train):
  return ref.normalize(x, s.mean, s.var, g, b, -1, EPS), tuple(s)


VARIANTS = [
  Variant(
    'ema',
    _stepped(bnjax.init_batch_stats),
    _bn_apply,
    _bn_oracle(
      lambda s, m, v: (
        0.7 * np.asarray(s.mean) + 0.3 * m,
        0.7 * np.asarray(s.var) + 0.3 * v,
      )
    ),
  ),
  Variant(
    'cumulative',
    _stepped(bnjax.init_cumulative_stats),
    _bn_apply,
    _bn_oracle(
      lambda s, m, v: ref.cumulative_update(
        *_np(s[:2]), np.asarray(s.count), m, v
      )
    ),
  ),
  Variant(
    'debiased',
    _stepped(bnjax.init_debiased_stats),
    _bn_apply,
    _bn_oracle(lambda s, m, v: ref.debiased_update(*_np(s), m, v, 0.7)),
  ),
  Variant('renorm', _renorm_init, _renorm_apply, _renorm_oracle),
  Variant(
    'ghost', _stepped(bnjax.init_batch_stats), _ghost_apply, _ghost_oracle
  ),
  Variant(
    'pooled', _stepped(bnjax.init_pooled_stats), _bn_apply, _pooled_oracle
  ),
  Variant(
    'frozen',
    _stepped(bnjax.init_batch_stats),
    _frozen_apply,
    _frozen_oracle,
    sync=False,
  ),
]
IDS = [v.name for v in VARIANTS]


def _inputs(variant, n=None, seed=0):
  x = jnp.asarray(randn((n or variant.batch, C), loc=0.5, scale=2.0, seed=seed))
  g = jnp.asarray(randn(C, loc=1.0, scale=0.3, seed=seed + 1))
  b = jnp.asarray(randn(C, seed=seed + 2))
  return x, variant.init(C), g, b


def _close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('v', VARIANTS, ids=IDS)
def test_oracle(v, train):
  x, s, g, b = _inputs(v)
  y, new = v.apply(x, s, g, b, train)
  y_ref, new_ref = v.oracle(x, s, g, b, train)
  _close(y, y_ref)
  for got, want in zip(new, new_ref, strict=True):
    _close(got, want)


@pytest.mark.parametrize('v', VARIANTS, ids=IDS)
def test_jit_equals_eager_state_invariants_and_no_retrace(v):
  x, s, g, b = _inputs(v)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, s, g, b):
    return v.apply(x, s, g, b, True)

  y0, new0 = v.apply(x, s, g, b, True)
  y1, new1 = step(x, s, g, b)
  _close(y1, np.asarray(y0, np.float64), 1e-6)
  y2, new2 = step(x + 1.0, new1, g, b)  # second call: no retrace
  for st in (new0, new1, new2):
    assert type(st) is type(s)
    chex.assert_trees_all_equal_shapes_and_dtypes(st, s)
  chex.clear_trace_counter()


@pytest.mark.parametrize('v', VARIANTS, ids=IDS)
def test_vmap_over_an_ensemble(v):
  xs = jnp.stack([_inputs(v, seed=i)[0] for i in range(3)])
  s, g, b = _inputs(v)[1:]
  ss = jax.tree.map(lambda a: jnp.stack([a] * 3), s)
  ys, news = jax.vmap(lambda x, s: v.apply(x, s, g, b, True))(xs, ss)
  for i in range(3):
    y, new = v.apply(xs[i], s, g, b, True)
    _close(ys[i], np.asarray(y, np.float64), 1e-6)
    jax.tree.map(
      lambda a, c: _close(a[i], np.asarray(c, np.float64), 1e-6), news, new
    )


@pytest.mark.parametrize('v', VARIANTS, ids=IDS)
def test_check_grads(v):
  with jax.enable_x64(True):
    x, s, g, b = _inputs(v)
    x, g, b = (jnp.asarray(a, jnp.float64) for a in (x, g, b))
    s = jax.tree.map(
      lambda a: (
        a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
      ),
      s,
    )
    f = lambda x, g, b: v.apply(x, s, g, b, True)[0]
    check_grads(
      f, (x, g, b), order=1, modes=('fwd', 'rev'), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize(
  'v', [v for v in VARIANTS if v.sync], ids=[v.name for v in VARIANTS if v.sync]
)
def test_sync_over_shards_equals_global_batch(v):
  k = 4
  x, s, g, b = _inputs(v, n=4 * k)
  y_g, new_g = v.apply(x, s, g, b, True)
  shard = lambda xs: v.apply(xs, s, g, b, True, axis_name='i')
  ys, news = jax.vmap(shard, axis_name='i')(x.reshape(k, 4, C))
  _close(ys.reshape(x.shape), np.asarray(y_g, np.float64), 1e-5)
  for got, want in zip(news, new_g, strict=True):
    for i in range(k):  # identical on every shard, and equal to global
      _close(got[i], np.asarray(want, np.float64), 1e-5)
  # Gradients of a global-mean loss, too.
  loss_g = lambda x, g, b: jnp.mean(jnp.sin(v.apply(x, s, g, b, True)[0]))
  loss_s = lambda x, g, b: jnp.mean(
    jnp.sin(
      jax.vmap(
        lambda xs: v.apply(xs, s, g, b, True, axis_name='i')[0], axis_name='i'
      )(x.reshape(k, 4, C))
    )
  )
  for a, c in zip(
    jax.grad(loss_s, (0, 1, 2))(x, g, b),
    jax.grad(loss_g, (0, 1, 2))(x, g, b),
    strict=True,
  ):
    _close(a, np.asarray(c, np.float64), 1e-5)


# ======================================================= each variant ===

X = jnp.asarray(randn((8, 3), loc=2.0, scale=3.0, seed=0))


def _bn(x, s, **kw):
  return bnjax.batch_norm(x, s, use_running_average=False, **kw)


# ---- cumulative average and zero-debiased EMA -------------------------------


def test_cumulative_first_step_is_the_batch_and_then_the_plain_average():
  s = bnjax.init_cumulative_stats(3)
  batches = [X, X * 2 + 1, X[:5] - 3]
  means, vars_ = [], []
  for i, x in enumerate(batches):
    _, s = _bn(x, s, momentum=0.3)  # momentum is not used by this rule
    bm, bv, _ = ref.moments(x)
    means.append(bm)
    vars_.append(bv)
    if i == 0:  # exactly the batch statistics, not a 99% pull to 0 and 1
      np.testing.assert_array_equal(s.mean, bnjax.moments(x)[0])
    np.testing.assert_allclose(s.mean, np.mean(means, 0), rtol=1e-6)
    np.testing.assert_allclose(s.var, np.mean(vars_, 0), rtol=1e-5)
  assert s.count.dtype == jnp.int32
  np.testing.assert_array_equal(s.count, [3, 3, 3])


def test_cumulative_skips_channels_with_no_valid_values():
  mask = jnp.broadcast_to(jnp.array([True, True, False]), X.shape)
  s0 = bnjax.init_cumulative_stats(3)
  _, s = _bn(X, s0, mask=mask)
  np.testing.assert_array_equal(s.count, [1, 1, 0])
  assert s.mean[2] == 0 and s.var[2] == 1


def test_debiased_first_step_is_exact_and_variance_is_not_inflated():
  """Regression: equinox starts the variance EMA at 1 but debiases it as if it
  started at 0, so after one step at momentum 0.99 its inference variance is
  about var + 99. Both hidden EMAs here start at 0."""
  s = bnjax.init_debiased_stats(3)
  pop = bnjax.population_stats(s)
  np.testing.assert_array_equal(pop.mean, 0)
  np.testing.assert_array_equal(pop.var, 1)
  _, s = _bn(X, s, momentum=0.99)
  bm, bv, _ = ref.moments(X)
  pop = bnjax.population_stats(s)
  np.testing.assert_allclose(pop.mean, bm, rtol=1e-5)
  np.testing.assert_allclose(pop.var, bv, rtol=1e-5)
  # equinox's rule (EMA from 1, debiased as if from 0) would give about
  # bv + 99 here; bnjax's variance is nowhere near it. (This compared the
  # formula with itself before, a test that could not fail.)
  equinox_var = (0.99 * 1 + 0.01 * bv) / (1 - 0.99)
  assert np.all(equinox_var - np.asarray(pop.var) > 98)
  # After t steps with a fixed momentum the weight is 1 - m**t (optax/haiku).
  for _ in range(4):
    _, s = _bn(X, s, momentum=0.99)
  np.testing.assert_allclose(s.weight, 1 - 0.99**5, rtol=1e-5)
  np.testing.assert_allclose(bnjax.population_stats(s).var, bv, rtol=1e-5)


def test_inference_uses_the_population_statistics():
  s = bnjax.init_debiased_stats(3)
  _, s = _bn(X, s, momentum=0.9)
  y, same = bnjax.batch_norm(X, s, use_running_average=True, epsilon=1e-3)
  assert same is s
  bm, bv, _ = ref.moments(X)
  np.testing.assert_allclose(
    y, ref.normalize(X, bm, bv, epsilon=1e-3), atol=2e-5, rtol=2e-5
  )


# ---- batch renorm -----------------------------------------------------------


def test_renorm_errors_name_the_fix():
  s = bnjax.init_renorm_stats(3)
  kw = dict(use_running_average=False)
  with pytest.raises(ValueError, match=r'r_max=0.5 must be >= 1'):
    bnjax.batch_renorm(X, s, r_max=0.5, d_max=1.0, **kw)
  with pytest.raises(ValueError, match=r'd_max=-1.0 must be >= 0'):
    bnjax.batch_renorm(X, s, r_max=2.0, d_max=-1.0, **kw)
  with pytest.raises(
    TypeError,
    match=r'RenormStats\(mean, std\), got '
    r'BatchStats.*init_renorm_stats.*jnp.sqrt',
  ):
    bnjax.batch_renorm(X, bnjax.init_batch_stats(3), r_max=2.0, d_max=1.0, **kw)
  with pytest.raises(TypeError, match=r'got RenormStats'):
    bnjax.batch_norm(X, s, **kw)


def test_renorm_with_no_room_is_plain_bn():
  s = bnjax.RenormStats(jnp.array([5.0, -1, 0]), jnp.array([0.1, 3, 9]))
  y, _ = bnjax.batch_renorm(
    X, s, use_running_average=False, r_max=1.0, d_max=0.0
  )
  y_bn, _ = _bn(X, bnjax.init_batch_stats(3))
  np.testing.assert_allclose(y, y_bn, atol=1e-6)


def test_renorm_limits_are_traced_so_a_schedule_never_retraces():
  """A schedule of (r_max, d_max) runs in one trace, and each step clips r
  and d at that step's limits: output and new state equal the float64
  oracle (Ioffe 2017, Algorithm 1) at each. It only checked that the first
  and last outputs differ before."""
  s = bnjax.RenormStats(jnp.array([1.0, 2, 3]), jnp.array([0.5, 1, 2]))
  m64, v64, _ = ref.moments(X)
  sd64 = np.sqrt(v64 + 1e-5)
  r64 = sd64 / np.asarray(s.std, np.float64)  # 7.1, 1.95, 0.87
  d64 = (m64 - np.asarray(s.mean, np.float64)) / np.asarray(s.std, np.float64)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, s, r_max, d_max):
    return bnjax.batch_renorm(
      x, s, use_running_average=False, r_max=r_max, d_max=d_max
    )

  # Each step clips some channels and leaves others: r from above (1.5, 3)
  # and from below (1), d from both sides (0.5) and not at all (5).
  schedule = [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)]
  clipped_r = [np.abs(np.log(r64)) > np.log(r) for r, _ in schedule]
  clipped_d = [np.abs(d64) > d for _, d in schedule]
  assert [c.tolist() for c in clipped_r] == [
    [True, True, True],
    [True, True, False],
    [True, False, False],
  ]
  assert [c.tolist() for c in clipped_d] == [
    [True, True, True],
    [True, False, True],
    [False, False, False],
  ]
  for r_max, d_max in schedule:
    y, new = step(X, s, jnp.float32(r_max), jnp.float32(d_max))
    want_y, want_mean, want_std = ref.batch_renorm(
      X, s.mean, s.std, use_running_average=False, r_max=r_max, d_max=d_max
    )
    np.testing.assert_allclose(y, want_y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new.mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(new.std, want_std, rtol=1e-6)
  chex.clear_trace_counter()


def test_renorm_gradient_treats_r_and_d_as_constants():
  with jax.enable_x64(True):
    x = jnp.asarray(X, jnp.float64)
    g, b = jnp.array([1.0, 2, 0.5]), jnp.array([0.1, 0, -1])
    s = bnjax.RenormStats(
      jnp.array([2.2, 1.5, 2.0]), jnp.array([2.5, 3.5, 3.0])
    )  # r, d not clipped

    def direct(x, g, b):  # the paper's formula, autodiffed
      mu, var = jnp.mean(x, 0), jnp.var(x, 0)
      sig = jnp.sqrt(var + 1e-5)
      r = jax.lax.stop_gradient(jnp.clip(sig / s.std, 1 / 3, 3))
      d = jax.lax.stop_gradient(jnp.clip((mu - s.mean) / s.std, -5, 5))
      return ((x - mu) / sig * r + d) * g + b

    ours = lambda x, g, b: bnjax.batch_renorm(
      x, s, g, b, use_running_average=False, r_max=3.0, d_max=5.0
    )[0]
    ct = jnp.asarray(randn(X.shape, np.float64, seed=5))
    loss = lambda f: lambda *a: jnp.vdot(f(*a), ct)
    np.testing.assert_allclose(ours(x, g, b), direct(x, g, b), rtol=1e-12)
    for a, c in zip(
      jax.grad(loss(ours), (0, 1, 2))(x, g, b),
      jax.grad(loss(direct), (0, 1, 2))(x, g, b),
      strict=True,
    ):
      np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)


# ---- ghost batch norm -------------------------------------------------------


def test_ghost_equals_batch_norm_on_each_chunk():
  x = jnp.asarray(randn((12, 2, 3), loc=1.0, seed=3))
  s = bnjax.init_batch_stats(3)
  y, new = _bn(x, s, virtual_batch_size=4, momentum=0.5)
  chunks = [_bn(x[i : i + 4], s, momentum=0.5) for i in range(0, 12, 4)]
  np.testing.assert_allclose(
    y, jnp.concatenate([c[0] for c in chunks]), atol=1e-6
  )
  np.testing.assert_allclose(
    new.mean, np.mean([c[1].mean for c in chunks], 0), rtol=1e-6
  )


def test_ghost_errors():
  s = bnjax.init_batch_stats(3)
  with pytest.raises(
    ValueError,
    match=r'batch size 8 on axis 0, which '
    r'virtual_batch_size=3 does not divide.*for example 2 or 4',
  ):
    _bn(X, s, virtual_batch_size=3)
  with pytest.raises(ValueError, match='axis 0 is a feature axis'):
    _bn(X.T, bnjax.init_batch_stats(3), axis=0, virtual_batch_size=1)


# ---- frozen BN --------------------------------------------------------------


def test_frozen_trains_the_affine_only():
  s = bnjax.BatchStats(jnp.array([1.0, 2, 3]), jnp.array([4.0, 1, 2]))
  g, b = jnp.ones(3), jnp.zeros(3)

  def loss(g, b, s):
    y, new = bnjax.frozen_batch_norm(X, s, g, b)
    return jnp.sum(y**2), new

  (_, new), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(g, b, s)
  jax.tree.map(np.testing.assert_array_equal, new, s)
  assert np.all(np.abs(grads[0]) > 0) and np.all(np.abs(grads[1]) > 0)
  np.testing.assert_array_equal(grads[2].mean, 0)
  np.testing.assert_array_equal(grads[2].var, 0)
