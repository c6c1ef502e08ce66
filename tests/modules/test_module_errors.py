"""The linen and nnx modules' own bad input (num_features, param_dtype, a
traced mode flag, a missing mode, convert's target): clear errors at trace
time that carry the module's name. The functional core's are in
tests/core/test_errors.py."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import bnjax.linen
import bnjax.nnx

X = jnp.ones((4, 3))


def _linen(**kw):
  m = bnjax.linen.BatchNorm(use_running_average=False, **kw)
  m.init(jax.random.key(0), X)
  return m


@pytest.mark.parametrize(
  'call, exc, pieces',
  [
    (
      lambda: bnjax.nnx.BatchRenorm(
        3, use_running_average=None, rngs=nnx.Rngs(0)
      )(X),
      ValueError,
      ['bnjax.nnx.BatchRenorm: no use_running_average was given'],
    ),
    (
      lambda: bnjax.nnx.BatchNorm(-1, rngs=nnx.Rngs(0)),
      TypeError,
      ['num_features must be a positive int', 'got -1'],
    ),
    (
      lambda: bnjax.nnx.BatchNorm('3', rngs=nnx.Rngs(0)),
      TypeError,
      ['num_features must be a positive int', "got '3'"],
    ),
    (
      lambda: bnjax.nnx.BatchNorm(3.0, rngs=nnx.Rngs(0)),
      TypeError,
      ['num_features must be a positive int', 'got 3.0'],
    ),
    (
      lambda: bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))(jnp.ones((4, 5))),
      ValueError,
      ['built with num_features=3', 'build it with num_features=5'],
    ),
    (
      lambda: jax.jit(
        lambda u: bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))(
          X, use_running_average=u
        )
      )(True),
      TypeError,
      ['use_running_average must be a Python bool, got a traced value'],
    ),
    (
      lambda: bnjax.nnx.convert(nnx.Linear(2, 2, rngs=nnx.Rngs(0))),
      ValueError,
      ['found no flax.nnx.BatchNorm in the Linear'],
    ),
    (
      lambda: _linen(param_dtype=jnp.int32),
      TypeError,
      ['param_dtype must be a floating dtype', 'param_dtype=jnp.float32'],
    ),
    (
      lambda: jax.jit(
        lambda u: bnjax.linen.BatchNorm().apply(
          {
            'batch_stats': {'mean': jnp.zeros(3), 'var': jnp.ones(3)},
            'params': {'scale': jnp.ones(3), 'bias': jnp.zeros(3)},
          },
          X,
          use_running_average=u,
        )
      )(True),
      TypeError,
      ['use_running_average must be a Python bool, got a traced value'],
    ),
  ],
)
def test_module_bad_input_raises_clear_error(call, exc, pieces):
  """Each module argument: wrong type, shape, dtype, traced where it must be
  static (one row per case)."""
  with pytest.raises(exc) as info:
    call()
  for p in pieces:
    assert p in str(info.value), (p, str(info.value))


def test_module_errors_carry_the_module_name():
  with pytest.raises(ValueError, match=r'^bnjax\.nnx\.BatchNorm: momentum=1.5'):
    bnjax.nnx.BatchNorm(3, momentum=1.5, rngs=nnx.Rngs(0))(jnp.ones((4, 3)))
  m = bnjax.linen.BatchNorm(use_running_average=False, momentum=1.5)
  with pytest.raises(ValueError, match=r'^bnjax\.linen\.BatchNorm: momentum'):
    m.init(jax.random.key(0), jnp.ones((4, 3)))
  m = bnjax.linen.BatchNorm(use_running_average=False, epsilon=0.0)
  with pytest.raises(ValueError, match=r'^bnjax\.linen\.BatchNorm: epsilon'):
    m.init(jax.random.key(0), jnp.ones((4, 3)))
