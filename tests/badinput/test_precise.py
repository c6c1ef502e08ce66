"""Bad input, by category, for every public callable of ``bnjax.precise``
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
import bnjax.precise as Pr
import bnjax.training
from tests.badinput._runner import all_cases, run_case

# The module is a deprecated alias of bnjax.training.recalibrate: its
# warning is tested once, below, and silenced for the bad-input cases.
pytestmark = pytest.mark.filterwarnings(
  'ignore:bnjax.precise.*is deprecated:DeprecationWarning'
)
NAN = float('nan')
BATCHES = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)))
WHOLE_VAR = np.asarray(BATCHES, np.float64).reshape(-1, 3).var(0)


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    return bnjax.linen.BatchNorm(use_running_average=not train)(x)


_V = _Linen().init(jax.random.key(0), BATCHES[0])


def _corrupt_linen():
  bs = {'BatchNorm_0': {'mean': jnp.full(3, NAN), 'var': -jnp.ones(3)}}
  return {**_V, 'batch_stats': bs}


def _recomputed(out):
  """Corrupt statistics are replaced: the right number."""
  np.testing.assert_allclose(
    out['batch_stats']['BatchNorm_0']['var'], WHOLE_VAR, rtol=1e-5
  )


def _bn(mean=None):
  bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  if mean is not None:
    bn.mean[...] = mean
  return bn


class _Check(nnx.Module):
  """A corrupt nnx model (NaN running mean) whose recomputation the
  runner's result check reads: the layer gets the right number."""

  def __init__(self):
    self.bn = _bn(jnp.full(3, NAN))

  def __call__(self, x):
    return self.bn(x)


_NNX_CORRUPT = _Check()


def _nnx_recomputed(_):
  np.testing.assert_allclose(_NNX_CORRUPT.bn.var[...], WHOLE_VAR, rtol=1e-5)
  assert np.all(np.isfinite(_NNX_CORRUPT.bn.mean[...]))


_BATCHES = [
  ('shape', jnp.ones(()), ValueError, 'batches must be stacked'),
  (
    'nonfinite',
    BATCHES.at[0, 0, 0].set(NAN),
    ValueError,
    'non-finite statistics; look for NaN or inf in batches',
  ),
]
_PASSED = 'exempt: passed through to the model as they are'

CASES: dict[str, dict[str, list | str]] = {
  'bnjax.precise.linen_batch_stats': {
    'model': [
      ('type', 5, TypeError, 'model must be a flax.linen Module, got int'),
    ],
    'variables': [
      ('type', 5, TypeError, 'variables must be the model'),
      ('range', {'params': {}}, TypeError, "a 'batch_stats' collection"),
      ('corrupt-state', _corrupt_linen(), None, _recomputed),
    ],
    'batches': _BATCHES,
    'args': _PASSED,
    'kwargs': _PASSED,
  },
  'bnjax.precise.update_nnx_batch_stats': {
    'model': [
      ('type', 5, TypeError, 'model must be an nnx.Module, got int'),
      (
        'range',
        nnx.Linear(3, 3, rngs=nnx.Rngs(0)),
        ValueError,
        'the model has no bnjax.nnx.BatchNorm layer',
      ),
      ('corrupt-state', _NNX_CORRUPT, None, _nnx_recomputed),
    ],
    'batches': _BATCHES,
    'args': _PASSED,
    'kwargs': _PASSED,
  },
}

GOOD = {
  'bnjax.precise.linen_batch_stats': (
    Pr.linen_batch_stats,
    {'model': _Linen(), 'variables': _V, 'batches': BATCHES},
  ),
  'bnjax.precise.update_nnx_batch_stats': lambda: (
    Pr.update_nnx_batch_stats,
    {'model': _bn(), 'batches': BATCHES},
  ),
}


@pytest.mark.parametrize('name, arg, case', all_cases(CASES))
def test_bad_input_raises_a_clear_error_naming_the_argument(name, arg, case):
  run_case(GOOD, name, arg, case)


def test_every_good_call_runs():
  for good in GOOD.values():
    fn, kw = good() if callable(good) else good
    fn(**kw)


@pytest.mark.filterwarnings('default')
def test_the_deprecated_aliases_warn_naming_recalibrate_and_equal_it():
  """bnjax.precise was a second public route to recalibration: its two
  functions stay one release, warn with DeprecationWarning naming
  bnjax.training.recalibrate, and give what recalibrate gives."""
  with pytest.warns(DeprecationWarning, match=r'bnjax.training.recalibrate'):
    old = Pr.linen_batch_stats(_Linen(), _V, BATCHES)
  new = bnjax.training.recalibrate(_Linen(), BATCHES, variables=_V)
  np.testing.assert_array_equal(
    old['batch_stats']['BatchNorm_0']['var'],
    new['batch_stats']['BatchNorm_0']['var'],
  )
  a, b = _bn(), _bn()
  with pytest.warns(DeprecationWarning, match=r'bnjax.training.recalibrate'):
    assert Pr.update_nnx_batch_stats(a, BATCHES) is None
  assert bnjax.training.recalibrate(b, BATCHES) is b
  np.testing.assert_array_equal(a.var[...], b.var[...])
  np.testing.assert_allclose(a.var[...], WHOLE_VAR, rtol=1e-5)
