"""Bad input to every public callable of ``bnjax.interop``, by category.

``CASES`` maps a callable's dotted name to ``{argument: cases}``, a case
being ``(category, value, exception type, piece of the message)``, or to
``'exempt: <reason>'``; tests/badinput/test_coverage.py checks that every
argument of every public callable has one. The test runs the good call,
swaps in the bad value, and checks the exception, the message piece and
that the message names the argument.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import BatchStats, interop
from tests.badinput._runner import all_cases

NAN = float('nan')


class Traced:
  """The argument passed traced, as a ``jax.jit`` argument."""

  def __init__(self, good):
    self.good = good


def _sd(**over):
  """A torch state dict of one BatchNorm layer 'bn' of 3 channels."""
  sd = {
    'bn.weight': np.ones(3),
    'bn.bias': np.zeros(3),
    'bn.running_mean': np.zeros(3),
    'bn.running_var': np.ones(3),
    'bn.num_batches_tracked': np.array(4),
  }
  return {**sd, **{f'bn.{k}': v for k, v in over.items()}}


def _variables(mean=None, var=None):
  return {
    'params': {'bn': {'scale': jnp.ones(3), 'bias': jnp.zeros(3)}},
    'batch_stats': {
      'bn': {
        'mean': jnp.zeros(3) if mean is None else mean,
        'var': jnp.ones(3) if var is None else var,
      }
    },
  }


def _ema(v):
  return {'counter': np.array(2), 'hidden': 0.19 * v, 'average': v}


def _hk(mean=None, var=None):
  """Haiku params and state of one hk.BatchNorm 'bn' of 3 channels."""
  params = {'bn': {'scale': np.ones((1, 3)), 'offset': np.zeros((1, 3))}}
  state = {
    'bn/~/mean_ema': _ema(np.zeros((1, 3)) if mean is None else mean),
    'bn/~/var_ema': _ema(np.ones((1, 3)) if var is None else var),
  }
  return params, state


_HK_LAYER = {'bn': {'mean': np.zeros(3), 'var': np.ones(3)}}
_STATE_CORRUPT = [
  (
    'corrupt-state',
    _sd(running_mean=np.array([0.0, NAN, 0.0])),
    ValueError,
    "'bn.running_mean' has non-finite values at channels [1]",
  ),
  (
    'corrupt-state',
    _sd(running_var=np.array([1.0, 1.0, -2.0])),
    ValueError,
    "'bn.running_var' is negative at channels [2]",
  ),
  (
    'corrupt-state',
    _sd(running_var=np.ones(4)),
    ValueError,
    '1-D vectors of one length',
  ),  # A bool vector (a mask or a flag) loaded as 0.0 and 1.0.
  (
    'corrupt-state',
    _sd(running_var=np.array([True, False, True])),
    ValueError,
    "'bn.running_var' is not a numeric array",
  ),
]

# The good call of each callable, as keyword arguments.
GOOD = {
  'batches_tracked': dict(state_dict=_sd()),
  'bn_prefixes': dict(state_dict=_sd()),
  'conv_kernel_from_torch': dict(w=np.ones((4, 3, 3, 3))),
  'dense_kernel_from_torch': dict(w=np.ones((4, 3))),
  'from_haiku': dict(params=_hk()[0], state=_hk()[1], decay_rate=0.9),
  'from_torch': dict(state_dict=_sd(), layers=None, dtype=jnp.float32),
  'load_state_dict': dict(source=_sd()),
  'momentum_from_torch': dict(p=0.1),
  'momentum_to_torch': dict(m=0.9),
  'nchw_to_nhwc': dict(x=np.ones((2, 3, 4))),
  'nhwc_to_nchw': dict(x=np.ones((2, 4, 3))),
  'to_haiku': dict(
    layers=_HK_LAYER, params=_hk()[0], state=_hk()[1], decay_rate=None
  ),
  'to_torch': dict(
    variables=_variables(), layers={'bn': 'bn'}, num_batches_tracked=0
  ),
}


def _call(name, **over):
  short = name.rsplit('.', 1)[1]
  return getattr(interop, short)(**{**GOOD[short], **over})


# Where a message names the argument by another word.
NAMED: dict[tuple[str, str], str] = {}

_PATHS = [
  ('type', 3, TypeError, 'source must be a mapping of arrays or a file path'),
  ('range', 'weights.txt', ValueError, "unknown file type '.txt'"),
]

CASES: dict[str, dict[str, list | str]] = {
  'bnjax.interop.batches_tracked': {
    'state_dict': [
      (
        'type',
        3,
        TypeError,
        'bnjax.interop.load_state_dict: source must be a mapping',
      ),
      (
        'corrupt-state',
        _sd(num_batches_tracked=np.array(-1)),
        ValueError,
        "'bn.num_batches_tracked' must be one int >= 0",
      ),
      (
        'dtype',
        _sd(num_batches_tracked=np.array(1.5)),
        ValueError,
        'must be one int >= 0',
      ),
      (
        'shape',
        _sd(num_batches_tracked=np.array([1, 2])),
        ValueError,
        'must be one int >= 0',
      ),
    ],
  },
  'bnjax.interop.bn_prefixes': {
    'state_dict': [
      (
        'type',
        3,
        TypeError,
        'bnjax.interop.load_state_dict: source must be a mapping',
      ),
      (
        'dtype',
        {'bn.running_mean': np.array(['a'])},
        TypeError,
        "in source, the entry 'bn.running_mean' has dtype <U1",
      ),
    ],
  },
  'bnjax.interop.conv_kernel_from_torch': {
    'w': [
      ('type', 'kernel', TypeError, 'w must be a numeric array'),
      ('shape', np.ones((4, 3)), ValueError, 'w must have >= 3'),
    ],
  },
  'bnjax.interop.dense_kernel_from_torch': {
    'w': [
      ('type', 'kernel', TypeError, 'w must be a numeric array'),
      ('shape', np.ones((4, 3, 3)), ValueError, 'w must have 2 (out, in)'),
    ],
  },
  'bnjax.interop.from_haiku': {
    'params': [
      ('type', [1], TypeError, 'params must be a mapping'),
      (
        'corrupt-state',
        {'bn': {'scale': np.array([[1.0, NAN, 1.0]])}},
        ValueError,
        "'bn/scale' has non-finite values at channels [1]",
      ),
      # A bool scale was cast to float32 before the check: 1.0 and 0.0.
      (
        'corrupt-state',
        {'bn': {'scale': np.array([[True, False, True]])}},
        ValueError,
        "'bn/scale' is not a numeric array",
      ),
    ],
    'state': [
      # A bool vector (a mask or a flag) was loaded as 0.0 and 1.0.
      (
        'corrupt-state',
        _hk(mean=np.array([[True, False, True]]))[1],
        ValueError,
        "'bn/~/mean_ema/average' is not a numeric array",
      ),
      # A complex mean lost its imaginary part in the cast to float32.
      (
        'corrupt-state',
        _hk(mean=np.array([[1j, 0.0, 0.0]]))[1],
        ValueError,
        "'bn/~/mean_ema/average' is complex",
      ),
      # Past float32's range: inf once converted.
      (
        'range',
        _hk(var=np.array([[1e39, 1.0, 1.0]]))[1],
        ValueError,
        "'bn/~/var_ema/average'",
      ),
      ('type', 'state', TypeError, 'state must be a mapping'),
      (
        'corrupt-state',
        _hk(mean=np.array([[NAN, 0.0, 0.0]]))[1],
        ValueError,
        "'bn/~/mean_ema/average' has non-finite values at channels [0]",
      ),
      (
        'corrupt-state',
        _hk(var=np.array([[1.0, -1.0, 1.0]]))[1],
        ValueError,
        "'bn/~/var_ema/average' is negative at channels [1]",
      ),
      (
        'corrupt-state',
        _hk(var=np.ones((1, 4)))[1],
        ValueError,
        '1-D vectors of one length',
      ),
      (
        'corrupt-state',
        {'bn/~/mean_ema': {'average': 1}, 'bn/~/var_ema': {}},
        ValueError,
        "state['bn/~/mean_ema'] must be an EMA state",
      ),
    ],
    'decay_rate': [
      ('range', 1.0, ValueError, 'decay_rate=1.0 must be in [0, 1)'),
      ('nonfinite', NAN, ValueError, 'decay_rate=nan must be in [0, 1)'),
      ('type', '0.9', TypeError, 'decay_rate must be a float'),
    ],
  },
  'bnjax.interop.from_torch': {
    'state_dict': [
      (
        'type',
        3,
        TypeError,
        'bnjax.interop.load_state_dict: source must be a mapping',
      ),
      ('range', {'x.weight': np.ones(3)}, ValueError, 'no BatchNorm layer'),
      *_STATE_CORRUPT,
      # Finite in float64, inf in float32: was converted to inf.
      (
        'range',
        _sd(weight=np.array([1.0, -1e39, 1.0])),
        ValueError,
        "'bn.weight' has values past float32's range",
      ),
    ],
    'layers': [
      ('type', ['bn'], TypeError, 'layers must map torch prefixes'),
      ('range', {'nope': 'bn'}, KeyError, "prefixes ['nope'] in layers"),
      ('type', {'bn': 1.5}, TypeError, "the Flax path of 'bn' must be"),
      ('type', {0: 'bn'}, TypeError, 'torch prefixes (keys of layers) must'),
      # Converted nothing, silently.
      ('range', {}, ValueError, 'layers is empty, so nothing would be'),
    ],
    'dtype': [
      ('dtype', jnp.int32, TypeError, 'dtype=int32 must be a floating'),
      ('type', 'floaty', TypeError, "dtype='floaty' is not a dtype"),
    ],
  },
  'bnjax.interop.load_state_dict': {
    'source': [
      *_PATHS,
      (
        'type',
        {'model': {'w': np.ones(2)}},
        TypeError,
        "in source, the entry 'model' is itself a mapping",
      ),
      ('dtype', {'w': np.array(['a'])}, TypeError, "'w' has dtype <U1"),
    ],
  },
  'bnjax.interop.momentum_from_torch': {
    'p': [
      ('type', '0.1', TypeError, 'p (torch'),
      ('range', 1.5, ValueError, 'p (torch'),
      ('nonfinite', NAN, ValueError, 'must be in [0, 1], got nan'),
      ('range', None, ValueError, 'momentum=None is a cumulative average'),
    ],
  },
  'bnjax.interop.momentum_to_torch': {
    'm': [
      ('type', '0.9', TypeError, 'm (Flax'),
      ('range', -0.5, ValueError, 'm (Flax'),
      ('nonfinite', NAN, ValueError, 'must be in [0, 1], got nan'),
    ],
  },
  'bnjax.interop.nchw_to_nhwc': {
    'x': [
      ('type', 'x', TypeError, 'x must be a numeric array'),
      ('shape', np.ones(3), ValueError, 'x must have >= 2'),
    ],
  },
  'bnjax.interop.nhwc_to_nchw': {
    'x': [
      ('type', 'x', TypeError, 'x must be a numeric array'),
      ('shape', np.ones(3), ValueError, 'x must have >= 2'),
    ],
  },
  'bnjax.interop.to_haiku': {
    'layers': [
      ('type', [1], TypeError, 'layers must be a mapping'),
      ('type', {'bn': (1, 2)}, TypeError, "layers['bn'] must be a mapping"),
      # Converted nothing, silently.
      ('range', {}, ValueError, 'layers is empty, so nothing would be'),
      (
        'range',
        {'conv': _HK_LAYER['bn']},
        ValueError,
        "'conv' is not an hk.BatchNorm",
      ),
      (
        'corrupt-state',
        {'bn': {'mean': np.array([0, NAN, 0]), 'var': np.ones(3)}},
        ValueError,
        "'bn.mean' has non-finite values at channels [1]",
      ),
      (
        'corrupt-state',
        {'bn': {'mean': np.zeros(3), 'var': -np.ones(3)}},
        ValueError,
        "'bn.var' is negative at channels [0, 1, 2]",
      ),
      # A bool vector was cast to float32 before the check: 0.0 and 1.0.
      (
        'corrupt-state',
        {'bn': {'mean': np.zeros(3), 'var': np.array([True, False, True])}},
        ValueError,
        "'bn.var' is not a numeric array",
      ),
      (
        'corrupt-state',
        {'bn': BatchStats(np.zeros(3, bool), np.ones(3))},
        ValueError,
        "'bn.mean' is not a numeric array",
      ),
      (
        'shape',
        {'bn': {'mean': np.zeros(4), 'var': np.ones(4)}},
        ValueError,
        'bn.mean has 4 values, but the Haiku layer has 3',
      ),
    ],
    'params': [('type', None, TypeError, 'params must be a mapping')],
    'state': [
      ('type', None, TypeError, 'state must be a mapping'),
      ('corrupt-state', {}, ValueError, 'state has no hk.BatchNorm'),
      # Written in the old average's dtype: 1.0 as True, silently.
      (
        'corrupt-state',
        _hk(var=np.ones((1, 3), bool))[1],
        TypeError,
        'the Haiku array that bn.var replaces is bool, not a float',
      ),
      # A bool counter was written as True (1): Haiku's next update then
      # debiases by 1 - decay**2; a uint8 one overflowed (a bare error).
      (
        'corrupt-state',
        {k: {**v, 'counter': np.bool_(True)} for k, v in _hk()[1].items()},
        TypeError,
        "state's bn/~/mean_ema/counter is bool; it must be an int of at",
      ),
      (
        'corrupt-state',
        {k: {**v, 'counter': np.uint8(2)} for k, v in _hk()[1].items()},
        TypeError,
        "state's bn/~/mean_ema/counter is uint8; it must be an int of at",
      ),
    ],
    'decay_rate': [
      ('range', -0.1, ValueError, 'decay_rate=-0.1 must be in [0, 1)'),
      ('type', True, TypeError, 'decay_rate must be a float'),
    ],
  },
  'bnjax.interop.to_torch': {
    'variables': [
      ('type', [1], TypeError, 'variables must be a mapping'),
      # Under jit: a bare TracerArrayConversionError.
      ('traced', Traced(_variables()), TypeError, 'variables holds traced'),
      (
        'corrupt-state',
        _variables(mean=jnp.array([0.0, 0.0, NAN])),
        ValueError,
        "'bn.running_mean' has non-finite values at channels [2]",
      ),
      (
        'corrupt-state',
        _variables(var=jnp.array([-1.0, 1.0, 1.0])),
        ValueError,
        "'bn.running_var' is negative at channels [0]",
      ),
      (
        'corrupt-state',
        _variables(var=jnp.ones(2)),
        ValueError,
        '1-D vectors of one length',
      ),
    ],
    'layers': [
      ('type', ['bn'], TypeError, 'layers must map torch prefixes'),
      ('range', {'bn': 'other'}, KeyError, "at the top level there is no 'o"),
      # An int prefix wrote the unprefixed keys 'running_mean', ...
      ('type', {0: 'bn'}, TypeError, 'torch prefixes (keys of layers) must'),
      # Converted nothing, silently; the message offered layers=None, which
      # to_torch refuses.
      (
        'range',
        {},
        ValueError,
        "be converted; name the layers to convert, e.g. {'bn1'",
      ),
    ],
    'num_batches_tracked': [
      ('type', 1.5, TypeError, 'num_batches_tracked must be an int >= 0'),
      ('range', -1, TypeError, 'num_batches_tracked must be an int >= 0'),
      # Past int64: a bare OverflowError; a prefix of no layer: ignored.
      ('range', 2**63, TypeError, 'must be an int >= 0 and < 2**63'),
      ('range', {'bn.0': 3}, ValueError, "has counts for ['bn.0'], no layer"),
    ],
  },
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_every_good_call_runs(name):
  _call(name)


@pytest.mark.parametrize('name, arg, case', all_cases(CASES))
def test_bad_input_raises_naming_the_argument(name, arg, case):
  _, value, exc, piece = case
  with pytest.raises(exc) as info:
    if isinstance(value, Traced):
      jax.jit(lambda v: _call(name, **{arg: v}))(value.good)
    else:
      _call(name, **{arg: value})
  msg = str(info.value)
  assert piece in msg, (piece, msg)
  assert arg in msg or NAMED.get((name, arg), arg) in msg, (arg, msg)
  assert f'{name}:' in msg or 'bnjax.interop.load_state_dict:' in msg, msg
