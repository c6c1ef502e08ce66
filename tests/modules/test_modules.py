"""bnjax.linen / bnjax.nnx BatchNorm are drop-ins for flax's."""

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax.linen
import bnjax.nnx
from tests._helpers import FLAX_ULPS, pairwise, randn

AXES = (
  [-1, 1, (1, 3)],  # axis
  [jnp.float32, jnp.bfloat16],  # x dtype
  [jnp.float32, jnp.bfloat16],  # param_dtype
  [(True, True), (False, True), (True, False)],  # use_bias, use_scale
  [None, 'rows'],  # mask
)
# Every value of every axis and every pair of values of two axes (9 cases;
# the full product was 72, and the formulas couple no three of these).
GRID = pairwise(*AXES)


EPS32 = 2.0**-23


def _assert_as_flax(y_flax, y_ours):
  """Where mean**2 <= 8 var (these inputs) bnjax evaluates flax's own
  formulas in float32, so outputs differ by float32 rounding only: a few
  ulps of the largest |y| (measured: at most 2.4e-7 with |y| up to 6), or one
  ulp of a half-precision output whose float32 value sat on a rounding
  boundary (measured: bit-identical)."""
  a, b = np.float64(np.float32(y_flax)), np.float64(np.float32(y_ours))
  ulp = 2.0**-8 if y_flax.dtype == jnp.bfloat16 else 0.0
  np.testing.assert_allclose(
    b, a, rtol=ulp, atol=2 * FLAX_ULPS * EPS32 * np.abs(a).max()
  )


def _x_mask(dtype, mask):
  x = jnp.asarray(randn((6, 3, 2, 4), loc=2.0, scale=3.0, seed=0), dtype)
  m = None
  if mask == 'rows':
    m = np.random.default_rng(1).random((6, 1, 1, 1)) < 0.6
    m[0] = True
  return x, m


def test_linen_has_flax_fields():
  ours = {f.name for f in dataclasses.fields(bnjax.linen.BatchNorm)}
  theirs = {f.name for f in dataclasses.fields(nn.BatchNorm)}
  assert theirs <= ours


@pytest.mark.parametrize('axis, dtype, pdtype, bias_scale, mask', GRID)
def test_linen_matches_flax(axis, dtype, pdtype, bias_scale, mask):
  x, m = _x_mask(dtype, mask)
  kw = dict(
    axis=axis,
    param_dtype=pdtype,
    use_bias=bias_scale[0],
    use_scale=bias_scale[1],
    momentum=0.8,
    bias_init=nn.initializers.normal(1.0),
    scale_init=nn.initializers.normal(1.0),
  )
  ref, ours = nn.BatchNorm(**kw), bnjax.linen.BatchNorm(**kw)
  v = ref.init(jax.random.key(0), x, use_running_average=False)
  v2 = ours.init(jax.random.key(0), x, use_running_average=False)
  jax.tree.map(np.testing.assert_array_equal, v, v2)  # same names, values
  for train in (True, False):
    y1, u1 = ref.apply(
      v, x, use_running_average=not train, mask=m, mutable=['batch_stats']
    )
    y2, u2 = ours.apply(
      v, x, use_running_average=not train, mask=m, mutable=['batch_stats']
    )
    assert y1.dtype == y2.dtype and y1.shape == y2.shape
    _assert_as_flax(y1, y2)
    # Running statistics: the same float32 EMA of the same batch moments.
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(
        a, b, rtol=FLAX_ULPS * EPS32, atol=0
      ),
      u1,
      u2,
    )
    jax.tree.map(lambda a, b: (a.dtype == b.dtype) or pytest.fail(), u1, u2)


def test_linen_exact_where_flax_is_not():
  x = randn((512, 4), loc=3e4, scale=3.0, seed=2)
  kw = dict(use_running_average=False, momentum=0.0)
  v = nn.BatchNorm(**kw).init(jax.random.key(0), x)
  _, u_flax = nn.BatchNorm(**kw).apply(v, x, mutable=['batch_stats'])
  _, u_ours = bnjax.linen.BatchNorm(**kw).apply(v, x, mutable=['batch_stats'])
  true = x.astype(np.float64).var(0)
  err = lambda u: np.max(np.abs(u['batch_stats']['var'] / true - 1))
  assert err(u_ours) <= 1e-5 < 1e-2 < err(u_flax)


def test_linen_use_running_average_merge_rule():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match='use_running_average'):
    bnjax.linen.BatchNorm().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='use_running_average'):
    bnjax.linen.BatchNorm(use_running_average=True).init(
      jax.random.key(0), x, use_running_average=False
    )


def test_linen_init_does_not_update_stats_and_ignores_axis_name():
  x = randn((1, 3), loc=5.0)  # flax accepts a one-example init batch
  v = bnjax.linen.BatchNorm(use_running_average=False, axis_name='batch').init(
    jax.random.key(0), x
  )
  np.testing.assert_array_equal(v['batch_stats']['mean'], np.zeros(3))
  np.testing.assert_array_equal(v['batch_stats']['var'], np.ones(3))


class CNN(nn.Module):
  bn: type

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(8, (3, 3))(x)
    x = self.bn(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = nn.Conv(8, (3, 3), strides=2)(x)
    x = self.bn(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean((1, 2))
    return nn.Dense(10)(x)


def _train_curve(model, variables, x, y, steps=5):
  opt = optax.sgd(0.1, momentum=0.9)
  params, stats = variables['params'], variables['batch_stats']
  state = opt.init(params)
  losses = []

  @jax.jit
  def step(params, stats, state):
    def loss_fn(p):
      logits, upd = model.apply(
        {'params': p, 'batch_stats': stats},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      l = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return l, upd['batch_stats']

    (l, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), stats, state, l

  for _ in range(steps):
    params, stats, state, l = step(params, stats, state)
    losses.append(float(l))
  return np.array(losses), {'params': params, 'batch_stats': stats}


def test_small_cnn_checkpoints_swap_both_ways_and_train_the_same():
  x = randn((16, 8, 8, 3), seed=3)
  y = np.arange(16) % 10
  flax_cnn, ours_cnn = CNN(nn.BatchNorm), CNN(bnjax.linen.BatchNorm)
  v_flax = flax_cnn.init(jax.random.key(0), x, train=False)
  v_ours = ours_cnn.init(jax.random.key(0), x, train=False)
  jax.tree.map(np.testing.assert_array_equal, v_flax, v_ours)
  for train in (False, True):
    kw = dict(train=train, mutable=['batch_stats'])
    a = flax_cnn.apply(v_ours, x, **kw)  # ours -> flax
    b = ours_cnn.apply(v_flax, x, **kw)  # flax -> ours
    jax.tree.map(
      lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5), a, b
    )
  l_flax, end_flax = _train_curve(flax_cnn, v_flax, x, y)
  l_ours, end_ours = _train_curve(ours_cnn, v_ours, x, y)
  np.testing.assert_allclose(l_ours, l_flax, rtol=1e-4)
  jax.tree.map(
    lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-3, atol=1e-4),
    end_flax,
    end_ours,
  )


def test_nnx_has_flax_constructor():
  ours = inspect.signature(bnjax.nnx.BatchNorm.__init__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  # flax's parameters, in flax's order; bnjax's extensions come after them,
  # keyword-only with defaults, so every flax call works unchanged.
  assert list(ours)[: len(theirs)] == list(theirs)
  for name in theirs:
    assert ours[name].kind == theirs[name].kind, name
  extra = list(ours)[len(theirs) :]
  assert extra == ['sync', 'virtual_batch_size']
  for name in extra:
    assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY
  assert ours['virtual_batch_size'].default is None
  assert ours['sync'].default == 'auto'
  # linen: flax's fields, then bnjax's, with defaults
  ours_l = [f.name for f in dataclasses.fields(bnjax.linen.BatchNorm)]
  theirs_l = [f.name for f in dataclasses.fields(nn.BatchNorm)]
  assert [f for f in ours_l if f not in theirs_l] == [
    'sync',
    'virtual_batch_size',
  ]


@pytest.mark.parametrize('dtype, pdtype, bias_scale, mask', pairwise(*AXES[1:]))
def test_nnx_matches_flax(dtype, pdtype, bias_scale, mask):
  x, m = _x_mask(dtype, mask)
  kw = dict(
    param_dtype=pdtype,
    use_bias=bias_scale[0],
    use_scale=bias_scale[1],
    momentum=0.8,
    bias_init=nnx.initializers.normal(1.0),
    scale_init=nnx.initializers.normal(1.0),
  )
  ref = nnx.BatchNorm(4, **kw, rngs=nnx.Rngs(0))
  ours = bnjax.nnx.BatchNorm(4, **kw, rngs=nnx.Rngs(0))
  _, s1 = nnx.split(ref)
  _, s2 = nnx.split(ours)
  jax.tree.map(np.testing.assert_array_equal, s1, s2)
  for train in (True, False):
    y1 = ref(x, use_running_average=not train, mask=m)
    y2 = ours(x, use_running_average=not train, mask=m)
    assert y1.dtype == y2.dtype
    _assert_as_flax(y1, y2)
    # flax's nnx stores the statistics in a half dtype when promoted to one
    # (a listed difference): then they agree to that dtype's rounding.
    half = ref.mean[...].dtype == jnp.bfloat16
    for a, b in (
      (ref.mean[...], ours.mean[...]),
      (ref.var[...], ours.var[...]),
    ):
      np.testing.assert_allclose(
        np.float32(b),
        np.float32(a),
        rtol=2.0**-8 if half else FLAX_ULPS * EPS32,
        atol=0,
      )


class NnxNet(nnx.Module):
  def __init__(self, bn, rngs):
    self.lin = nnx.Linear(3, 4, rngs=rngs)
    self.bn = bn(4, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.lin(x))


def test_nnx_train_eval_split_merge_jit_and_grad():
  x = randn((8, 3), seed=4)
  models = [
    NnxNet(nnx.BatchNorm, nnx.Rngs(0)),
    NnxNet(bnjax.nnx.BatchNorm, nnx.Rngs(0)),
  ]
  outs = []
  for model in models:
    model.train()
    assert model.bn.use_running_average is False

    @nnx.jit
    def step(model, x):
      def loss(model):
        return jnp.mean(model(x) ** 2)

      l, grads = nnx.value_and_grad(loss)(model)
      return l, grads

    l, grads = step(model, x)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state)
    model.eval()
    assert model.bn.use_running_average is True
    outs.append((l, grads, model(x), model.bn.mean[...]))
  (l1, g1, y1, m1), (l2, g2, y2, m2) = outs
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m2, m1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    g2['lin']['kernel'][...], g1['lin']['kernel'][...], rtol=1e-4, atol=1e-6
  )
  assert isinstance(models[1].bn.mean, nnx.BatchStat)


def test_signatures_of_class_and_instance():
  """The class shows its constructor (nnx's metaclass gave (*args,
  **kwargs), and BatchRenorm's **kwargs hid flax's arguments); an instance
  shows __call__, which flax 0.12.12's nnx.Sequential reads to forward
  keyword arguments (the class attribute first leaked into instances)."""
  for cls in (bnjax.nnx.BatchNorm, bnjax.nnx.BatchRenorm):
    ctor = inspect.signature(cls).parameters
    assert list(ctor)[0] == 'num_features' and 'promote_dtype' in ctor
    assert not any(p.kind == p.VAR_KEYWORD for p in ctor.values())
    call = inspect.signature(cls(3, rngs=nnx.Rngs(0))).parameters
    assert list(call)[:2] == ['x', 'use_running_average'] and 'rngs' not in call


# Every flax BatchNorm argument behaves the same on both bnjax modules of an
# API: BatchRenorm at r_max=1, d_max=0 is BatchNorm (in training and, from
# the initial std of 1 = sqrt(var), in inference), so each module is held to
# flax's BatchNorm given the same argument.
RENORM_AS_BN = {'r_max': 1.0, 'd_max': 0.0}


@pytest.mark.parametrize('name', ['BatchNorm', 'BatchRenorm'])
def test_linen_force_float32_reductions_as_flax(name):
  x = jnp.asarray(randn((8, 3), loc=1.0, seed=5), jnp.bfloat16)
  extra = RENORM_AS_BN if name == 'BatchRenorm' else {}
  for force in (True, False):
    kw = dict(param_dtype=jnp.bfloat16, force_float32_reductions=force)
    ref = nn.BatchNorm(**kw)
    ours = getattr(bnjax.linen, name)(**kw, **extra)
    v1 = ref.init(jax.random.key(0), x, use_running_average=False)
    v2 = ours.init(jax.random.key(0), x, use_running_average=False)
    # the running statistics' dtype follows the argument, as flax's do
    assert [a.dtype for a in jax.tree.leaves(v2)] == [
      a.dtype for a in jax.tree.leaves(v1)
    ]
    for train in (True, False):
      y1, _ = ref.apply(
        v1, x, use_running_average=not train, mutable=['batch_stats']
      )
      y2, _ = ours.apply(
        v2, x, use_running_average=not train, mutable=['batch_stats']
      )
      assert y2.dtype == y1.dtype, (force, train)
      np.testing.assert_allclose(
        np.float32(y2), np.float32(y1), rtol=2.0**-7, atol=2.0**-7
      )


@pytest.mark.parametrize('name', ['BatchNorm', 'BatchRenorm'])
def test_nnx_promote_dtype_as_flax(name):
  """A custom promote_dtype sees the same arguments and decides the dtype."""

  def recorder(calls):
    def to_half(args, *, dtype=None):
      calls.append((len(args), dtype))
      return tuple(
        None if a is None else jnp.asarray(a, jnp.float16) for a in args
      )

    return to_half

  x = randn((8, 3), loc=1.0, seed=6)
  extra = RENORM_AS_BN if name == 'BatchRenorm' else {}
  theirs, mine = [], []
  ref = nnx.BatchNorm(3, promote_dtype=recorder(theirs), rngs=nnx.Rngs(0))
  ours = getattr(bnjax.nnx, name)(
    3, promote_dtype=recorder(mine), rngs=nnx.Rngs(0)
  )
  for train in (True, False):
    y1 = ref(x, use_running_average=not train)
    y2 = ours(x, use_running_average=not train, **extra)
    assert y1.dtype == y2.dtype == jnp.float16
    np.testing.assert_allclose(
      np.float32(y2), np.float32(y1), rtol=2.0**-9, atol=2.0**-9
    )
  # (x, two statistics, scale, bias) and the module's dtype, once a call
  assert mine == theirs == [(5, None), (5, None)]


@pytest.mark.parametrize('name', ['BatchNorm', 'BatchRenorm'])
def test_nnx_param_metadata_as_flax(name):
  kw = dict(
    bias_metadata={'tag': 'b', 'note': (1, 2)},
    scale_metadata={'tag': 's'},
    rngs=nnx.Rngs(0),
  )
  ref = nnx.BatchNorm(3, **kw)
  ours = getattr(bnjax.nnx, name)(3, **kw)
  for p in ('scale', 'bias'):
    a, b = getattr(ref, p), getattr(ours, p)
    assert type(a) is type(b)
    assert b.get_metadata() == a.get_metadata()
    assert b.get_metadata()['tag'] == p[0]


def test_nnx_batch_renorm_refuses_virtual_batch_size_by_name():
  """BatchNorm and BatchRenorm share one constructor; ghost batches are a
  BatchNorm variant, so BatchRenorm names the class that takes them."""
  with pytest.raises(TypeError, match=r'bnjax\.nnx\.BatchNorm\(virtual_batch'):
    bnjax.nnx.BatchRenorm(3, virtual_batch_size=2, rngs=nnx.Rngs(0))
  bn = bnjax.nnx.BatchNorm(3, virtual_batch_size=2, rngs=nnx.Rngs(0))
  assert bn.virtual_batch_size == 2


@pytest.mark.parametrize('cls', [bnjax.nnx.BatchNorm, bnjax.nnx.BatchRenorm])
def test_nnx_nchw_input_error_names_the_axis_not_num_features(cls):
  # Issue 44, item 21: BatchNorm(16) on NCHW input said "build it with
  # num_features=4", the wrong fix; the functional API names axis=1.
  bn = cls(16, rngs=nnx.Rngs(0), use_running_average=False)
  with pytest.raises(ValueError, match=r'build it with axis=1') as e:
    bn(jnp.ones((2, 16, 4, 4)))
  assert 'axis 1 of x has size 16' in str(e.value)
  with pytest.raises(ValueError, match=r'build it with num_features=5'):
    cls(3, rngs=nnx.Rngs(0), use_running_average=False)(jnp.ones((2, 5)))
