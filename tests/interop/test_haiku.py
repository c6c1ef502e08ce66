"""Haiku checkpoints to bnjax and back, against dm-haiku's real hk.BatchNorm:
eval outputs, train outputs and the next debiased EMA step, bfloat16 state
included, within float32 rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hk = pytest.importorskip(
  'haiku', reason='needs the haiku extra: pip install "bnjax[haiku]"'
)

import bnjax  # noqa: E402
import bnjax.linen  # noqa: E402
from bnjax import interop  # noqa: E402
from tests._helpers import randn  # noqa: E402

C, DECAY = 4, 0.9


def _haiku(dtype=jnp.float32):
  def f(x, is_training):
    return hk.BatchNorm(True, True, DECAY, name='bn')(x, is_training)

  t = hk.transform_with_state(f)
  x0 = jnp.ones((2, 3, 3, C), dtype)
  params, state = t.init(jax.random.key(0), x0, True)
  params = jax.tree.map(  # non-trivial affine
    lambda p: p + jnp.asarray(randn(p.shape, seed=1), p.dtype), params
  )
  for i in range(3):  # a trained state: counter 3
    _, state = t.apply(params, state, None, _x(i, dtype), True)
  return t, params, state


def _x(seed, dtype=jnp.float32):
  return jnp.asarray(randn((8, 3, 3, C), loc=2.0, scale=1.5, seed=seed), dtype)


@pytest.mark.parametrize(
  'dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16']
)
def test_haiku_eval_and_train_outputs_are_reproduced(dtype):
  t, params, state = _haiku(dtype)
  layer = interop.from_haiku(params, state, decay_rate=DECAY)['bn']
  for v in layer.values():
    assert jax.tree.leaves(v)[0].dtype == jnp.float32  # read into float32
  x = _x(7, dtype)
  bn = bnjax.linen.BatchNorm(momentum=DECAY, epsilon=1e-5)
  variables = {
    'params': {'scale': layer['scale'], 'bias': layer['bias']},
    'batch_stats': {'mean': layer['mean'], 'var': layer['var']},
  }
  tol = 2e-5 if dtype == jnp.float32 else 3e-2  # bf16 output rounding
  y_hk, _ = t.apply(params, state, None, x, False)
  y = bn.apply(variables, x.astype(jnp.float32), use_running_average=True)
  np.testing.assert_allclose(
    y, np.asarray(y_hk, np.float32), atol=tol, rtol=tol
  )
  # Train: batch statistics, and the next step of haiku's debiased EMA is
  # bnjax's DebiasedStats rule exactly.
  y_hk, new_state = t.apply(params, state, None, x, True)
  y, stats = bnjax.batch_norm(
    x.astype(jnp.float32),
    layer['stats'],
    layer['scale'],
    layer['bias'],
    use_running_average=False,
    momentum=DECAY,
  )
  np.testing.assert_allclose(
    y, np.asarray(y_hk, np.float32), atol=tol, rtol=tol
  )
  want = interop.from_haiku(params, new_state)['bn']
  pop = bnjax.population_stats(stats)
  np.testing.assert_allclose(pop.mean, want['mean'], rtol=tol, atol=tol)
  np.testing.assert_allclose(pop.var, want['var'], rtol=tol, atol=tol)


@pytest.mark.parametrize(
  'dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16']
)
def test_round_trip_keeps_haiku_outputs_and_dtypes(dtype):
  t, params, state = _haiku(dtype)
  layers = interop.from_haiku(params, state)
  # bnjax-side training would change these; here the round trip itself.
  p2, s2 = interop.to_haiku(layers, params, state)
  jax.tree.map(
    lambda a, b: np.testing.assert_equal(
      (np.shape(a), np.asarray(a).dtype), (np.shape(b), np.asarray(b).dtype)
    ),
    (p2, s2),
    (params, state),
  )
  x = _x(9, dtype)
  want, _ = t.apply(params, state, None, x, False)
  got, _ = t.apply(p2, s2, None, x, False)
  np.testing.assert_array_equal(
    np.asarray(got, np.float32), np.asarray(want, np.float32)
  )
  # A further haiku training step continues the imported statistics as a
  # converged EMA: new = d * old + (1 - d) * batch.
  _, s3 = t.apply(p2, s2, None, x, True)
  mean = np.asarray(x, np.float32).reshape(-1, C).mean(0)
  expect = DECAY * np.asarray(layers['bn']['mean']) + (1 - DECAY) * mean
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(
    np.asarray(s3['bn/~/mean_ema']['average'], np.float32).reshape(-1),
    expect,
    rtol=tol,
    atol=tol,
  )


def test_errors_name_the_fix():
  t, params, state = _haiku()
  with pytest.raises(ValueError, match=r'no hk.BatchNorm statistics'):
    interop.from_haiku(params, {'linear': {}})
  with pytest.raises(
    ValueError,
    match=r"'conv' is not an hk.BatchNorm of "
    r"this model; its layers are \['bn'\]",
  ):
    interop.to_haiku(
      {'conv': {'mean': np.zeros(C), 'var': np.ones(C)}}, params, state
    )
  with pytest.raises(
    ValueError,
    match=r'bn.mean has 3 values, but the Haiku '
    r'layer has 4',
  ):
    interop.to_haiku(
      {'bn': {'mean': np.zeros(3), 'var': np.ones(3)}}, params, state
    )
  with pytest.raises(ValueError, match=r'decay_rate=1.5 must be in \[0, 1\)'):
    interop.from_haiku(params, state, decay_rate=1.5)


def test_round_trip_with_stats_continues_haiku_training_as_the_original():
  # Issue 44, item 14: to_haiku ignored the 'stats' from_haiku returns and
  # wrote counter=2**30 with hidden = average, so haiku training continued
  # from a round trip drifted from the original (0.8% in variance).
  t, params, state = _haiku()
  layers = interop.from_haiku(params, state, decay_rate=DECAY)
  _, template = t.init(jax.random.key(1), _x(0), True)  # counter 0
  p2, s2 = interop.to_haiku(layers, params, template, decay_rate=DECAY)
  for ema in ('bn/~/mean_ema', 'bn/~/var_ema'):
    np.testing.assert_array_equal(s2[ema]['counter'], state[ema]['counter'])
    np.testing.assert_array_equal(s2[ema]['hidden'], state[ema]['hidden'])
  s_orig, s_trip = state, s2
  for i in range(2):  # continue haiku training from both
    x = _x(20 + i)
    _, s_orig = t.apply(params, s_orig, None, x, True)
    _, s_trip = t.apply(p2, s_trip, None, x, True)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7, atol=0),
    s_trip,
    s_orig,
  )


def test_to_haiku_takes_a_debiased_stats_layer_instead_of_a_bare_error():
  # Issue 44, item 14: to_haiku({'bn': DebiasedStats}) raised "tuple indices
  # must be integers".
  t, params, state = _haiku()
  stats = interop.from_haiku(params, state, decay_rate=DECAY)['bn']['stats']
  _, s2 = interop.to_haiku({'bn': stats}, params, state, decay_rate=DECAY)
  np.testing.assert_array_equal(
    s2['bn/~/var_ema']['counter'], state['bn/~/var_ema']['counter']
  )
  np.testing.assert_allclose(
    s2['bn/~/var_ema']['average'], state['bn/~/var_ema']['average'], rtol=1e-6
  )
  with pytest.raises(ValueError, match=r'carries a DebiasedStats.*decay_rate'):
    interop.to_haiku({'bn': stats}, params, state)
  with pytest.raises(
    TypeError, match=r"bnjax.interop.to_haiku: layers\['bn'\] must be"
  ):
    interop.to_haiku({'bn': (1, 2)}, params, state)


def test_from_haiku_with_swapped_arguments_says_they_are_swapped():
  # Issue 44, item 14: the message said only "no hk.BatchNorm statistics".
  t, params, state = _haiku()
  with pytest.raises(ValueError, match=r'the arguments are swapped'):
    interop.from_haiku(state, params)
  with pytest.raises(
    TypeError, match=r'bnjax.interop.from_haiku: state must be a mapping'
  ):
    interop.from_haiku(params, [1])


@pytest.mark.parametrize(
  'ema, value, piece',
  [
    ('mean', np.nan, "'bn/~/mean_ema/average' has non-finite values"),
    ('var', -1.0, "'bn/~/var_ema/average' is negative at channels [1]"),
  ],
)
def test_haiku_conversions_refuse_nan_means_and_negative_variances(
  ema, value, piece
):
  # Issue 44, item 13: from_haiku/to_haiku took and wrote them silently.
  t, params, state = _haiku()
  bad = {k: dict(v) for k, v in state.items()}
  avg = np.array(bad[f'bn/~/{ema}_ema']['average'])
  avg.reshape(-1)[1] = value
  bad[f'bn/~/{ema}_ema']['average'] = avg
  with pytest.raises(
    ValueError, match='bnjax.interop.from_haiku: invalid'
  ) as e:
    interop.from_haiku(params, bad)
  assert piece in str(e.value)
  layer = dict(interop.from_haiku(params, state)['bn'])
  layer[ema] = layer[ema].at[1].set(value)
  with pytest.raises(ValueError, match='bnjax.interop.to_haiku: invalid') as e:
    interop.to_haiku({'bn': layer}, params, state)
  assert f"'bn.{ema}'" in str(e.value)


def test_to_haiku_refuses_to_write_into_an_int_or_bool_haiku_array():
  # It wrote each value in the replaced array's dtype: a scale of 0.5 into
  # an int32 scale as 0, a variance of 2.5 into a bool average as True.
  _, params, state = _haiku()
  layer = {
    'mean': np.zeros(C),
    'var': np.full(C, 2.5),
    'scale': np.full(C, 0.5),
  }
  ints = {**params, 'bn': {**params['bn'], 'scale': np.ones((1, C), np.int32)}}
  with pytest.raises(TypeError, match='bn.scale replaces is int32, not a'):
    interop.to_haiku({'bn': layer}, ints, state)
  var = {**state['bn/~/var_ema'], 'average': np.ones((1, C), bool)}
  with pytest.raises(TypeError, match='bn.var replaces is bool, not a float'):
    interop.to_haiku({'bn': layer}, params, {**state, 'bn/~/var_ema': var})
