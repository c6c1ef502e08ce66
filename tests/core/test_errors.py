"""Bad input: clear errors at trace time that name the argument and the fix."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax

F16 = jnp.float16

S3 = bnjax.init_batch_stats(3)
X = jnp.ones((4, 3))


def bn(x=X, stats=S3, scale=None, bias=None, **kw):
  kw.setdefault('use_running_average', False)
  return bnjax.batch_norm(x, stats, scale, bias, **kw)


@pytest.mark.parametrize(
  'call, exc, pieces',
  [
    (
      lambda: bn(jnp.ones((4, 3), jnp.int32)),
      TypeError,
      ['x must be a floating-point', 'int32', 'astype'],
    ),
    (lambda: bn(axis=2), ValueError, ['axis 2 is out of range', '(4, 3)']),
    (
      lambda: bn(jnp.ones((2, 3, 3)), axis=(2, -1)),
      ValueError,
      ['names the same axis twice'],
    ),
    (
      lambda: bn(scale=jnp.ones(4)),
      ValueError,
      [
        'scale has shape (4,)',
        'features of shape (3,)',
        'pass scale of shape (3,)',
      ],
    ),
    (lambda: bn(bias=jnp.ones((3, 1))), ValueError, ['bias has shape (3, 1)']),
    (
      lambda: bn(stats=bnjax.BatchStats(jnp.zeros(3), jnp.ones(2))),
      ValueError,
      ['batch_stats.var has shape (2,)'],
    ),
    (
      lambda: bn(stats=bnjax.BatchStats(jnp.zeros(5), jnp.ones(3))),
      ValueError,
      ['batch_stats.mean has shape (5,)'],
    ),
    (
      lambda: bn(stats={'mean': jnp.zeros(3), 'var': jnp.ones(3)}),
      TypeError,
      [
        'batch_stats must be a bnjax.BatchStats',
        "dict with keys ['mean', 'var']",
        'BatchStats(**',
      ],
    ),
    (
      lambda: bn(momentum=1.5),
      ValueError,
      ['momentum=1.5', 'PyTorch', '1 - p'],
    ),
    (lambda: bn(momentum=-0.1), ValueError, ['outside [0, 1]']),
    (
      lambda: bn(epsilon=0.0),
      ValueError,
      ['epsilon=0.0 must be finite and > 0'],
    ),
    (
      lambda: bn(jnp.ones((0, 3))),
      ValueError,
      ['reduction is empty', '(0, 3)'],
    ),
    (
      lambda: bn(mask=jnp.ones((3, 3), bool)),
      ValueError,
      ['mask of shape (3, 3) does not broadcast to x of shape (4, 3)'],
    ),
    (lambda: bn(mask=jnp.ones((4, 3))), TypeError, ['mask must be a boolean']),
    (
      lambda: bn(jnp.ones((1, 3))),
      ValueError,
      ['one value per channel', 'use_running_average=True', 'axis_name'],
    ),
    (
      lambda: bn(jnp.ones((3,)), axis=0),
      ValueError,
      ['1 value(s) per channel'],
    ),
    (
      lambda: bn(use_running_average=None),
      TypeError,
      ['use_running_average must be a Python bool'],
    ),
    (
      lambda: bnjax.normalize(X, jnp.zeros(2), jnp.ones(3)),
      ValueError,
      ['normalize: mean has shape (2,)'],
    ),
    (lambda: bnjax.moments(X, axis=5), ValueError, ['moments: axis 5']),
    (lambda: bnjax.init_batch_stats('3'), TypeError, ['feature_shape']),
    # Issue 12, point 5: inputs that passed silently or unclearly.
    (
      lambda: bn(epsilon=float('inf')),
      ValueError,
      ['epsilon=inf', 'finite and > 0'],
    ),
    (
      lambda: bn(
        stats=bnjax.BatchStats(
          jnp.zeros(3, jnp.float16), jnp.ones(3, jnp.float16)
        )
      ),
      TypeError,
      [
        'batch_stats.mean has dtype float16',
        'overflows past 65504',
        'astype(jnp.float32)',
      ],
    ),
    (
      lambda: bn(stats=bnjax.BatchStats(jnp.zeros(3), jnp.ones(3, F16))),
      TypeError,
      ['batch_stats.var has dtype float16'],
    ),
    (
      lambda: bnjax.init_batch_stats(3, jnp.float16),
      TypeError,
      ['init_batch_stats: dtype must be float32', 'got float16'],
    ),
    (
      lambda: bn(axis_index_groups=[[0, 1]]),
      ValueError,
      [
        'axis_index_groups=[[0, 1]] was passed without axis_name',
        'pass the axis_name',
      ],
    ),
    (
      lambda: bnjax.moments(X, axis_index_groups=[[0]]),
      ValueError,
      ['moments: axis_index_groups'],
    ),
    (
      lambda: bn(momentum='0.9'),
      TypeError,
      ['momentum must be a real scalar', "'0.9'", 'momentum=0.99'],
    ),
    (lambda: bn(epsilon=None), TypeError, ['epsilon must be a real scalar']),
    (
      lambda: bn(axis='-1'),
      TypeError,
      ["axis must be an int or a tuple of ints, got '-1'", 'axis=-1'],
    ),
    # Issue 29: values truncated or accepted silently.
    (
      lambda: bnjax.init_batch_stats((2.5,)),
      TypeError,
      ['feature_shape must be an int or a tuple of ints', '(2.5,)'],
    ),
    (
      lambda: bnjax.init_batch_stats(True),
      TypeError,
      ['feature_shape must be an int', 'got True'],
    ),
    (
      lambda: bn(use_running_average=True, sync='gathr'),
      ValueError,
      ["sync='gathr' must be one of"],
    ),
    (
      lambda: bn(
        use_running_average=True,
        stats=bnjax.BatchStats(jnp.zeros(3), jnp.array([1.0, -1, 1])),
      ),
      ValueError,
      ['running statistic var is negative', 'channels [1]', 'init_batch_stats'],
    ),
    (
      lambda: bn(
        use_running_average=True,
        stats=bnjax.BatchStats(jnp.array([0, jnp.nan, 0]), jnp.ones(3)),
      ),
      ValueError,
      ['running statistic mean is not finite', 'channels [1]'],
    ),
    (
      lambda: bnjax.batch_renorm(
        X,
        bnjax.RenormStats(jnp.zeros(3), jnp.array([1.0, 0, -1])),
        use_running_average=True,
        r_max=3.0,
        d_max=5.0,
      ),
      ValueError,
      ['batch_renorm: the running statistic std is <= 0', 'channels [1, 2]'],
    ),
    (
      lambda: bnjax.fold(
        jnp.ones((2, 3)),
        None,
        bnjax.BatchStats(jnp.zeros(3), -jnp.ones(3)),
        None,
        None,
      ),
      ValueError,
      ['fold: the running statistic var is negative'],
    ),
    # Issue 29, fixed before its regression tests: one row each.
    (
      lambda: bn(scale=jnp.ones(3) * 1j),
      TypeError,
      ['scale must be a real floating array', 'complex64'],
    ),
    (
      lambda: bn(bias=jnp.ones(3, jnp.complex64)),
      TypeError,
      ['bias must be a real floating array'],
    ),
    (
      lambda: bn(momentum=np.complex64(0.9)),
      TypeError,
      ['momentum must be a real scalar'],
    ),
    (
      lambda: bn(epsilon=1e-50),
      ValueError,
      ['epsilon=1e-50 is below the smallest normal float32 number'],
    ),
    (lambda: bn(epsilon=1e-45), ValueError, ['epsilon=1e-45 is below']),
    (
      lambda: bn(axis_name=3),
      TypeError,
      ['axis_name=3 must be the name of a mapped axis'],
    ),
    (
      lambda: bn(use_fast_variance='no'),
      TypeError,
      ["use_fast_variance must be a Python bool, got 'no'"],
    ),
    (
      lambda: bn(use_running_average=True, axis_name='zz'),
      NameError,
      ["axis_name='zz'", 'not bound'],
    ),
    (
      lambda: bn(
        jnp.ones((8, 3)), use_running_average=True, virtual_batch_size=3
      ),
      ValueError,
      ['virtual_batch_size=3 does not divide'],
    ),
    (
      lambda: jax.pmap(
        lambda xi: bn(
          xi, axis_name='d', axis_index_groups=[[0, 1.5, 2, 3], [4, 5, 6, 7]]
        ),
        axis_name='d',
        devices=jax.devices()[:8],
      )(jnp.ones((8, 2, 3))),
      TypeError,
      ['axis_index_groups must be a list of lists of int indices'],
    ),
  ],
)
def test_bad_input_raises_clear_error(call, exc, pieces):
  """Every public argument: wrong type, dtype, shape, out of range, traced
  where it must be static (one row per case)."""
  with pytest.raises(exc) as info:
    call()
  for p in pieces:
    assert p in str(info.value), (p, str(info.value))


def test_errors_fire_at_trace_time_under_jit():
  f = jax.jit(lambda x, s: bnjax.batch_norm(x, s, use_running_average=False))
  with pytest.raises(ValueError, match='one value per channel'):
    f.trace(jnp.ones((1, 3)), S3)
  with pytest.raises(ValueError, match='batch_stats.mean has shape'):
    f.trace(jnp.ones((4, 5)), S3)


def test_use_running_average_is_required_keyword():
  with pytest.raises(TypeError, match='use_running_average'):
    bnjax.batch_norm(X, S3)  # pytype: disable=missing-parameter


def test_one_value_per_channel_allowed_in_inference():
  stats = bnjax.BatchStats(
    jnp.array([0.5, 1.0, -2.0]), jnp.array([4.0, 1.0, 0.25])
  )
  x = jnp.array([[2.5, 1.0, -1.0]])
  y, _ = bn(x, stats, use_running_average=True, epsilon=1e-5)
  # (x - mean) / sqrt(var + 1e-5) = (1, 0, 2) up to epsilon's share.
  np.testing.assert_allclose(y, [[1.0, 0.0, 2.0]], rtol=5e-5)


def test_traced_momentum_and_epsilon_are_accepted():
  f = jax.jit(lambda m, e: bn(momentum=m, epsilon=e)[1].mean)
  np.testing.assert_allclose(f(0.5, 1e-3), 0.5 * X[0])


def test_channels_first_data_gets_the_axis_fix():
  """A wrong feature size from NCHW data suggests axis=1, not a new shape."""
  with pytest.raises(ValueError) as info:
    bnjax.batch_norm(
      jnp.ones((4, 8, 5, 5)),
      bnjax.init_batch_stats(8),
      use_running_average=False,
    )
  msg = str(info.value)
  for piece in (
    'batch_stats.mean has shape (8,)',
    'x of shape (4, 8, 5, 5)',
    'axis 1 of x has size 8',
    'NCHW',
    'pass axis=1',
  ):
    assert piece in msg, msg


@pytest.mark.parametrize('where', ['unmapped', 'vmap'])
def test_unbound_axis_name_says_which_name_and_what_is_bound(where):
  """A typo in axis_name ended in JAX's bare "unbound axis name" under about
  10 frames; the NameError now names the argument, the name and the fix."""
  f = lambda x: bnjax.moments(x, axis_name='dta')
  with pytest.raises(NameError) as info:
    if where == 'vmap':
      jax.vmap(f, axis_name='data')(jnp.ones((2, 4, 3)))
    else:
      f(jnp.ones((4, 3)))
  msg = str(info.value)
  for piece in (
    "moments: axis_name='dta'",
    "'dta', which is not bound",
    'axis_name=None',
  ):
    assert piece in msg, msg
  if where == 'vmap':
    assert "['data']" in msg, msg


def test_running_values_are_not_checked_under_jit():
  """Traced statistics cannot be read at trace time: a negative variance
  under jit gives NaN (documented), and the eager call raises."""
  bad = bnjax.BatchStats(jnp.zeros(3), -jnp.ones(3))
  y, _ = jax.jit(lambda s: bn(use_running_average=True, stats=s))(bad)
  assert np.isnan(np.asarray(y)).all()


def test_float8_input_gets_float32_statistics_and_float8_output():
  """float8 x (e4m3fn, e5m2) is reduced in float32, as bfloat16 is, and the
  output keeps x's dtype (it raised a TypePromotionError)."""
  rng = np.random.default_rng(0)
  for dt in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    x = jnp.asarray(rng.standard_normal((16, 3)) * 2 + 1, dt)
    y, new = bnjax.batch_norm(x, S3, use_running_average=False, momentum=0.0)
    assert y.dtype == dt and new.mean.dtype == jnp.float32
    xf = np.asarray(x, np.float64)
    np.testing.assert_allclose(new.mean, xf.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, xf.var(0), rtol=1e-5)


@pytest.mark.parametrize(
  'momentum, epsilon, match',
  [
    (1.5, 1e-5, r'momentum must be in \[0, 1\] \(got 1.5\)'),
    (np.nan, 1e-5, r'momentum must be in \[0, 1\] \(got nan\)'),
    (0.9, -1.0, r'epsilon must be >= 1.18e-38 \(got -1.0\)'),
  ],
)
def test_traced_hyperparameters_are_checked_under_checkify(
  momentum, epsilon, match
):
  """A traced momentum or epsilon cannot be checked at trace time; bnjax
  states the check as checkify.debug_check, which checkify reports (and
  plain jit skips, as documented in the numerics guide)."""
  from jax.experimental import checkify

  f = jax.jit(lambda m, e: bn(momentum=m, epsilon=e)[1].mean)
  err, _ = checkify.checkify(f)(jnp.float32(momentum), jnp.float32(epsilon))
  assert err.get() is not None and re.search(match, err.get()), err.get()
  assert np.all(np.isnan(np.asarray(f(jnp.float32(np.nan), 1e-5))))


def test_a_one_device_group_does_not_ask_for_axis_name():
  """Regression: with axis_name passed, a one-device group of one value
  per channel suggested 'pass axis_name'."""
  x = jnp.ones((8, 1, 3))
  with pytest.raises(
    ValueError,
    match=r"axis_name='d' the smallest group "
    r'of axis_index_groups has 1 device',
  ) as info:
    jax.pmap(
      lambda xi: bnjax.batch_norm(
        xi,
        S3,
        use_running_average=False,
        axis_name='d',
        axis_index_groups=[[0], [1, 2, 3, 4, 5, 6, 7]],
      )[0],
      axis_name='d',
      devices=jax.devices()[:8],
    )(x)
  assert 'pass axis_name' not in str(info.value)


# Every argument of batch_norm, by category of bad input. A new argument
# without rows here fails test_every_argument_has_bad_input_cases, so each
# one is covered by construction. Categories: 'type' (wrong Python type),
# 'dtype', 'shape', 'range' (out of range) and 'traced' (traced where it
# must be static); an argument lists the ones that apply to it.
_TRACED = object()  # passed as a jit argument instead of a static value
BN_ARGUMENT_CASES = {
  'x': [
    (
      'dtype',
      jnp.ones((4, 3), jnp.int32),
      TypeError,
      'x must be a floating-point',
    ),
    ('type', 'x', TypeError, 'x must be a floating-point array, got str'),
    ('shape', jnp.ones((0, 3)), ValueError, 'reduction is empty'),
  ],
  'batch_stats': [
    ('type', {'mean': 1}, TypeError, 'batch_stats must be'),
    (
      'shape',
      bnjax.BatchStats(jnp.zeros(2), jnp.ones(2)),
      ValueError,
      'batch_stats.mean has shape (2,)',
    ),
    (
      'dtype',
      bnjax.BatchStats(jnp.zeros(3, F16), jnp.ones(3, F16)),
      TypeError,
      'float16',
    ),
  ],
  'scale': [
    ('shape', jnp.ones(4), ValueError, 'scale has shape (4,)'),
    ('dtype', jnp.ones(3, jnp.int32), TypeError, 'scale must be'),
    (
      'type',
      ['one'],
      TypeError,
      'scale must be a floating-point array, got list',
    ),
  ],
  'bias': [
    ('shape', jnp.ones(2), ValueError, 'bias has shape (2,)'),
    ('dtype', jnp.ones(3, jnp.complex64), TypeError, 'bias must be'),
  ],
  'use_running_average': [
    ('type', None, TypeError, 'use_running_average must be a Python bool'),
    ('traced', _TRACED, TypeError, 'got a traced value'),
  ],
  'axis': [
    ('range', 2, ValueError, 'axis 2 is out of range'),
    ('type', '-1', TypeError, 'axis must be an int or a tuple'),
  ],
  'momentum': [
    ('range', 1.5, ValueError, 'momentum=1.5'),
    ('type', '0.9', TypeError, 'momentum must be a real scalar'),
    ('dtype', np.complex64(0.9), TypeError, 'real scalar'),
  ],
  'epsilon': [
    ('range', 0.0, ValueError, 'epsilon=0.0'),
    ('range', 1e-50, ValueError, 'below the smallest normal'),
    ('type', None, TypeError, 'epsilon must be a real scalar'),
  ],
  'axis_name': [
    ('type', 3, TypeError, 'must be the name of a mapped axis'),
    ('range', 'unbound', NameError, "axis_name='unbound'"),
  ],
  'axis_index_groups': [
    ('range', [[0, 1]], ValueError, 'was passed without axis_name')
  ],
  'mask': [
    ('dtype', jnp.ones((4, 3)), TypeError, 'mask must be a boolean'),
    ('shape', jnp.ones((3, 3), bool), ValueError, 'does not broadcast'),
  ],
  'use_fast_variance': [
    ('type', 'no', TypeError, 'must be a Python bool'),
    ('traced', _TRACED, TypeError, 'traced value'),
  ],
  'dtype': [
    ('dtype', jnp.int32, TypeError, 'dtype'),
    ('type', 'bogus', TypeError, 'dtype'),
  ],
  'virtual_batch_size': [
    ('range', 3, ValueError, 'does not divide'),
    ('type', 2.0, TypeError, 'virtual_batch_size'),
  ],
  'sync': [
    ('range', 'gathr', ValueError, "sync='gathr' must be one of"),
    ('type', 1, ValueError, 'sync=1 must be one of'),
  ],
}


def test_every_argument_has_bad_input_cases():
  import inspect

  params = set(inspect.signature(bnjax.batch_norm).parameters)
  assert set(BN_ARGUMENT_CASES) == params, (
    'add bad-input cases for',
    params - set(BN_ARGUMENT_CASES),
  )


@pytest.mark.parametrize(
  'arg, case',
  [(arg, case) for arg, cases in BN_ARGUMENT_CASES.items() for case in cases],
  ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_each_argument_rejects_bad_input_naming_it(arg, case):
  _, value, exc, piece = case
  kw = dict(
    x=jnp.ones((8, 3)),
    batch_stats=S3,
    scale=None,
    bias=None,
    use_running_average=False,
  )
  if value is _TRACED:
    good = True if arg == 'use_running_average' else False
    call = lambda: jax.jit(lambda v: bnjax.batch_norm(**{**kw, arg: v}))(good)
  else:
    call = lambda: bnjax.batch_norm(**{**kw, arg: value})
  with pytest.raises(exc) as info:
    call()
  msg = str(info.value)
  assert piece in msg, (piece, msg)
  assert arg.split('_')[0] in msg or arg in ('x',), (arg, msg)


def test_ghost_chunks_of_one_value_per_channel_raise_again():
  """Regression (issue 44, 19): batch_norm(x of shape (4, 3),
  virtual_batch_size=1) returned the bias and stored var 0 (each chunk is
  one row: one value per channel); it raises, naming the fix."""
  x = jnp.arange(12.0).reshape(4, 3)
  with pytest.raises(
    ValueError,
    match=r'more than one value per channel.*virtual_batch_size > 1',
  ):
    bnjax.batch_norm(
      x,
      bnjax.init_batch_stats(3),
      use_running_average=False,
      virtual_batch_size=1,
    )
  # Two rows a chunk train; inference never needed more than one.
  bnjax.batch_norm(
    x,
    bnjax.init_batch_stats(3),
    use_running_average=False,
    virtual_batch_size=2,
  )
  bnjax.batch_norm(
    x,
    bnjax.init_batch_stats(3),
    use_running_average=True,
    virtual_batch_size=1,
  )
