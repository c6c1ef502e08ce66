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
import bnjax.interop  # noqa: E402
from tests._helpers import aligned, randn  # noqa: E402

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
    with pytest.raises(
      TypeError, match=r'bnjax.equinox.BatchNorm: inference must be a'
    ):
      bnjax.equinox.BatchNorm(C, 'batch', inference=1)
  else:
    bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'batch')
    with pytest.raises(
      TypeError, match=r'bnjax.equinox.BatchNorm: inference must be a'
    ) as e:
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
  with pytest.raises(
    ValueError, match='bnjax.equinox.from_torch: invalid'
  ) as e:
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
    with pytest.raises(
      ValueError, match='bnjax.equinox.to_torch: invalid'
    ) as e:
      bnjax.equinox.to_torch(bn, bad, ME)
    assert piece in str(e.value)


# ---- issue 42: equinox's torch I/O is interop's one path ----------------


def _sd(c=C, **over):
  sd = {
    'bn.weight': np.full(c, 2.0, np.float32),
    'bn.bias': np.full(c, 0.5, np.float32),
    'bn.running_mean': np.arange(c, dtype=np.float32),
    'bn.running_var': np.full(c, 4.0, np.float32),
    'bn.num_batches_tracked': np.array(7),
  }
  return {**sd, **over}


class _Net(eqx.Module):
  blocks: list
  head: bnjax.equinox.BatchNorm


def _net():
  return eqx.nn.make_with_state(_Net)(
    [bnjax.equinox.BatchNorm(C, 'b'), bnjax.equinox.BatchRenorm(C, 'b')],
    bnjax.equinox.BatchNorm(C, 'b', channelwise_affine=False),
  )


@pytest.mark.parametrize(
  'over, piece',
  [
    # Reshaped to (C,) and loaded.
    ({'bn.weight': np.ones((1, C))}, '1-D vectors of one length'),
    # Its imaginary part dropped, with a ComplexWarning.
    (
      {'bn.running_mean': np.ones(C, np.complex64)},
      "'bn.running_mean' is complex",
    ),
  ],
)
def test_equinox_from_torch_refuses_what_interop_refuses(over, piece):
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'b')
  with pytest.raises(ValueError, match='nothing was converted') as e:
    bnjax.equinox.from_torch(bn, state, _sd(**over), ME)
  assert piece in str(e.value)


def test_equinox_from_torch_refuses_weights_a_layer_would_drop():
  # A channelwise_affine=False layer took torch's weight and bias silently
  # dropped: its outputs were no longer torch's.
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, 'b', channelwise_affine=False
  )
  with pytest.raises(ValueError, match='build it with channelwise_affine=True'):
    bnjax.equinox.from_torch(bn, state, _sd(), ME)
  sd = {k: v for k, v in _sd().items() if 'running' in k}
  bn, state = bnjax.equinox.from_torch(bn, state, sd, ME)
  np.testing.assert_array_equal(
    state.get(bn.state_index).var, sd['bn.running_var']
  )


def test_equinox_from_torch_refuses_two_prefixes_picking_one_layer():
  # The second overwrote the first silently.
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'b')
  sd = {**_sd(), **{k.replace('bn.', 'bn2.'): v for k, v in _sd().items()}}
  with pytest.raises(ValueError, match="'bn' and 'bn2' both pick the same"):
    bnjax.equinox.from_torch(bn, state, sd, {'bn': '', 'bn2': lambda m: m})


def test_equinox_layers_by_path_and_none_as_interop():
  """layers takes interop's paths (dots or slashes, ints index lists), and
  None means every layer, its prefix its path, both ways."""
  net, state = _net()
  sd = {
    **{k.replace('bn.', 'blocks.0.'): v for k, v in _sd().items()},
    **{k.replace('bn.', 'blocks.1.'): v + 1 for k, v in _sd().items()},
    **{
      k.replace('bn.', 'head.'): v
      for k, v in _sd().items()
      if not k.endswith(('weight', 'bias'))
    },
  }
  by_path, s1 = bnjax.equinox.from_torch(
    net,
    state,
    sd,
    {'blocks.0': 'blocks/0', 'blocks.1': ('blocks', 1), 'head': 'head'},
  )
  net, state = _net()
  by_none, s2 = bnjax.equinox.from_torch(net, state, sd)
  np.testing.assert_array_equal(by_none.blocks[1].weight, sd['blocks.1.weight'])
  counts = bnjax.interop.batches_tracked(sd)
  back = bnjax.equinox.to_torch(by_none, s2, num_batches_tracked=counts)
  assert sorted(back) == sorted(sd)
  for k, a in sd.items():
    np.testing.assert_allclose(back[k], a, rtol=1e-6, err_msg=k)
  paths = {p: p for p in ('blocks.0', 'blocks.1', 'head')}
  again = bnjax.equinox.to_torch(by_path, s1, paths, num_batches_tracked=counts)
  for k, a in back.items():
    np.testing.assert_array_equal(again[k], a, err_msg=k)
  with pytest.raises(ValueError, match='found no BatchNorm layer'):
    bnjax.equinox.from_torch(by_none, s2, {'conv.weight': np.zeros(3)})
  with pytest.raises(KeyError, match=r"blocks/1 has no 'bn'"):
    bnjax.equinox.from_torch(by_none, s2, sd, {'blocks.1': 'blocks/1/bn'})


def test_equinox_to_torch_writes_the_batch_counts_as_interop():
  # to_torch had no num_batches_tracked: torch's counts were lost.
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'b')
  sd = _sd()
  bn, state = bnjax.equinox.from_torch(bn, state, sd, ME)
  counts = bnjax.interop.batches_tracked(sd)
  back = bnjax.equinox.to_torch(bn, state, ME, num_batches_tracked=counts)
  assert back['bn.num_batches_tracked'].dtype == np.int64
  assert int(back['bn.num_batches_tracked']) == 7
  with pytest.raises(TypeError, match=r'num_batches_tracked must be an int'):
    bnjax.equinox.to_torch(bn, state, ME, num_batches_tracked=-1)


def test_equinox_to_torch_of_a_model_without_bnjax_layers_is_refused():
  """layers=None on a model of eqx.nn.BatchNorm (or none at all) returned
  {}: nothing written and no error."""
  bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, 'b')
  with pytest.raises(ValueError, match='model holds no bnjax.equinox'):
    bnjax.equinox.to_torch(bn, state)


def test_equinox_torch_arrays_are_owned_copies_both_ways():
  # from_torch: jnp.asarray of an aligned NumPy array may alias it on CPU,
  # so changing the source after loading changed the running variance.
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'b')
  sd = {k: aligned(a) for k, a in _sd().items()}
  bn, state = bnjax.equinox.from_torch(bn, state, sd, ME)
  sd['bn.weight'][:] = 9.0  # the source changes after loading
  sd['bn.running_var'][:] = 9.0
  assert float(bn.weight[0]) == 2.0
  assert float(state.get(bn.state_index).var[0]) == 4.0
  out = bnjax.equinox.to_torch(bn, state, ME)
  for k, a in out.items():
    assert a.flags.writeable and a.flags.owndata, k
    a[...] = 0  # torch's in-place updates
  assert float(bn.weight[0]) == 2.0
  assert float(state.get(bn.state_index).mean[1]) == 1.0
