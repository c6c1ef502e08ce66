"""bnjax.interop: PyTorch <-> Flax BatchNorm state, files, and orbax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import bnjax.linen
from bnjax import interop
from tests._helpers import aligned, import_torch, randn


def _torch_like_state(prefix, c, seed):
  r = np.random.default_rng(seed)
  return {
    f'{prefix}.weight': r.normal(size=c).astype(np.float32),
    f'{prefix}.bias': r.normal(size=c).astype(np.float32),
    f'{prefix}.running_mean': r.normal(size=c).astype(np.float32),
    f'{prefix}.running_var': r.uniform(0.5, 2, c).astype(np.float32),
    f'{prefix}.num_batches_tracked': np.array(3, np.int64),
  }


def _model_state():
  sd = {'conv.weight': np.zeros((4, 3, 3, 3), np.float32)}
  sd.update(_torch_like_state('bn1', 4, 0))
  sd.update(_torch_like_state('layer1.0.bn', 5, 1))
  return sd


LAYERS = {'bn1': 'BatchNorm_0', 'layer1.0.bn': ('block', 'BatchNorm_0')}


def test_round_trip_is_bitwise():
  sd = _model_state()
  v = interop.from_torch(sd, LAYERS)
  assert set(v['batch_stats']) == {'BatchNorm_0', 'block'}
  back = interop.to_torch(v, LAYERS, num_batches_tracked=3)
  for k, val in back.items():
    np.testing.assert_array_equal(val, sd[k])
    assert val.dtype == sd[k].dtype
  # Flax does not count batches: by default the count written is 0, which a
  # torch model with momentum=None (a cumulative average) would restart from.
  default = interop.to_torch(v, LAYERS)
  assert {
    k: int(a) for k, a in default.items() if k.endswith('num_batches_tracked')
  } == {'bn1.num_batches_tracked': 0, 'layer1.0.bn.num_batches_tracked': 0}


def test_default_layers_come_from_prefixes():
  """An all-digit level is a list index (an int), as in an nnx state."""
  sd = _model_state()
  assert interop.bn_prefixes(sd) == ['bn1', 'layer1.0.bn']
  v = interop.from_torch(sd)
  np.testing.assert_array_equal(
    v['batch_stats']['layer1'][0]['bn']['mean'], sd['layer1.0.bn.running_mean']
  )


def test_affine_free_layer_has_no_params():
  sd = _torch_like_state('bn', 3, 0)
  del sd['bn.weight'], sd['bn.bias']
  v = interop.from_torch(sd, {'bn': 'bn'})
  assert v['params'] == {} and set(v['batch_stats']['bn']) == {'mean', 'var'}


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_files(tmp_path, suffix):
  sd = _model_state()
  path = tmp_path / f'model{suffix}'
  if suffix == '.npz':
    np.savez(path, **sd)
  else:
    from safetensors.numpy import save_file

    save_file(sd, str(path))
  v = interop.from_torch(path, LAYERS)
  np.testing.assert_array_equal(
    v['params']['block']['BatchNorm_0']['scale'], sd['layer1.0.bn.weight']
  )


def test_errors():
  with pytest.raises(ValueError, match='cumulative average'):
    interop.momentum_from_torch(None)
  with pytest.raises(ValueError, match=r'in \[0, 1\], got 1.5'):
    interop.momentum_from_torch(1.5)
  with pytest.raises(
    KeyError, match=r"prefixes found: \['bn1', 'layer1.0.bn'\]"
  ):
    interop.from_torch(_model_state(), {'bn2': 'x'})
  with pytest.raises(ValueError, match='found no BatchNorm layer'):
    interop.from_torch({'conv.weight': np.zeros(3)})
  with pytest.raises(ValueError, match="unknown file type '.txt'"):
    interop.load_state_dict('weights.txt')


def test_momentum_convention():
  assert interop.momentum_from_torch(0.1) == 0.9
  assert interop.momentum_to_torch(0.99) == 0.01


def test_orbax_round_trip_is_bitwise(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  import optax

  model = nn.Sequential(
    [
      nn.Dense(8),
      bnjax.linen.BatchNorm(use_running_average=False),
      nn.relu,
      nn.Dense(2),
    ]
  )
  x = jnp.asarray(randn((16, 5), seed=0))
  v = model.init(jax.random.key(0), x)
  _, upd = model.apply(v, x, mutable=['batch_stats'])
  opt = optax.adam(1e-3)
  state = {
    'params': v['params'],
    'batch_stats': upd['batch_stats'],
    'opt_state': opt.init(v['params']),
    'step': jnp.asarray(5),
  }
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'ckpt', state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(
    tmp_path / 'ckpt', jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  )
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(
    jax.tree.leaves(state), jax.tree.leaves(restored), strict=True
  ):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- against PyTorch itself (optional extra: pip install -e ".[torch]") ----


def _torch():
  return import_torch()


def _bn_vars(torch_bn):
  return interop.from_torch(torch_bn.state_dict(), {'': 'bn'})


def test_torch_bn_eval_and_train():
  torch = _torch()
  torch.manual_seed(0)
  tbn = torch.nn.BatchNorm2d(6, momentum=0.1)
  with torch.no_grad():
    tbn.weight.normal_(), tbn.bias.normal_()
    tbn.running_mean.normal_(), tbn.running_var.uniform_(0.5, 2)
  v = _bn_vars(tbn)
  v = {'params': v['params']['bn'], 'batch_stats': v['batch_stats']['bn']}
  x_nchw = torch.randn(8, 6, 5, 5) * 3 + 2
  x = interop.nchw_to_nhwc(x_nchw)
  m = interop.momentum_from_torch(tbn.momentum)
  bn = bnjax.linen.BatchNorm(momentum=m, epsilon=tbn.eps)

  tbn.eval()
  y_t = tbn(x_nchw).detach().numpy()
  y = bn.apply(v, x, use_running_average=True)
  np.testing.assert_allclose(interop.nhwc_to_nchw(y), y_t, atol=1e-5, rtol=1e-5)

  tbn.train()
  old_var = v['batch_stats']['var']
  before = np.array(v['batch_stats']['mean'])
  y_t = tbn(x_nchw).detach().numpy()
  y, upd = bn.apply(v, x, use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(interop.nhwc_to_nchw(y), y_t, atol=1e-5, rtol=1e-5)
  # Regression: converted arrays once aliased the tensors' memory, so torch's
  # in-place update changed them.
  np.testing.assert_array_equal(v['batch_stats']['mean'], before)
  new = upd['batch_stats']
  np.testing.assert_allclose(
    new['mean'], tbn.running_mean.numpy(), atol=1e-5, rtol=1e-5
  )
  # torch averages the unbiased batch variance: its batch term is n/(n-1)
  # times ours (documented in bnjax.interop).
  n = 8 * 5 * 5
  torch_rule = m * old_var + (new['var'] - m * old_var) * n / (n - 1)
  np.testing.assert_allclose(
    torch_rule, tbn.running_var.numpy(), atol=1e-5, rtol=1e-5
  )
  assert int(tbn.num_batches_tracked) == 1


class _FlaxNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name='conv1')(x)
    x = bnjax.linen.BatchNorm(
      use_running_average=not train, momentum=0.9, name='bn1'
    )(x)
    x = nn.relu(x)
    x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name='conv2')(x)
    x = bnjax.linen.BatchNorm(
      use_running_average=not train, momentum=0.9, name='bn2'
    )(x)
    x = nn.relu(x).mean((1, 2))
    return nn.Dense(3, name='fc')(x)


def _torch_net(torch):
  return torch.nn.Sequential(
    torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
    torch.nn.BatchNorm2d(8),
    torch.nn.ReLU(),
    torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
    torch.nn.BatchNorm2d(8),
    torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1),
    torch.nn.Flatten(),
    torch.nn.Linear(8, 3),
  )


def test_torch_conv_net_with_bn(tmp_path):
  torch = _torch()
  torch.manual_seed(0)
  net = _torch_net(torch)
  x_nchw = torch.randn(4, 3, 6, 6)
  net.train()
  net(x_nchw)  # move the running stats off their initial values
  path = tmp_path / 'net.pt'
  torch.save(net.state_dict(), path)

  sd = interop.load_state_dict(path)  # weights_only=True
  v = interop.from_torch(sd, {'1': 'bn1', '4': 'bn2'})
  v['params'].update(
    conv1={'kernel': interop.conv_kernel_from_torch(sd['0.weight'])},
    conv2={'kernel': interop.conv_kernel_from_torch(sd['3.weight'])},
    fc={
      'kernel': interop.dense_kernel_from_torch(sd['8.weight']),
      'bias': jnp.asarray(sd['8.bias']),
    },
  )
  x = interop.nchw_to_nhwc(x_nchw)
  net.eval()
  np.testing.assert_allclose(
    _FlaxNet().apply(v, x, False),
    net(x_nchw).detach().numpy(),
    atol=1e-5,
    rtol=1e-5,
  )
  net.train()
  y_t = net(x_nchw).detach().numpy()
  y, upd = _FlaxNet().apply(v, x, True, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_t, atol=1e-5, rtol=1e-5)
  back = interop.to_torch(
    {'params': v['params'], 'batch_stats': upd['batch_stats']},
    {'1': 'bn1', '4': 'bn2'},
  )
  for k in ('1.running_mean', '4.running_mean'):
    np.testing.assert_allclose(
      back[k], net.state_dict()[k].numpy(), atol=1e-5, rtol=1e-5
    )


# Hardening (each of these once passed silently or crashed).


def test_to_torch_returns_owned_writable_copies():
  v = interop.from_torch(_model_state(), LAYERS)
  before = np.array(v['batch_stats']['BatchNorm_0']['mean'])
  out = interop.to_torch(v, LAYERS)
  for arr in out.values():
    assert arr.flags.writeable and arr.flags.owndata
  out['bn1.running_mean'] += 1.0  # what torch's in-place update does
  np.testing.assert_array_equal(v['batch_stats']['BatchNorm_0']['mean'], before)


@pytest.mark.parametrize('c', [3, 64, 1024])
def test_from_torch_owns_its_arrays_changing_the_source_changes_nothing(c):
  """Regression: jnp.asarray of an aligned NumPy array may alias it on CPU,
  so a NumPy state dict changed after from_torch changed the variables."""
  sd = {k: aligned(a) for k, a in _one_layer(c=c).items()}
  v = interop.from_torch(sd)
  for a in sd.values():
    a[...] = 9
  np.testing.assert_array_equal(v['batch_stats']['bn']['var'], np.ones(c))
  np.testing.assert_array_equal(v['params']['bn']['scale'], np.ones(c))
  np.testing.assert_array_equal(v['batch_stats']['bn']['mean'], np.arange(c))


def test_to_torch_then_torch_training_leaves_jax_state_alone():
  torch = _torch()
  v = interop.from_torch(_model_state(), LAYERS)
  before = np.array(v['batch_stats']['BatchNorm_0']['mean'])
  tbn = torch.nn.BatchNorm1d(4)
  sd = {
    k[len('bn1.') :]: torch.from_numpy(a)
    for k, a in interop.to_torch(v, {'bn1': 'BatchNorm_0'}).items()
  }
  tbn.load_state_dict(sd, assign=True)
  tbn.train()
  tbn(torch.randn(8, 4) + 5)  # in-place running-stat update
  assert not np.allclose(tbn.running_mean.numpy(), before)
  np.testing.assert_array_equal(v['batch_stats']['BatchNorm_0']['mean'], before)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_half_precision_torch_tensors_and_files(tmp_path, dtype):
  torch = _torch()
  tbn = torch.nn.BatchNorm1d(3).to(getattr(torch, dtype))
  with torch.no_grad():
    tbn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    tbn.running_var.copy_(torch.tensor([1.5, 0.25, 3.0]))
  expect = tbn.running_mean.float().numpy()
  v = interop.from_torch(tbn.state_dict(), {'': 'bn'})
  np.testing.assert_array_equal(v['batch_stats']['bn']['mean'], expect)
  path = tmp_path / 'bn.pt'
  torch.save(tbn.state_dict(), path)
  v = interop.from_torch(path, {'': 'bn'})
  np.testing.assert_array_equal(
    v['batch_stats']['bn']['var'], tbn.running_var.float().numpy()
  )
  assert v['batch_stats']['bn']['var'].dtype == jnp.float32


def _bad(mutate):
  sd = _model_state()
  mutate(sd)
  return sd


@pytest.mark.parametrize(
  'mutate, match',
  [
    (
      lambda sd: sd.update({'bn1.bias': np.zeros(3, np.float32)}),
      r"1-D vectors of one length.*'bn1.bias': \(3,\)",
    ),
    (
      lambda sd: sd.update({'bn1.running_var': np.ones((4, 1), np.float32)}),
      r"'bn1.running_var': \(4, 1\)",
    ),
    (
      lambda sd: sd['bn1.running_var'].__setitem__(2, np.nan),
      r"'bn1.running_var' has non-finite values at channels \[2\]",
    ),
    (
      lambda sd: sd['layer1.0.bn.running_mean'].__setitem__(0, np.inf),
      r"'layer1.0.bn.running_mean' has non-finite values at channels \[0\]",
    ),
    (
      lambda sd: sd['bn1.running_var'].__setitem__(1, -0.5),
      r"'bn1.running_var' is negative at channels \[1\]",
    ),
    (
      lambda sd: sd.pop('bn1.weight'),
      r"'bn1.bias' is present but 'bn1.weight' is missing",
    ),
  ],
)
def test_from_torch_rejects_invalid_state_naming_the_key(mutate, match):
  with pytest.raises(ValueError, match=match) as e:
    interop.from_torch(_bad(mutate), LAYERS)
  assert 'nothing was converted' in str(e.value)


def test_from_torch_reports_every_problem_at_once():
  def both(sd):
    sd['bn1.running_var'][0] = -1.0
    sd['layer1.0.bn.weight'][1] = np.nan

  with pytest.raises(ValueError) as e:
    interop.from_torch(_bad(both), LAYERS)
  assert 'bn1.running_var' in str(e.value)
  assert 'layer1.0.bn.weight' in str(e.value)


def test_from_torch_rejects_two_layers_on_one_target():
  with pytest.raises(
    ValueError,
    match="'bn1' and 'layer1.0.bn' both map to the Flax path 'BatchNorm_0'",
  ):
    interop.from_torch(
      _model_state(), {'bn1': 'BatchNorm_0', 'layer1.0.bn': 'BatchNorm_0'}
    )


def test_from_torch_layers_must_be_a_mapping():
  with pytest.raises(
    TypeError,
    match=r'layers must map torch prefixes to '
    r"Flax paths, got list \['bn1'\]; pass e.g. \{'bn1'",
  ):
    interop.from_torch(_model_state(), ['bn1'])


# ------------------------------------------- issue 29: interop defects ---


def _one_layer(prefix='bn', c=3, **extra):
  sd = {
    f'{prefix}.weight': np.ones(c, np.float32),
    f'{prefix}.bias': np.zeros(c, np.float32),
    f'{prefix}.running_mean': np.arange(c, dtype=np.float32),
    f'{prefix}.running_var': np.ones(c, np.float32),
    f'{prefix}.num_batches_tracked': np.array(5),
  }
  return {**sd, **extra}


def test_a_buffer_named_like_running_mean_is_not_a_layer():
  """Regression: 'encoder.ema_running_mean' made 'encoder.ema_' a BatchNorm
  prefix, and from_torch raised KeyError on a valid state dict."""
  sd = _one_layer(**{'encoder.ema_running_mean': np.zeros(3, np.float32)})
  assert interop.bn_prefixes(sd) == ['bn']
  assert list(interop.from_torch(sd)['batch_stats']) == ['bn']


@pytest.mark.parametrize(
  'value, match',
  [
    (['a', 'b', 'c'], r"entry 'bn.running_mean' has dtype <U1"),
    ({'x': np.zeros(3)}, r"entry 'bn.running_mean' is itself a mapping"),
    (
      object(),
      r"entry 'bn.running_mean' \(object\) is not an array|"
      r"entry 'bn.running_mean' has dtype object",
    ),
  ],
)
def test_non_array_entries_name_their_key(value, match):
  with pytest.raises(TypeError, match=match):
    interop.from_torch(_one_layer(**{'bn.running_mean': value}))


def test_a_nested_checkpoint_says_where_the_state_dict_is():
  """A Lightning-style {'state_dict': ...} checkpoint said 'found no
  BatchNorm layer' with no hint at the nesting."""
  with pytest.raises(TypeError, match=r"pass checkpoint\['state_dict'\]"):
    interop.from_torch({'state_dict': _one_layer(), 'epoch': np.array(3)})


@pytest.mark.parametrize('content', [b'', b'PK\x03\x04garbage'])
@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_truncated_files_name_the_path(tmp_path, content, suffix):
  path = tmp_path / f'model{suffix}'
  path.write_bytes(content)
  with pytest.raises(
    ValueError,
    match=rf'cannot read .*model\{suffix}.*'
    'is the file complete',
  ):
    interop.from_torch(path)


def test_a_missing_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    interop.load_state_dict(tmp_path / 'nope.npz')


@pytest.mark.parametrize(
  'dtype, match',
  [
    ('bogus', "dtype='bogus' is not a dtype"),
    (jnp.int32, 'dtype=int32 must be a floating dtype'),
  ],
)
def test_from_torch_dtype_must_be_floating(dtype, match):
  with pytest.raises(TypeError, match=match):
    interop.from_torch(_one_layer(), dtype=dtype)


@pytest.mark.parametrize('path', [None, 1.5, [('a',)], {'a': 1}])
def test_layer_paths_of_the_wrong_type_name_the_prefix(path):
  with pytest.raises(
    TypeError,
    match=r"the Flax path of 'bn' must be a "
    'string',
  ):
    interop.from_torch(_one_layer(), {'bn': path})


def test_a_complex_running_mean_keeps_its_imaginary_part():
  mean = np.array([1 + 2j, 3 - 1j], np.complex64)
  v = interop.from_torch(_one_layer(c=2, **{'bn.running_mean': mean}))
  np.testing.assert_array_equal(v['batch_stats']['bn']['mean'], mean)
  with pytest.raises(ValueError, match="'bn.running_var' is complex"):
    interop.from_torch(_one_layer(c=2, **{'bn.running_var': mean}))


@pytest.mark.parametrize(
  'field, value, match',
  [
    (
      'mean',
      np.nan,
      r"'bn.running_mean' has non-finite values at channels "
      r'\[1\]',
    ),
    ('var', -1.0, r"'bn.running_var' is negative at channels \[1\]"),
    ('mean', 1j, r"'bn.running_mean' is complex; this state is real"),
  ],
)
def test_to_torch_validates_what_it_exports(field, value, match):
  v = interop.from_torch(_one_layer())
  bad = np.asarray(v['batch_stats']['bn'][field]).astype(
    np.complex64 if isinstance(value, complex) else np.float32
  )
  bad[1] = value
  v['batch_stats']['bn'][field] = bad
  with pytest.raises(ValueError, match=match):
    interop.to_torch(v, {'bn': 'bn'})


def test_to_torch_writes_back_the_batch_counts():
  sd = _one_layer()
  v = interop.from_torch(sd)
  counts = interop.batches_tracked(sd)
  assert counts == {'bn': 5}
  back = interop.to_torch(v, {'bn': 'bn'}, num_batches_tracked=counts)
  assert int(back['bn.num_batches_tracked']) == 5


def test_nnx_model_with_list_held_layers_round_trips():
  """Regression (jax-ml/bonsai's ResNet): from_torch gave string keys like
  '0' where nnx list indices are ints, so merging into nnx.state failed
  with KeyError: '0'; to_torch on that state named the wrong level."""
  from flax import nnx

  import bnjax.nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.bn0 = bnjax.nnx.BatchNorm(3, rngs=rngs)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([Block(rngs), Block(rngs)])

  sd = {**_one_layer('blocks.0.bn0'), **_one_layer('blocks.1.bn0')}
  sd['blocks.1.bn0.running_mean'] = np.array([7.0, 8.0, 9.0], np.float32)
  to_pure = getattr(nnx, 'to_pure_dict', lambda s: s.to_pure_dict())
  model = Net(nnx.Rngs(0))
  v = interop.from_torch(sd)
  state = nnx.state(model)
  pure = to_pure(state)
  for coll in ('batch_stats', 'params'):
    for i in (0, 1):
      pure['blocks'][i]['bn0'].update(v[coll]['blocks'][i]['bn0'])
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  np.testing.assert_array_equal(model.blocks[1].bn0.mean[...], [7.0, 8.0, 9.0])
  # Back: the nnx state read as flax variables, with int list indices.
  pure = to_pure(nnx.state(model))
  tree = {'batch_stats': pure, 'params': pure}
  layers = {f'blocks.{i}.bn0': f'blocks/{i}/bn0' for i in (0, 1)}
  back = interop.to_torch(
    tree, layers, num_batches_tracked=interop.batches_tracked(sd)
  )
  for k, a in sd.items():
    np.testing.assert_array_equal(back[k], a, err_msg=k)
  with pytest.raises(
    KeyError,
    match=r"at blocks/0 there is no 'bn1', only "
    r"\['bn0'\]",
  ):
    interop.to_torch(tree, {'x': 'blocks/0/bn1'})
