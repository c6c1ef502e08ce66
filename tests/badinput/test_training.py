"""Bad input, by category, for every public callable of ``bnjax.training``
(the format and runner: tests/badinput/_runner.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
import bnjax.training as T
from tests.badinput._runner import all_cases, run_case

NAN = float('nan')
STACKED = bnjax.BatchStats(jnp.ones((2, 3)), jnp.ones((2, 3)))
BATCHES = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)))


def _bn():
  return bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))


def _pooling_bn(corrupt=None):
  bn = _bn()
  T.start_pooling(bn)
  bn(BATCHES[0])
  if corrupt:
    getattr(bn, corrupt[0])[...] = corrupt[1]
  return bn


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    return bnjax.linen.BatchNorm(use_running_average=False)(nn.Dense(3)(x))


_LINEN = _Linen().init(jax.random.key(0), BATCHES[0])


def _net(stats, x):
  y, s = bnjax.batch_norm(x, stats['bn'], use_running_average=False)
  return y, {'bn': s}


def _is_kept(out):
  """A layer's NaN statistics are recomputed: the right number."""
  np.testing.assert_allclose(
    out['bn'].var, np.asarray(BATCHES, np.float64).reshape(-1, 3).var(0), 1e-5
  )


_MODEL_NNX = [
  ('type', 5, TypeError, 'model must be an nnx.Module, got int'),
  ('type', _Linen(), TypeError, 'model must be an nnx.Module'),
]
_ONLY = [
  ('type', 5, TypeError, 'only must be an nnx Filter'),
  (
    'range',
    lambda p, m: False,
    ValueError,
    'no BatchNorm layer selected by only',
  ),
]

CASES: dict[str, dict[str, list | str]] = {
  'bnjax.training.apply_pooled': {
    'model': _MODEL_NNX
    + [
      (
        'range',
        _bn(),
        ValueError,
        'no BatchNorm layer of the model is pooling',
      ),
      (
        'corrupt-state',
        _pooling_bn(('pooled_m2', -jnp.ones(3))),
        ValueError,
        'm2 is negative',
      ),
      (
        'corrupt-state',
        _pooling_bn(('pooled_mean', jnp.full(3, NAN))),
        ValueError,
        'mean is not finite',
      ),
    ],
    'when': [
      ('type', 'yes', TypeError, 'when must be a bool'),
      ('shape', jnp.ones(3, bool), TypeError, 'when must be a bool or a 0-d'),
      ('dtype', jnp.float32(1), TypeError, 'when must be a bool'),
    ],
  },
  'bnjax.training.average_stats': {
    'stats': [
      ('type', 'x', TypeError, 'stats must be a pytree of arrays'),
      ('shape', {'m': jnp.ones(())}, ValueError, 'stacked along a leading'),
      (
        'corrupt-state',
        STACKED._replace(mean=STACKED.mean.at[0, 0].set(NAN)),
        ValueError,
        'mean is not finite',
      ),
      (
        'corrupt-state',
        STACKED._replace(var=-STACKED.var),
        ValueError,
        'var is negative',
      ),
      (
        'corrupt-state',
        {'bn': {'var': jnp.full((2, 3), jnp.inf)}},
        ValueError,
        'stats holds a non-finite statistic',
      ),
    ],
    'axis_name': [
      ('type', 3, TypeError, 'axis_name=3 must be the name of a mapped axis'),
    ],
    'weight': [
      ('type', 'a', TypeError, 'weight must be a real number'),
      ('shape', jnp.ones(3), ValueError, 'weight of shape (3,)'),
      ('nonfinite', jnp.array([1.0, NAN]), ValueError, 'weight must be finite'),
      (
        'range',
        jnp.array([1.0, -1.0]),
        ValueError,
        'weight must be finite and >= 0',
      ),
      ('range', jnp.zeros(2), ValueError, 'the weights sum to 0'),
    ],
    'axis_index_groups': [
      ('range', [[0, 1]], ValueError, 'axis_index_groups=[[0, 1]] was passed'),
    ],
  },
  'bnjax.training.bn_param_mask': {
    'params': [
      ('type', [1.0], TypeError, 'params must be a nested dict'),
      ('range', {'x': {'w': 1.0}}, ValueError, 'no module of params'),
    ],
    'batch_stats': [
      ('type', [1.0], TypeError, 'batch_stats must be a nested dict'),
      ('range', {'other': {'mean': 1.0}}, ValueError, 'pass the batch_stats'),
    ],
  },
  'bnjax.training.mode_fields': {
    'mode': [
      ('range', 'test', ValueError, 'mode must be one of'),
      ('type', 5, ValueError, 'mode must be one of'),
    ],
    'momentum': [
      ('range', 1.5, ValueError, 'momentum=1.5 is outside [0, 1]'),
      ('nonfinite', NAN, ValueError, 'momentum=nan'),
      ('type', 'a', TypeError, 'momentum must be a real scalar'),
    ],
  },
  'bnjax.training.recalibrate': {
    'model': [
      ('type', 5, TypeError, 'model must be an nnx.Module, a linen Module'),
      # A function returning its statistics alone: a bare KeyError 1, or
      # (a BatchStats) its var taken for the tree.
      ('type', lambda s, x: s, TypeError, 'model must return (out, new'),
      (
        'type',
        lambda s, x: _net(s, x)[1]['bn'],
        TypeError,
        'model must return (out, new batch_stats)',
      ),
    ],
    'batches': [
      ('shape', jnp.ones(()), ValueError, 'batches must be stacked'),
      ('type', 'abc', ValueError, 'batches must be stacked'),
      # N = 0 kept every statistic, silently (nnx), or blamed the model.
      ('shape', BATCHES[:0], ValueError, 'batches holds 0 batches'),
      ('shape', [BATCHES, BATCHES[:1]], ValueError, 'holds 1 or 2 batches'),
      (
        'nonfinite',
        BATCHES.at[0, 0, 0].set(NAN),
        ValueError,
        'non-finite statistics; look for NaN or inf in batches',
      ),
    ],
    'args': 'exempt: passed through to the model as they are',
    'variables': [
      ('type', 5, ValueError, 'variables holds no bnjax.BatchStats'),
      ('range', None, ValueError, 'pass variables='),
      (
        'corrupt-state',
        {'bn': bnjax.BatchStats(jnp.full(3, NAN), -jnp.ones(3))},
        None,
        _is_kept,
      ),
    ],
    'kwargs': 'exempt: passed through to the model as they are',
  },
  'bnjax.training.set_mode': {
    'model': _MODEL_NNX
    + [
      ('range', nnx.Linear(2, 2, rngs=nnx.Rngs(0)), ValueError, 'no BatchNorm')
    ],
    'mode': [
      ('range', 'test', ValueError, 'mode must be one of'),
      ('type', None, ValueError, 'mode must be one of'),
    ],
    'only': _ONLY,
  },
  'bnjax.training.start_pooling': {
    'model': _MODEL_NNX
    + [
      (
        'type',
        nnx.BatchNorm(3, rngs=nnx.Rngs(0)),
        TypeError,
        'only bnjax.nnx.BatchNorm layers pool',
      ),
      (
        'range',
        _pooling_bn(),
        ValueError,
        'a layer of model is pooling already',
      ),
    ],
    'only': _ONLY,
  },
  'bnjax.training.stop_pooling': {
    'model': _MODEL_NNX
    + [
      ('range', _bn(), ValueError, 'no BatchNorm layer of the model is pooling')
    ],
  },
}

GOOD = {
  'bnjax.training.apply_pooled': lambda: (
    T.apply_pooled,
    {'model': _pooling_bn()},
  ),
  'bnjax.training.average_stats': (T.average_stats, {'stats': STACKED}),
  'bnjax.training.bn_param_mask': (
    T.bn_param_mask,
    {'params': _LINEN['params'], 'batch_stats': _LINEN['batch_stats']},
  ),
  'bnjax.training.mode_fields': (T.mode_fields, {'mode': 'train'}),
  'bnjax.training.recalibrate': (
    T.recalibrate,
    {
      'model': _net,
      'batches': BATCHES,
      'variables': {'bn': bnjax.init_batch_stats(3)},
    },
  ),
  'bnjax.training.set_mode': lambda: (
    T.set_mode,
    {'model': _bn(), 'mode': 'eval'},
  ),
  'bnjax.training.start_pooling': lambda: (T.start_pooling, {'model': _bn()}),
  'bnjax.training.stop_pooling': lambda: (
    T.stop_pooling,
    {'model': _pooling_bn()},
  ),
}


@pytest.mark.parametrize('name, arg, case', all_cases(CASES))
def test_bad_input_raises_a_clear_error_naming_the_argument(name, arg, case):
  run_case(GOOD, name, arg, case)


def test_every_good_call_runs():
  for good in GOOD.values():
    fn, kw = good() if callable(good) else good
    fn(**kw)
