"""bnjax.batch_norm_act: BN + activation that keeps only its output.

Every gradient is checked against the float64 autodiff of textbook BN then
the activation (tests/reference.py, no bnjax), for each activation, layout,
sync mode and dtype; the numerics at small |scale|, large |mean|/std and in
half precision; and the transforms it must compose with.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref
from tests._helpers import randn
from tests._sync import _mesh, _shard

ACTS = {
  'identity': ('identity', lambda z: z),
  'leaky_relu': ('leaky_relu', lambda z: jnp.where(z >= 0, z, 0.01 * z)),
  'leaky_relu_0.2': (
    bnjax.LeakyReLU(0.2),
    lambda z: jnp.where(z >= 0, z, 0.2 * z),
  ),
  'leaky_relu_3': (bnjax.LeakyReLU(3.0), lambda z: jnp.where(z >= 0, z, 3 * z)),
  'elu': ('elu', jax.nn.elu),
  'elu_0.5': (bnjax.ELU(0.5), lambda z: jax.nn.elu(z, 0.5)),
}
C = 6


def _problem(shape=(16, 5, C), loc=2.0, seed=0, dtype=np.float32):
  x = randn(shape, loc=loc, scale=3.0, seed=seed).astype(dtype)
  signs = np.where(np.arange(C) % 2, -1.0, 1.0)
  g = ((0.5 + randn((C,), seed=seed + 1) ** 2) * signs).astype(np.float32)
  b = randn((C,), seed=seed + 2)
  w = randn(shape, seed=seed + 3)
  stats = bnjax.BatchStats(jnp.asarray(randn((C,), seed=seed + 4)), jnp.ones(C))
  return x, g, b, w, stats


def _oracle(x, g, b, w, stats, act64, axis=-1, mask=None):
  """(y, new stats, grads of sum(w * y)) by float64 autodiff of textbook BN
  (features moved last) then the activation."""
  with jax.enable_x64(True):
    f = jnp.float64

    def loss(x, g, b):
      xl = jnp.moveaxis(x, axis, -1)
      m = None if mask is None else jnp.moveaxis(mask, axis, -1)
      z, new = ref.jax_batch_norm_f64(
        xl, stats.mean, stats.var, g, b, mask=m, momentum=0.9
      )
      y = jnp.moveaxis(act64(z), -1, axis)
      return jnp.sum(jnp.asarray(w, f) * y), (y, new)

    grads, (y, new) = jax.grad(loss, (0, 1, 2), has_aux=True)(
      *(np.asarray(v, np.float64) for v in (x, g, b))
    )
    return (
      np.asarray(y),
      tuple(map(np.asarray, new)),
      tuple(map(np.asarray, grads)),
    )


def _loss(stats, w, **kw):
  def loss(x, g, b):
    y, new = bnjax.batch_norm_act(
      x, stats, g, b, use_running_average=False, momentum=0.9, **kw
    )
    return jnp.sum(w * y.astype(jnp.float32)), (y, new)

  return loss


def _close(got, want, rtol):
  """Max-norm relative error of each array below rtol."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
    assert err <= rtol, (err, rtol, a.shape)


# Relative tolerance on gradients: 1e-5 in float32; in half precision the
# output (the residual the backward inverts) is rounded to the half type,
# so x_hat comes back to a few of its ulps.
RTOL = {'float32': 1e-5, 'bfloat16': 4 * 2.0**-8, 'float16': 4 * 2.0**-11}


@pytest.mark.parametrize('act', sorted(ACTS))
@pytest.mark.parametrize('axis', [-1, 1])
@pytest.mark.parametrize('dtype', sorted(RTOL))
def test_grads_equal_float64_autodiff_of_bn_then_activation(act, axis, dtype):
  shape = (16, C, 5) if axis == 1 else (16, 5, C)
  x, g, b, w, stats = _problem(shape, dtype=jnp.dtype(dtype))
  activation, act64 = ACTS[act]
  if dtype != 'float32' and act.startswith('elu'):
    with pytest.raises(ValueError, match='ELU with a .* output'):
      _loss(stats, w, activation=activation, axis=axis)(x, g, b)
    return
  grads, (y, new) = jax.jit(
    jax.grad(
      _loss(stats, w, activation=activation, axis=axis), (0, 1, 2), has_aux=True
    )
  )(x, g, b)
  y0, new0, grads0 = _oracle(x, g, b, w, stats, act64, axis=axis)
  assert y.dtype == x.dtype and grads[0].dtype == x.dtype
  _close(grads, grads0, RTOL[dtype])
  _close(y, y0, RTOL[dtype])
  _close(tuple(new), new0, 1e-6)


@pytest.mark.parametrize('act', ['leaky_relu', 'elu', 'identity'])
def test_equals_batch_norm_then_activation_in_both_modes(act):
  x, g, b, w, stats = _problem(seed=3)
  activation, act64 = ACTS[act]
  for inference in (False, True):
    y, new = bnjax.batch_norm_act(
      x, stats, g, b, use_running_average=inference, activation=activation
    )
    z, new_bn = bnjax.batch_norm(x, stats, g, b, use_running_average=inference)
    np.testing.assert_allclose(y, act64(z), rtol=2e-6, atol=2e-6)
    jax.tree.map(np.testing.assert_array_equal, new, new_bn)


def test_inference_grads_equal_batch_norm_then_activation():
  x, g, b, w, stats = _problem(seed=4)

  def loss(fn):
    return lambda x, g, b: jnp.sum(w * fn(x, g, b))

  act = lambda x, g, b: bnjax.batch_norm_act(
    x, stats, g, b, use_running_average=True
  )[0]
  plain = lambda x, g, b: jax.nn.leaky_relu(
    bnjax.batch_norm(x, stats, g, b, use_running_average=True)[0]
  )
  got = jax.grad(loss(act), (0, 1, 2))(x, g, b)
  want = jax.grad(loss(plain), (0, 1, 2))(x, g, b)
  _close(got, want, 1e-6)


def test_mask_and_no_scale_or_bias():
  x, g, b, w, _ = _problem(seed=5)
  # Running statistics near the data's, so that the fully masked-out channel
  # stays where ELU is invertible in float32 (z > -15; see bnjax.ELU).
  stats = bnjax.BatchStats(jnp.full(C, 2.0), jnp.full(C, 9.0))
  g = np.clip(g, -3, 3)
  mask = jnp.asarray(randn(x.shape, seed=9) > -0.5)
  # Channel 0 fully masked out: normalized with the running statistics.
  mask = mask.at[..., 0].set(False)
  grads, (y, _) = jax.grad(
    _loss(stats, w, mask=mask, activation='elu'), (0, 1, 2), has_aux=True
  )(x, g, b)
  y0, _, grads0 = _oracle(x, g, b, w, stats, jax.nn.elu, mask=mask)
  _close(grads, grads0, 1e-5)
  gx, _ = (
    jax.grad(lambda x: _loss(stats, w)(x, None, None)[0], has_aux=False)(x),
    None,
  )
  gx0 = _oracle(x, np.ones(C), np.zeros(C), w, stats, ACTS['leaky_relu'][1])
  _close(gx, gx0[2][0], 1e-5)


def test_ghost_batches_match_batch_norm_then_activation():
  x, g, b, w, stats = _problem((16, C), seed=6)

  def loss(use_act):
    def f(x, g, b):
      kw = dict(use_running_average=False, virtual_batch_size=4)
      if use_act:
        y, _ = bnjax.batch_norm_act(x, stats, g, b, **kw)
      else:
        y = jax.nn.leaky_relu(bnjax.batch_norm(x, stats, g, b, **kw)[0])
      return jnp.sum(w * y)

    return f

  got = jax.grad(loss(True), (0, 1, 2))(x, g, b)
  want = jax.grad(loss(False), (0, 1, 2))(x, g, b)
  _close(got, want, 1e-5)


@pytest.mark.parametrize('scale', [0.0, 1e-6, -1e-4, 5e-3])
def test_small_scale_uses_the_documented_floor(scale):
  """|scale| < scale_floor is replaced by +-scale_floor (+ at 0) in the
  forward; its gradient is the floored layer's, passed straight through."""
  x, _, b, w, stats = _problem(seed=7)
  g = np.full((C,), scale, np.float32)
  g[1] = 1.0
  floor = 1e-3
  g_eff = np.where(np.abs(g) < floor, np.where(np.signbit(g), -floor, floor), g)
  grads, (y, _) = jax.grad(_loss(stats, w), (0, 1, 2), has_aux=True)(x, g, b)
  y0, _, grads0 = _oracle(x, g_eff, b, w, stats, ACTS['leaky_relu'][1])
  assert all(np.all(np.isfinite(v)) for v in grads)
  _close(y, y0, 1e-6)
  # x_hat comes back to float32 eps * |bias / scale| relative.
  rtol = max(1e-5, 4e-7 * np.max(np.abs(b)) / min(abs(g_eff).min(), 1))
  _close(grads, grads0, rtol)


def test_large_mean_over_std():
  x, g, b, w, stats = _problem(loc=0.0, seed=8)
  x = (1e4 + x / 3).astype(np.float32)  # |mean|/std = 1e4
  stats = bnjax.BatchStats(jnp.full(C, 1e4), jnp.ones(C))
  grads, (y, _) = jax.grad(_loss(stats, w), (0, 1, 2), has_aux=True)(x, g, b)

  def plain(x, g, b):
    y, _ = bnjax.batch_norm(x, stats, g, b, use_running_average=False)
    return jnp.sum(w * jax.nn.leaky_relu(y))

  # Inverting the output loses nothing here: the gradients are batch_norm's
  # then leaky ReLU's. Both differ from the float64 oracle by the float32
  # rounding of the mean the forward subtracts (half an ulp of 1e4 is 5e-4
  # standard deviations), which batch_norm_act shares.
  _close(grads, jax.grad(plain, (0, 1, 2))(x, g, b), 1e-5)
  _, _, grads0 = _oracle(x, g, b, w, stats, ACTS['leaky_relu'][1])
  _close(grads, grads0, 1e-3)


@pytest.mark.parametrize('sync', ['gather', 'psum'])
@pytest.mark.parametrize('act', ['leaky_relu', 'elu'])
def test_shard_map_sync_equals_global_batch(sync, act):
  x, g, b, w, stats = _problem((32, C), seed=10)
  activation, act64 = ACTS[act]
  mesh = _mesh()

  def local(x, w, g, b):
    y, new = bnjax.batch_norm_act(
      x,
      stats,
      g,
      b,
      use_running_average=False,
      activation=activation,
      axis_name='d',
      sync=sync,
      momentum=0.9,
    )
    return jax.lax.psum(jnp.sum(w * y), 'd'), new

  f = jax.shard_map(
    local, mesh=mesh, in_specs=(P('d'), P('d'), P(), P()), out_specs=(P(), P())
  )
  grads, new = jax.jit(jax.grad(f, (0, 2, 3), has_aux=True))(
    _shard(x, mesh), _shard(w, mesh), g, b
  )
  _, new0, grads0 = _oracle(x, g, b, w, stats, act64)
  _close(grads, grads0, 1e-5)
  _close(tuple(new), new0, 1e-6)


def test_pmap_sync_equals_global_batch():
  x, g, b, w, stats = _problem((32, C), seed=11)
  d = 8

  def per_device(x, w):
    def loss(x, g, b):
      y, _ = bnjax.batch_norm_act(
        x, stats, g, b, use_running_average=False, axis_name='d'
      )
      return jnp.sum(w * y)

    gx, gg, gb = jax.grad(loss, (0, 1, 2))(x, g, b)
    return gx, jax.lax.psum(gg, 'd'), jax.lax.psum(gb, 'd')

  gx, gg, gb = jax.pmap(per_device, axis_name='d', devices=jax.devices()[:d])(
    x.reshape(d, -1, C), w.reshape(d, -1, C)
  )
  _, _, grads0 = _oracle(x, g, b, w, stats, ACTS['leaky_relu'][1])
  _close((gx.reshape(-1, C), gg[0], gb[0]), grads0, 1e-5)


def test_vmap_axis_name_equals_global_batch():
  """Regression: the backward transposed the tangent inside a nested
  jax.vjp, whose psum found no bound axis under vmap (NameError)."""
  x, g, b, w, stats = _problem((32, C), seed=12)

  def loss(x, g, b):
    f = lambda xi: bnjax.batch_norm_act(
      xi, stats, g, b, use_running_average=False, axis_name='v'
    )[0]
    return jnp.sum(w * jax.vmap(f, axis_name='v')(x))

  grads = jax.grad(loss, (0, 1, 2))(x, g, b)
  _, _, grads0 = _oracle(x, g, b, w, stats, ACTS['leaky_relu'][1])
  _close(grads, grads0, 1e-5)


@pytest.mark.parametrize('sync', ['gather', 'psum'])
def test_shard_map_sync_with_a_mask_equals_global_batch(sync):
  x, g, b, w, stats = _problem((32, C), seed=13)
  mask = randn((32, C), seed=14) > -0.3
  mesh = _mesh()

  def local(x, w, m, g, b):
    y, new = bnjax.batch_norm_act(
      x,
      stats,
      g,
      b,
      use_running_average=False,
      axis_name='d',
      sync=sync,
      momentum=0.9,
      mask=m,
    )
    return jax.lax.psum(jnp.sum(w * y), 'd'), new

  specs = (P('d'), P('d'), P('d'), P(), P())
  f = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
  grads, new = jax.jit(jax.grad(f, (0, 3, 4), has_aux=True))(
    _shard(x, mesh), _shard(w, mesh), _shard(mask, mesh), g, b
  )
  _, new0, grads0 = _oracle(x, g, b, w, stats, ACTS['leaky_relu'][1], mask=mask)
  _close(grads, grads0, 1e-5)
  _close(tuple(new), new0, 1e-6)
