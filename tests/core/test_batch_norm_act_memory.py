"""bnjax.batch_norm_act composes with JAX's transforms, and keeps one
full-size array a layer: in JAX's saved residuals, in the compiled CPU
program, and in the GPU/TPU export (no data-dependent conditional)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export
from jax.ad_checkpoint import checkpoint_policies as policies

import bnjax
from bnjax._moments import kernel
from tests._helpers import ACCELERATOR_PATH, randn
from tests._hlo import conditionals

C, L = 8, 3
X_SHAPE = (8, 8, 8, C)


def _conv(x, k):
  return jax.lax.conv_general_dilated(
    x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _layer(kind, x, g, b, activation='leaky_relu'):
  """One BN + leaky ReLU, as flax, bnjax.batch_norm or batch_norm_act."""
  stats = bnjax.init_batch_stats(C)
  if kind == 'flax':
    v = {'params': {'scale': g, 'bias': b}, 'batch_stats': stats._asdict()}
    y, _ = nn.BatchNorm(use_running_average=False).apply(
      v, x, mutable=['batch_stats']
    )
    return nn.leaky_relu(y)
  if kind == 'batch_norm':
    y, _ = bnjax.batch_norm(x, stats, g, b, use_running_average=False)
    return nn.leaky_relu(y)
  if kind == 'plain':
    return nn.leaky_relu(x)
  return bnjax.batch_norm_act(
    x, stats, g, b, use_running_average=False, activation=activation
  )[0]


def _net(kind, layers=L, remat=None, activation='leaky_relu'):
  def body(x, ks, gs, bs):
    for i in range(layers):
      x = _layer(kind, _conv(x, ks[i]), gs[i], bs[i], activation)
    return x

  if remat is not None:
    body = jax.checkpoint(body, policy=remat)
  return lambda x, ks, gs, bs: jnp.sum(jnp.sin(body(x, ks, gs, bs)))


def _args(layers=L, shape=X_SHAPE):
  x = jnp.asarray(randn(shape, seed=0))
  ks = jnp.asarray(randn((layers, 3, 3, C, C), scale=0.2, seed=1))
  gs = jnp.asarray(1 + randn((layers, C), scale=0.1, seed=2))
  bs = jnp.asarray(randn((layers, C), scale=0.1, seed=3))
  return x, ks, gs, bs


def _close(a, b):
  """Max-norm relative error below 1e-5 (float32 sums in another order)."""
  assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


def _full_size(fn, *args):
  from jax._src.ad_checkpoint import saved_residuals

  shape = np.shape(args[0])
  return [(a, why) for a, why in saved_residuals(fn, *args) if a.shape == shape]


@pytest.mark.parametrize(
  'kind, per_layer', [('flax', 4), ('batch_norm', 3), ('batch_norm_act', 1)]
)
def test_saved_residuals_per_layer(kind, per_layer):
  """flax keeps x - mean, x_hat, BN's output and leaky ReLU's bool mask;
  bnjax.batch_norm x (its one residual), its output and the mask;
  batch_norm_act only its output, which the next convolution saves anyway
  (the same array, counted once). Counted as the difference between L + 1
  and L layers."""
  count = [len(_full_size(_net(kind, n), *_args(n))) for n in (L, L + 1)]
  assert count[1] - count[0] == per_layer, count


def _named_output(why: str) -> bool:
  """A residual saved by the output's checkpoint name. JAX 0.8 describes
  the same saved array as the "output of reduce_precision" at the line
  that names it, later versions by its name."""
  return 'bnjax_bn_act_output' in why or (
    'reduce_precision' in why and 'bnjax/_train.py' in why
  )


def test_checkpoint_policy_can_name_the_output():
  args = _args()
  named = policies.save_only_these_names('bnjax_bn_act_output')
  res = _full_size(_net('batch_norm_act', remat=named), *args)
  assert sum(_named_output(why) for _, why in res) == L
  res = _full_size(
    _net('batch_norm_act', remat=policies.nothing_saveable), *args
  )
  assert not any(_named_output(why) for _, why in res)
  want = jax.grad(_net('batch_norm_act'), (1, 2, 3))(*args)
  got = jax.grad(_net('batch_norm_act', remat=named), (1, 2, 3))(*args)
  jax.tree.map(_close, got, want)


def _per_layer_bytes(kind, activation='leaky_relu'):
  """Compiled temp bytes per layer (XLA:CPU), from 2 and 4 layers."""
  sizes = []
  for layers in (2, 4):
    args = _args(layers, (16, 16, 16, C))
    net = _net(kind, layers, activation=activation)
    step = jax.jit(jax.grad(net, (1, 2, 3)))
    mem = step.lower(*args).compile().memory_analysis()
    sizes.append(mem.temp_size_in_bytes)
  return (sizes[1] - sizes[0]) / 2


@pytest.mark.skipif(
  ACCELERATOR_PATH,
  reason='XLA:CPU memory of the CPU path: the GPU/TPU path keeps no tie '
  "against XLA:CPU hoisting, and its memory is the device benchmark's",
)
@pytest.mark.parametrize('activation', ['leaky_relu', 'elu', 'identity'])
def test_compiled_memory_per_layer_is_no_more_than_conv_and_leaky_relu(
  activation,
):
  """Regression: the inverse activation, a function of the output alone, was
  hoisted by XLA:CPU into the forward and kept to the backward: 3 arrays a
  layer (ELU: 4) against conv + leaky ReLU's 2."""
  act = _per_layer_bytes('batch_norm_act', activation)
  assert act <= _per_layer_bytes('plain') * 1.01
  if activation != 'identity':  # flax's BN + identity keeps no mask either
    assert act < _per_layer_bytes('flax')


def test_scan_over_layers_equals_the_unrolled_loop():
  x, ks, gs, bs = _args()

  def scanned(x, ks, gs, bs):
    def body(x, p):
      return _layer('batch_norm_act', _conv(x, p[0]), p[1], p[2]), None

    x, _ = jax.lax.scan(body, x, (ks, gs, bs))
    return jnp.sum(jnp.sin(x))

  got = jax.grad(scanned, (1, 2, 3))(x, ks, gs, bs)
  want = jax.grad(_net('batch_norm_act'), (1, 2, 3))(x, ks, gs, bs)
  jax.tree.map(_close, got, want)


def _bn(use_act, x, g, b, activation='elu'):
  stats = bnjax.init_batch_stats(x.shape[-1])
  if use_act:
    return bnjax.batch_norm_act(
      x, stats, g, b, use_running_average=False, activation=activation
    )[0]
  return jax.nn.elu(
    bnjax.batch_norm(x, stats, g, b, use_running_average=False)[0]
  )


def test_jit_vmap_and_second_order_equal_batch_norm_then_activation():
  x = jnp.asarray(randn((4, 16, C), seed=4))
  g, b = jnp.asarray(1 + randn((C,), seed=5) ** 2), jnp.asarray(randn((C,)))
  w = jnp.asarray(randn((16, C), seed=6))

  def loss(use_act):
    return lambda x, g: jnp.sum(w * jnp.sin(_bn(use_act, x, g, b)))

  close = _close
  # vmap over independent problems, jitted and eager.
  f = jax.vmap(jax.grad(loss(True), (0, 1)), (0, None))
  jax.tree.map(close, jax.jit(f)(x, g), f(x, g))
  jax.tree.map(
    close, f(x, g), jax.vmap(jax.grad(loss(False), (0, 1)), (0, None))(x, g)
  )
  # Reverse over reverse, and forward over reverse (jax.hessian).
  gg = lambda u: jax.grad(
    lambda x, g: jnp.sum(jax.grad(loss(u), (0, 1))(x, g)[1] ** 2)
  )
  jax.tree.map(close, gg(True)(x[0], g), gg(False)(x[0], g))
  hess = lambda u: jax.hessian(lambda g: loss(u)(x[0], g))(g)
  close(hess(True), hess(False))


def test_forward_mode_raises_jax_custom_vjp_error():
  x = jnp.asarray(randn((16, C)))
  with pytest.raises(TypeError, match='forward-mode'):
    jax.jvp(lambda x: _bn(True, x, None, None), (x,), (x,))


@pytest.mark.parametrize('activation', ['leaky_relu', 'elu', 'identity'])
def test_exported_for_gpu_and_tpu_without_data_dependent_conditionals(
  activation,
):
  args = _args()
  net = lambda x, ks, gs, bs: _net('batch_norm_act')(x, ks, gs, bs)
  if activation != 'leaky_relu':

    def net(x, ks, gs, bs):
      for i in range(L):
        x = _bn(True, _conv(x, ks[i]), gs[i], bs[i], activation)
      return jnp.sum(jnp.sin(x))

  step = jax.jit(jax.grad(net, (0, 1, 2, 3)))
  # With the opt-in Pallas statistics kernel selected, the CUDA program
  # carries Triton's call, which exports only with its check disabled
  # (tests/core/test_kernel.py).
  checks = (
    [jax_export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
    if kernel.SELECTED
    else []
  )
  export = lambda platforms: jax_export.export(
    step, platforms=platforms, disabled_checks=checks
  )
  export(('cuda', 'tpu'))(*args)  # lowers for both
  # One platform at a time, as tests/core/test_export.py: the platform
  # switch is then a constant the classifier recognizes.
  for platform in ('cuda', 'tpu'):
    exp = export((platform,))(*args)
    assert conditionals(exp.mlir_module())['data'] == 0, platform
