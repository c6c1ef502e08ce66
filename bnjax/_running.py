"""Running-statistic updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._types import BatchStats


def ema(old: BatchStats, mean: jax.Array, var: jax.Array, momentum,
        valid: jax.Array | None = None) -> BatchStats:
  r"""Flax's exponential moving average of the batch statistics.

  .. math:: s_{t} = m \, s_{t-1} + (1 - m) \, b_t

  with ``m = momentum`` and ``b_t`` the batch mean or biased batch variance.
  PyTorch's momentum ``p`` is ``m = 1 - p``. Channels where ``valid`` is False
  (no unmasked values) keep their old statistics. The result carries no
  gradient and has the dtypes of ``old``.
  """
  def upd(o, b):
    b = lax.stop_gradient(b)
    new = momentum * o.astype(b.dtype) + (1 - momentum) * b
    if valid is not None:
      new = jnp.where(valid, new, o.astype(b.dtype))
    return new.astype(o.dtype)
  return BatchStats(upd(old.mean, mean), upd(old.var, var))
