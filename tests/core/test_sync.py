"""Synchronized BN: k shards with axis_name equal one call on the global batch."""

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref
from tests._helpers import randn
from tests._sync import (
  B,
  C,
  D,
  _assert_same,
  _global,
  _mesh,
  _problem,
  _shard,
  _shard_map_bn,
)


def test_the_suite_runs_on_eight_devices():
  """Regression: tests/_multihost_worker.py set jax_num_cpu_devices=2 at
  import, and --doctest-modules imports it during collection, so the whole
  suite ran on 2 devices and the pmap tests failed late in full runs."""
  assert jax.device_count() == D


def test_the_suite_gives_xla_cpu_two_threads_per_device():
  """Regression: with a pool of max(cores, devices) threads, jax 0.8.1 and
  0.10.2 deadlocked now and then in an 8-way all-reduce on 2 busy cores,
  and XLA aborted the worker after 40 s (tests/conftest.py). XLA sizes its
  CPU pools from PJRT_NPROC; its compute pool shows the size taken."""
  assert int(os.environ['PJRT_NPROC']) >= 2 * D
  jax.block_until_ready(jnp.sum(_shard(jnp.ones(D), _mesh())))
  tasks = pathlib.Path('/proc/self/task')
  if not tasks.is_dir():  # pragma: no cover - not Linux
    return
  names = [(t / 'comm').read_text().strip() for t in tasks.iterdir()]
  assert names.count('tf_XLAEigen') >= 2 * D, sorted(set(names))


def test_shard_map_equals_global_batch_outputs_stats_and_grads():
  x, g, b, w, stats = _problem()
  mesh = _mesh()
  bn = _shard_map_bn(mesh, stats)

  def loss(x, g, b):
    y, new = bn(x, g, b)
    return jnp.mean(w * y), (y, new)

  grads, (y, new) = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(
    _shard(x, mesh), g, b
  )
  y0, new0, grads0 = _global(x, g, b, w, stats)
  _assert_same((y, new, grads), (y0, new0, grads0))


def test_running_stats_identical_on_every_shard():
  x, g, b, _, stats = _problem(seed=5)
  mesh = _mesh()
  f = jax.shard_map(
    lambda x: jax.tree.map(
      lambda a: a[None],
      bnjax.batch_norm(x, stats, use_running_average=False, axis_name='d')[1],
    ),
    mesh=mesh,
    in_specs=P('d'),
    out_specs=P('d'),
  )
  per_shard = jax.jit(f)(_shard(x, mesh))
  for a in per_shard:
    assert np.all(np.asarray(a) == np.asarray(a)[:1])


def test_pmap_equals_global_batch():
  x, g, b, w, stats = _problem(seed=1)

  def per_device(x, w):
    def loss(x, g, b):
      y, new = bnjax.batch_norm(
        x, stats, g, b, use_running_average=False, axis_name='d', momentum=0.9
      )
      return jnp.sum(w * y) / (D * B * C), (y, new)

    grads, (y, new) = jax.grad(loss, (0, 1, 2), has_aux=True)(x, g, b)
    # x's gradient is per device; the parameters' gradients are summed.
    return (
      y,
      new,
      (grads[0], jax.lax.psum(grads[1], 'd'), jax.lax.psum(grads[2], 'd')),
    )

  y, new, grads = jax.pmap(
    per_device, axis_name='d', devices=jax.devices()[:D]
  )(x.reshape(D, B, C), w.reshape(D, B, C))
  y0, new0, grads0 = _global(x, g, b, w, stats)
  _assert_same(y.reshape(-1, C), y0)
  _assert_same(jax.tree.map(lambda a: a[0], new), new0)
  _assert_same((grads[0].reshape(-1, C), grads[1][0], grads[2][0]), grads0)


@pytest.mark.parametrize('per_example', [True, False])
def test_vmap_axis_name_equals_global_batch(per_example):
  x, g, b, w, stats = _problem(seed=2)

  def loss(x, g, b):
    f = lambda xi: bnjax.batch_norm(
      xi, stats, g, b, use_running_average=False, axis_name='v', momentum=0.9
    )
    y, new = jax.vmap(f, axis_name='v', out_axes=(0, None))(
      x if per_example else x.reshape(D, B, C)
    )
    y = y.reshape(-1, C)
    return jnp.mean(w * y), (y, new)

  grads, (y, new) = jax.grad(loss, (0, 1, 2), has_aux=True)(x, g, b)
  _assert_same((y, new, grads), _global(x, g, b, w, stats))


def test_nested_vmap_inside_shard_map_with_a_tuple_of_names():
  x, g, b, w, stats = _problem(seed=3)
  mesh = _mesh(4)

  def inner(x, g, b):
    f = lambda xi: bnjax.batch_norm(
      xi,
      stats,
      g,
      b,
      use_running_average=False,
      axis_name=('d', 'v'),
      momentum=0.9,
    )
    y, new = jax.vmap(f, axis_name='v', out_axes=(0, None))(x.reshape(2, -1, C))
    return y.reshape(-1, C), new

  # JAX 0.10's shard_map type check rejects a psum over a vmap axis inside
  # it (an AssertionError in pvary), so this nesting needs check_vma=False.
  bn = jax.shard_map(
    inner,
    mesh=mesh,
    in_specs=(P('d'), P(), P()),
    out_specs=(P('d'), P()),
    check_vma=False,
  )

  def loss(x, g, b):
    y, new = bn(x, g, b)
    return jnp.mean(w * y), (y, new)

  got = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(_shard(x, mesh), g, b)
  grads0_y_new = _global(x, g, b, w, stats)
  _assert_same((got[1][0], got[1][1], got[0]), grads0_y_new)


def test_sharded_jit_without_axis_name_is_global():
  x, g, b, w, stats = _problem(seed=4)
  mesh = _mesh()

  def loss(x, g, b):
    y, new = bnjax.batch_norm(
      x, stats, g, b, use_running_average=False, momentum=0.9
    )
    return jnp.mean(w * y), (y, new)

  f = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))
  xs = _shard(x, mesh)
  hlo = f.lower(xs, g, b).compile().as_text()
  assert 'all-reduce' in hlo  # XLA inserted the cross-device reduction
  grads, (y, new) = f(xs, g, b)
  _assert_same((y, new, grads), _global(x, g, b, w, stats))


def test_count_weighted_with_uneven_masks():
  # Shard 0: 8 valid rows of 0. Shard 1: 2 valid rows of 10. Global: 2 / 16.
  # Flax, haiku and equinox average per-shard means and get 5 / 25.
  x = np.zeros((16, 1), np.float32)
  x[8:] = 10.0
  mask = np.zeros((16, 1), bool)
  mask[:8] = True
  mask[8:10] = True
  x[10:] = 1e6  # masked-out garbage must not leak
  mesh = _mesh(2)
  mean, var = jax.jit(
    jax.shard_map(
      lambda x, m: bnjax.moments(x, mask=m, axis_name='d'),
      mesh=mesh,
      in_specs=(P('d'), P('d')),
      out_specs=P(),
    )
  )(_shard(x, mesh), _shard(mask, mesh))
  np.testing.assert_allclose([mean[0], var[0]], [2.0, 16.0], rtol=1e-6)


def test_masked_sync_equals_global_and_empty_shard_contributes_nothing():
  x, g, b, w, stats = _problem(seed=6)
  mask = np.random.default_rng(0).random((D * B, 1)) < 0.5
  mask[:B] = False  # shard 0 has no valid rows at all
  mask[B] = True
  mesh = _mesh()
  bn = _shard_map_bn(mesh, stats, mask_spec=P('d'))

  def loss(x, g, b):
    y, new = bn(x, g, b, _shard(mask, mesh))
    return jnp.mean(w * y), (y, new)

  got = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(_shard(x, mesh), g, b)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(got))
  y0, new0, grads0 = _global(x, g, b, w, stats, mask)
  _assert_same((got[1][0], got[1][1], got[0]), (y0, new0, grads0))


@pytest.mark.parametrize('ratio', [1e2, 1e4])
def test_exact_from_the_first_step_with_different_shard_means(ratio):
  rng = np.random.default_rng(7)
  shard_means = ratio * (1 + 0.01 * np.arange(D))[:, None, None]
  x = (shard_means + rng.standard_normal((D, 64, C))).astype(np.float32)
  x = x.reshape(-1, C)
  mesh = _mesh()
  stats = bnjax.init_batch_stats(C)  # running mean 0: no help at step 0
  _, new = jax.jit(_shard_map_bn(mesh, stats))(
    _shard(x, mesh), jnp.ones(C), jnp.zeros(C)
  )
  _, rv, _ = ref.moments(x.astype(np.float64))
  var = (np.asarray(new.var, np.float64) - 0.9) / 0.1
  assert np.max(np.abs(var / rv - 1)) <= 1e-5 * (1 + 0.9 / 0.1 / rv.min())


def test_exact_stats_via_moments_with_different_shard_means():
  rng = np.random.default_rng(8)
  x = (
    (
      1e4 * (1 + 0.01 * np.arange(D))[:, None, None]
      + rng.standard_normal((D, 64, C))
    )
    .astype(np.float32)
    .reshape(-1, C)
  )
  mesh = _mesh()
  _, var = jax.jit(
    jax.shard_map(
      lambda x: bnjax.moments(x, axis_name='d'),
      mesh=mesh,
      in_specs=P('d'),
      out_specs=P(),
    )
  )(_shard(x, mesh))
  _, rv, _ = ref.moments(x.astype(np.float64))
  assert np.max(np.abs(np.asarray(var, np.float64) / rv - 1)) <= 1e-5


def _collectives(lowered_text):
  return len(
    re.findall(
      r'stablehlo\.(all_reduce|all_gather|reduce_scatter|'
      r'collective_permute|all_to_all)\b',
      lowered_text,
    )
  )


def test_one_collective_forward_and_one_backward():
  # Counted in the lowered program (XLA's combiner may merge more later).
  # scale/bias are off: a replicated parameter's gradient needs its own
  # cross-shard sum in any data-parallel step, and is not BN's to count.
  # Flax's exact mode needs two in the forward; haiku and equinox two.
  x, _, _, w, stats = _problem()
  mesh = _mesh()
  bn = jax.shard_map(
    lambda x: bnjax.batch_norm(
      x, stats, use_running_average=False, axis_name='d'
    )[0],
    mesh=mesh,
    in_specs=P('d'),
    out_specs=P('d'),
  )
  xs = _shard(x, mesh)
  count = lambda f: _collectives(jax.jit(f).lower(xs).as_text())
  assert count(bn) == 1
  assert count(jax.grad(lambda x: jnp.mean(w * bn(x)))) == 2


def test_axis_index_groups_under_pmap():
  x, g, b, w, stats = _problem(seed=9)
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  y, new = jax.pmap(
    lambda x: bnjax.batch_norm(
      x,
      stats,
      g,
      b,
      use_running_average=False,
      axis_name='d',
      axis_index_groups=groups,
      momentum=0.9,
    ),
    axis_name='d',
    devices=jax.devices()[:D],
  )(x.reshape(D, B, C))
  for _k, grp in enumerate(groups):
    rows = x.reshape(D, B, C)[grp].reshape(-1, C)
    y0, new0 = bnjax.batch_norm(
      rows, stats, g, b, use_running_average=False, momentum=0.9
    )
    _assert_same(y[np.array(grp)].reshape(-1, C), y0)
    _assert_same(jax.tree.map(lambda a: a[grp[0]], new), new0)


def test_unbound_axis_name_raises_name_error():
  with pytest.raises(NameError):
    bnjax.batch_norm(
      jnp.ones((4, 3)),
      bnjax.init_batch_stats(3),
      use_running_average=False,
      axis_name='nope',
    )


def test_one_value_per_shard_is_fine_when_the_global_batch_has_more():
  x = randn((D, C), seed=10)
  y, _ = jax.vmap(
    lambda xi: bnjax.batch_norm(
      xi, bnjax.init_batch_stats(C), use_running_average=False, axis_name='v'
    ),
    axis_name='v',
  )(x)
  # One row per shard, D rows in all: the global batch's statistics.
  np.testing.assert_allclose(
    y, ref.normalize(x, *ref.moments(x)[:2]), rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match='one value per channel'):
    jax.vmap(
      lambda xi: bnjax.batch_norm(
        xi, bnjax.init_batch_stats(C), use_running_average=False, axis_name='v'
      ),
      axis_name='v',
    )(x[:1])


def test_public_api_fallback_gives_the_same_results_and_collective_count(
  monkeypatch,
):
  """bnjax imports JAX's private all_gather_invariant; where a release lacks
  it, the psum-gather (public API) takes over. Force that fallback: the
  outputs, statistics and gradients are the same and the forward still
  holds one collective (an all_reduce instead of an all_gather)."""
  from bnjax._moments import collectives

  x, g, b, w, stats = _problem(seed=13, loc=1e3)
  mesh = _mesh()
  xs = _shard(x, mesh)

  def run():
    bn = _shard_map_bn(mesh, stats)

    def loss(x, g, b):
      y, new = bn(x, g, b)
      return jnp.mean(w * y), (y, new)

    step = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))
    fwd = jax.jit(lambda x: bn(x, g, b)[0]).lower(xs).as_text()
    return step(xs, g, b), re.findall(
      r'stablehlo\.(all_reduce|all_gather)\b', fwd
    )

  assert collectives.replicated_all_gather is not None  # the path exists
  want, ops = run()
  monkeypatch.setattr(collectives, 'replicated_all_gather', None)
  got, ops_fallback = run()
  assert ops == ['all_gather'] and ops_fallback == ['all_reduce']
  _assert_same(got, want, rtol=1e-6, atol=1e-7)
