"""A real model both ways: torchvision's ResNet-18 -> Flax (linen and nnx,
with bnjax BatchNorm) -> torch, and bnjax.fold on it (examples/resnet18.py).

Eval logits agree with torch's within 1e-4 relative; the converted-back state
dict loads into torch with strict=True and reproduces torch's logits exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bnjax import interop
from examples import resnet18 as R
from tests._helpers import import_torch

torch = import_torch()

CLASSES = 10


def _rel_close(y, ref, rel=1e-4):
  y, ref = np.asarray(y), np.asarray(ref)
  err = np.abs(y - ref).max() / np.abs(ref).max()
  assert err <= rel, f'max |diff| / max |ref| = {err:.2e} > {rel}'


@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  net = R.torch_resnet18(CLASSES)
  with torch.no_grad():  # non-trivial BN state everywhere
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(7)
  return net.eval()


@pytest.fixture(scope='module')
def x():
  g = torch.Generator().manual_seed(1)
  return torch.randn(4, 3, 64, 64, generator=g)


def _logits(net, x):
  with torch.no_grad():
    return net(x).numpy()


def _torchvision_resnet18_keys(classes):
  """torchvision.models.resnet18's state-dict names and shapes, written
  from its architecture (torchvision itself cannot import beside this CPU
  torch build: PyPI's torchvision is a CUDA build)."""
  keys = {'conv1.weight': (64, 3, 7, 7)}

  def bn(prefix, c):
    keys.update(
      {
        f'{prefix}.{n}': (c,)
        for n in ('weight', 'bias', 'running_mean', 'running_var')
      }
    )
    keys[f'{prefix}.num_batches_tracked'] = ()

  bn('bn1', 64)
  cin = 64
  for i, c in enumerate((64, 128, 256, 512), 1):
    for j in range(2):
      p = f'layer{i}.{j}'
      keys[f'{p}.conv1.weight'] = (c, cin if j == 0 else c, 3, 3)
      bn(f'{p}.bn1', c)
      keys[f'{p}.conv2.weight'] = (c, c, 3, 3)
      bn(f'{p}.bn2', c)
      if j == 0 and i > 1:
        keys[f'{p}.downsample.0.weight'] = (c, cin, 1, 1)
        bn(f'{p}.downsample.1', c)
    cin = c
  keys.update({'fc.weight': (classes, 512), 'fc.bias': (classes,)})
  return keys


def test_plain_torch_model_has_torchvisions_state_dict():
  ours = {
    k: tuple(v.shape)
    for k, v in R._plain_torch_resnet18(CLASSES).state_dict().items()
  }
  assert ours == _torchvision_resnet18_keys(CLASSES)
  try:  # and against torchvision itself, where it imports
    import torchvision

    ref = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
  except Exception:  # noqa: BLE001, S110  # absent, or a CUDA build
    return
  assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == ours


def test_linen_eval_logits_match_torch(torch_model, x):
  v = R.from_torch(torch_model.state_dict())
  y = R.ResNet18(CLASSES).apply(v, interop.nchw_to_nhwc(x), train=False)
  _rel_close(y, _logits(torch_model, x))


def test_nnx_eval_logits_match_torch(torch_model, x):
  model = R.nnx_from_variables(R.from_torch(torch_model.state_dict()), CLASSES)
  model.eval()
  y = nnx.jit(lambda m, x: m(x))(model, interop.nchw_to_nhwc(x))
  _rel_close(y, _logits(torch_model, x))


@pytest.mark.parametrize('frontend', ['linen', 'nnx'])
def test_back_to_torch_strict_and_same_logits(torch_model, x, frontend):
  v = R.from_torch(torch_model.state_dict())
  if frontend == 'nnx':
    v = R.nnx_variables(R.nnx_from_variables(v, CLASSES))
  sd = R.to_torch(v)
  fresh = R.torch_resnet18(CLASSES)
  fresh.load_state_dict(
    {k: torch.from_numpy(a) for k, a in sd.items()}, strict=True
  )
  fresh.eval()
  np.testing.assert_array_equal(_logits(fresh, x), _logits(torch_model, x))
  for k, t in torch_model.state_dict().items():
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(sd[k], t.numpy(), err_msg=k)


def test_train_mode_matches_torch(torch_model, x):
  # One training-mode forward: batch statistics in every BN layer.
  v = R.from_torch(torch_model.state_dict())
  y, upd = R.ResNet18(CLASSES).apply(
    v, interop.nchw_to_nhwc(x), train=True, mutable=['batch_stats']
  )
  net = R.torch_resnet18(CLASSES)
  net.load_state_dict(torch_model.state_dict())
  net.train()
  with torch.no_grad():
    y_t = net(x).numpy()
  _rel_close(y, y_t)
  back = R.to_torch({'params': v['params'], 'batch_stats': upd['batch_stats']})
  for k, t in net.state_dict().items():
    if k.endswith('running_mean'):
      np.testing.assert_allclose(
        back[k], t.numpy(), rtol=1e-4, atol=1e-5, err_msg=k
      )


def test_fold_keeps_logits(torch_model, x):
  v = R.from_torch(torch_model.state_dict())
  xj = interop.nchw_to_nhwc(x)
  y = R.ResNet18(CLASSES).apply(v, xj, train=False)
  folded = R.fold_variables(v)
  assert 'batch_stats' not in folded
  y_f = R.ResNet18(CLASSES, fold=True).apply(folded, xj, train=False)
  _rel_close(y_f, y)
  _rel_close(y_f, _logits(torch_model, x))
  # and it agrees with torch's own fusion
  from torch.nn.utils.fusion import fuse_conv_bn_eval

  fused = fuse_conv_bn_eval(
    torch_model.layer2[0].conv1, torch_model.layer2[0].bn1
  )
  k = folded['params']['layer2_0']['conv1']
  np.testing.assert_allclose(
    k['kernel'],
    interop.conv_kernel_from_torch(fused.weight),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    k['bias'], fused.bias.detach().numpy(), rtol=1e-5, atol=1e-6
  )
  assert jnp.asarray(k['kernel']).dtype == jnp.float32


@pytest.mark.heavy
def test_equinox_resnet18_reproduces_torch_both_ways(torch_model, x):
  """The Equinox ResNet-18 (examples/resnet18_equinox.py, per-example
  convention): torch's eval logits and train-mode logits and running means,
  and back to a torch state dict that loads strictly with the same logits."""
  eqx = pytest.importorskip(
    'equinox', reason='needs the equinox extra: pip install "bnjax[equinox]"'
  )
  from examples import resnet18_equinox as E

  model, state = E.make(jax.random.key(0), CLASSES)
  model, state = E.from_torch(model, state, torch_model.state_dict())
  xs = jnp.asarray(x.numpy())
  y, _ = eqx.filter_jit(E.logits)(eqx.nn.inference_mode(model), state, xs)
  _rel_close(y, _logits(torch_model, x))
  sd = E.to_torch(model, state)
  fresh = R.torch_resnet18(CLASSES)
  fresh.load_state_dict(
    {k: torch.from_numpy(np.array(a)) for k, a in sd.items()}, strict=True
  )
  fresh.eval()
  np.testing.assert_array_equal(_logits(fresh, x), _logits(torch_model, x))
  # Train mode: batch statistics in every layer, torch's running means.
  y, new = eqx.filter_jit(E.logits)(model, state, xs)
  net = R.torch_resnet18(CLASSES)
  net.load_state_dict(torch_model.state_dict())
  net.train()
  with torch.no_grad():
    _rel_close(y, net(x).numpy())
  back = E.to_torch(model, new)
  for k, t in net.state_dict().items():
    if k.endswith('running_mean'):
      np.testing.assert_allclose(
        back[k], t.numpy(), rtol=1e-4, atol=1e-5, err_msg=k
      )
