"""Bad input to every public callable of ``bnjax.nnx``, by category.

The format is tests/badinput/test_interop.py's: ``CASES[callable][argument]``
is a list of ``(category, value, exception type, message piece)`` or an
``'exempt: <reason>'``; a class's constructor is its name, its call
``<name>.__call__``. ``Traced(good)`` passes the argument as a ``jax.jit``
argument (traced where it must be static).
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import bnjax
import bnjax.nnx
from tests.badinput._runner import all_cases

NAN = float('nan')
X = jnp.arange(24.0).reshape(8, 3)


class Traced:
  def __init__(self, good):
    self.good = good


def _ctor(cls):
  def call(**over):
    kw = {
      'num_features': 3,
      'rngs': nnx.Rngs(0),
      'use_running_average': False,
      **over,
    }
    return cls(**kw)(X)

  return call


def _call(cls):
  def call(**over):
    bn = cls(3, rngs=nnx.Rngs(0))
    return bn(**{'x': X, 'use_running_average': False, **over})

  return call


def _convert(**over):
  model = nnx.Sequential(
    nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  )
  kw = {'model': model, **over}
  return bnjax.nnx.convert(**kw)


CALLS = {
  'bnjax.nnx.BatchNorm': _ctor(bnjax.nnx.BatchNorm),
  'bnjax.nnx.BatchNorm.__call__': _call(bnjax.nnx.BatchNorm),
  'bnjax.nnx.BatchNormAct': _ctor(bnjax.nnx.BatchNormAct),
  'bnjax.nnx.BatchNormAct.__call__': _call(bnjax.nnx.BatchNormAct),
  'bnjax.nnx.BatchRenorm': _ctor(bnjax.nnx.BatchRenorm),
  'bnjax.nnx.BatchRenorm.__call__': _call(bnjax.nnx.BatchRenorm),
  'bnjax.nnx.convert': _convert,
}

# Where a message names the argument by another word.
NAMED = {
  ('bnjax.nnx.convert', 'overrides'): 'BatchNorm',
  ('bnjax.nnx.convert', 'model'): 'flax.nnx.BatchNorm',
}

_ARGS = {
  'num_features': [
    ('range', 0, TypeError, 'num_features must be a positive int'),
    ('type', 3.0, TypeError, 'num_features must be a positive int'),
    ('shape', 4, ValueError, 'built with num_features=4'),
  ],
  'use_running_average': [
    ('type', 'yes', TypeError, 'use_running_average must be a Python bool'),
    ('range', None, ValueError, 'no use_running_average was given'),
  ],
  'axis': [
    ('range', 5, ValueError, 'axis 5 is out of range'),
    ('type', '1', TypeError, 'axis must be an int or a tuple of ints'),
  ],
  'momentum': [
    ('range', 1.5, ValueError, 'momentum=1.5 is outside [0, 1]'),
    ('nonfinite', NAN, ValueError, 'momentum=nan is outside [0, 1]'),
    ('type', '0.9', TypeError, 'momentum must be a real scalar'),
  ],
  'epsilon': [
    ('range', 0.0, ValueError, 'epsilon=0.0 must be finite and > 0'),
    ('nonfinite', float('inf'), ValueError, 'epsilon=inf must be finite'),
    ('type', None, TypeError, 'epsilon must be a real scalar'),
  ],
  'dtype': [
    ('dtype', jnp.int32, TypeError, 'dtype must be a floating dtype'),
    ('type', 'bogus', TypeError, 'dtype must be a floating dtype'),
  ],
  'param_dtype': [
    ('dtype', jnp.int32, TypeError, 'param_dtype must be a floating dtype'),
  ],
  'use_bias': [('type', 'yes', TypeError, 'use_bias must be a Python bool')],
  'use_scale': [('type', None, TypeError, 'use_scale must be a Python bool')],
  'bias_init': [
    ('type', 3, TypeError, 'bias_init must be an initializer'),
    (
      'shape',
      lambda key, shape, dtype: jnp.zeros((2,), dtype),
      ValueError,
      'bias has shape (2,)',
    ),
  ],
  'scale_init': [('type', 3, TypeError, 'scale_init must be an initializer')],
  'axis_name': [('type', 3, TypeError, 'must be the name of a mapped axis')],
  'axis_index_groups': [
    ('range', [[0, 1]], ValueError, 'was passed without axis_name'),
  ],
  'use_fast_variance': [
    ('type', 'no', TypeError, 'use_fast_variance must be a Python bool'),
  ],
  'promote_dtype': [
    ('type', 3, TypeError, 'promote_dtype must be a function'),
  ],
  'rngs': [
    ('type', None, TypeError, 'rngs must be an nnx.Rngs'),
  ],
  'bias_metadata': [
    ('type', 3, TypeError, 'bias_metadata must be a mapping'),
  ],
  'scale_metadata': [
    ('type', [1], TypeError, 'scale_metadata must be a mapping'),
  ],
  'sync': [('range', 'gathr', ValueError, "sync='gathr' must be one of")],
}

_CALL_ARGS = {
  'x': [
    ('type', 'x', TypeError, 'x must be a floating-point array, got str'),
    ('shape', jnp.ones((8, 4)), ValueError, 'build it with num_features=4'),
  ],
  'use_running_average': [
    ('type', 1, TypeError, 'use_running_average must be a Python bool'),
    ('traced', Traced(False), TypeError, 'traced value'),
  ],
  'mask': [
    ('dtype', jnp.ones((8, 3)), TypeError, 'mask must be a boolean'),
    ('shape', jnp.ones((3, 3), bool), ValueError, 'does not broadcast'),
  ],
}

_LIMITS = {
  'r_max': [
    ('range', 0.5, ValueError, 'r_max=0.5 must be >= 1'),
    ('nonfinite', NAN, ValueError, 'r_max=nan must be >= 1'),
    ('type', 'a', TypeError, 'r_max must be a real scalar'),
  ],
  'd_max': [
    ('range', -1.0, ValueError, 'd_max=-1.0 must be >= 0'),
    ('type', 'a', TypeError, 'd_max must be a real scalar'),
  ],
}

CASES: dict[str, dict[str, list | str]] = {
  'bnjax.nnx.BatchNorm': {
    **_ARGS,
    'virtual_batch_size': [
      ('range', 3, ValueError, 'virtual_batch_size=3 does not divide'),
      ('type', 2.0, TypeError, 'virtual_batch_size must be a positive int'),
    ],
  },
  'bnjax.nnx.BatchNorm.__call__': _CALL_ARGS,
  'bnjax.nnx.BatchRenorm': {**_ARGS, **_LIMITS},
  # An int x is promoted to the parameters' dtype, as by flax's modules.
  'bnjax.nnx.BatchRenorm.__call__': {**_CALL_ARGS, **_LIMITS},
  'bnjax.nnx.PooledMoment': {
    'args': 'exempt: nnx.Variable constructor, a plain container that '
    'bnjax.training.start_pooling fills (its values are checked where '
    'pooling reads them)',
    'kwargs': 'exempt: nnx.Variable metadata, as args',
  },
  'bnjax.nnx.convert': {
    'model': [
      ('type', 3, ValueError, 'found no flax.nnx.BatchNorm in the int'),
    ],
    'axis_name': [
      ('type', 3, TypeError, 'axis_name=3 must be the name of a mapped axis'),
    ],
    'overrides': [
      ('type', {'bogus': 1}, TypeError, "unknown BatchNorm arguments ['bog"),
      ('range', {'momentum': 1.5}, ValueError, 'momentum=1.5 is outside'),
    ],
  },
}

# BatchNormAct is BatchNorm (the same fields, checks and state) plus the
# activation and its |scale| floor: every BatchNorm case runs on it too.
_ACT_ARGS = {
  'activation': [
    ('range', 'relu', ValueError, 'cannot be inverted'),
    ('type', 3, TypeError, 'activation must be one of'),
  ],
  'scale_floor': [
    ('range', 0.0, ValueError, 'scale_floor=0.0 must be finite and > 0'),
    ('nonfinite', float('nan'), ValueError, 'scale_floor'),
  ],
}
CASES['bnjax.nnx.BatchNormAct'] = {
  **{k: v for k, v in CASES['bnjax.nnx.BatchNorm'].items()},
  **_ACT_ARGS,
}
CASES['bnjax.nnx.BatchNormAct.__call__'] = CASES['bnjax.nnx.BatchNorm.__call__']


@pytest.mark.parametrize('name', sorted(CALLS))
def test_every_good_call_runs(name):
  CALLS[name]()


@pytest.mark.parametrize('name, arg, case', all_cases(CASES))
def test_bad_input_raises_naming_the_argument(name, arg, case):
  _, value, exc, piece = case
  call = CALLS[name]
  with pytest.raises(exc) as info:
    if isinstance(value, Traced):
      jax.jit(lambda v: call(**{arg: v}))(value.good)
    elif arg == 'overrides':
      call(**value)
    else:
      call(**{arg: value})
  msg = str(info.value)
  assert piece in msg, (piece, msg)
  named = NAMED.get((name, arg), arg)
  assert arg in msg or named in msg or arg.endswith('_init'), (arg, msg)
  assert 'bnjax.nnx.' in msg, msg
