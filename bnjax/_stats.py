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


# The one-pass variance s2/n - mean**2 has a float32 relative error of about
# (1 + mean**2/var) times that of a plain sum. Up to this ratio that is at
# most 9x the rounding of the exact two-pass, far inside the 1e-5 bar; beyond
# it the two-pass runs instead.
_ONE_PASS_MAX_RATIO = 8.0


def local_partial(x: jax.Array, lay: Layout, mask: jax.Array | None,
                  fast: bool) -> Partial:
  """Exact per-channel partial moments of x over ``lay.reduction_axes``.

  With ``fast=True`` and no mask, two plain reductions give ``sum(x)`` and
  ``sum(x**2)``. Where some channel has ``mean**2 > 8 var``, the textbook
  ``E[x^2] - E[x]^2`` (flax's fast variance, which loses all float32
  precision at |mean|/std of 1e3 to 1e4) is not trusted: a ``lax.cond`` runs
  the exact centred pass instead. Plain sums are what XLA:CPU reduces fastest
  (a fused per-channel subtraction halves its reduction speed), so typical
  activations pay nothing for exactness. (Under differentiation the core
  passes ``fast=False``: see ``_bn_train_jvp``.) ``fast=False`` and masks use
  the two-pass (mean, then centred sum of squares).
  """
  f = stats_dtype(x.dtype)
  red = lay.reduction_axes
  xf = x.astype(f)
  if mask is None:
    n = jnp.asarray(lay.count, f)
    mean = jnp.sum(xf, red) / n
    if not fast:
      return Partial(n, mean, _centred_m2(xf, mean, lay, barrier=True))
    # s2 - s1 * mean can round below zero; clamp as flax does.
    m2_fast = jnp.maximum(jnp.sum(xf * xf, red) - n * mean * mean, 0.0)
    inexact = jnp.any(mean * mean * n > _ONE_PASS_MAX_RATIO * m2_fast)
    m2 = lax.cond(inexact, lambda: _centred_m2(xf, mean, lay, barrier=False),
                  lambda: m2_fast)
    return Partial(n, mean, m2)
  m = jnp.broadcast_to(mask, x.shape)
  n = jnp.sum(m, red, dtype=f)
  safe_n = jnp.maximum(n, 1.0)
  mean = jnp.sum(jnp.where(m, xf, 0.0), red) / safe_n
  d = jnp.where(m, xf - lay.broadcast(mean), 0.0)
  return Partial(n, mean, jnp.sum(d * d, red))


def _centred_m2(xf, mean, lay: Layout, barrier: bool):
  if barrier:
    # A barrier copy of the mean, so that CSE cannot share x - mean with the
    # normalization pass (XLA would then write it out full-size).
    mean = lax.optimization_barrier(mean)
  d = xf - lay.broadcast(mean)
  return jnp.sum(d * d, lay.reduction_axes)


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
