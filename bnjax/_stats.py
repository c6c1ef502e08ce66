r"""Per-channel moments: local partial statistics and their count-weighted merge.

A partial is ``(count, mean, m2)`` with ``m2 = sum((x - mean)**2)``. Partials
from shards merge exactly with Chan et al.'s formula

.. math::
  N = \sum_i n_i, \quad \mu = \sum_i n_i \mu_i / N, \quad
  M_2 = \sum_i M_{2,i} + \sum_i n_i (\mu_i - \mu)^2,

whose terms are all non-negative, so no cancellation occurs however far apart
the shard means are.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._checks import Layout


class Partial(NamedTuple):
  """Per-channel partial moments. ``count`` is a scalar or per-channel."""

  count: jax.Array
  mean: jax.Array
  m2: jax.Array


def stats_dtype(dtype) -> jnp.dtype:
  """Statistics are at least float32 (half-precision input is promoted)."""
  return jnp.promote_types(dtype, jnp.float32)


def local_partial(x: jax.Array, lay: Layout, mask: jax.Array | None,
                  fast: bool) -> Partial:
  """Exact per-channel partial moments of x over ``lay.reduction_axes``.

  Without a mask and with ``fast=True`` this is one pass over x: two sums of
  ``d = x - s`` and ``d**2`` around a per-channel shift ``s`` taken from the
  data itself. The textbook ``E[x^2] - E[x]^2`` (flax's fast variance) loses
  all float32 precision once |mean|/std reaches 1e3 to 1e4; after the shift
  the cancellation is of order ``(mean - s)**2 / var``, which is O(1) for any
  sample s of the data. Otherwise it is two passes (mean, then centred sum).
  """
  f = stats_dtype(x.dtype)
  red = lay.reduction_axes
  if mask is None and fast:
    shift = lax.stop_gradient(_first_sample(x, lay).astype(f))
    # Two copies of the shift behind a barrier: otherwise CSE shares
    # d = x - shift between the two sums and XLA writes it out as a full-size
    # temporary; with distinct copies each sum is one fused read of x.
    shift1, shift2 = lax.optimization_barrier((shift, shift))
    d1 = x.astype(f) - lay.broadcast(shift1)
    d2 = x.astype(f) - lay.broadcast(shift2)
    s1 = jnp.sum(d1, red)
    s2 = jnp.sum(d2 * d2, red)
    n = jnp.asarray(lay.count, f)
    delta = s1 / n
    # s2 - s1**2/n can round below zero; clamp as flax does.
    m2 = jnp.maximum(s2 - s1 * delta, 0.0)
    return Partial(n, shift + delta, m2)
  if mask is None:
    n = jnp.asarray(lay.count, f)
    mean = jnp.sum(x.astype(f), red) / n
    d = x.astype(f) - lay.broadcast(mean)
    return Partial(n, mean, jnp.sum(d * d, red))
  m = jnp.broadcast_to(mask, x.shape)
  n = jnp.sum(m, red, dtype=f)
  safe_n = jnp.maximum(n, 1.0)
  mean = jnp.sum(jnp.where(m, x.astype(f), 0.0), red) / safe_n
  d = jnp.where(m, x.astype(f) - lay.broadcast(mean), 0.0)
  return Partial(n, mean, jnp.sum(d * d, red))


def _first_sample(x: jax.Array, lay: Layout) -> jax.Array:
  idx = tuple(slice(None) if i in lay.feature_axes else 0
              for i in range(x.ndim))
  return x[idx]


def merge(parts: Partial, axis: int = 0) -> Partial:
  """Count-weighted exact merge of partials stacked along ``axis``."""
  n_i, mean_i, m2_i = parts
  n = jnp.sum(n_i, axis)
  safe_n = jnp.maximum(n, 1.0)
  mean = jnp.sum(n_i * mean_i, axis) / safe_n
  dev = mean_i - jnp.expand_dims(mean, axis)
  m2 = jnp.sum(m2_i, axis) + jnp.sum(n_i * dev * dev, axis)
  return Partial(n, mean, m2)


def finalize(p: Partial) -> tuple[jax.Array, jax.Array]:
  """(mean, biased var). A channel with no values gets mean 0 and var 0."""
  var = p.m2 / jnp.maximum(p.count, 1.0)
  return p.mean, var
