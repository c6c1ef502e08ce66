"""Shared helpers of the synced-BN tests: mesh, sharding, the float64
global-batch oracle (tests/reference.py, independent of bnjax)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference as ref
from tests._helpers import randn

D, B, C = 8, 4, 3


def _mesh(n=D, name='d'):
  return Mesh(np.array(jax.devices()[:n]), (name,))


def _shard(x, mesh):
  return jax.device_put(x, NamedSharding(mesh, P(mesh.axis_names[0])))


def _problem(seed=0, loc=2.0, rows=D * B):
  x = randn((rows, C), loc=loc, scale=3.0, seed=seed)
  g = 1 + randn((C,), seed=seed + 1) ** 2
  b = randn((C,), seed=seed + 2)
  w = randn((rows, C), seed=seed + 3)
  stats = bnjax.BatchStats(jnp.asarray(randn((C,), seed=seed + 4)), jnp.ones(C))
  return x, g, b, w, stats


def _global(x, g, b, w, stats, mask=None):
  """Global-batch oracle: outputs, stats and gradients of float64 textbook
  BN (tests/reference.py), independent of bnjax, so a bug shared with
  bnjax's single-device path cannot hide here."""
  with jax.enable_x64(True):

    def loss(x, g, b):
      y, new = ref.jax_batch_norm_f64(
        x, stats.mean, stats.var, g, b, mask=mask, momentum=0.9
      )
      return jnp.mean(jnp.asarray(w, jnp.float64) * y), (y, new)

    grads, (y, new) = jax.grad(loss, (0, 1, 2), has_aux=True)(
      *(np.asarray(v, np.float64) for v in (x, g, b))
    )
    out = (
      np.asarray(y),
      bnjax.BatchStats(*map(np.asarray, new)),
      tuple(map(np.asarray, grads)),
    )
  return out


def _assert_same(got, want, rtol=2e-5, atol=2e-6):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=rtol, atol=atol
    ),
    got,
    want,
  )


def _shard_map_bn(mesh, stats, axis_name='d', mask_spec=None, **kw):
  def f(x, g, b, *m):
    return bnjax.batch_norm(
      x,
      stats,
      g,
      b,
      use_running_average=False,
      axis_name=axis_name,
      momentum=0.9,
      mask=m[0] if m else None,
      **kw,
    )

  specs = (P('d'), P(), P()) + ((mask_spec,) if mask_spec else ())
  return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=(P('d'), P()))
