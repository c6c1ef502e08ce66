r"""Folding inference-mode BN into the Dense or Conv before it.

In inference mode BN is a per-channel affine map, so a linear layer followed
by BN is one linear layer:

.. math::
  \mathrm{BN}(x * W + b)
    = x * (W \odot m) + (b - \mu)\, m + \beta, \qquad
  m = \gamma\, (\sigma^2 + \epsilon)^{-1/2},

with :math:`m` broadcast along the kernel's output (last) axis. Flax has no
counterpart of PyTorch's ``torch.nn.utils.fuse_conv_bn_eval``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _checks, _running
from bnjax._types import BatchStats, RunningStats

Array = jax.Array


def fold(
  kernel: Array,
  bias: Array | None,
  batch_stats: RunningStats | Any,
  scale: Array | None = None,
  bn_bias: Array | None = None,
  *,
  epsilon: float = 1e-5,
) -> tuple[Array, Array]:
  """The ``(kernel, bias)`` of a Dense or Conv with inference-mode BN folded in.

  Args:
    kernel: a Flax Dense or Conv kernel, output features on the last axis
      (``(in, out)`` or ``(*window, in, out)``).
    bias: that layer's bias of shape ``(out,)``, or None (``use_bias=False``).
    batch_stats: the BN layer's running statistics: a ``bnjax.BatchStats``
      (or another bnjax state type), or a Flax ``{'mean', 'var'}`` mapping.
    scale: the BN layer's ``scale``, or None where it has none
      (``use_scale=False``).
    bn_bias: the BN layer's ``bias``, or None (``use_bias=False``).
    epsilon: the BN layer's epsilon.

  Returns:
    ``(kernel, bias)`` in the kernel's dtype (arithmetic at least float32),
    for a layer with ``use_bias=True``: its output equals the original
    layer's followed by BN with ``use_running_average=True``.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> stats = bnjax.BatchStats(jnp.array([1.0, 2.0]), jnp.array([4.0, 1.0]))
    >>> k, b = bnjax.fold(jnp.ones((3, 2)), None, stats, epsilon=1e-12)
    >>> k[0], b
    (Array([0.5, 1. ], dtype=float32), Array([-0.5, -2. ], dtype=float32))
  """
  fn = 'bnjax.fold'
  kernel = _checks.check_floating(fn, kernel, 'kernel')
  if kernel.ndim < 2:
    raise ValueError(
      f'{fn}: kernel must have at least 2 axes (inputs, outputs), got shape '
      f'{tuple(kernel.shape)}; pass a Dense or Conv kernel'
    )
  if isinstance(batch_stats, dict) and set(batch_stats) == {'mean', 'var'}:
    batch_stats = BatchStats(**batch_stats)
  lay = _checks.layout(fn, kernel, -1, 'kernel')
  _checks.check_stats(fn, batch_stats, lay, _running.STATE_TYPES)
  _checks.check_running_values(fn, batch_stats)
  bias = _checks.check_per_channel(fn, 'bias', bias, lay, real=True)
  scale = _checks.check_per_channel(fn, 'scale', scale, lay, real=True)
  bn_bias = _checks.check_per_channel(fn, 'bn_bias', bn_bias, lay, real=True)
  _checks.check_hyper(fn, 0.0, epsilon)
  pop = _running.population_stats(batch_stats)
  f = jnp.promote_types(kernel.dtype, jnp.float32)
  m = lax.rsqrt(pop.var.astype(f) + epsilon)
  if scale is not None:
    m = m * scale.astype(f)
  b = -pop.mean.astype(f) if bias is None else bias.astype(f) - pop.mean
  b = b * m
  if bn_bias is not None:
    b = b + bn_bias.astype(f)
  out_dtype = kernel.dtype
  return (kernel.astype(f) * m).astype(out_dtype), b.astype(out_dtype)
