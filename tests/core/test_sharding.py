"""Every way current JAX shards a batch gives the global batch's BN.

Sharded ``jit`` without ``axis_name`` on meshes with Explicit and with Auto
axes, ``jax.shard_map`` on an Explicit mesh, ``jax.smap``, ``jax.set_mesh``;
BN groups as one axis of a 2-D mesh; and the whole sync matrix (vmap and
pmap, gather and psum, with and without groups) with x64 on. Each result is
checked against the float64 global-batch oracle (tests/_sync.py). The APIs
are feature-detected: a JAX without one skips that case, naming it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref
from tests._sync import B, C, D, _assert_same, _global, _problem

AxisType = getattr(jax.sharding, 'AxisType', None)
needs_axis_types = pytest.mark.skipif(
  AxisType is None, reason='this JAX has no jax.sharding.AxisType'
)


def _typed_mesh(kind, shape=(D,), names=('d',)):
  return jax.make_mesh(
    shape, names, axis_types=(getattr(AxisType, kind),) * len(shape)
  )


def _use(mesh):
  """jax.set_mesh (JAX 0.7+), or the older context managers."""
  if hasattr(jax, 'set_mesh'):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)  # pragma: no cover


def _step(stats, total, **kw):
  """The gradient of the global batch's mean loss; mapped (with
  axis_name), each shard's part of it, whose parameter gradients
  shard_map/smap sum over the shards."""

  def loss(x, g, b, w):
    y, new = bnjax.batch_norm(
      x, stats, g, b, use_running_average=False, momentum=0.9, **kw
    )
    return jnp.sum(w * y) / total, (y, new)

  return jax.grad(loss, (0, 1, 2), has_aux=True)


def _result(out):
  grads, (y, new) = out
  return y, new, grads


@needs_axis_types
@pytest.mark.parametrize('kind', ['Explicit', 'Auto'])
@pytest.mark.parametrize('rows', [D * B, D * 600])  # 600: blocked levels
def test_sharded_jit_without_axis_name_on_a_typed_mesh(kind, rows):
  """Regression: on an Explicit mesh (jax.make_mesh's default since JAX
  0.9) the exact path sliced one element out of the sharded batch axis and
  split it into blocks, which JAX refuses (ShardingTypeError)."""
  x, g, b, w, stats = _problem(seed=20, rows=rows)
  mesh = _typed_mesh(kind)
  with _use(mesh):
    xs, ws = (jax.device_put(v, NamedSharding(mesh, P('d'))) for v in (x, w))
    got = _result(jax.jit(_step(stats, x.size))(xs, g, b, ws))
  _assert_same(got, _global(x, g, b, w, stats))
  # The output keeps the input's batch sharding.
  assert got[0].sharding.spec[0] == 'd'


@needs_axis_types
def test_shard_map_on_an_explicit_mesh():
  x, g, b, w, stats = _problem(seed=21)
  mesh = _typed_mesh('Explicit')
  f = jax.shard_map(
    _step(stats, x.size, axis_name='d'),
    mesh=mesh,
    in_specs=(P('d'), P(), P(), P('d')),
    out_specs=((P('d'), P(), P()), (P('d'), P())),
  )
  with _use(mesh):
    xs, ws = (jax.device_put(v, NamedSharding(mesh, P('d'))) for v in (x, w))
    grads, (y, new) = jax.jit(f)(xs, g, b, ws)
  # shard_map sums a replicated parameter's gradient over the shards.
  _assert_same((y, new, grads), _global(x, g, b, w, stats))


@pytest.mark.skipif(not hasattr(jax, 'smap'), reason='this JAX has no smap')
def test_smap_equals_global_batch():
  x, g, b, w, stats = _problem(seed=22)
  mesh = _typed_mesh('Explicit') if AxisType else None
  f = jax.smap(
    _step(stats, x.size, axis_name='d'),
    in_axes=(0, None, None, 0),
    out_axes=((0, None, None), (0, None)),
    axis_name='d',
  )
  with _use(mesh):
    xs, ws = (jax.device_put(v, NamedSharding(mesh, P('d'))) for v in (x, w))
    grads, (y, new) = jax.jit(f)(xs, g, b, ws)
  _assert_same((y, new, grads), _global(x, g, b, w, stats))


# ---------------------------------------------------------------- groups ---

GROUP = 4  # devices per BN group: two groups of four on eight devices


def _per_group_oracle(x, stats, groups):
  """Float64 BN of each group's rows, stacked back in device order."""
  xs = x.reshape(D, B, C)
  ys, news = np.zeros((D, B, C)), {}
  for grp in groups:
    rows = xs[list(grp)].reshape(-1, C)
    y, mean, var = ref.batch_norm(
      rows, stats.mean, stats.var, use_running_average=False, momentum=0.9
    )
    ys[list(grp)] = y.reshape(len(grp), B, C)
    for d in grp:
      news[d] = (mean, var)
  return ys.reshape(-1, C), news


def test_groups_as_one_axis_of_a_2d_mesh_equal_per_group_bn():
  """The supported form of axis_index_groups under jit/shard_map: split the
  data axis into ('replica', 'bn_group') and sync over 'bn_group' only."""
  x, _, _, _, stats = _problem(seed=23, loc=1e2)
  mesh = jax.make_mesh((D // GROUP, GROUP), ('replica', 'bn_group'))
  batch = P(('replica', 'bn_group'))

  def f(x):
    y, new = bnjax.batch_norm(
      x, stats, use_running_average=False, momentum=0.9, axis_name='bn_group'
    )
    return y, jax.tree.map(lambda a: a[None], new)

  y, new = jax.jit(
    jax.shard_map(f, mesh=mesh, in_specs=batch, out_specs=(batch, P('replica')))
  )(jax.device_put(x, NamedSharding(mesh, batch)))
  groups = [range(r * GROUP, (r + 1) * GROUP) for r in range(D // GROUP)]
  y0, new0 = _per_group_oracle(x, stats, groups)
  np.testing.assert_allclose(y, y0, rtol=2e-5, atol=2e-5)
  for r in range(D // GROUP):
    mean, var = new0[r * GROUP]
    np.testing.assert_allclose(
      np.asarray(new.mean)[r], mean, rtol=2e-6, atol=1e-6
    )
    np.testing.assert_allclose(
      np.asarray(new.var)[r], var, rtol=2e-6, atol=1e-6
    )


@pytest.mark.parametrize('sync', ['gather', 'psum'])
def test_groups_under_shard_map_name_the_2d_mesh_alternative(sync):
  x, _, _, _, stats = _problem(seed=24)
  mesh = jax.make_mesh((D,), ('d',))
  f = jax.shard_map(
    lambda x: bnjax.batch_norm(
      x,
      stats,
      use_running_average=False,
      axis_name='d',
      axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]],
      sync=sync,
    )[0],
    mesh=mesh,
    in_specs=P('d'),
    out_specs=P('d'),
  )
  with pytest.raises(
    ValueError,
    match=r'not supported by JAX under shard_map'
    r".*axis_name='bn_group'",
  ):
    jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P('d'))))


# ------------------------------------------------------------------- x64 ---

GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize('how', ['vmap', 'pmap'])
@pytest.mark.parametrize('sync', ['gather', 'psum'])
@pytest.mark.parametrize('grouped', [False, True])
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_sync_matrix_with_x64_on(how, sync, grouped, dtype):
  """Regression: with jax_enable_x64 every sync path crashed inside bnjax
  (int32/int64 concatenation, dynamic_update_slice index types)."""
  groups = GROUPS if grouped else None
  with jax.enable_x64(True):
    x, _, _, _, stats = _problem(seed=25)
    x = x.astype(dtype)

    def f(x):
      return bnjax.batch_norm(
        x,
        stats,
        use_running_average=False,
        momentum=0.9,
        axis_name='d',
        axis_index_groups=groups,
        sync=sync,
      )

    mapped = (
      jax.vmap(f, axis_name='d')
      if how == 'vmap'
      else jax.pmap(f, axis_name='d', devices=jax.devices()[:D])
    )
    if grouped and how == 'vmap':
      with pytest.raises(ValueError, match='not supported by JAX under'):
        mapped(x.reshape(D, B, C))
      return
    y, new = mapped(x.reshape(D, B, C))
    assert y.dtype == dtype and new.mean.dtype == stats.mean.dtype
    y0, new0 = _per_group_oracle(x, stats, groups or [range(D)])
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(y.reshape(-1, C), y0, rtol=tol, atol=tol)
    for d in range(D):
      np.testing.assert_allclose(new.mean[d], new0[d][0], rtol=2e-6)
      np.testing.assert_allclose(new.var[d], new0[d][1], rtol=2e-5)
