"""bnjax.fold: a Dense or Conv followed by inference-mode BN is one layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import bnjax.linen
from tests._helpers import randn


def _stats(c, seed):
  r = np.random.default_rng(seed)
  return bnjax.BatchStats(
    jnp.asarray(r.normal(size=c), jnp.float32),
    jnp.asarray(r.uniform(0.1, 3, c), jnp.float32),
  )


@pytest.mark.parametrize(
  'layer, x_shape',
  [
    (nn.Dense(6), (5, 4)),
    (nn.Dense(6, use_bias=False), (5, 4)),
    (nn.Conv(6, (3, 3)), (2, 7, 7, 3)),
    (nn.Conv(6, (3, 3), use_bias=False, strides=2), (2, 8, 8, 3)),
    (nn.Conv(6, (5,), padding='VALID'), (3, 11, 2)),
    (nn.Conv(6, (3, 3), feature_group_count=3), (2, 6, 6, 3)),
  ],
)
@pytest.mark.parametrize(
  'affine', [(True, True), (True, False), (False, True), (False, False)]
)
def test_folded_layer_equals_layer_then_bn(layer, x_shape, affine):
  use_scale, use_bias = affine
  x = jnp.asarray(randn(x_shape, seed=1, loc=0.5))
  v = layer.init(jax.random.key(0), x)['params']
  if 'bias' in v:
    v['bias'] = jnp.asarray(randn(6, seed=2))
  bn = bnjax.linen.BatchNorm(
    use_running_average=True,
    use_scale=use_scale,
    use_bias=use_bias,
    epsilon=1e-3,
  )
  bv = bn.init(jax.random.key(0), layer.apply({'params': v}, x))
  bv = {
    'batch_stats': _stats(6, 3)._asdict(),
    'params': {
      k: jnp.asarray(randn(6, seed=4 + i))
      for i, k in enumerate(sorted(bv.get('params', {})))
    },
  }
  y = bn.apply(bv, layer.apply({'params': v}, x))
  kernel, bias = bnjax.fold(
    v['kernel'],
    v.get('bias'),
    bv['batch_stats'],
    bv['params'].get('scale'),
    bv['params'].get('bias'),
    epsilon=1e-3,
  )
  folded = layer.clone(use_bias=True)
  y_f = folded.apply({'params': {'kernel': kernel, 'bias': bias}}, x)
  np.testing.assert_allclose(y_f, y, rtol=2e-5, atol=2e-5)


def test_fold_takes_any_state_type_and_jits():
  k = jnp.asarray(randn((4, 3), seed=5))
  s = bnjax.init_debiased_stats(3)
  _, s = bnjax.batch_norm(
    jnp.asarray(randn((8, 3), seed=6)), s, use_running_average=False
  )
  pop = bnjax.population_stats(s)
  a = jax.jit(bnjax.fold)(k, None, s)
  b = bnjax.fold(k, None, pop)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_fold_keeps_the_kernel_dtype():
  k = jnp.asarray(randn((4, 3), seed=7), jnp.bfloat16)
  kernel, bias = bnjax.fold(k, None, _stats(3, 8))
  assert kernel.dtype == bias.dtype == jnp.bfloat16


def test_fold_errors():
  k = jnp.ones((4, 3))
  with pytest.raises(
    ValueError,
    match=r'fold: batch_stats.mean has shape '
    r'\(5,\) but kernel of shape \(4, 3\)',
  ):
    bnjax.fold(k, None, _stats(5, 0))
  with pytest.raises(ValueError, match=r'fold: bias has shape \(4,\)'):
    bnjax.fold(k, jnp.ones(4), _stats(3, 0))
  with pytest.raises(ValueError, match='kernel must have at least 2 axes'):
    bnjax.fold(jnp.ones(3), None, _stats(3, 0))
  with pytest.raises(TypeError, match='batch_stats must be a bnjax.BatchStats'):
    bnjax.fold(k, None, {'mean': jnp.zeros(3)})
