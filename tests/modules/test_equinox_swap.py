"""Swapping ``eqx.nn.BatchNorm`` for ``bnjax.equinox.BatchNorm``: equinox's
arguments accepted or refused by name, its running statistics with
``debias=True``, no silent per-example statistics, and torch export of the
statistics inference uses (issue 44, items 11, 12, 13, 18, 20)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip(
  'equinox', reason='needs the equinox extra: pip install "bnjax[equinox]"'
)

import bnjax  # noqa: E402
import bnjax.equinox  # noqa: E402
from tests._helpers import randn  # noqa: E402

C = 3
ME = {'bn': lambda m: m}


def _vmapped(bn, x, state):
  return jax.vmap(bn, axis_name='batch', in_axes=(0, None), out_axes=(0, None))(
    x, state
  )


def _x(seed, shape=(8, C, 2, 2)):
  return jnp.asarray(randn(shape, loc=3.0, scale=2.0, seed=seed))


def test_default_layer_outside_vmap_refuses_instead_of_returning_the_bias():
  # Item 11: BatchNorm(3) with its defaults, called on one example outside
  # vmap, returned the bias and blended a variance of 0 into the state.
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C)
  for x in (jnp.arange(3.0), _x(0)[0]):
    with pytest.raises(ValueError, match=r'axis_name=None and batch_axis=None'):
      bn(x, state)
  with pytest.raises(
    ValueError, match=r'jax\.vmap\(\.\.\., axis_name=\.\.\.\)'
  ):
    bn(jnp.arange(3.0), state)
  # Inference needs no batch: it still runs on one example.
  y, _ = bn(jnp.arange(3.0), state, inference=True)
  np.testing.assert_allclose(y, np.arange(3.0) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_legacy_mode_is_equinox_ema_and_refused_as_ema():
  # Item 18: mode='legacy' (equinox's default, its "ema") ran "batch".
  with pytest.raises(ValueError, match=r'mode="legacy" normalizes.*"ema"'):
    bnjax.equinox.BatchNorm(C, 'batch', mode='legacy')


@pytest.mark.parametrize('where', ['constructor', 'call'])
def test_non_bool_inference_is_refused_naming_inference(where):
  # Item 18: inference=1 was refused as "use_running_average must be a
  # Python bool", a name equinox does not have (and accepted by the
  # constructor).
  if where == 'constructor':
    with pytest.raises(TypeError, match=r'BatchNorm: inference must be a'):
      bnjax.equinox.BatchNorm(C, 'batch', inference=1)
  else:
    bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'batch')
    with pytest.raises(TypeError, match=r'BatchNorm: inference must be a') as e:
      bn(jnp.ones(C), state, inference=1)
    assert 'use_running_average' not in str(e.value)


def test_debias_true_gives_equinox_batch_mode_running_statistics():
  # Item 20: debias=True is the faithful replacement of eqx.nn.BatchNorm
  # mode="batch": the same debiased running mean, and the same variance but
  # for equinox's start term m**t / (1 - m**t) (its variance EMA starts at
  # 1 and is debiased as if it started at 0). The default keeps Flax's EMA
  # from (0, 1), which after a few steps is far from equinox's.
  m, steps = 0.9, 12
  theirs, s_eqx = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
    C, 'batch', momentum=m, mode='batch'
  )
  ours, s_ours = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, 'batch', momentum=m, debias=True
  )
  flax_ema, s_flax = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, 'batch', momentum=m
  )
  for i in range(steps):
    x = _x(i)
    _, s_eqx = _vmapped(theirs, x, s_eqx)
    _, s_ours = _vmapped(ours, x, s_ours)
    _, s_flax = _vmapped(flax_ema, x, s_flax)
  hidden_mean, hidden_var = s_eqx.get(theirs.batch_state_index)
  debias = 1 - m**steps
  eqx_mean, eqx_var = hidden_mean / debias, hidden_var / debias
  pop = bnjax.population_stats(s_ours.get(ours.state_index))
  np.testing.assert_allclose(pop.mean, eqx_mean, rtol=2e-6)
  np.testing.assert_allclose(pop.var, eqx_var - m**steps / debias, rtol=2e-5)
  default = s_flax.get(flax_ema.state_index)
  assert np.max(np.abs(default.mean - eqx_mean) / np.abs(eqx_mean)) > 0.2


def _trained(**kw):
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, 'batch', momentum=0.9, **kw
  )
  _, state = _vmapped(bn, _x(1), state)
  return bn, state


def test_to_torch_exports_the_debiased_statistics_not_the_hidden_ema():
  # Item 12: a debias=True layer exported its hidden EMA (running_mean 0.45
  # where the statistic is 4.5).
  bn, state = _trained(debias=True)
  sd = bnjax.equinox.to_torch(bn, state, ME)
  pop = bnjax.population_stats(state.get(bn.state_index))
  np.testing.assert_array_equal(sd['bn.running_mean'], pop.mean)
  np.testing.assert_array_equal(sd['bn.running_var'], pop.var)
  x = np.asarray(_x(1))
  np.testing.assert_allclose(sd['bn.running_mean'], x.mean((0, 2, 3)), 1e-5)
  # And back: the debiased layer infers as before.
  bn2, state2 = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, 'batch', debias=True
  )
  bn2, state2 = bnjax.equinox.from_torch(bn2, state2, sd, ME)
  y, _ = bn(x[0], state, inference=True)
  y2, _ = bn2(x[0], state2, inference=True)
  np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)


def test_to_torch_exports_a_renorm_std_as_the_variance_torch_uses():
  # Item 12: a BatchRenorm's std was exported as running_var.
  rn, state = eqx.nn.make_with_state(bnjax.equinox.BatchRenorm)(
    C, momentum=0.5, batch_axis=0, eps=1e-3
  )
  _, state = rn(_x(2), state)
  std = np.asarray(state.get(rn.state_index).std, np.float64)
  sd = bnjax.equinox.to_torch(rn, state, ME)
  np.testing.assert_allclose(sd['bn.running_var'], std**2 - 1e-3, rtol=1e-6)
  # torch's inference, (x - mean) / sqrt(var + eps), is the renorm's.
  x = np.asarray(_x(3))
  y, _ = rn(x, state, inference=True)
  mean = sd['bn.running_mean'].reshape(1, C, 1, 1)
  var = sd['bn.running_var'].reshape(1, C, 1, 1)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-5)
  rn2, state2 = eqx.nn.make_with_state(bnjax.equinox.BatchRenorm)(
    C, batch_axis=0, eps=1e-3
  )
  rn2, state2 = bnjax.equinox.from_torch(rn2, state2, sd, ME)
  np.testing.assert_allclose(state2.get(rn2.state_index).std, std, rtol=1e-6)


@pytest.mark.parametrize(
  'key, value, piece',
  [
    ('running_mean', np.nan, "'bn.running_mean' has non-finite values at"),
    ('running_var', -1.0, "'bn.running_var' is negative at channels [1]"),
    ('weight', np.inf, "'bn.weight' has non-finite values at channels [1]"),
  ],
)
def test_equinox_torch_converters_refuse_nan_means_and_negative_variances(
  key, value, piece
):
  # Item 13: from_torch/to_torch took and wrote them, which
  # interop.from_torch/to_torch refuse by channel.
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'batch')
  good = jax.tree.map(lambda a: a, state)  # a copy: a State is used once
  sd = bnjax.equinox.to_torch(bn, state, ME)
  sd[f'bn.{key}'] = sd[f'bn.{key}'].copy()
  sd[f'bn.{key}'][1] = value
  with pytest.raises(ValueError, match='from_torch: invalid') as e:
    bnjax.equinox.from_torch(bn, good, sd, ME)
  assert piece in str(e.value)
  # The same value in the model's state is refused on the way out.
  field = {'running_mean': 'mean', 'running_var': 'var'}.get(key)
  if field is not None:
    stats = good.get(bn.state_index)
    bad = good.set(
      bn.state_index,
      stats._replace(**{field: getattr(stats, field).at[1].set(value)}),
    )
    with pytest.raises(ValueError, match='to_torch: invalid') as e:
      bnjax.equinox.to_torch(bn, bad, ME)
    assert piece in str(e.value)
