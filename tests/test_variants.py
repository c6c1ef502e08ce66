"""Variants: one property suite over a registry, plus each variant's own facts.

Every variant (EMA, cumulative, debiased, batch renorm, ghost BN, frozen BN)
passes the same properties as the core: the float64 oracle, jit equals eager,
vmap over an ensemble, gradient checks, state invariants with no retrace, and
sync over k shards equals one call on the concatenated batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

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
  init: Callable            # C -> state (already stepped once where useful)
  apply: Callable           # (x, state, g, b, train, **kw) -> (y, new)
  oracle: Callable          # (x, state, g, b, train) -> (y, new fields)
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
  return bnjax.batch_norm(x, s, g, b, use_running_average=not train,
                          momentum=0.7, epsilon=EPS, **kw)


def _np(s):
  return [np.asarray(v, np.float64) for v in s]


def _renorm_init(c):
  # Far enough from the batch that r and d are clipped in every channel: the
  # stop-gradient is then the true derivative, so check_grads applies.
  # test_renorm_gradient_treats_r_and_d_as_constants covers the unclipped case.
  assert c == 3
  return bnjax.RenormStats(jnp.array([-3.0, 4.0, 30.0]),
                           jnp.array([0.2, 0.3, 10.0]))


def _renorm_apply(x, s, g, b, train, **kw):
  return bnjax.batch_renorm(x, s, g, b, use_running_average=not train,
                            r_max=1.5, d_max=0.3, momentum=0.7, epsilon=EPS,
                            **kw)


def _renorm_oracle(x, s, g, b, train):
  y, m, sd = ref.batch_renorm(x, *_np(s), g, b, use_running_average=not train,
                              r_max=1.5, d_max=0.3, momentum=0.7, epsilon=EPS)
  return y, (m, sd)


def _ghost_apply(x, s, g, b, train, **kw):
  return bnjax.batch_norm(x, s, g, b, use_running_average=not train,
                          momentum=0.7, epsilon=EPS, virtual_batch_size=4,
                          **kw)


def _ghost_oracle(x, s, g, b, train):
  if not train:
    return ref.normalize(x, s.mean, s.var, g, b, -1, EPS), tuple(s)
  y, m, v = ref.ghost_batch_norm(x, *_np(s), g, b, virtual_batch_size=4,
                                 momentum=0.7, epsilon=EPS)
  return y, (m, v)


def _frozen_apply(x, s, g, b, train, **kw):
  del train, kw  # frozen: always the stored statistics
  return bnjax.frozen_batch_norm(x, s, g, b, epsilon=EPS)


def _frozen_oracle(x, s, g, b, train):
  return ref.normalize(x, s.mean, s.var, g, b, -1, EPS), tuple(s)


VARIANTS = [
    Variant('ema', _stepped(bnjax.init_batch_stats), _bn_apply,
            _bn_oracle(lambda s, m, v: (0.7 * np.asarray(s.mean) + 0.3 * m,
                                        0.7 * np.asarray(s.var) + 0.3 * v))),
    Variant('cumulative', _stepped(bnjax.init_cumulative_stats), _bn_apply,
            _bn_oracle(lambda s, m, v: ref.cumulative_update(
                *_np(s[:2]), np.asarray(s.count), m, v))),
    Variant('debiased', _stepped(bnjax.init_debiased_stats), _bn_apply,
            _bn_oracle(lambda s, m, v: ref.debiased_update(*_np(s), m, v,
                                                           0.7))),
    Variant('renorm', _renorm_init, _renorm_apply, _renorm_oracle),
    Variant('ghost', _stepped(bnjax.init_batch_stats), _ghost_apply,
            _ghost_oracle),
    Variant('frozen', _stepped(bnjax.init_batch_stats), _frozen_apply,
            _frozen_oracle, sync=False),
]
IDS = [v.name for v in VARIANTS]


def _inputs(variant, n=None, seed=0):
  x = jnp.asarray(randn((n or variant.batch, C), loc=0.5, scale=2.0,
                        seed=seed))
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
  for got, want in zip(new, new_ref):
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
    jax.tree.map(lambda a, c: _close(a[i], np.asarray(c, np.float64), 1e-6),
                 news, new)


@pytest.mark.parametrize('v', VARIANTS, ids=IDS)
def test_check_grads(v):
  with jax.enable_x64(True):
    x, s, g, b = _inputs(v)
    x, g, b = (jnp.asarray(a, jnp.float64) for a in (x, g, b))
    s = jax.tree.map(lambda a: a.astype(jnp.float64)
                     if jnp.issubdtype(a.dtype, jnp.floating) else a, s)
    f = lambda x, g, b: v.apply(x, s, g, b, True)[0]
    check_grads(f, (x, g, b), order=1, modes=('fwd', 'rev'), atol=1e-6,
                rtol=1e-6)


@pytest.mark.parametrize('v', [v for v in VARIANTS if v.sync], ids=[
    v.name for v in VARIANTS if v.sync])
def test_sync_over_shards_equals_global_batch(v):
  k = 4
  x, s, g, b = _inputs(v, n=4 * k)
  y_g, new_g = v.apply(x, s, g, b, True)
  shard = lambda xs: v.apply(xs, s, g, b, True, axis_name='i')
  ys, news = jax.vmap(shard, axis_name='i')(x.reshape(k, 4, C))
  _close(ys.reshape(x.shape), np.asarray(y_g, np.float64), 1e-5)
  for got, want in zip(news, new_g):
    for i in range(k):  # identical on every shard, and equal to global
      _close(got[i], np.asarray(want, np.float64), 1e-5)
  # Gradients of a global-mean loss, too.
  loss_g = lambda x, g, b: jnp.mean(jnp.sin(v.apply(x, s, g, b, True)[0]))
  loss_s = lambda x, g, b: jnp.mean(jnp.sin(jax.vmap(
      lambda xs: v.apply(xs, s, g, b, True, axis_name='i')[0],
      axis_name='i')(x.reshape(k, 4, C))))
  for a, c in zip(jax.grad(loss_s, (0, 1, 2))(x, g, b),
                  jax.grad(loss_g, (0, 1, 2))(x, g, b)):
    _close(a, np.asarray(c, np.float64), 1e-5)
