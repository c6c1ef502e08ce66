"""PyTorch's BatchNorm semantics tests (test/test_nn.py, torch 2.13), ported.

Each test names the PyTorch test it mirrors. PyTorch's assertions compare
torch against itself; here the same scenario runs through bnjax and is
compared against ``torch.nn.BatchNorm*`` as the oracle, with the two
documented convention changes applied: Flax's momentum is ``1 - p``, and
torch's running variance averages the unbiased batch variance (``n/(n-1)``
times bnjax's). Deliberate differences are listed in tests/peer/conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import interop
from tests._helpers import import_torch

torch = import_torch()


def _bn_stats(tbn):
  return bnjax.BatchStats(
    jnp.asarray(tbn.running_mean.numpy()), jnp.asarray(tbn.running_var.numpy())
  )


def _unbiased_to_biased(v_torch_batch, n):
  return v_torch_batch * (n - 1) / n


def test_batchnorm_simple_average():
  # torch: momentum=None keeps the simple average of the batch statistics;
  # resetting and feeding two batches gives the mean of the two runs' stats.
  torch.manual_seed(0)
  t = torch.nn.BatchNorm1d(3, momentum=None)
  d1, d2 = torch.rand(4, 3), torch.rand(4, 3)
  t(d1), t(d2)
  s = bnjax.init_cumulative_stats(3)
  for d in (d1, d2):
    _, s = bnjax.batch_norm(
      jnp.asarray(d.numpy()), s, use_running_average=False
    )
  np.testing.assert_allclose(s.mean, t.running_mean.numpy(), rtol=1e-6)
  m1, m2 = d1.mean(0), d2.mean(0)
  np.testing.assert_allclose(s.mean, ((m1 + m2) / 2).numpy(), rtol=1e-6)
  v = (d1.var(0, unbiased=False) + d2.var(0, unbiased=False)) / 2
  np.testing.assert_allclose(s.var, v.numpy(), rtol=1e-5)
  np.testing.assert_allclose(
    s.var, _unbiased_to_biased(t.running_var.numpy(), 4), rtol=1e-5
  )
  np.testing.assert_array_equal(s.count, int(t.num_batches_tracked))
  assert int(t.num_batches_tracked) == 2


def test_batchnorm_update_stats():
  # torch: running_mean = (1 - p) old + p batch_mean; eval leaves it.
  torch.manual_seed(1)
  t = torch.nn.BatchNorm2d(4, momentum=0.3)
  x = torch.randn(6, 4, 3, 3) * 2 + 1
  s0 = _bn_stats(t)
  t.train()
  y_t = t(x).detach().numpy()
  xj = interop.nchw_to_nhwc(x.numpy())
  y, s = bnjax.batch_norm(
    xj, s0, use_running_average=False, momentum=interop.momentum_from_torch(0.3)
  )
  np.testing.assert_allclose(interop.nhwc_to_nchw(y), y_t, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    s.mean, t.running_mean.numpy(), rtol=1e-6, atol=1e-7
  )
  n = 6 * 9
  batch_var = x.var((0, 2, 3), unbiased=False).numpy()
  np.testing.assert_allclose(s.var, 0.7 * 1.0 + 0.3 * batch_var, rtol=1e-5)
  np.testing.assert_allclose(
    t.running_var.numpy(), 0.7 + 0.3 * batch_var * n / (n - 1), rtol=1e-5
  )
  t.eval()
  before = t.running_mean.clone()
  t(x)
  _, s2 = bnjax.batch_norm(xj, s, use_running_average=True)
  assert torch.equal(before, t.running_mean)
  jax.tree.map(np.testing.assert_array_equal, s2, s)


def test_batchnorm_raises_error_if_less_than_one_value_per_channel():
  # torch raises ValueError for (1, 10) in training; so does bnjax's
  # functional API (its modules follow flax instead: see conftest.py).
  with pytest.raises(ValueError):
    torch.nn.BatchNorm1d(10)(torch.randn(1, 10))
  with pytest.raises(ValueError, match='more than one value per channel'):
    bnjax.batch_norm(
      jnp.ones((1, 10)), bnjax.init_batch_stats(10), use_running_average=False
    )


@pytest.mark.parametrize(
  'arg', ['running_mean', 'running_var', 'weight', 'bias']
)
def test_batchnorm_raises_error_if_arg_is_not_same_size_as_input(arg):
  # torch's four test_batchnorm_raises_error_if_*_is_not_same_size_as_input.
  x = torch.rand(2, 10)
  args = dict(
    running_mean=torch.rand(10),
    running_var=torch.rand(10),
    weight=torch.rand(10),
    bias=torch.rand(10),
  )
  args[arg] = torch.rand(11)
  with pytest.raises(RuntimeError):
    torch.nn.functional.batch_norm(
      x,
      args['running_mean'],
      args['running_var'],
      args['weight'],
      args['bias'],
      training=True,
    )
  j = {k: jnp.asarray(v.numpy()) for k, v in args.items()}
  name = {
    'running_mean': 'batch_stats.mean',
    'running_var': 'batch_stats.var',
    'weight': 'scale',
    'bias': 'bias',
  }[arg]
  with pytest.raises(ValueError, match=rf'{name} has shape \(11,\)'):
    bnjax.batch_norm(
      jnp.asarray(x.numpy()),
      bnjax.BatchStats(j['running_mean'], j['running_var']),
      j['weight'],
      j['bias'],
      use_running_average=False,
    )


def test_batchnorm_eval():
  # torch: in eval mode two calls give equal outputs and equal gradients,
  # and the running statistics do not move.
  torch.manual_seed(2)
  t = torch.nn.BatchNorm1d(3).eval()
  with torch.no_grad():
    t.running_mean.normal_(), t.running_var.uniform_(0.5, 2)
  x = torch.rand(4, 3, requires_grad=True)
  ct = torch.rand(4, 3)
  y_t = t(x)
  (g_t,) = torch.autograd.grad(y_t, x, ct)
  s = _bn_stats(t)

  def f(x):
    return bnjax.batch_norm(x, s, use_running_average=True)

  xj, ctj = jnp.asarray(x.detach().numpy()), jnp.asarray(ct.numpy())
  (y1, s1), vjp = jax.vjp(f, xj)
  (y2, s2), _ = jax.vjp(f, xj)
  np.testing.assert_array_equal(y1, y2)
  for a, b in ((s1, s), (s2, s)):  # the running statistics do not move
    jax.tree.map(np.testing.assert_array_equal, a, b)
  (g,) = vjp((ctj, jax.tree.map(jnp.zeros_like, s)))
  np.testing.assert_allclose(y1, y_t.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g, g_t.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'shape', [(5, 3), (4, 3, 6), (3, 3, 4, 5), (2, 3, 2, 3, 2)]
)
def test_batchnorm_grad(shape):
  # torch's gradcheck of F.batch_norm in training mode (float64): bnjax's
  # gradients for x, weight and bias equal torch's autograd.
  r = np.random.default_rng(sum(shape))
  x = r.normal(size=shape) * 3 + 1
  w, b = r.normal(size=3), r.normal(size=3)
  ct = r.normal(size=shape)
  xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
  y_t = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
  g_t = torch.autograd.grad(y_t, (xt, wt, bt), torch.tensor(ct))
  with jax.enable_x64(True):

    def f(x, w, b):
      y, _ = bnjax.batch_norm(
        x,
        bnjax.init_batch_stats(3, jnp.float64),
        w,
        b,
        axis=1,
        use_running_average=False,
      )
      return jnp.sum(y * ct)

    g = jax.grad(f, (0, 1, 2))(*(jnp.asarray(a) for a in (x, w, b)))
  for a, b_ in zip(g, g_t, strict=True):
    np.testing.assert_allclose(a, b_.numpy(), rtol=1e-9, atol=1e-10)


def test_batchnorm_nhwc():
  # torch: channels_last gives the NCHW result; bnjax's NHWC does too.
  torch.manual_seed(3)
  t = torch.nn.BatchNorm2d(4)
  x = torch.randn(4, 4, 5, 5)
  y_t = t(x.contiguous(memory_format=torch.channels_last)).detach().numpy()
  y, _ = bnjax.batch_norm(
    interop.nchw_to_nhwc(x.numpy()),
    bnjax.init_batch_stats(4),
    use_running_average=False,
  )
  np.testing.assert_allclose(interop.nhwc_to_nchw(y), y_t, rtol=1e-5, atol=1e-5)


def test_batchnorm_large_batch():
  # torch: a batch of 2**16 examples (its CPU kernel switches algorithm).
  torch.manual_seed(4)
  x = torch.randn(2**16, 3, 2) * 5 + 3
  t = torch.nn.BatchNorm1d(3)
  y_t = t(x).detach().numpy()
  y, s = bnjax.batch_norm(
    jnp.asarray(x.numpy()),
    bnjax.init_batch_stats(3),
    axis=1,
    use_running_average=False,
    momentum=0.9,
  )
  np.testing.assert_allclose(y, y_t, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s.mean, t.running_mean.numpy(), rtol=1e-5)


def test_batchnorm_buffer_update_when_stats_are_not_tracked():
  # torch: track_running_stats=False normalizes with batch statistics in
  # eval too and keeps no buffers; in bnjax that is training mode with the
  # returned statistics discarded.
  torch.manual_seed(5)
  t = torch.nn.BatchNorm1d(3, track_running_stats=False).eval()
  assert t.running_mean is None
  x = torch.randn(8, 3)
  y, _ = bnjax.batch_norm(
    jnp.asarray(x.numpy()), bnjax.init_batch_stats(3), use_running_average=False
  )
  np.testing.assert_allclose(y, t(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_batchnorm_load_state_dict():
  # torch: a state dict round trip keeps every buffer; bnjax.interop's
  # round trip is bitwise, num_batches_tracked included.
  torch.manual_seed(6)
  t = torch.nn.BatchNorm2d(3)
  t(torch.randn(4, 3, 2, 2))
  v = interop.from_torch(t.state_dict(), {'': 'bn'})
  back = interop.to_torch(
    v, {'': 'bn'}, num_batches_tracked=int(t.num_batches_tracked)
  )
  fresh = torch.nn.BatchNorm2d(3)
  fresh.load_state_dict(
    {k: torch.from_numpy(a) for k, a in back.items()}, strict=True
  )
  for k, a in t.state_dict().items():
    assert torch.equal(a, fresh.state_dict()[k]), k
