"""Bad input to bnjax.batch_norm_act, by argument and category.

``CASES[function][argument]`` is a list of ``(category, value, exception
type, a piece of the message)``, or ``'exempt: reason'``. Categories:
type, shape, range, nonfinite, corrupt-state. Each case calls the
function with that one argument replaced in a valid call (``_call``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax

NAN = float('nan')
INF = float('inf')
C = 3

CASES = {
  'bnjax.batch_norm_act': {
    'x': [
      ('type', np.arange(24).reshape(8, C), TypeError, 'floating'),
      ('type', jnp.ones((8, C), jnp.complex64), TypeError, 'complex'),
      ('shape', jnp.ones((8, 4)), ValueError, 'shape'),
      ('shape', jnp.ones((1, C)), ValueError, 'one value per channel'),
    ],
    'batch_stats': [
      ('type', (jnp.zeros(C), jnp.ones(C)), TypeError, 'batch_stats'),
      ('type', bnjax.init_renorm_stats(C), TypeError, 'batch_stats'),
      ('shape', bnjax.init_batch_stats(4), ValueError, 'shape'),
      (
        'corrupt-state',
        bnjax.BatchStats(jnp.zeros(C), jnp.array([1.0, NAN, 1.0])),
        ValueError,
        'var',
      ),
    ],
    'scale': [
      ('type', 'ones', TypeError, 'scale'),
      ('shape', jnp.ones(4), ValueError, 'scale has shape (4,)'),
    ],
    'bias': [
      ('type', [0, 0, 0], TypeError, 'bias'),
      ('shape', jnp.zeros((C, 1)), ValueError, 'bias has shape'),
    ],
    'use_running_average': [
      ('type', None, TypeError, 'use_running_average'),
      ('type', 'yes', TypeError, 'use_running_average'),
    ],
    'activation': [
      ('type', jax.nn.leaky_relu, TypeError, 'bnjax.LeakyReLU'),
      ('type', 3, TypeError, 'activation must be one of'),
      ('type', ('leaky_relu', 0.1), TypeError, 'activation must be one of'),
      ('range', 'relu', ValueError, 'cannot be inverted'),
      ('range', jax.nn.relu, ValueError, 'cannot be inverted'),
      ('range', 'gelu', ValueError, 'activation must be one of'),
      ('range', bnjax.LeakyReLU(0.0), ValueError, 'negative_slope=0.0'),
      ('range', bnjax.LeakyReLU(1e-45), ValueError, 'a normal float32'),
      ('range', bnjax.ELU(1e-45), ValueError, 'a normal float32'),
      ('range', bnjax.LeakyReLU(-0.2), ValueError, 'must be finite and > 0'),
      ('range', bnjax.ELU(-1.0), ValueError, 'alpha=-1.0'),
      ('nonfinite', bnjax.LeakyReLU(NAN), ValueError, 'finite'),
      ('nonfinite', bnjax.ELU(INF), ValueError, 'finite'),
      ('type', bnjax.LeakyReLU('0.1'), TypeError, 'Python number'),
      ('type', bnjax.LeakyReLU(True), TypeError, 'Python number'),
      ('type', bnjax.ELU(jnp.ones(())), TypeError, 'static'),
    ],
    'scale_floor': [
      ('type', '1e-3', TypeError, 'scale_floor must be a Python number'),
      ('type', jnp.float32(1e-3) + jnp.zeros(()), TypeError, 'static'),
      ('type', None, TypeError, 'scale_floor'),
      ('range', 0.0, ValueError, 'scale_floor=0.0 must be finite and > 0'),
      ('range', -1e-3, ValueError, 'scale_floor'),
      ('nonfinite', NAN, ValueError, 'scale_floor'),
      ('nonfinite', INF, ValueError, 'scale_floor'),
      # Regression (hostile review): values that pass "finite and > 0" but
      # are subnormal or overflow in float32 made the backward NaN.
      ('range', 1e-40, ValueError, 'scale_floor=1e-40 must be a normal'),
      ('range', 1e39, ValueError, 'scale_floor=1e+39 must be a normal'),
      ('range', 10**400, ValueError, 'scale_floor=inf must be finite'),
    ],
    'axis': [
      ('range', 2, ValueError, 'axis'),
      ('type', 'last', TypeError, 'axis'),
    ],
    'momentum': [
      ('range', 1.5, ValueError, 'momentum'),
      ('nonfinite', NAN, ValueError, 'momentum'),
    ],
    'epsilon': [
      ('range', 0.0, ValueError, 'epsilon'),
      ('nonfinite', INF, ValueError, 'epsilon'),
    ],
    'axis_name': [('range', 'unbound', NameError, 'unbound')],
    'axis_index_groups': [('type', [[0]], ValueError, 'axis_index_groups')],
    'mask': [
      ('shape', jnp.ones((8, 4), bool), ValueError, 'mask'),
      ('type', jnp.ones((8, C)), TypeError, 'mask'),
    ],
    'use_fast_variance': [('type', 'no', TypeError, 'use_fast_variance')],
    'dtype': [
      ('type', jnp.int32, TypeError, 'dtype'),
    ],
    'virtual_batch_size': [
      ('range', 3, ValueError, 'virtual_batch_size'),
      ('type', 2.0, TypeError, 'virtual_batch_size'),
    ],
    'sync': [('range', 'allreduce', ValueError, 'sync')],
  }
}

# ELU's half-precision output (the residual) cannot be inverted: a dtype
# case of its own, with the activation.
ELU_HALF = [
  ('range', jnp.bfloat16, ValueError, 'ELU with a bfloat16 output'),
  ('range', jnp.float16, ValueError, 'ELU with a float16 output'),
]


def _call(**override):
  kw = dict(
    x=jnp.asarray(
      np.random.default_rng(0).standard_normal((8, C)), jnp.float32
    ),
    batch_stats=bnjax.init_batch_stats(C),
    scale=jnp.ones(C),
    bias=jnp.zeros(C),
    use_running_average=False,
  )
  kw.update(override)
  x, stats, scale, bias = (
    kw.pop(k) for k in ('x', 'batch_stats', 'scale', 'bias')
  )
  if kw['use_running_average'] is False and isinstance(stats, bnjax.BatchStats):
    # Corrupt running values are read in inference.
    if not bool(jnp.all(jnp.isfinite(stats.var))):
      kw['use_running_average'] = True
  return bnjax.batch_norm_act(x, stats, scale, bias, **kw)


def _cases():
  for fn, args in CASES.items():
    for arg, cases in args.items():
      if isinstance(cases, str):
        continue
      for i, (cat, value, exc, piece) in enumerate(cases):
        yield pytest.param(
          fn, arg, cat, value, exc, piece, id=f'{arg}-{cat}-{i}'
        )


@pytest.mark.parametrize('fn, arg, category, value, exc, piece', _cases())
def test_bad_input_raises_a_clear_error(fn, arg, category, value, exc, piece):
  assert category in ('type', 'shape', 'range', 'nonfinite', 'corrupt-state')
  if exc is None:  # a boundary value that is valid
    y, _ = _call(**{arg: value})
    assert bool(jnp.all(jnp.isfinite(y)))
    return
  with pytest.raises(exc, match=None) as info:
    _call(**{arg: value})
  assert piece.lower() in str(info.value).lower(), str(info.value)
  if exc is not NameError:  # JAX's own error for an unbound axis name
    assert str(info.value).startswith(f'{fn}: '), str(info.value)


@pytest.mark.parametrize('dtype, exc_piece', [(c[1], c[3]) for c in ELU_HALF])
def test_elu_refuses_a_half_precision_output(dtype, exc_piece):
  with pytest.raises(ValueError, match=exc_piece):
    _call(activation='elu', dtype=dtype)
  with pytest.raises(ValueError, match=exc_piece):
    _call(activation='elu', x=jnp.ones((8, C), dtype))


def test_every_argument_has_cases():
  import inspect

  params = set(inspect.signature(bnjax.batch_norm_act).parameters)
  assert set(CASES['bnjax.batch_norm_act']) == params
