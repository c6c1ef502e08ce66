"""Bad input to every public callable of ``bnjax.linen``, by category.

The format is tests/badinput/test_interop.py's: ``CASES[callable][argument]``
is a list of ``(category, value, exception type, message piece)`` or an
``'exempt: <reason>'``; a module's dataclass fields are its name, its call
``<name>.__call__``. ``Traced(good)`` passes the argument as a ``jax.jit``
argument (traced where it must be static).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import bnjax.linen
from tests.badinput._runner import all_cases

NAN = float('nan')
X = jnp.arange(24.0).reshape(8, 3)


class Traced:
  def __init__(self, good):
    self.good = good


def _ctor(cls):
  def call(**over):
    m = cls(**{'use_running_average': False, **over})
    v = m.init(jax.random.key(0), X)
    return m.apply(v, X, mutable=['batch_stats'])

  return call


def _call(cls):
  def call(**over):
    m = cls()
    v = m.init(jax.random.key(0), X, use_running_average=False)
    kw = {'x': X, 'use_running_average': False, **over}
    return m.apply(v, **kw, mutable=['batch_stats'])

  return call


def _pooled():
  """A layer's batch_stats and its pool of one micro-batch."""
  bn = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.9)
  v = bn.init(jax.random.key(0), X)
  _, upd = bn.apply(
    {**v, bnjax.linen.MOMENTS: {}},
    X,
    mutable=['batch_stats', bnjax.linen.MOMENTS],
  )
  return v['batch_stats'], upd[bnjax.linen.MOMENTS]


STATS, MOMENTS = _pooled()


def _apply_pooled(**over):
  kw = {'batch_stats': STATS, 'pooled': MOMENTS, **over}
  return bnjax.linen.apply_pooled(**kw)


CALLS = {
  'bnjax.linen.BatchNorm': _ctor(bnjax.linen.BatchNorm),
  'bnjax.linen.BatchNorm.__call__': _call(bnjax.linen.BatchNorm),
  'bnjax.linen.BatchNormAct': _ctor(bnjax.linen.BatchNormAct),
  'bnjax.linen.BatchNormAct.__call__': _call(bnjax.linen.BatchNormAct),
  'bnjax.linen.BatchRenorm': _ctor(bnjax.linen.BatchRenorm),
  'bnjax.linen.BatchRenorm.__call__': _call(bnjax.linen.BatchRenorm),
  'bnjax.linen.apply_pooled': _apply_pooled,
}

# Where a message names the argument by another word.
NAMED: dict[tuple[str, str], str] = {}

_FIELDS = {
  'use_running_average': [
    ('type', 'yes', TypeError, 'use_running_average must be a Python bool'),
    ('range', None, ValueError, 'pass use_running_average to the construc'),
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
    ('nonfinite', NAN, ValueError, 'epsilon=nan must be finite'),
    ('type', '1e-5', TypeError, 'epsilon must be a real scalar'),
  ],
  'dtype': [
    ('dtype', jnp.int32, TypeError, 'dtype must be floating'),
    ('type', 'bogus', TypeError, 'dtype must be floating'),
  ],
  'param_dtype': [
    ('dtype', jnp.int32, TypeError, 'param_dtype must be a floating dtype'),
    ('type', 'bogus', TypeError, 'param_dtype must be a floating dtype'),
  ],
  'use_bias': [('type', 'yes', TypeError, 'use_bias must be a Python bool')],
  'use_scale': [('type', None, TypeError, 'use_scale must be a Python bool')],
  'bias_init': [
    ('type', 'zeros', TypeError, 'bias_init must be an initializer'),
    (
      'shape',
      lambda key, shape, dtype: jnp.zeros((2,), dtype),
      ValueError,
      'bias has shape (2,)',
    ),
  ],
  'scale_init': [
    ('type', 3, TypeError, 'scale_init must be an initializer'),
    (
      'shape',
      lambda key, shape, dtype: jnp.ones((4,), dtype),
      ValueError,
      'scale has shape (4,)',
    ),
  ],
  'axis_name': [
    ('type', 3, TypeError, 'must be the name of a mapped axis'),
    ('range', 'unbound', NameError, "axis_name='unbound'"),
  ],
  'axis_index_groups': [
    ('range', [[0, 1]], ValueError, 'was passed without axis_name'),
  ],
  'use_fast_variance': [
    ('type', 'no', TypeError, 'use_fast_variance must be a Python bool'),
    ('traced', Traced(True), TypeError, 'traced value'),
  ],
  'force_float32_reductions': [
    ('type', None, TypeError, 'force_float32_reductions must be a Python'),
  ],
  'sync': [('range', 'gathr', ValueError, "sync='gathr' must be one of")],
}

_CALL_ARGS = {
  'x': [
    ('type', 'x', TypeError, 'x must be a floating-point array, got str'),
    (
      'shape',
      jnp.ones((8, 4)),
      ValueError,
      "the module's batch_stats hold (3,)",
    ),
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


def _moments(**over):
  return {**MOMENTS, **over}


CASES: dict[str, dict[str, list | str]] = {
  'bnjax.linen.BatchNorm': {
    **_FIELDS,
    'virtual_batch_size': [
      ('range', 3, ValueError, 'virtual_batch_size=3 does not divide'),
      ('range', 0, ValueError, 'virtual_batch_size must be a positive int'),
      ('type', 2.0, TypeError, 'virtual_batch_size must be a positive int'),
    ],
  },
  'bnjax.linen.BatchNorm.__call__': {
    **_CALL_ARGS,
    'x': _CALL_ARGS['x']
    + [('dtype', X.astype(jnp.int32), TypeError, 'x must be a floating')],
  },
  'bnjax.linen.BatchRenorm': {**_FIELDS, **_LIMITS},
  'bnjax.linen.BatchRenorm.__call__': {
    **_CALL_ARGS,
    'x': _CALL_ARGS['x']
    + [('dtype', X.astype(jnp.int32), TypeError, 'x must be a real floating')],
    **_LIMITS,
  },
  'bnjax.linen.apply_pooled': {
    'batch_stats': [
      ('type', [1], TypeError, 'batch_stats must be a mapping'),
      (
        'corrupt-state',
        {'mean': jnp.array([NAN, 0.0, 0.0]), 'var': jnp.ones(3)},
        ValueError,
        'the running statistic mean is not finite at channels [0]',
      ),
      (
        'corrupt-state',
        {'mean': jnp.zeros(3), 'var': jnp.array([1.0, -1.0, 1.0])},
        ValueError,
        'the running statistic var is negative',
      ),
      (
        'corrupt-state',
        {'mean': jnp.zeros(2), 'var': jnp.ones(2)},
        ValueError,
        "'batch_stats/mean': (2,)",
      ),
      ('range', {}, ValueError, 'batch_stats has no BatchNorm statistics'),
    ],
    'pooled': [
      ('type', [1], TypeError, 'pooled must be a mapping'),
      (
        'corrupt-state',
        _moments(mean=jnp.array([0.0, NAN, 0.0])),
        ValueError,
        'the running statistic mean is not finite at channels [1]',
      ),
      (
        'corrupt-state',
        _moments(m2=-jnp.ones(3)),
        ValueError,
        'the running statistic m2 is negative',
      ),
      (
        'corrupt-state',
        _moments(count=jnp.ones(4)),
        ValueError,
        "'pooled/count': (4,)",
      ),
      (
        'range',
        _moments(momentum=jnp.float32(1.5)),
        ValueError,
        'momentum=1.5 is outside [0, 1]',
      ),
      # Edited or foreign trees: each was a bare KeyError or TypeError.
      (
        'corrupt-state',
        {k: v for k, v in MOMENTS.items() if k != 'momentum'},
        ValueError,
        "the pool in pooled at the top lacks ['momentum']",
      ),
      ('type', {'mean': 1}, TypeError, 'pooled at mean is of type int, not a'),
      (
        'shape',
        {'mean': {'bn': MOMENTS}},
        ValueError,
        'pooled has layers under mean but batch_stats there is of type',
      ),
    ],
    'when': [
      ('type', 0.5, TypeError, 'when must be a bool or a 0-d bool array'),
      ('shape', jnp.ones(3, bool), TypeError, 'when must be a bool'),
    ],
    # The deprecated name of pooled: given beside pooled, it is refused.
    'batch_moments': [
      ('range', MOMENTS, TypeError, 'batch_moments is the deprecated name'),
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
CASES['bnjax.linen.BatchNormAct'] = {
  **{k: v for k, v in CASES['bnjax.linen.BatchNorm'].items()},
  **_ACT_ARGS,
}
CASES['bnjax.linen.BatchNormAct.__call__'] = CASES[
  'bnjax.linen.BatchNorm.__call__'
]


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
    else:
      call(**{arg: value})
  msg = str(info.value)
  assert piece in msg, (piece, msg)
  named = NAMED.get((name, arg), arg)
  assert arg in msg or named in msg or arg.endswith('_init'), (arg, msg)
  if exc is not NameError:
    assert 'bnjax.linen.' in msg, msg


def test_apply_pooled_good_values_are_the_pool_applied():
  # Not only no error: the right number (one EMA step to the pool).
  stats, _ = _apply_pooled()
  x = np.asarray(X, np.float64)
  np.testing.assert_allclose(stats['mean'], 0.1 * x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * x.var(0), rtol=1e-6)
