"""bnjax.equinox: both calling conventions against the float64 global-batch
oracle (tests/reference.py), sync on 8 devices, Equinox's layer protocol, a
regression test for each equinox BatchNorm issue that applies, PyTorch state
both ways, and a CNN trained on load_digits to flax's accuracy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

eqx = pytest.importorskip(
  'equinox', reason='needs the equinox extra: pip install "bnjax[equinox]"'
)

import bnjax  # noqa: E402
import bnjax.equinox  # noqa: E402
from tests import reference as ref  # noqa: E402
from tests._helpers import randn  # noqa: E402
from tests._sync import _mesh  # noqa: E402

C = 3
EPS = 1e-5


def _x(shape=(8, C, 4, 4), loc=5.0, seed=0):
  return jnp.asarray(randn(shape, loc=loc, scale=2.0, seed=seed))


def _per_example(bn, x, state, **kw):
  return jax.vmap(
    functools.partial(bn, **kw),
    axis_name='batch',
    in_axes=(0, None),
    out_axes=(0, None),
  )(x, state)


def _oracle(x, w, b, momentum=0.99, mask=None):
  """float64 BN over every axis but the channel axis 1, its EMA step."""
  mean, var, _ = ref.moments(x, axis=1, mask=mask)
  y = ref.normalize(x, mean, var, w, b, axis=1, epsilon=EPS)
  return y, (
    momentum * 0 + (1 - momentum) * mean,
    momentum * 1 + (1 - momentum) * var,
  )


@pytest.mark.parametrize('shape', [(8, C), (8, C, 4, 4)], ids=['2d', '4d'])
@pytest.mark.parametrize('convention', ['per_example', 'batched'])
def test_both_conventions_equal_the_float64_global_batch(shape, convention):
  x = _x(shape, loc=20.0)
  if convention == 'per_example':
    bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
      C, axis_name='batch', momentum=0.9
    )
    call = lambda bn, x, state: _per_example(bn, x, state)
  else:
    bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
      C, momentum=0.9, batch_axis=0
    )
    call = lambda bn, x, state: bn(x, state)
  w = jnp.asarray(randn(C, loc=1.0, seed=3))
  bn = eqx.tree_at(lambda m: m.weight, bn, w)
  y, state = eqx.filter_jit(call)(bn, x, state)
  y_ref, (m_ref, v_ref) = _oracle(x, w, np.zeros(C), momentum=0.9)
  np.testing.assert_allclose(y, y_ref, atol=3e-5)
  stats = state.get(bn.state_index)
  np.testing.assert_allclose(stats.mean, m_ref, rtol=1e-6)
  np.testing.assert_allclose(stats.var, v_ref, rtol=1e-5)
  # Gradients with respect to x and the weight, against the oracle's.
  g = jnp.asarray(randn(shape, seed=7))
  loss = lambda x, w: jnp.sum(
    g * call(eqx.tree_at(lambda m: m.weight, bn, w), x, state)[0]
  )
  with jax.enable_x64(True):

    def loss64(x, w):
      mean = jnp.mean(x, ref.canonical_axes(x.ndim, 1)[1], keepdims=True)
      var = jnp.var(x, ref.canonical_axes(x.ndim, 1)[1], keepdims=True)
      wb = w.reshape((1, C) + (1,) * (x.ndim - 2))
      return jnp.sum(
        jnp.asarray(g, jnp.float64) * (x - mean) / jnp.sqrt(var + EPS) * wb
      )

    want = jax.grad(loss64, (0, 1))(
      np.asarray(x, np.float64), np.asarray(w, np.float64)
    )
  for got, exp in zip(jax.grad(loss, (0, 1))(x, w), want, strict=True):
    np.testing.assert_allclose(got, exp, rtol=2e-4, atol=2e-5)


def test_batched_calls_sync_over_a_mesh_and_under_sharded_jit():
  """8 devices: shard_map with axis_name, and sharded jit with no axis_name,
  both give the global batch's statistics (count-weighted with a mask)."""
  mesh = _mesh()
  x = _x((16, C, 2, 2))
  mask = jnp.asarray(randn((16, 1, 2, 2), seed=5) > -0.5)
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, axis_name='d', momentum=0.0, batch_axis=0
  )

  # The layer is closed over (its bool field stays static); the state
  # enters as a replicated argument, so old and new values have one type.
  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P('d'), P('d'), P()),
    out_specs=(P('d'), P()),
  )
  def synced(x, mask, state):
    y, new = bn(x, state, mask=mask)
    return y, new.get(bn.state_index)

  y, stats = synced(x, mask, state)
  mean, var, _ = ref.moments(x, axis=1, mask=mask)
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(stats.var, var, rtol=1e-5)
  local, lstate = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, momentum=0.0, batch_axis=0
  )
  xs = jax.device_put(x, NamedSharding(mesh, P('d')))
  _, new = eqx.filter_jit(lambda x: local(x, lstate))(xs)
  np.testing.assert_allclose(
    new.get(local.state_index).var, ref.moments(x, axis=1)[1], rtol=1e-5
  )


def test_sequential_threads_state_and_inference_mode_uses_it():
  model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
    [
      eqx.nn.Linear(4, C, key=jax.random.key(0)),
      bnjax.equinox.BatchNorm(C, 'batch', momentum=0.5),
      eqx.nn.Lambda(jax.nn.relu),
    ]
  )
  x = _x((8, 4), loc=0.0)
  _, state = _per_example(model, x, state)
  stats = state.get(model.layers[1].state_index)
  h = jax.vmap(model.layers[0])(x)
  np.testing.assert_allclose(  # one EMA step at momentum 0.5 from 0
    stats.mean, 0.5 * ref.moments(h)[0], rtol=1e-5, atol=1e-7
  )
  frozen = eqx.nn.inference_mode(model)
  y, same = jax.vmap(frozen, in_axes=(0, None), out_axes=(0, None))(x, state)
  want = (h - stats.mean) / jnp.sqrt(stats.var + EPS)
  np.testing.assert_allclose(y, jax.nn.relu(want), atol=1e-5)
  np.testing.assert_array_equal(
    same.get(model.layers[1].state_index).var, stats.var
  )


# ---- regressions: equinox's BatchNorm issues -------------------------------


def test_training_normalizes_by_the_batch_statistics_by_default():
  """equinox#659: equinox's default mode normalizes training batches by a
  running average (gradient spikes); here the batch statistics, always, and
  mode='ema' raises naming the fix."""
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'batch')
  x = _x((8, C), loc=4.0)
  y, _ = _per_example(bn, x, state)
  mean, var, _ = ref.moments(x, axis=1)
  np.testing.assert_allclose(y, ref.normalize(x, mean, var, axis=1), atol=1e-5)
  with pytest.raises(
    ValueError,
    match=r'bnjax.equinox.BatchNorm: mode="ema" '
    r'normalizes.*equinox#659.*mode="batch".*debias=True',
  ):
    bnjax.equinox.BatchNorm(C, 'batch', mode='ema')


def test_axis_name_is_static_so_a_model_replicates():
  """equinox#1074: a non-static axis_name is a string leaf, so stacking or
  replicating a model (vmap over copies, device_put_replicated) failed."""
  bn = bnjax.equinox.BatchNorm(C, ('batch', 'devices'))
  assert not any(isinstance(v, str) for v in jax.tree.leaves(bn))
  stacked = jax.tree.map(lambda v: jnp.stack([v, v]), bn)
  assert stacked.weight.shape == (2, C)


def test_higher_rank_input_and_two_vmaps():
  """equinox#592 (higher-rank input) and #707 (vmapping twice)."""
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'batch')
  x = _x((6, C, 2, 3, 2))
  y, _ = _per_example(bn, x, state)
  mean, var, _ = ref.moments(x, axis=1)
  np.testing.assert_allclose(y, ref.normalize(x, mean, var, axis=1), atol=2e-5)
  outer = jax.vmap(
    lambda x: _per_example(eqx.nn.inference_mode(bn, False), x, state)[0]
  )
  assert outer(jnp.stack([x, x])).shape == (2, *x.shape)


def test_debiased_running_variance_is_not_inflated():
  """equinox's mode="batch" starts its variance EMA at 1 and debiases it as
  if it started at 0, so inference reads var + m^t/(1 - m^t): +9.5 after 10
  steps at m = 0.99. debias=True is exact from the first step."""
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, 'batch', debias=True, momentum=0.99
  )
  x = _x((16, C), loc=2.0)
  for _ in range(10):
    _, state = _per_example(bn, x, state)
  pop = bnjax.population_stats(state.get(bn.state_index))
  _, var, _ = ref.moments(x, axis=1)
  np.testing.assert_allclose(pop.var, var, rtol=1e-5)
  inflated = var + 0.99**10 / (1 - 0.99**10)
  assert np.all(inflated - var > 9.4)


def test_inference_before_training_uses_mean_0_var_1():
  """equinox's mode="ema" reads jnp.empty buffers (uninitialized since JAX
  0.11) at inference before any training step."""
  for debias in (False, True):
    bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
      C, 'batch', inference=True, debias=debias
    )
    x = _x((4, C))
    y, _ = _per_example(bn, x, state)
    np.testing.assert_allclose(y, x / np.sqrt(1 + EPS), rtol=1e-6)


def test_errors_name_the_layer_and_the_fix():
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(4, 'batch')
  with pytest.raises(
    ValueError,
    match=r'bnjax.equinox.BatchNorm: x of shape '
    r'\(3, 5\) has \(3,\) channels on axis 0.*input_size=4',
  ):
    _per_example(bn, _x((8, 3, 5)), state)
  with pytest.raises(TypeError, match='input_size must be a positive int'):
    bnjax.equinox.BatchNorm(0, 'batch')
  with pytest.raises(TypeError, match='batch_axis must be None'):
    bnjax.equinox.BatchNorm(3, batch_axis='0')
  with pytest.raises(TypeError, match=r'inference is traced.*eqx.filter_jit'):
    jax.jit(lambda bn, x: _per_example(bn, x, state))(bn, _x((8, 4)))


def test_batch_renorm_layer_matches_the_functional_core():
  rn, state = eqx.nn.make_with_state(bnjax.equinox.BatchRenorm)(
    C, batch_axis=0, momentum=0.9
  )
  x = _x((8, C))
  y, state = rn(x, state, r_max=1.5, d_max=0.5)
  want, rs = bnjax.batch_renorm(
    x,
    bnjax.init_renorm_stats(C),
    axis=1,
    use_running_average=False,
    r_max=1.5,
    d_max=0.5,
    momentum=0.9,
  )
  np.testing.assert_allclose(y, want, atol=1e-6)
  np.testing.assert_allclose(state.get(rn.state_index).std, rs.std, rtol=1e-6)


# ---- PyTorch state -----------------------------------------------------------


def test_torch_state_dict_round_trip_reproduces_torch_eval_outputs():
  torch = pytest.importorskip(
    'torch', reason='needs the torch extra: pip install "bnjax[torch]"'
  )
  tbn = torch.nn.BatchNorm2d(C)
  with torch.no_grad():
    tbn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
    tbn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
  tbn.train()
  x = np.asarray(_x((8, C, 4, 4)))
  tbn(torch.tensor(x))
  tbn.eval()
  want = tbn(torch.tensor(x)).detach().numpy()

  class Net(eqx.Module):
    bn: bnjax.equinox.BatchNorm

  net, state = eqx.nn.make_with_state(Net)(
    bnjax.equinox.BatchNorm(C, 'batch', inference=True)
  )
  where = {'bn': lambda m: m.bn}
  net, state = bnjax.equinox.from_torch(
    net,
    state,
    tbn.state_dict() and {f'bn.{k}': v for k, v in tbn.state_dict().items()},
    where,
  )
  y, _ = jax.vmap(net.bn, in_axes=(0, None), out_axes=(0, None))(x, state)
  np.testing.assert_allclose(y, want, atol=1e-5)
  back = bnjax.equinox.to_torch(net, state, where)
  for k, v in tbn.state_dict().items():
    if k != 'num_batches_tracked':
      np.testing.assert_array_equal(back[f'bn.{k}'], v.numpy())


def test_from_torch_errors_name_the_key():
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, 'b')
  sd = {
    'bn.weight': np.ones(4),
    'bn.bias': np.zeros(4),
    'bn.running_mean': np.zeros(4),
    'bn.running_var': np.ones(4),
  }
  with pytest.raises(
    ValueError,
    match=r"'bn.weight', .* have 4 channels, but the layer has 3",
  ):
    bnjax.equinox.from_torch(bn, state, sd, {'bn': lambda m: m})
  # As interop.from_torch: a prefix with no BatchNorm state is a KeyError.
  with pytest.raises(
    KeyError,
    match=r"no BatchNorm state for the prefixes \['conv'\].*prefixes found: "
    r"\['bn'\]",
  ):
    bnjax.equinox.from_torch(bn, state, sd, {'conv': lambda m: m})


# ---- a CNN trained on load_digits --------------------------------------------


def _digits():
  datasets = pytest.importorskip(
    'sklearn.datasets',
    reason='needs the experiments extra: pip install "bnjax[experiments]"',
  )
  load_digits = datasets.load_digits
  x, y = load_digits(return_X_y=True)
  perm = np.random.default_rng(0).permutation(len(x))
  x = (x[perm] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
  return x[:1536], y[perm][:1536], x[1536:], y[perm][1536:]


class _EqxCNN(eqx.Module):
  convs: list
  bns: list
  head: eqx.nn.Linear
  batched: bool = eqx.field(static=True)

  def __init__(self, key, batched):
    k = jax.random.split(key, 3)
    self.batched = batched
    self.convs = [
      eqx.nn.Conv2d(1, 8, 3, padding=1, key=k[0]),
      eqx.nn.Conv2d(8, 16, 3, padding=1, key=k[1]),
    ]
    kw = dict(batch_axis=0) if batched else dict(axis_name='batch')
    self.bns = [
      bnjax.equinox.BatchNorm(8, momentum=0.9, **kw),
      bnjax.equinox.BatchNorm(16, momentum=0.9, **kw),
    ]
    self.head = eqx.nn.Linear(16 * 8 * 8, 10, key=k[2])

  def __call__(self, x, state):
    """x: (batch, 1, 8, 8) if batched, else one example (1, 8, 8)."""
    for conv, bn in zip(self.convs, self.bns, strict=True):
      x = jax.vmap(conv)(x) if self.batched else conv(x)
      x, state = bn(x, state)
      x = jax.nn.relu(x)
    flat = x.reshape(x.shape[0], -1) if self.batched else x.reshape(-1)
    return (
      jax.vmap(self.head)(flat) if self.batched else self.head(flat),
      state,
    )


_OPT = None  # optax.sgd(0.1, momentum=0.9), made on first use


def _opt():
  global _OPT
  if _OPT is None:
    import optax

    _OPT = optax.sgd(0.1, momentum=0.9)
  return _OPT


def _eqx_forward(model, x, state):
  if model.batched:
    return model(x, state)
  return jax.vmap(
    model, axis_name='batch', in_axes=(0, None), out_axes=(0, None)
  )(x, state)


@eqx.filter_jit
def _eqx_step(model, state, opt_state, x, y):
  import optax

  def loss(model):
    logits, new = _eqx_forward(model, x, state)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return ce.mean(), new

  (_, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
  updates, opt_state = _opt().update(grads, opt_state)
  return eqx.apply_updates(model, updates), state, opt_state


def _train_eqx(seed, batched, data, epochs=4):
  xtr, ytr, xte, yte = data
  model, state = eqx.nn.make_with_state(_EqxCNN)(jax.random.key(seed), batched)
  opt_state = _opt().init(eqx.filter(model, eqx.is_array))
  order = np.random.default_rng(seed)
  for _ in range(epochs):
    for b in order.permutation(len(xtr)).reshape(-1, 64):
      model, state, opt_state = _eqx_step(
        model, state, opt_state, xtr[b], ytr[b]
      )
  logits, _ = _eqx_forward(eqx.nn.inference_mode(model), xte, state)
  return float(np.mean(np.argmax(logits, -1) == yte))


def _flax_cnn():
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      for width in (8, 16):
        x = nn.Conv(width, (3, 3), padding=1)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
      # Channel-major flattening, as the Equinox model's (C, H, W).
      return nn.Dense(10)(jnp.moveaxis(x, -1, 1).reshape(x.shape[0], -1))

  return CNN()


@functools.partial(jax.jit, static_argnums=0)
def _flax_step(net, params, stats, opt_state, x, y):
  import optax

  def loss(p):
    logits, upd = net.apply(
      {'params': p, 'batch_stats': stats},
      x,
      train=True,
      mutable=['batch_stats'],
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return ce.mean(), upd['batch_stats']

  (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
  updates, opt_state = _opt().update(grads, opt_state)
  return optax.apply_updates(params, updates), stats, opt_state


def _train_flax(seed, data, net, epochs=4):
  xtr, ytr, xte, yte = data
  nhwc = lambda x: np.moveaxis(x, 1, -1)
  v = net.init(jax.random.key(seed), nhwc(xtr[:2]), train=False)
  params, stats = v['params'], v['batch_stats']
  opt_state = _opt().init(params)
  order = np.random.default_rng(seed)
  for _ in range(epochs):
    for b in order.permutation(len(xtr)).reshape(-1, 64):
      params, stats, opt_state = _flax_step(
        net, params, stats, opt_state, nhwc(xtr[b]), ytr[b]
      )
  logits = net.apply(
    {'params': params, 'batch_stats': stats}, nhwc(xte), train=False
  )
  return float(np.mean(np.argmax(logits, -1) == yte))


@pytest.mark.heavy
def test_cnn_trains_on_digits_to_flax_accuracy_both_conventions():
  """A linen-free Equinox CNN with bnjax.equinox.BatchNorm, per example
  (vmap, axis_name) and batched, against the same CNN in linen with
  flax.linen.BatchNorm: three seeds each, mean test accuracy within seed
  noise (twice the larger spread across seeds, at least 2 points)."""
  data, net = _digits(), _flax_cnn()
  runs = {
    'per_example': [_train_eqx(s, False, data) for s in range(3)],
    'batched': [_train_eqx(s, True, data) for s in range(3)],
    'flax': [_train_flax(s, data, net) for s in range(3)],
  }
  flax_mean = np.mean(runs['flax'])
  assert flax_mean > 0.85, runs
  for name in ('per_example', 'batched'):
    noise = max(0.02, 2 * max(np.std(runs[name]), np.std(runs['flax'])))
    assert abs(np.mean(runs[name]) - flax_mean) <= noise, runs
