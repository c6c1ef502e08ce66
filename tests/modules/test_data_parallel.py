"""Data-parallel training as users write it: every pattern, every API.

One matrix: each API (``bnjax.batch_norm``, ``bnjax.linen``, ``bnjax.nnx``,
``bnjax.equinox``) under each way current JAX splits a batch over devices,
on both statistics paths (the CPU's, and the GPU/TPU one run here), against
the float64 global batch (tests/_sync.py): the output, the new running
statistics and the gradients of x, scale and bias.

The patterns: ``jit`` on ``NamedSharding`` inputs with no context mesh (JAX's
"distributed arrays" tutorial and flax's examples), on Explicit and on Auto
axes; the same under ``jax.set_mesh``; a 2-D ``('data', 'model')`` mesh with
the channels over 'model', and a ``shard_map`` over 'data' alone on it;
``jax.shard_map`` and ``pmap`` with ``axis_name``; masked and uneven
shards; nnx parameters and statistics with sharding annotations under
``nnx.jit``.
"""

from __future__ import annotations

import contextlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.equinox
import bnjax.linen
import bnjax.nnx
from bnjax._moments import dispatch
from tests._helpers import randn
from tests._sync import D, _assert_same, _global

AxisType = getattr(jax.sharding, 'AxisType', None)
APIS = ('batch_norm', 'linen', 'nnx', 'equinox')
MOMENTUM = 0.9


@contextlib.contextmanager
def stats_path(path):
  """Forces one statistics path ('cpu' or 'accelerator') for a test."""
  old = dispatch._path
  dispatch._path = path
  for f in (dispatch._local_stats, dispatch._exact_partial):
    f.clear_cache()
  try:
    yield
  finally:
    dispatch._path = old
    for f in (dispatch._local_stats, dispatch._exact_partial):
      f.clear_cache()


@pytest.fixture(params=['cpu', 'accelerator'])
def path(request):
  with stats_path(request.param):
    yield request.param


def _problem(seed, rows=D * 8, c=4, loc=50.0):
  """Far enough from zero (mean**2 > 8 var) that the CPU path takes its
  exact branch: both branches of the conditional are traced anyway."""
  x = randn((rows, c), loc=loc, scale=3.0, seed=seed)
  g = 1 + randn((c,), seed=seed + 1) ** 2
  b = randn((c,), seed=seed + 2)
  w = randn((rows, c), seed=seed + 3)
  stats = bnjax.BatchStats(jnp.asarray(randn((c,), seed=seed + 4)), jnp.ones(c))
  return x, g, b, w, stats


# ------------------------------------------------------ the four APIs ---


def bn_apply(api, axis_name=None, sync='auto'):
  """``f(x, g, b, stats, mask) -> (y, (mean, var))`` through one API, x of
  shape (batch, channels), training mode, momentum 0.9."""
  kw = dict(momentum=MOMENTUM, axis_name=axis_name, sync=sync)

  def fn(x, g, b, stats, mask=None):
    y, new = bnjax.batch_norm(
      x, stats, g, b, use_running_average=False, mask=mask, **kw
    )
    return y, (new.mean, new.var)

  def linen(x, g, b, stats, mask=None):
    m = bnjax.linen.BatchNorm(use_running_average=False, **kw)
    v = {
      'params': {'scale': g, 'bias': b},
      'batch_stats': {'mean': stats.mean, 'var': stats.var},
    }
    y, upd = m.apply(v, x, mask=mask, mutable=['batch_stats'])
    return y, (upd['batch_stats']['mean'], upd['batch_stats']['var'])

  def nnx_(x, g, b, stats, mask=None):
    m = bnjax.nnx.BatchNorm(x.shape[-1], rngs=nnx.Rngs(0), **kw)
    for var, v in ((m.scale, g), (m.bias, b), (m.mean, stats.mean)):
      _set(var, v)
    _set(m.var, stats.var)
    y = m(x, mask=mask)
    return y, (m.mean[...], m.var[...])

  def equinox(x, g, b, stats, mask=None):
    bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
      x.shape[-1], batch_axis=0, **kw
    )
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (g, b))
    # The statistics as passed (placed on a mesh or not): State.set would
    # refuse a sharding type the initial state lacks.
    state = jax.tree.unflatten(jax.tree.structure(state), list(stats))
    y, state = bn(x, state, mask=mask)
    new = state.get(bn.state_index)
    return y, (new.mean, new.var)

  return {'batch_norm': fn, 'linen': linen, 'nnx': nnx_, 'equinox': equinox}[
    api
  ]


def _set(variable, value):
  """Replaces an nnx Variable's value (whatever its sharding)."""
  if hasattr(variable, 'set_value'):
    variable.set_value(value)
  else:  # pragma: no cover - flax without set_value
    variable.value = value


def _grad_step(f, w, total):
  """The gradient of the global batch's mean weighted output through
  ``f(x, g, b, stats)``, differentiated from outside whatever maps f over
  devices."""

  def loss(x, g, b, stats):
    y, new = f(x, g, b, stats)
    return jnp.sum(w * y) / total, (y, new)

  return jax.grad(loss, (0, 1, 2), has_aux=True)


def _check(out, x, g, b, w, stats, mask=None, rtol=2e-5, atol=5e-6):
  grads, (y, (mean, var)) = out
  want_y, want_new, want_grads = _global(x, g, b, w, stats, mask)
  _assert_same(
    (y, (mean, var), grads),
    (want_y, (want_new.mean, want_new.var), want_grads),
    rtol=rtol,
    atol=atol,
  )


def _mesh(kind, shape=(D,), names=('d',)):
  if AxisType is None:  # pragma: no cover - JAX without axis types
    return jax.make_mesh(shape, names)
  return jax.make_mesh(
    shape, names, axis_types=(getattr(AxisType, kind),) * len(shape)
  )


def _use(mesh):
  return jax.set_mesh(mesh)


# ------------------------------------------------- sharded jit, no name ---


@pytest.mark.parametrize('api', APIS)
@pytest.mark.parametrize('kind', ['Explicit', 'Auto'])
@pytest.mark.parametrize('context', [False, True], ids=['no-mesh', 'set_mesh'])
def test_sharded_jit_equals_global_batch(api, kind, context, path):
  """Regression (issue 39): the pattern of JAX's tutorial, ``make_mesh`` +
  ``device_put`` + ``jit`` with no context mesh, raised ShardingTypeError
  on Explicit axes (the exact path's one-element slice of the sharded batch
  axis): ``auto_axes`` found no mesh outside ``jax.set_mesh``."""
  x, g, b, w, stats = _problem(seed=40)
  mesh = _mesh(kind)
  with _use(mesh) if context else contextlib.nullcontext():
    xs, ws = (jax.device_put(v, NamedSharding(mesh, P('d'))) for v in (x, w))
    # Parameters and state replicated on the mesh, as flax's examples
    # place their train state.
    gs, bs, ss = jax.device_put((g, b, stats), NamedSharding(mesh, P()))
    out = jax.jit(_grad_step(bn_apply(api), ws, x.size))(xs, gs, bs, ss)
  _check(out, x, g, b, w, stats)
  # The output and the gradient of x keep the batch's sharding.
  for a in (out[1][0], out[0][0]):
    assert a.sharding.spec[0] == 'd', a.sharding


@pytest.mark.parametrize('api', APIS)
def test_sharded_jit_eagerly(api, path):
  """The same without jit: op by op on sharded arrays, as a notebook runs."""
  x, g, b, w, stats = _problem(seed=41)
  mesh = _mesh('Explicit')
  xs = jax.device_put(x, NamedSharding(mesh, P('d')))
  gs, bs, ss = jax.device_put((g, b, stats), NamedSharding(mesh, P()))
  y, (mean, var) = bn_apply(api)(xs, gs, bs, ss)
  want_y, want_new, _ = _global(x, g, b, w, stats)
  _assert_same((y, mean, var), (want_y, want_new.mean, want_new.var))


@pytest.mark.parametrize('api', APIS)
@pytest.mark.parametrize('kind', ['Explicit', 'Auto'])
def test_masked_sharded_jit_with_an_empty_shard(api, kind, path):
  """Masked rows, one shard entirely masked out: count-weighted statistics
  of the masked-in rows of the global batch."""
  x, g, b, w, stats = _problem(seed=42)
  mask = np.ones(x.shape[:1] + (1,), bool)
  mask[:8] = False  # the first shard's rows
  mask[20:27] = False  # most of the third's
  mesh = _mesh(kind)

  def loss(x, g, b, s, m, w):
    y, new = bn_apply(api)(x, g, b, s, mask=m)
    return jnp.sum(w * y) / x.size, (y, new)

  step = jax.grad(loss, (0, 1, 2), has_aux=True)
  put = lambda v: jax.device_put(v, NamedSharding(mesh, P('d')))
  gs, bs, ss = jax.device_put((g, b, stats), NamedSharding(mesh, P()))
  out = jax.jit(step)(put(x), gs, bs, ss, put(mask), put(w))
  _check(out, x, g, b, w, stats, mask=mask)


# ---------------------------------------------- channels over 'model' ---


@pytest.mark.parametrize('api', APIS)
def test_channel_sharded_2d_mesh_keeps_statistics_by_channel(api, path):
  """Tensor-parallel BN: the batch over 'data', the channels over 'model'.
  The statistics stay sharded by channel: the program all-reduces over
  'data' and gathers no features."""
  x, g, b, w, stats = _problem(seed=43, c=4)
  mesh = _mesh('Explicit', (4, 2), ('data', 'model'))
  xs, ws = (
    jax.device_put(v, NamedSharding(mesh, P('data', 'model'))) for v in (x, w)
  )
  gs, bs, ss = jax.device_put((g, b, stats), NamedSharding(mesh, P('model')))
  step = jax.jit(_grad_step(bn_apply(api), ws, x.size))
  out = step(xs, gs, bs, ss)
  _check(out, x, g, b, w, stats)
  _, (y, (mean, var)) = out
  assert y.sharding.spec == P('data', 'model'), y.sharding
  hlo = step.lower(xs, gs, bs, ss).compile().as_text()
  # No features gathered: an all-gather, if any, carries the shards'
  # partial statistics (the kernel's route: 3 floats a channel a shard).
  for shape in re.findall(r'= f32\[([\d,]*)\][^ ]* all-gather\(', hlo):
    assert np.prod([int(d) for d in shape.split(',')]) <= D * 3 * x.shape[1]


# ------------------------------------------------- shard_map and pmap ---


@pytest.mark.parametrize('api', APIS)
def test_shard_map_with_axis_name(api, path):
  x, g, b, w, stats = _problem(seed=44)
  mesh = _mesh('Explicit')
  f = jax.shard_map(
    bn_apply(api, axis_name='d'),
    mesh=mesh,
    in_specs=(P('d'), P(), P(), P()),
    out_specs=(P('d'), (P(), P())),
  )
  xs, ws = (jax.device_put(v, NamedSharding(mesh, P('d'))) for v in (x, w))
  out = jax.jit(_grad_step(f, ws, x.size))(xs, g, b, stats)
  _check(out, x, g, b, w, stats)


@pytest.mark.parametrize('api', APIS)
@pytest.mark.parametrize('sync', ['gather', 'psum'])
def test_shard_map_over_data_with_channels_over_model(api, sync, path):
  """Regression: a shard_map over 'data' only (partial-manual) on an
  Explicit ('data', 'model') mesh, the channels over 'model' (a
  tensor-parallel model's BN, synced over 'data'), raised ValueError from
  the gather's all-gather (JAX types its output with 'model' on the new
  axis) and ShardingTypeError from the psum's; flax's BatchNorm runs. The
  statistics now come from inside ``auto_axes`` over the Explicit axes
  and stay sharded by channel."""
  x, g, b, w, stats = _problem(seed=49, c=4)
  mesh = _mesh('Explicit', (4, 2), ('data', 'model'))
  f = jax.shard_map(
    bn_apply(api, axis_name='data', sync=sync),
    mesh=mesh,
    in_specs=(P('data'), P(), P(), P()),
    out_specs=(P('data'), (P(), P())),
    axis_names={'data'},
  )
  with _use(mesh):
    xs, ws = (
      jax.device_put(v, NamedSharding(mesh, P('data', 'model'))) for v in (x, w)
    )
    gs, bs, ss = jax.device_put((g, b, stats), NamedSharding(mesh, P('model')))
    out = jax.jit(_grad_step(f, ws, x.size))(xs, gs, bs, ss)
  _check(out, x, g, b, w, stats)
  _, (y, (mean, var)) = out
  assert mean.sharding.spec == P('model'), mean.sharding


@pytest.mark.parametrize('api', APIS)
def test_pmap_with_axis_name(api, path):
  x, g, b, w, stats = _problem(seed=45)
  rows = x.shape[0] // D
  pm = jax.pmap(
    bn_apply(api, axis_name='d'),
    axis_name='d',
    in_axes=(0, None, None, None),
    devices=jax.devices()[:D],
  )

  def f(x, g, b, s):
    y, (mean, var) = pm(x.reshape(D, rows, -1), g, b, s)
    return y.reshape(x.shape), (mean[0], var[0])

  out = jax.jit(_grad_step(f, w, x.size))(x, g, b, stats)
  _check(out, x, g, b, w, stats)


@pytest.mark.parametrize('api', APIS)
def test_uneven_masked_shards_under_shard_map(api, path):
  """Shards of unequal valid counts (one empty): count-weighted."""
  x, g, b, w, stats = _problem(seed=46)
  mask = np.ones(x.shape[:1] + (1,), bool)
  mask[8:16] = False
  mask[40:45] = False
  mesh = _mesh('Explicit')
  f = jax.shard_map(
    lambda x, g, b, s, m: bn_apply(api, axis_name='d')(x, g, b, s, mask=m),
    mesh=mesh,
    in_specs=(P('d'), P(), P(), P(), P('d')),
    out_specs=(P('d'), (P(), P())),
  )
  put = lambda v: jax.device_put(v, NamedSharding(mesh, P('d')))
  ms = put(mask)
  step = _grad_step(lambda x, g, b, s: f(x, g, b, s, ms), put(w), x.size)
  _check(jax.jit(step)(put(x), g, b, stats), x, g, b, w, stats, mask=mask)


# ------------------------------------------- nnx sharding annotations ---


def test_nnx_with_partitioning_under_nnx_jit(path):
  """An nnx model whose parameters and batch statistics carry sharding
  annotations (``nnx.with_partitioning``), the batch sharded over 'data'
  and the channels over 'model', trained under ``nnx.jit``."""
  x, g, b, w, stats = _problem(seed=47, c=4)
  mesh = _mesh('Auto', (4, 2), ('data', 'model'))
  init = lambda v: nnx.with_partitioning(lambda *_: jnp.asarray(v), ('model',))
  with _use(mesh):
    m = bnjax.nnx.BatchNorm(
      4,
      momentum=MOMENTUM,
      scale_init=init(g),
      bias_init=init(b),
      rngs=nnx.Rngs(0),
    )
    m.mean[...], m.var[...] = stats.mean, stats.var
    state = nnx.state(m)
    sharded = jax.lax.with_sharding_constraint(
      state, nnx.get_named_sharding(state, mesh)
    )
    nnx.update(m, sharded)
    xs, ws = (
      jax.device_put(v, NamedSharding(mesh, P('data', 'model'))) for v in (x, w)
    )

    @nnx.jit
    def step(m, x, w):
      def loss(m, x):
        y = m(x)
        return jnp.sum(w * y) / x.size, y

      (_, y), (gm, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        m, x
      )
      return y, gx, gm

    y, gx, gm = step(m, xs, ws)
  out = (
    (gx, gm.scale.value, gm.bias.value),
    (y, (m.mean.value, m.var.value)),
  )
  _check(out, x, g, b, w, stats)
  assert m.scale.value.sharding.spec == P('model'), m.scale.value.sharding
  assert m.mean.value.sharding.spec == P('model'), m.mean.value.sharding


def test_equinox_state_off_the_mesh_names_the_fix(path):
  """eqx.nn.State.set refuses new statistics whose type carries the mesh
  when the old state's did not, printing both as ``f32[4]``: bnjax says to
  place the state on the mesh."""
  x, *_ = _problem(seed=48)
  mesh = _mesh('Explicit')
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(4, batch_axis=0)
  xs = jax.device_put(x, NamedSharding(mesh, P('d')))
  with pytest.raises(ValueError, match=r'place the state on it first'):
    jax.jit(lambda x, s: bn(x, s))(xs, state)
  placed = jax.device_put(state, NamedSharding(mesh, P()))
  y, new = jax.jit(lambda x, s: bn(x, s))(xs, placed)
  np.testing.assert_allclose(
    new.get(bn.state_index).mean, 0.01 * np.mean(x, 0), rtol=1e-5
  )


def test_ghost_chunks_that_do_not_split_over_shards_name_the_fix(path):
  """Regression (hostile review): virtual_batch_size larger than a shard's
  rows on an Explicit mesh raised JAX's ShardingTypeError from the ghost
  reshape; a size that divides the shard's rows gives the unsharded
  ghost call's statistics."""
  x, *_ = _problem(seed=49, rows=32)
  mesh = _mesh('Explicit')
  xs = jax.device_put(x, NamedSharding(mesh, P('d')))
  stats = bnjax.init_batch_stats(4)
  bn = lambda v: jax.jit(
    lambda x: bnjax.batch_norm(
      x, stats, use_running_average=False, virtual_batch_size=v
    )[1]
  )
  with pytest.raises(ValueError, match=r'virtual_batch_size=8 cuts the batch'):
    bn(8)(xs)
  np.testing.assert_allclose(bn(4)(xs).var, bn(4)(x).var, rtol=1e-5)
