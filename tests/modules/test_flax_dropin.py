"""Drop-in behaviour against Flax: bit-identical float32 results on
well-conditioned input, complex input, a batch of one in the modules,
nnx.view_info, and bnjax.nnx.convert.

tests/peer/ runs Flax's own BatchNorm tests with the class swapped; these
cover what those tests leave out.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from tests._helpers import cpu_path_only, randn

# ------------------------------------------------------ bit-identical ---


@pytest.mark.parametrize('fast', [True, False])
@pytest.mark.parametrize(
  'shape, axis',
  [((10, 5), -1), ((4, 6, 6, 8), -1), ((3, 7, 5), 1), ((64, 33), -1)],
)
@pytest.mark.parametrize('jit', [False, True])
@cpu_path_only
def test_linen_train_bit_identical_to_flax(fast, shape, axis, jit):
  # Where mean**2 <= 8 var in every channel bnjax runs flax's own formulas:
  # the batch statistics are flax's bit for bit. The outputs are the same
  # arithmetic, but XLA fuses the two graphs differently, and rounding can
  # differ: measured, 15 of these 16 cases are bit-identical and one
  # (fast=False, (10, 5), jit) differs by 2 ulp.
  x = jnp.asarray(randn(shape, loc=0.5, seed=sum(shape)))
  outs = []
  for cls in (nn.BatchNorm, bnjax.linen.BatchNorm):
    m = cls(
      use_running_average=False, axis=axis, use_fast_variance=fast, momentum=0.0
    )  # momentum 0: the stored stats are the batch's
    v = m.init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.25, v)  # non-trivial scale and bias
    f = lambda v, x, m=m: m.apply(v, x, mutable=['batch_stats'])
    outs.append((jax.jit(f) if jit else f)(v, x))
  (y0, s0), (y1, s1) = outs
  for k in ('mean', 'var'):
    np.testing.assert_array_equal(s1['batch_stats'][k], s0['batch_stats'][k])
  np.testing.assert_array_max_ulp(np.asarray(y1), np.asarray(y0), maxulp=2)


@cpu_path_only
def test_masked_channels_bit_identical_to_flax_except_empty_ones():
  # Flax's test_nnx_linen_batchnorm_equivalence mask: channels 1 and 3 empty.
  x = jnp.asarray(randn((10, 5), seed=3))
  mask = jnp.array([True, False, True, False, True])
  ys = []
  for cls in (nn.BatchNorm, bnjax.linen.BatchNorm):
    m = cls(use_running_average=False)
    v = m.init(jax.random.key(1), x)
    ys.append(m.apply(v, x, mask=mask, mutable=['batch_stats']))
  (y0, s0), (y1, s1) = ys
  keep = np.asarray(mask)
  np.testing.assert_array_equal(
    np.asarray(y1)[:, keep], np.asarray(y0)[:, keep]
  )
  assert np.isnan(np.asarray(y0)[:, ~keep]).all()  # flax's
  assert np.isfinite(np.asarray(y1)).all()  # bnjax's: running statistics
  np.testing.assert_array_equal(s1['batch_stats']['mean'][~keep], 0.0)
  np.testing.assert_array_equal(s1['batch_stats']['var'][~keep], 1.0)


def test_complex_modules():
  x = (randn((8, 3), seed=13) + 1j * randn((8, 3), seed=14)).astype(
    np.complex64
  )
  m = bnjax.linen.BatchNorm(
    use_running_average=False, momentum=0.9, dtype=jnp.complex64
  )
  v = m.init(jax.random.key(0), x)
  assert v['batch_stats']['mean'].dtype == jnp.complex64
  y, upd = m.apply(v, x, mutable=['batch_stats'])
  assert upd['batch_stats']['mean'].dtype == jnp.complex64
  np.testing.assert_allclose(
    upd['batch_stats']['mean'], 0.1 * x.mean(0), rtol=1e-5, atol=1e-6
  )
  bn = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
  y2 = bn(jnp.asarray(x))
  np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
  assert bn.mean[...].dtype == jnp.complex64  # as flax's, on first update


def test_modules_train_on_a_batch_of_one_like_flax():
  x = jnp.asarray(randn((1, 3), seed=15))
  for cls in (nn.BatchNorm, bnjax.linen.BatchNorm):
    m = cls(use_running_average=False, momentum=0.9)
    v = m.init(jax.random.key(0), x)
    v['params']['bias'] = jnp.array([1.0, 2.0, 3.0])
    y, upd = m.apply(v, x, mutable=['batch_stats'])
    np.testing.assert_array_equal(y, [[1.0, 2.0, 3.0]])  # the bias
    np.testing.assert_allclose(
      upd['batch_stats']['mean'], 0.1 * x[0], rtol=1e-6
    )
    np.testing.assert_allclose(upd['batch_stats']['var'], 0.9, rtol=1e-6)
  bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(bn(x), jnp.zeros((1, 3)))
  g = jax.grad(
    lambda x: jnp.sum(
      bnjax.linen.BatchNorm(use_running_average=False).init_with_output(
        jax.random.key(0), x
      )[0]
      * jnp.arange(3.0)
    )
  )(x)
  assert np.isfinite(np.asarray(g)).all()


def test_functional_api_keeps_its_error_on_one_value():
  with pytest.raises(ValueError, match='more than one value per channel'):
    bnjax.batch_norm(
      jnp.ones((1, 3)), bnjax.init_batch_stats(3), use_running_average=False
    )
  # and the module's permission does not leak out of the module call
  bnjax.linen.BatchNorm(use_running_average=False).init(
    jax.random.key(0), jnp.ones((1, 3))
  )
  with pytest.raises(ValueError, match='more than one value per channel'):
    bnjax.batch_norm(
      jnp.ones((1, 3)), bnjax.init_batch_stats(3), use_running_average=False
    )


def test_flax_shape_only_flows_with_a_batch_of_one():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return bnjax.linen.BatchNorm(use_running_average=False)(nn.Dense(4)(x))

  x = jnp.ones((1, 3))
  assert 'BatchNorm' in nn.tabulate(Net(), jax.random.key(0))(x)
  v = jax.eval_shape(Net().init, jax.random.key(0), x)
  assert v['batch_stats']['BatchNorm_0']['mean'].shape == (4,)

  model = nnx.Sequential(
    nnx.Linear(3, 4, rngs=nnx.Rngs(0)), bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  )
  assert 'BatchNorm' in nnx.tabulate(model, x)
  assert nnx.eval_shape(lambda m, x: m(x), model, x).shape == (1, 4)


def test_view_info_reads_set_view_docstrings():
  if not hasattr(nnx, 'view_info'):
    pytest.skip('this flax has no nnx.view_info (flax 0.12.8 has)')
  model = nnx.Sequential(
    bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0)),
    bnjax.nnx.BatchRenorm(2, rngs=nnx.Rngs(0)),
  )
  info = str(nnx.view_info(model))
  assert 'use_running_average' in info
  assert 'stored batch statistics will be' in info


# ------------------------------------------------------------- convert ---


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 4, rngs=rngs)
    shared = nnx.BatchNorm(4, momentum=0.8, epsilon=1e-3, rngs=rngs)
    self.blocks = nnx.List([shared, nnx.Linear(4, 4, rngs=rngs), shared])
    self.heads = nnx.Dict({'a': nnx.BatchNorm(4, use_scale=False, rngs=rngs)})

  def __call__(self, x):
    x = self.lin(x)
    for layer in self.blocks:
      x = layer(x)
    return self.heads['a'](x)


def _set_state(model):
  for _path, bn in nnx.iter_graph(model):
    if isinstance(bn, nnx.BatchNorm):
      bn.mean[...] = jnp.arange(4.0) * 0.3
      bn.var[...] = jnp.linspace(0.5, 2.0, 4)
      if bn.bias is not None:
        bn.bias[...] = jnp.full(4, 0.1)


def test_convert_keeps_outputs_and_state_in_both_modes():
  x = jnp.asarray(randn((16, 3), seed=16, loc=1.0))
  ref = _Net(nnx.Rngs(0))
  _set_state(ref)
  model = _Net(nnx.Rngs(0))
  _set_state(model)
  model = bnjax.nnx.convert(model)
  assert model.blocks[0] is model.blocks[2]  # still shared
  assert isinstance(model.blocks[0], bnjax.nnx.BatchNorm)
  assert isinstance(model.heads['a'], bnjax.nnx.BatchNorm)
  assert model.blocks[0].momentum == 0.8 and model.blocks[0].epsilon == 1e-3
  assert model.heads['a'].scale is None
  for mode in ('eval', 'train'):
    getattr(ref, mode)(), getattr(model, mode)()
    np.testing.assert_allclose(model(x), ref(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    model.blocks[0].var[...], ref.blocks[0].var[...], rtol=1e-6
  )
  # same state tree as flax's, so checkpoints load both ways
  assert jax.tree.structure(nnx.to_pure_dict(nnx.state(model))) == (
    jax.tree.structure(nnx.to_pure_dict(nnx.state(ref)))
  )


def test_convert_for_synced_training_equals_global_batch():
  x = jnp.asarray(randn((8, 4, 3), seed=17))
  model = bnjax.nnx.convert(_Net(nnx.Rngs(0)), axis_name='d')
  assert model.blocks[0].axis_name == 'd'
  graphdef, state = nnx.split(model)

  def shard(state, x):
    return nnx.merge(graphdef, state)(x)

  y = jax.vmap(shard, in_axes=(None, 0), axis_name='d')(state, x)
  ref = _Net(nnx.Rngs(0))
  np.testing.assert_allclose(
    np.asarray(y).reshape(32, 4), ref(x.reshape(32, 3)), rtol=2e-5, atol=2e-5
  )


def test_convert_a_bare_batchnorm_and_overrides():
  bn = bnjax.nnx.convert(
    nnx.BatchNorm(3, rngs=nnx.Rngs(0)), virtual_batch_size=2, momentum=0.5
  )
  assert isinstance(bn, bnjax.nnx.BatchNorm)
  assert bn.virtual_batch_size == 2 and bn.momentum == 0.5
  with pytest.raises(
    TypeError, match=r"unknown BatchNorm arguments \['momentun'\]"
  ):
    bnjax.nnx.convert(nnx.BatchNorm(3, rngs=nnx.Rngs(0)), momentun=0.5)


def test_a_model_built_with_axis_name_evaluates_outside_the_mapping():
  """Regression: bnjax checked that axis_name was bound in inference too,
  where flax never syncs, so evaluating a data-parallel model outside its
  shard_map (experiment 5's eval) raised NameError."""
  x = jnp.asarray(randn((8, 3), loc=1.0, seed=30))
  outs = []
  for bn in (nn.BatchNorm, bnjax.linen.BatchNorm):
    m = bn(use_running_average=True, axis_name='d')
    outs.append(m.apply(m.init(jax.random.key(0), x), x))
  for bn in (nnx.BatchNorm, bnjax.nnx.BatchNorm):
    m = bn(3, axis_name='d', rngs=nnx.Rngs(0))
    m.eval()
    outs.append(m(x))
  for y in outs[1:]:
    np.testing.assert_array_equal(y, outs[0])


@pytest.mark.parametrize(
  'field, value, piece',
  [
    ('var', -1.0, "'layers/1.var' is negative at channels [1]"),
    ('mean', jnp.nan, "'layers/1.mean' has non-finite values at channels [1]"),
  ],
)
def test_convert_refuses_nan_and_negative_flax_statistics_converting_nothing(
  field, value, piece
):
  # Issue 44: every conversion into bnjax goes through the one value check
  # interop.from_torch uses; nnx.convert copied such statistics silently.
  model = nnx.Sequential(
    nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  )
  var = getattr(model.layers[1], field)
  var.value = var.value.at[1].set(value)
  with pytest.raises(ValueError, match='bnjax.nnx.convert: invalid') as e:
    bnjax.nnx.convert(model)
  assert piece in str(e.value)
  assert type(model.layers[1]) is nnx.BatchNorm  # nothing was swapped
