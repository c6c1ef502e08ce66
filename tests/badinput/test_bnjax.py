"""Bad input, by category, for every public callable of ``bnjax`` but
``batch_norm`` (whose cases are tests/core/test_errors.py's
BN_ARGUMENT_CASES).

``CASES`` maps a callable's dotted name to ``{argument: cases}``; a case is
``(category, bad value, exception type, piece of the message)``, category
one of 'type', 'dtype', 'shape', 'range', 'nonfinite', 'traced' and
'corrupt-state'; an argument that needs none maps to ``'exempt: <why>'``.
A 'traced' case passes its value traced under ``jax.jit`` and
``checkify``: a value only known at run time gets a checkify check.
tests/badinput/test_coverage.py checks that every parameter is covered.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import bnjax
from tests.badinput._runner import all_cases, run_case

NAN = float('nan')
F16 = jnp.float16
X = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)
S = bnjax.init_batch_stats(3)
R = bnjax.init_renorm_stats(3)
POOL = bnjax.batch_norm(
  X, bnjax.init_pooled_stats(3), use_running_average=False
)[1]
KERNEL = jnp.ones((5, 3))


def _stats(mean=None, var=None):
  return bnjax.BatchStats(
    jnp.zeros(3) if mean is None else mean,
    jnp.ones(3) if var is None else var,
  )


_NAMEDTUPLE = (
  'exempt: a NamedTuple state, a pytree node that jax rebuilds with any '
  'leaves (tracers, None, sentinels); its values are checked where it is '
  'used (batch_norm, apply_pooled, population_stats, fold)'
)


def _per_channel(name, complex_ok=False):
  """scale, bias, mean, var: wrong shape, dtype and type."""
  return [
    ('shape', jnp.ones(4), ValueError, f'{name} has shape (4,)'),
    ('dtype', jnp.ones(3, jnp.int32), TypeError, f'{name} must be'),
    ('type', 'one', TypeError, f'{name} must be a floating-point array'),
  ] + (
    []
    if complex_ok
    else [('dtype', jnp.ones(3, jnp.complex64), TypeError, f'{name} must be')]
  )


_X_CASES = [
  ('dtype', jnp.ones((8, 3), jnp.int32), TypeError, 'x must be'),
  ('type', 'x', TypeError, 'x must be a floating-point array, got str'),
  ('shape', jnp.ones((0, 3)), ValueError, 'reduction is empty'),
]
_AXIS = [
  ('range', 2, ValueError, 'axis 2 is out of range'),
  ('type', '-1', TypeError, 'axis must be an int or a tuple'),
  ('range', (1, -1), ValueError, 'axis=(1, -1) names the same axis twice'),
]
_EPSILON = [
  ('range', 0.0, ValueError, 'epsilon=0.0'),
  ('range', 1e-50, ValueError, 'below the smallest normal'),
  ('nonfinite', NAN, ValueError, 'epsilon=nan'),
  ('type', None, TypeError, 'epsilon must be a real scalar'),
  ('traced', 0.0, checkify.JaxRuntimeError, 'epsilon must be >='),
]
_MOMENTUM = [
  ('range', 1.5, ValueError, 'momentum=1.5'),
  ('nonfinite', NAN, ValueError, 'momentum=nan'),
  ('type', '0.9', TypeError, 'momentum must be a real scalar'),
  ('dtype', np.complex64(0.9), TypeError, 'momentum must be a real scalar'),
  ('traced', 1.5, checkify.JaxRuntimeError, 'momentum must be in [0, 1]'),
]
_DTYPE = [
  ('dtype', jnp.int32, TypeError, 'dtype must be'),
  ('type', 'bogus', TypeError, 'dtype must be'),
]
_MASK = [
  ('dtype', jnp.ones((8, 3)), TypeError, 'mask must be a boolean'),
  ('shape', jnp.ones((3, 3), bool), ValueError, 'mask of shape (3, 3)'),
]
_AXIS_NAME = [
  ('type', 3, TypeError, 'axis_name=3 must be the name of a mapped axis'),
  ('range', 'unbound', NameError, "axis_name='unbound'"),
]
_GROUPS = [
  ('range', [[0, 1]], ValueError, 'axis_index_groups=[[0, 1]] was passed'),
]
_SYNC = [
  ('range', 'gathr', ValueError, "sync='gathr' must be one of"),
  ('type', 1, ValueError, 'sync=1 must be one of'),
]
_FLAG = [
  ('type', 'no', TypeError, 'must be a Python bool'),
  ('traced', True, TypeError, 'got a traced value'),
]
_STATE_CORRUPT = [
  (
    'corrupt-state',
    _stats(mean=jnp.full(3, NAN)),
    ValueError,
    'mean is not finite',
  ),
  ('corrupt-state', _stats(var=-jnp.ones(3)), ValueError, 'var is negative'),
  (
    'corrupt-state',
    bnjax.BatchStats(jnp.zeros(3), jnp.ones(2)),
    ValueError,
    'var has shape (2,)',
  ),
]
_STATE_TYPE = [
  ('type', {'mean': jnp.zeros(3)}, TypeError, 'must be a bnjax'),
  ('shape', bnjax.init_batch_stats(2), ValueError, 'mean has shape (2,)'),
  ('dtype', jax.tree.map(lambda v: v.astype(F16), S), TypeError, 'float16'),
]
_FEATURE_SHAPE = [
  ('type', '3', TypeError, 'feature_shape must be an int or a tuple'),
  ('type', 2.5, TypeError, 'feature_shape must be an int or a tuple'),
  ('range', -1, ValueError, 'feature_shape has a negative size'),
]
_INIT_DTYPE = [
  ('dtype', jnp.int32, TypeError, 'dtype must be float32'),
  ('dtype', jnp.float16, TypeError, 'float16 overflows'),
  ('type', 'bogus', TypeError, 'dtype must be float32'),
]


def _renorm_cases():
  """batch_renorm shares batch_norm's checks; its own are the state type
  (a std, > 0) and r_max, d_max."""
  return {
    'x': _X_CASES,
    'renorm_stats': [
      ('type', S, TypeError, 'renorm_stats must be a bnjax.RenormStats'),
      ('shape', bnjax.init_renorm_stats(2), ValueError, 'mean has shape (2,)'),
      (
        'corrupt-state',
        R._replace(std=jnp.zeros(3)),
        ValueError,
        'std is <= 0',
      ),
      (
        'corrupt-state',
        R._replace(mean=jnp.full(3, NAN)),
        ValueError,
        'mean is not finite',
      ),
    ],
    'scale': _per_channel('scale'),
    'bias': _per_channel('bias'),
    'use_running_average': [
      ('type', None, TypeError, 'use_running_average must be a Python bool'),
      ('traced', False, TypeError, 'got a traced value'),
    ],
    'r_max': [
      ('range', 0.5, ValueError, 'r_max=0.5 must be >= 1'),
      ('nonfinite', NAN, ValueError, 'r_max=nan'),
      ('type', 'a', TypeError, 'r_max must be a real scalar'),
    ],
    'd_max': [
      ('range', -1.0, ValueError, 'd_max=-1.0 must be >= 0'),
      ('nonfinite', NAN, ValueError, 'd_max=nan'),
      ('type', 'a', TypeError, 'd_max must be a real scalar'),
    ],
    'axis': _AXIS,
    'momentum': _MOMENTUM,
    'epsilon': _EPSILON,
    'axis_name': _AXIS_NAME,
    'axis_index_groups': _GROUPS,
    'mask': _MASK,
    'use_fast_variance': _FLAG,
    'dtype': _DTYPE,
    'sync': _SYNC,
  }


def _init(name):
  return {'feature_shape': _FEATURE_SHAPE, 'dtype': _INIT_DTYPE}


CASES: dict[str, dict[str, list | str]] = {
  **{
    f'bnjax.{t.__name__}': {f: _NAMEDTUPLE for f in t._fields}
    for t in (
      bnjax.BatchStats,
      bnjax.CumulativeStats,
      bnjax.DebiasedStats,
      bnjax.PooledStats,
      bnjax.RenormStats,
    )
  },
  # The activations are typed values; batch_norm_act checks their fields
  # (tests/badinput/test_batch_norm_act.py, its activation cases).
  'bnjax.LeakyReLU': {
    'negative_slope': 'exempt: a NamedTuple checked where batch_norm_act '
    'reads it (activation cases: 0.0, -0.2, NaN)'
  },
  'bnjax.ELU': {
    'alpha': 'exempt: a NamedTuple checked where batch_norm_act reads it '
    '(activation cases)'
  },
  'bnjax.apply_pooled': {
    'batch_stats': _STATE_TYPE
    + [
      ('type', POOL, TypeError, 'batch_stats is a PooledStats'),
      ('shape', bnjax.init_batch_stats(1), ValueError, 'mean has shape (1,)'),
    ]
    + _STATE_CORRUPT,
    'pooled': [
      ('type', S, TypeError, 'pooled must be a bnjax.PooledStats'),
      (
        'corrupt-state',
        POOL._replace(mean=jnp.full(3, NAN)),
        ValueError,
        'pooled.mean',
      ),
      (
        'corrupt-state',
        POOL._replace(m2=-jnp.ones(3)),
        ValueError,
        'm2 is negative',
      ),
      (
        'corrupt-state',
        POOL._replace(count=-jnp.ones(3)),
        ValueError,
        'count is negative',
      ),
      (
        'corrupt-state',
        POOL._replace(m2=jnp.ones(2)),
        ValueError,
        'pooled.m2 has shape (2,)',
      ),
      (
        'dtype',
        jax.tree.map(lambda v: v.astype(F16), POOL),
        TypeError,
        'pooled.mean has dtype float16',
      ),
    ],
    'momentum': _MOMENTUM,
    'epsilon': [
      ('range', -1.0, ValueError, 'epsilon=-1.0 must be finite and >= 0'),
      ('nonfinite', float('inf'), ValueError, 'epsilon=inf'),
      ('type', 'a', TypeError, 'epsilon must be a real scalar'),
    ],
    'when': [
      ('type', 'yes', TypeError, 'when must be a bool'),
      ('shape', jnp.ones(3, bool), TypeError, 'when must be a bool or a 0-d'),
      ('dtype', jnp.float32(1), TypeError, 'when must be a bool'),
    ],
  },
  'bnjax.batch_renorm': _renorm_cases(),
  'bnjax.fold': {
    'kernel': [
      ('dtype', jnp.ones((5, 3), jnp.int32), TypeError, 'kernel must be'),
      ('type', 'k', TypeError, 'kernel must be a floating-point array'),
      ('shape', jnp.ones((5, 4)), ValueError, 'kernel of shape (5, 4)'),
      ('shape', jnp.ones(3), ValueError, 'kernel must have at least 2 axes'),
    ],
    'bias': _per_channel('bias'),
    'batch_stats': [
      ('type', 5, TypeError, 'batch_stats must be a bnjax'),
      ('shape', bnjax.init_batch_stats(2), ValueError, 'mean has shape (2,)'),
    ]
    + _STATE_CORRUPT,
    'scale': _per_channel('scale'),
    'bn_bias': _per_channel('bn_bias'),
    'epsilon': _EPSILON[:4],
  },
  'bnjax.frozen_batch_norm': {
    'x': _X_CASES,
    'batch_stats': _STATE_TYPE + _STATE_CORRUPT,
    'scale': _per_channel('scale'),
    'bias': _per_channel('bias'),
    'axis': _AXIS,
    'epsilon': _EPSILON,
    'dtype': _DTYPE,
  },
  **{
    f'bnjax.{n}': _init(n)
    for n in (
      'init_batch_stats',
      'init_cumulative_stats',
      'init_debiased_stats',
      'init_pooled_stats',
      'init_renorm_stats',
    )
  },
  'bnjax.moments': {
    'x': _X_CASES,
    'axis': _AXIS,
    'mask': _MASK,
    'axis_name': _AXIS_NAME,
    'axis_index_groups': _GROUPS,
    'sync': _SYNC,
  },
  'bnjax.normalize': {
    'x': _X_CASES,
    'mean': _per_channel('mean', complex_ok=True)
    + [('nonfinite', jnp.full(3, NAN), ValueError, 'mean is not finite')],
    'var': _per_channel('var')
    + [
      ('nonfinite', jnp.full(3, NAN), ValueError, 'var is not finite'),
      ('range', -jnp.ones(3), ValueError, 'var is negative'),
    ],
    'scale': _per_channel('scale'),
    'bias': _per_channel('bias'),
    'axis': _AXIS,
    'epsilon': _EPSILON,
    'dtype': _DTYPE,
  },
  'bnjax.population_stats': {
    'state': [
      ('type', {'mean': 1}, TypeError, 'state must be a BatchStats'),
      ('type', R, TypeError, 'state must be a BatchStats'),
      ('dtype', jax.tree.map(lambda v: v.astype(F16), S), TypeError, 'float16'),
    ]
    + [(c, v._replace(), e, m) for c, v, e, m in _STATE_CORRUPT]
    + [
      (
        'corrupt-state',
        bnjax.DebiasedStats(jnp.zeros(3), jnp.ones(3), -jnp.ones(3)),
        ValueError,
        'weight is negative',
      ),
      (
        'corrupt-state',
        POOL._replace(m2=-jnp.ones(3)),
        ValueError,
        'm2 is negative',
      ),
    ],
  },
}

# A good call of each callable: (function, keyword arguments).
GOOD = {
  'bnjax.apply_pooled': (
    bnjax.apply_pooled,
    dict(batch_stats=S, pooled=POOL, momentum=0.9),
  ),
  'bnjax.batch_renorm': (
    bnjax.batch_renorm,
    dict(x=X, renorm_stats=R, use_running_average=False, r_max=1.0, d_max=0.0),
  ),
  'bnjax.fold': (bnjax.fold, dict(kernel=KERNEL, bias=None, batch_stats=S)),
  'bnjax.frozen_batch_norm': (
    bnjax.frozen_batch_norm,
    dict(x=X, batch_stats=S),
  ),
  **{
    f'bnjax.{n}': (getattr(bnjax, n), dict(feature_shape=3))
    for n in (
      'init_batch_stats',
      'init_cumulative_stats',
      'init_debiased_stats',
      'init_pooled_stats',
      'init_renorm_stats',
    )
  },
  'bnjax.moments': (bnjax.moments, dict(x=X)),
  'bnjax.normalize': (
    bnjax.normalize,
    dict(x=X, mean=jnp.zeros(3), var=jnp.ones(3)),
  ),
  'bnjax.population_stats': (bnjax.population_stats, dict(state=S)),
}


@pytest.mark.parametrize('name, arg, case', all_cases(CASES))
def test_bad_input_raises_a_clear_error_naming_the_argument(name, arg, case):
  run_case(GOOD, name, arg, case)


def test_every_good_call_runs():
  for fn, kw in GOOD.values():
    fn(**kw)
