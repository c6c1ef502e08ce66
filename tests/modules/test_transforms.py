"""The modules under the Flax and JAX transforms users report BN failures in.

Each test builds the same model with flax's BatchNorm and with bnjax's and
runs both under the transform, or, where the transform syncs statistics
over a mapped axis, checks bnjax against the float64 global-batch oracle
(tests/reference.py). Flax issue numbers name the user reports.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax.linen
import bnjax.nnx
from tests import reference as ref
from tests._helpers import FLAX_ULPS, randn

EPS32 = 2.0**-23
C = 4


def _close(ours, theirs, per_leaf=True):
  """Within a few float32 ulps of the largest value of each leaf (see
  test_modules), or of the whole tree (gradients: a Dense bias before BN
  has a gradient that is round-off around 0)."""
  ours, theirs = jax.tree.leaves(ours), jax.tree.leaves(theirs)
  assert len(ours) == len(theirs)
  top = max(np.abs(np.asarray(b, np.float64)).max() for b in theirs)
  for a, b in zip(ours, theirs, strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    big = np.abs(b).max() if per_leaf else top
    np.testing.assert_allclose(a, b, rtol=0, atol=8 * FLAX_ULPS * EPS32 * big)


def _oracle_y(x, axis=-1):
  """Float64 training-mode output of BN over all of x's non-feature axes."""
  mean, var, _ = ref.moments(x, axis)
  return ref.normalize(x, mean, var, axis=axis)


# ------------------------------------------------------------------ nnx ---


class _Net(nnx.Module):
  def __init__(self, bn, rngs, **kw):
    self.lin = nnx.Linear(3, C, rngs=rngs)
    self.bn = bn(C, rngs=rngs, **kw)

  def __call__(self, x):
    return self.bn(self.lin(x))


def test_nnx_vmap_with_axis_name_twice_equals_global_batch():
  """flax#4760: a vmapped model with BatchNorm worked once and failed on
  the second call. The supported form: the model broadcast (in_axes None),
  the statistics synced over the vmapped axis, which makes the new running
  statistics the same for every member, so they can be written back."""
  model = _Net(bnjax.nnx.BatchNorm, nnx.Rngs(0), axis_name='members')
  x = jnp.asarray(randn((16, 5, 3), loc=1.0, seed=1))
  f = nnx.vmap(
    lambda m, x: m(x), in_axes=(None, 1), out_axes=1, axis_name='members'
  )
  h = np.asarray(model.lin(x))
  y1 = f(model, x)
  mean1 = np.asarray(model.bn.mean[...])
  y2 = f(model, x)
  np.testing.assert_allclose(y1, _oracle_y(h), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(y2, y1, rtol=0, atol=0)
  m64, _, _ = ref.moments(h)
  np.testing.assert_allclose(mean1, 0.01 * m64, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(
    model.bn.mean[...], 0.0199 * m64, rtol=2e-5, atol=1e-7
  )


def test_nnx_vmap_without_axis_name_fails_at_the_first_call():
  """Without a mapped axis for the statistics each member computes its own,
  which cannot be written into one shared running average: flax raises on
  the first call (not later, with a leaked tracer), for bnjax as for flax."""
  model = _Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
  x = jnp.ones((16, 5, 3))
  with pytest.raises(Exception, match='trace level|broadcast|mutat'):
    nnx.vmap(model, in_axes=1)(x)


def test_nnx_vmap_over_an_ensemble_matches_flax():
  """An ensemble: state split along the member axis (in_axes 0), each
  member normalizing its own batch."""

  def make(bn):
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
      return _Net(bn, nnx.Rngs(key))

    return create(jax.random.split(jax.random.key(0), 3))

  x = jnp.asarray(randn((3, 8, 3), seed=2))
  outs = []
  for bn in (nnx.BatchNorm, bnjax.nnx.BatchNorm):
    ens = make(bn)
    run = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))
    y = run(ens, x)
    y = run(ens, x)  # twice: the written state is reused
    outs.append((y, ens.bn.mean[...], ens.bn.var[...]))
  _close(outs[1], outs[0])


class _Block(nnx.Module):
  def __init__(self, bn, rngs):
    self.lin = nnx.Linear(C, C, rngs=rngs)
    self.bn = bn(C, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.lin(x)))


def _stacked(bn, n=3):
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(key):
    return _Block(bn, nnx.Rngs(key))

  return create(jax.random.split(jax.random.key(1), n))


def test_nnx_scan_over_stacked_blocks_carries_batch_stats():
  x = jnp.asarray(randn((8, C), seed=3))
  outs = []
  for bn in (nnx.BatchNorm, bnjax.nnx.BatchNorm):
    blocks = _stacked(bn)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block, h):
      return block(h)

    y = forward(blocks, x)
    assert blocks.bn.mean[...].shape == (3, C)
    outs.append((y, blocks.bn.mean[...], blocks.bn.var[...]))
  _close(outs[1], outs[0])
  assert not np.allclose(outs[1][1], 0)  # the statistics were written


def test_nnx_eval_shape_of_a_model_with_batchnorm():
  """flax#4734: nnx.eval_shape of a model holding BatchNorm."""
  abstract = nnx.eval_shape(lambda: _Net(bnjax.nnx.BatchNorm, nnx.Rngs(0)))
  shapes = jax.tree.map(lambda v: v.shape, nnx.state(abstract, nnx.BatchStat))
  assert shapes['bn']['mean'] == shapes['bn']['var'] == (C,)
  model = _Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
  before = np.asarray(model.bn.mean[...])
  out = nnx.eval_shape(lambda m, x: m(x), model, jnp.ones((8, 3)))
  assert out.shape == (8, C) and out.dtype == jnp.float32
  np.testing.assert_array_equal(model.bn.mean[...], before)  # not trained


def test_nnx_remat_equals_the_plain_call_with_gradients():
  x = jnp.asarray(randn((8, 3), loc=1.0, seed=4))
  got = []
  for wrap in (lambda f: f, nnx.remat):
    model = _Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
    call = wrap(lambda m, x: m(x))
    grads = nnx.grad(lambda m, x: jnp.sum(call(m, x) ** 3))(model, x)
    got.append((nnx.state(grads, nnx.Param), model.bn.mean[...]))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
    got[1],
    got[0],
  )


def test_nnx_jit_with_donated_state_trains_like_the_undonated_step():
  x = jnp.asarray(randn((8, 3), seed=5))

  def step(graphdef, state, x):
    m = nnx.merge(graphdef, state)
    y = m(x)
    return nnx.state(m), y

  means = []
  for donate in ((), (1,)):
    model = _Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    f = jax.jit(step, static_argnums=0, donate_argnums=donate)
    for _ in range(3):
      state, y = f(graphdef, state, x)
    means.append((y, state['bn']['mean'][...]))
  np.testing.assert_array_equal(means[1][0], means[0][0])
  np.testing.assert_array_equal(means[1][1], means[0][1])


def test_nnx_jit_decorated_step_donating_the_model():
  x = jnp.asarray(randn((8, 3), seed=5))
  ref_model = _Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
  for _ in range(2):
    y_ref = ref_model(x)
  model = _Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
  f = nnx.jit(lambda m, x: m(x), donate_argnums=0)
  for _ in range(2):
    y = f(model, x)
  _close((y, model.bn.mean[...]), (y_ref, ref_model.bn.mean[...]))


def _modes():
  """flax's Variable modes, where the installed flax has them: array-ref
  Variables, hijax Variables created with ref=True (what flax 0.12.12's
  test_example_mutable_arrays uses) and the tree mode."""
  import contextlib

  def config(name, value):
    @contextlib.contextmanager
    def ctx():
      old = flax.config._read(name)
      flax.config.update(name, value)
      try:
        yield
      finally:
        flax.config.update(name, old)

    return ctx

  modes = {}
  if hasattr(flax.config, 'flax_array_ref'):
    modes['array_ref'] = config('flax_array_ref', True)
  if hasattr(nnx, 'var_defaults'):
    modes['ref_variables'] = lambda: nnx.var_defaults(ref=True)
  if hasattr(flax.config, 'nnx_graph_mode'):
    modes['tree_mode'] = config('nnx_graph_mode', False)
  return modes


MODES = _modes()


def _train_twice(bn, x):
  model = _Net(bn, nnx.Rngs(0))
  f = nnx.jit(lambda m, x: m(x))
  y = f(model, x)
  y = f(model, x)
  return y, model.bn.mean[...], model.bn.var[...]


@pytest.mark.skipif(not MODES, reason='this flax has no Variable modes')
@pytest.mark.parametrize('mode', sorted(MODES) or [None])
def test_nnx_under_flax_variable_modes_matches_flax(mode):
  x = jnp.asarray(randn((8, 3), seed=6))
  want = _train_twice(bnjax.nnx.BatchNorm, x)
  with MODES[mode]():
    got = _train_twice(bnjax.nnx.BatchNorm, x)
    theirs = _train_twice(nnx.BatchNorm, x)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  _close(got, theirs)


# ---------------------------------------------------------------- linen ---


class _LBlock(nn.Module):
  bn: type

  @nn.compact
  def __call__(self, x, _=None):
    x = nn.Dense(C)(x)
    return nn.relu(self.bn(use_running_average=False)(x)), None


def _linen_run(module, x):
  variables = module.init(jax.random.key(0), x)
  out, upd = module.apply(variables, x, mutable=['batch_stats'])
  out, upd = module.apply({**variables, **upd}, x, mutable=['batch_stats'])
  return out, upd


def test_linen_scan_over_stacked_blocks_matches_flax():
  x = jnp.asarray(randn((8, C), seed=7))
  outs = []
  for bn in (nn.BatchNorm, bnjax.linen.BatchNorm):
    scanned = nn.scan(
      _LBlock,
      variable_axes={'params': 0, 'batch_stats': 0},
      split_rngs={'params': True},
      length=3,
    )(bn)
    (y, _), upd = _linen_run(scanned, x)
    assert upd['batch_stats']['BatchNorm_0']['mean'].shape == (3, C)
    outs.append((y, upd))
  _close(outs[1], outs[0])


def test_linen_remat_matches_flax_with_gradients():
  x = jnp.asarray(randn((8, C), seed=8))
  outs = []
  for bn in (nn.BatchNorm, bnjax.linen.BatchNorm):
    block = nn.remat(_LBlock)(bn)
    variables = block.init(jax.random.key(0), x)

    def loss(params, variables=variables, block=block):
      (y, _), upd = block.apply(
        {**variables, 'params': params}, x, mutable=['batch_stats']
      )
      return jnp.sum(y**3), upd

    grads, upd = jax.grad(loss, has_aux=True)(variables['params'])
    outs.append((grads, upd))
  _close(outs[1][0], outs[0][0], per_leaf=False)
  _close(outs[1][1], outs[0][1])


class _Synced(nn.Module):
  axis_name: object

  @nn.compact
  def __call__(self, x):
    return bnjax.linen.BatchNorm(
      use_running_average=False, axis_name=self.axis_name
    )(x)


def test_linen_vmap_with_axis_name_equals_global_batch():
  x = randn((5, 6, C), loc=2.0, seed=9)
  vm = nn.vmap(
    _Synced,
    variable_axes={'params': None, 'batch_stats': None},
    split_rngs={'params': False},
    in_axes=0,
    axis_name='b',
  )('b')
  y, upd = vm.apply(vm.init(jax.random.key(0), x), x, mutable=['batch_stats'])
  flat = x.reshape(-1, C)
  np.testing.assert_allclose(
    np.asarray(y).reshape(-1, C), _oracle_y(flat), rtol=2e-5, atol=2e-5
  )
  np.testing.assert_allclose(
    upd['batch_stats']['BatchNorm_0']['mean'],
    0.01 * ref.moments(flat)[0],
    rtol=2e-5,
    atol=1e-7,
  )


def test_nested_linen_vmap_with_a_tuple_axis_name():
  """flax#3319: BatchNorm inside two nested nn.vmaps, synced over both."""
  x = randn((2, 3, 4, C), loc=2.0, seed=10)

  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
      return _Synced(('outer', 'inner'))(x)

  inner = nn.vmap(
    Inner,
    variable_axes={'params': None, 'batch_stats': None},
    split_rngs={'params': False},
    axis_name='inner',
  )
  outer = nn.vmap(
    inner,
    variable_axes={'params': None, 'batch_stats': None},
    split_rngs={'params': False},
    axis_name='outer',
  )()
  y, upd = outer.apply(
    outer.init(jax.random.key(0), x), x, mutable=['batch_stats']
  )
  flat = x.reshape(-1, C)
  np.testing.assert_allclose(
    np.asarray(y).reshape(-1, C), _oracle_y(flat), rtol=2e-5, atol=2e-5
  )
  stats = upd['batch_stats']['_Synced_0']['BatchNorm_0']
  np.testing.assert_allclose(
    stats['mean'], 0.01 * ref.moments(flat)[0], rtol=2e-5, atol=1e-7
  )
