"""Bad input to every public callable of ``bnjax.equinox``, by category.

The format is tests/badinput/test_interop.py's: ``CASES[callable][argument]``
is a list of ``(category, value, exception type, message piece)`` or an
``'exempt: <reason>'``; a class's constructor is its name, its call
``<name>.__call__``. ``Traced(good)`` passes the argument as a ``jax.jit``
argument (traced where it must be static).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip(
  'equinox', reason='needs the equinox extra: pip install "bnjax[equinox]"'
)

import bnjax  # noqa: E402
import bnjax.equinox  # noqa: E402
from tests.badinput._runner import all_cases  # noqa: E402

NAN = float('nan')
X = jnp.arange(24.0).reshape(8, 3)
ME = {'bn': lambda m: m}


class Traced:
  def __init__(self, good):
    self.good = good


class InInference:
  """Running statistics put in the layer's state for an inference call."""

  def __init__(self, stats):
    self.stats = stats


def _build(cls, **over):
  kw = {'input_size': 3, 'batch_axis': 0, **over}
  return eqx.nn.make_with_state(cls)(**kw)


def _ctor(cls):
  def call(**over):
    bn, state = _build(cls, **over)
    return bn(X, state)

  return call


def _state(cls, stats=None):
  bn, state = _build(cls)
  return state if stats is None else state.set(bn.state_index, stats)


# The state of another model (a Sequential around the layer).
OTHER_STATE = eqx.nn.make_with_state(eqx.nn.Sequential)(
  [bnjax.equinox.BatchNorm(3, 0)]
)[1]


def _call(cls):
  def call(**over):
    bn, state = _build(cls)
    kw = {'x': X, 'state': state, **over}
    return bn(**kw)

  return call


def _from_torch(**over):
  bn, state = _build(bnjax.equinox.BatchNorm)
  sd = bnjax.equinox.to_torch(bn, state, ME)
  kw = {'model': bn, 'state': state, 'state_dict': sd, 'layers': ME, **over}
  return bnjax.equinox.from_torch(**kw)


def _to_torch(**over):
  bn, state = _build(bnjax.equinox.BatchNorm)
  kw = {'model': bn, 'state': state, 'layers': ME, **over}
  return bnjax.equinox.to_torch(**kw)


def _sd(**over):
  sd = {
    'bn.weight': np.ones(3),
    'bn.bias': np.zeros(3),
    'bn.running_mean': np.zeros(3),
    'bn.running_var': np.ones(3),
  }
  return {**sd, **{f'bn.{k}': v for k, v in over.items()}}


CALLS = {
  'bnjax.equinox.BatchNorm': _ctor(bnjax.equinox.BatchNorm),
  'bnjax.equinox.BatchNorm.__call__': _call(bnjax.equinox.BatchNorm),
  'bnjax.equinox.BatchNormAct': _ctor(bnjax.equinox.BatchNormAct),
  'bnjax.equinox.BatchNormAct.__call__': _call(bnjax.equinox.BatchNormAct),
  'bnjax.equinox.BatchRenorm': _ctor(bnjax.equinox.BatchRenorm),
  'bnjax.equinox.BatchRenorm.__call__': _call(bnjax.equinox.BatchRenorm),
  'bnjax.equinox.from_torch': _from_torch,
  'bnjax.equinox.to_torch': _to_torch,
}

# Where a message names the argument by another word.
NAMED = {
  ('bnjax.equinox.BatchNorm.__call__', 'state'): 'running statistic',
  ('bnjax.equinox.BatchRenorm.__call__', 'state'): 'running statistic',
  ('bnjax.equinox.BatchNormAct.__call__', 'state'): 'running statistic',
}

_BAD_STATS = [
  (
    'corrupt-state',
    bnjax.BatchStats(jnp.array([0.0, NAN, 0.0]), jnp.ones(3)),
    'the running statistic mean is not finite at channels [1]',
  ),
  (
    'corrupt-state',
    bnjax.BatchStats(jnp.zeros(3), jnp.array([1.0, 1.0, -1.0])),
    'the running statistic var is negative',
  ),
]


def _layer_args(cls):
  return {
    'input_size': [
      ('range', 0, TypeError, 'input_size must be a positive int'),
      ('type', 3.0, TypeError, 'input_size must be a positive int'),
      ('shape', 4, ValueError, 'input_size=4'),
    ],
    'axis_name': [
      ('type', 3, TypeError, 'must be the name of a mapped axis'),
      ('range', 'unbound', NameError, "axis_name='unbound'"),
    ],
    'eps': [
      ('range', 0.0, ValueError, 'eps=0.0 must be finite and > 0'),
      ('nonfinite', NAN, ValueError, 'eps=nan must be finite'),
      ('type', '1e-5', TypeError, 'eps must be a real scalar'),
    ],
    'channelwise_affine': [
      ('type', 'yes', TypeError, 'channelwise_affine must be a Python bool'),
    ],
    'momentum': [
      ('range', 1.5, ValueError, 'momentum=1.5 is outside [0, 1]'),
      ('nonfinite', NAN, ValueError, 'momentum=nan is outside [0, 1]'),
      ('type', '0.9', TypeError, 'momentum must be a real scalar'),
    ],
    'inference': [
      ('type', 1, TypeError, 'inference must be a Python bool'),
    ],
    'dtype': [
      ('dtype', jnp.int32, TypeError, 'dtype=int32 must be a floating dtype'),
      ('type', 'bogus', TypeError, "dtype='bogus' is not a dtype"),
    ],
    'batch_axis': [
      ('type', '0', TypeError, 'batch_axis must be None'),
      ('range', 2, ValueError, 'batch_axis=2 is out of range'),
    ],
    'sync': [('range', 'gathr', ValueError, "sync='gathr' must be one of")],
  }


def _call_args(name):
  return {
    'x': [
      ('dtype', X.astype(jnp.int32), TypeError, 'x must be a real floating'),
      ('type', 'x', TypeError, 'x must be a floating-point array, got str'),
      ('shape', jnp.ones((8, 4)), ValueError, 'input_size=3'),
    ],
    'state': [
      ('type', {}, TypeError, 'state must be an eqx.nn.State'),
    ],
    'key': 'exempt: ignored, as by every Equinox layer (its layer protocol)',
    'inference': [
      ('type', 1, TypeError, 'inference must be a Python bool'),
      ('traced', Traced(False), TypeError, 'inference is traced'),
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
    ('type', '3', TypeError, 'r_max must be a real scalar'),
  ],
  'd_max': [
    ('range', -1.0, ValueError, 'd_max=-1.0 must be >= 0'),
    ('type', 'a', TypeError, 'd_max must be a real scalar'),
  ],
}

CASES: dict[str, dict[str, list | str]] = {
  'bnjax.equinox.BatchNorm': {
    **_layer_args(bnjax.equinox.BatchNorm),
    'mode': [
      ('range', 'ema', ValueError, 'mode="ema" normalizes'),
      ('range', 'legacy', ValueError, 'mode="legacy" normalizes'),
      ('type', 1, ValueError, 'mode must be "batch", got 1'),
    ],
    'debias': [('type', 'yes', TypeError, 'debias must be a Python bool')],
  },
  'bnjax.equinox.BatchNorm.__call__': {
    **_call_args('BatchNorm'),
  },
  'bnjax.equinox.BatchRenorm': {
    **_layer_args(bnjax.equinox.BatchRenorm),
    **_LIMITS,
  },
  'bnjax.equinox.BatchRenorm.__call__': {
    **_call_args('BatchRenorm'),
    **_LIMITS,
  },
  'bnjax.equinox.from_torch': {
    'model': [
      ('type', 3, TypeError, 'must pick a bnjax.equinox.BatchNorm'),
    ],
    'state': [
      ('type', {}, TypeError, 'state must be an eqx.nn.State'),
      # Another model's state: a bare KeyError from Equinox.
      ('range', OTHER_STATE, ValueError, 'state has no entry for the layer'),
    ],
    'state_dict': [
      ('type', 3, TypeError, 'source must be a mapping'),
      # interop.from_torch's checks (issue 42): a KeyError as there, and
      # neither a reshaped (1, C) vector nor dropped or missing weights.
      ('range', {}, KeyError, "no BatchNorm state for the prefixes ['bn']"),
      (
        'shape',
        _sd(weight=np.ones((1, 3))),
        ValueError,
        '1-D vectors of one length',
      ),
      (
        'range',
        {k: v for k, v in _sd().items() if 'running' in k},
        ValueError,
        "'bn.weight' and 'bn.bias' are missing (a torch BatchNorm with "
        'affine=False), but the layer has a weight and bias',
      ),
      (
        'dtype',
        _sd(running_mean=np.zeros(3, np.complex64)),
        ValueError,
        "'bn.running_mean' is complex; this state is real",
      ),
      (
        'corrupt-state',
        _sd(running_mean=np.array([0.0, NAN, 0.0])),
        ValueError,
        "'bn.running_mean' has non-finite values at channels [1]",
      ),
      (
        'corrupt-state',
        _sd(running_var=-np.ones(3)),
        ValueError,
        "'bn.running_var' is negative at channels [0, 1, 2]",
      ),
      (
        'corrupt-state',
        _sd(running_var=np.ones(4)),
        ValueError,
        '1-D vectors of one length',
      ),
      # A bool vector (a mask or a flag) loaded as 0.0 and 1.0.
      (
        'corrupt-state',
        _sd(running_var=np.array([True, False, True])),
        ValueError,
        "'bn.running_var' is not a numeric array",
      ),
      (
        'shape',
        _sd(**{k: np.ones(4) for k in ('weight', 'bias')})
        | {'bn.running_mean': np.zeros(4), 'bn.running_var': np.ones(4)},
        ValueError,
        'have 4 channels, but the layer has 3',
      ),
      # Finite in float64, inf in the layer's float32: was loaded as inf.
      (
        'range',
        _sd(running_var=np.array([1.0, 1e39, 1.0])),
        ValueError,
        "'bn.running_var' has values past float32's range",
      ),
    ],
    'layers': [
      ('type', ['bn'], TypeError, 'layers must map torch prefixes'),
      ('type', {0: ''}, TypeError, 'torch prefixes (keys of layers) must be'),
      ('type', {'bn': 1.5}, TypeError, "the Equinox path of 'bn' must be"),
      ('range', {'bn': 'bn'}, KeyError, "no 'bn' (a path in layers)"),
      # A bare AttributeError, naming no argument.
      (
        'range',
        {'bn': lambda m: m.bn2},
        KeyError,
        "the function of layers['bn'] picks nothing in the model",
      ),
      # Converted nothing, silently.
      ('range', {}, ValueError, 'layers is empty, so nothing would be'),
    ],
  },
  'bnjax.equinox.to_torch': {
    'model': [
      ('type', 3, TypeError, 'must pick a bnjax.equinox.BatchNorm'),
      # Under jit: a bare TracerArrayConversionError.
      (
        'traced',
        Traced(_build(bnjax.equinox.BatchNorm)[0]),
        TypeError,
        'model or state holds traced arrays',
      ),
    ],
    'state': [
      ('type', {}, TypeError, 'state must be an eqx.nn.State'),
      ('range', OTHER_STATE, ValueError, 'state has no entry for the layer'),
      (
        'corrupt-state',
        bnjax.BatchStats(jnp.array([0.0, NAN, 0.0]), jnp.ones(3)),
        ValueError,
        "'bn.running_mean' has non-finite values at channels [1]",
      ),
      (
        'corrupt-state',
        bnjax.BatchStats(jnp.zeros(3), -jnp.ones(3)),
        ValueError,
        "'bn.running_var' is negative at channels [0, 1, 2]",
      ),
    ],
    'layers': [
      ('type', ['bn'], TypeError, 'layers must map torch prefixes'),
      # An int prefix wrote the unprefixed keys 'running_mean', ...
      ('type', {0: ''}, TypeError, 'torch prefixes (keys of layers) must be'),
      # A bare AttributeError, naming no argument.
      (
        'range',
        {'bn': lambda m: m.bn2},
        KeyError,
        "the function of layers['bn'] picks nothing in the model",
      ),
      # Converted nothing, silently.
      ('range', {}, ValueError, 'layers is empty, so nothing would be'),
    ],
    'num_batches_tracked': [
      ('range', -1, TypeError, 'num_batches_tracked must be an int >= 0'),
      ('type', 1.5, TypeError, 'num_batches_tracked must be an int >= 0'),
      # Past int64: a bare OverflowError; a prefix of no layer: ignored.
      ('range', 2**63, TypeError, 'must be an int >= 0 and < 2**63'),
      ('range', {'bn.0': 3}, ValueError, "has counts for ['bn.0'], no layer"),
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
_FORWARDED = 'exempt: forwarded to BatchNorm, whose cases above cover them'
CASES['bnjax.equinox.BatchNormAct'] = {
  'input_size': CASES['bnjax.equinox.BatchNorm']['input_size'],
  'args': _FORWARDED,
  'kwargs': _FORWARDED,
  **_ACT_ARGS,
}
CASES['bnjax.equinox.BatchNormAct.__call__'] = CASES[
  'bnjax.equinox.BatchNorm.__call__'
]

# Corrupt running statistics, in an eager inference call: a clear error.
_BN_STATE = CASES['bnjax.equinox.BatchNorm.__call__']['state']
_RN_STATE = CASES['bnjax.equinox.BatchRenorm.__call__']['state']
assert isinstance(_BN_STATE, list) and isinstance(_RN_STATE, list)
_BN_STATE += [
  ('corrupt-state', InInference(stats), ValueError, piece)
  for _, stats, piece in _BAD_STATS
]
_RN_STATE.append(
  (
    'corrupt-state',
    InInference(bnjax.RenormStats(jnp.zeros(3), jnp.array([1.0, 0.0, 1.0]))),
    ValueError,
    'the running statistic std is <= 0',
  )
)


@pytest.mark.parametrize('name', sorted(CALLS))
def test_every_good_call_runs(name):
  CALLS[name]()


def _run(name, arg, value):
  call = CALLS[name]
  if isinstance(value, Traced):
    return jax.jit(lambda v: call(**{arg: v}))(value.good)
  if (
    arg == 'state'
    and isinstance(value, bnjax.BatchStats)
    and 'to_torch' in name
  ):
    bn, state = _build(bnjax.equinox.BatchNorm)
    return call(model=bn, state=state.set(bn.state_index, value))
  if isinstance(value, InInference):
    bn, state = _build(getattr(bnjax.equinox, name.split('.')[2]))
    return bn(X, state.set(bn.state_index, value.stats), inference=True)
  return call(**{arg: value})


@pytest.mark.parametrize('name, arg, case', all_cases(CASES))
def test_bad_input_raises_naming_the_argument(name, arg, case):
  _, value, exc, piece = case
  with pytest.raises(exc) as info:
    _run(name, arg, value)
  msg = str(info.value)
  assert piece in msg, (piece, msg)
  assert arg in msg or NAMED.get((name, arg), arg) in msg, (arg, msg)
  if exc is not NameError:  # JAX's, for an unbound axis name
    # One prefix form, bnjax.<module>.<name>: (issue 42); the state dict is
    # read by bnjax.interop.load_state_dict, named as such.
    prefix = re.match(r'"?(bnjax\.\w+\.\w+): ', msg)
    assert prefix, msg
    owner = name.removesuffix('.__call__')
    assert prefix[1] in (owner, 'bnjax.interop.load_state_dict'), msg
