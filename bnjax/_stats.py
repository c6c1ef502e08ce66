r"""Per-channel moments: local partial statistics and their count-weighted merge.

A partial is ``(count, shift, s1, m2)``: the moments of a channel's values
around a float32 ``shift`` (an estimate of their mean),

.. math::
  s_1 = \sum (x - K), \qquad \mu = K + s_1 / n, \qquad
  M_2 = \sum (x - \mu)^2 = \sum (x - K)^2 - s_1^2 / n .

This is the corrected two-pass of Chan, Golub & LeVeque (1983). The shift K
comes from a plain float32 sum, whose error depends on the order in which
XLA adds (it differs between JAX versions and between CPU, GPU and TPU).
The correction ``s1`` measures that error and removes it: the error of
``m2`` is ``eps * (1 + 3 (mu - K)**2 / var)``, so it is second order in the
shift's error, and ``mu = K + s1/n`` keeps the mean's low-order bits, which
a float32 mean alone rounds away (``ulp(1e4) / 2 = 5e-4``).

Partials merge (across shards, chunks or batches) with the same corrected
form around a common reference, so a merged result is as exact as one call
on the concatenated values, however close or far apart the parts' means are.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._checks import Layout


class Partial(NamedTuple):
  """Per-channel moments around ``shift`` (see the module docstring).

  ``count`` is a scalar or per-channel (with a mask); ``shift``, ``s1`` and
  ``m2`` have the feature shape.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  shift: jax.Array
  s1: jax.Array
  m2: jax.Array


def stats_dtype(dtype) -> jnp.dtype:
  """Statistics are at least float32 (half-precision input is promoted)."""
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
  """The real dtype of a (possibly complex) floating dtype: a variance's."""
  return jnp.finfo(dtype).dtype


# The one-pass variance s2/n - mean**2 has a float32 relative error of about
# (1 + mean**2/var) times that of a plain sum. Up to this ratio that is at
# most 9x the rounding of the exact two-pass, far inside the 1e-5 bar; beyond
# it the corrected two-pass runs instead.
_ONE_PASS_MAX_RATIO = 8.0


def local_partial(
  x: jax.Array, lay: Layout, mask: jax.Array | None, fast: bool
) -> Partial:
  """Exact per-channel partial moments of x over ``lay.reduction_axes``.

  With ``fast=True`` and no mask, two plain reductions give ``sum(x)`` and
  ``sum(x**2)``. Where some channel has ``mean**2 > 8 var``, the textbook
  ``E[x^2] - E[x]^2`` (flax's fast variance, which loses all float32
  precision at |mean|/std of 1e3 to 1e4) is not trusted: a ``lax.cond`` runs
  the corrected two-pass instead. Plain sums are what XLA:CPU reduces fastest
  (a fused per-channel subtraction halves its reduction speed), so typical
  activations pay nothing for exactness. ``fast=False`` and masks always
  take the corrected two-pass.
  """
  f = stats_dtype(x.dtype)
  red = lay.reduction_axes
  xf = x.astype(f)
  if mask is None:
    n = jnp.asarray(lay.count, f)
    if not fast:
      return corrected(xf, n, subset_shift(xf, lay), lay)
    shift = jnp.sum(xf, red) / n
    # s2 - s1 * mean can round below zero; clamp as flax does.
    m2_fast = jnp.maximum(jnp.sum(xf * xf, red) - n * shift * shift, 0.0)
    inexact = jnp.any(shift * shift * n > _ONE_PASS_MAX_RATIO * m2_fast)
    return lax.cond(
      inexact,
      lambda: corrected(xf, n, shift, lay),
      lambda: Partial(n, shift, jnp.zeros_like(shift), m2_fast),
    )
  m = jnp.broadcast_to(mask, x.shape)
  n = jnp.sum(m, red, dtype=f)
  shift = jnp.sum(jnp.where(m, xf, 0.0), red) / jnp.maximum(n, 1.0)
  return corrected(xf, n, shift, lay, mask=m)


def local_moments(
  x: jax.Array, lay: Layout, mask: jax.Array | None, fast: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Exact per-channel ``(count, mean, var)`` of x, unsynced.

  Where every channel has ``mean**2 <= 8 var`` these are flax's statistics,
  computed with the same jnp operations (``mean(x**2) - mean(x)**2`` with
  ``fast``, else ``mean((x - mean(x))**2)``; ``where=mask``), so such input
  gets flax's float32 results bit for bit. Elsewhere flax's lose precision
  (all of it at |mean|/std of 1e3 to 1e4), and a ``lax.cond`` runs the
  corrected two-pass instead (see :func:`local_partial`). A channel with no
  masked-in value gets mean 0 and var 0, where flax's gives NaN.
  """
  f = stats_dtype(x.dtype)
  red = lay.reduction_axes
  xf = x.astype(f)
  m = None if mask is None else jnp.broadcast_to(mask, x.shape)
  n = jnp.asarray(lay.count, f) if m is None else jnp.sum(m, red, dtype=f)
  mean = jnp.mean(xf, red, where=m)
  if fast:
    var = jnp.maximum(0.0, jnp.mean(xf * xf, red, where=m) - mean * mean)
  else:
    var = jnp.mean(jnp.square(xf - lay.broadcast(mean)), red, where=m)
  if m is not None:  # 0/0 in an empty channel
    mean, var = (jnp.where(n > 0, v, 0.0) for v in (mean, var))
  inexact = jnp.any(mean * mean > _ONE_PASS_MAX_RATIO * var)
  return (
    n,
    *lax.cond(
      inexact,
      lambda: finalize(corrected(xf, n, mean, lay, mask=m)),
      lambda: (mean, var),
    ),
  )


# The shift of the two-pass without a mask: the mean of the first 1/8 (or
# more) of the values. A subset holding a fraction f of the values has a mean
# within sqrt((1 - f) / f) std of the whole's (Cauchy-Schwarz), so
# |mean - shift| <= sqrt(7) std whatever the data, and the corrected two-pass
# error eps * (1 + 3 (mean - shift)**2 / var) stays below 22 eps. It reads
# 1/8 of x instead of all of it for a full mean.
_SUBSET = 8


def subset_shift(xf: jax.Array, lay: Layout) -> jax.Array:
  """Mean of the first ceil(size / 8) slices of the longest reduction axis."""
  ax = max(lay.reduction_axes, key=lambda a: xf.shape[a])
  k = -(-xf.shape[ax] // _SUBSET)
  sub = lax.slice_in_dim(xf, 0, k, axis=ax)
  return jnp.sum(sub, lay.reduction_axes) / (lay.count // xf.shape[ax] * k)


def corrected(
  xf: jax.Array,
  n: jax.Array,
  shift: jax.Array,
  lay: Layout,
  *,
  mask: jax.Array | None = None,
) -> Partial:
  """The corrected two-pass around any ``shift`` (exact to first order in it).

  ``n`` is the number of (masked-in) values per channel. Taking the shift as
  an argument lets tests feed a deliberately perturbed one.
  """
  # Two barrier copies of the shift: each reduction then fuses its own
  # x - shift and reads x once. With one copy XLA:CPU writes x - shift out
  # full-size for its two consumers (and CSE could share it with the
  # normalization pass).
  shifts = lax.optimization_barrier((shift, shift))
  d1, d2 = (xf - lay.broadcast(k) for k in shifts)
  if mask is not None:
    d1, d2 = (jnp.where(mask, d, 0.0) for d in (d1, d2))
  s1 = jnp.sum(d1, lay.reduction_axes)
  m2 = jnp.sum(d2 * d2, lay.reduction_axes) - s1 * s1 / jnp.maximum(n, 1.0)
  return Partial(n, shift, s1, jnp.maximum(m2, 0.0))


def merge(parts: Partial, axis: int = 0) -> Partial:
  r"""Count-weighted exact merge of partials stacked along ``axis``.

  With per-part means :math:`\mu_i = K_i + s_{1,i}/n_i` and a common float32
  reference K (the count-weighted mean of the :math:`K_i`), the deviations
  :math:`\delta_i = (K_i - K) + s_{1,i}/n_i` are small and exact (the
  difference of two close float32 numbers is exact), and

  .. math::
    M_2 = \sum_i M_{2,i} + \sum_i n_i (\delta_i - \Delta)^2
          - \big(\textstyle\sum_i n_i (\delta_i - \Delta)\big)^2 / N,
    \quad \Delta = \textstyle\sum_i n_i \delta_i / N,

  the corrected two-pass over the parts' means. Parts with no values weigh 0.
  The result is a partial around K with :math:`s_1 = N \Delta`.
  """
  count_i, shift_i, s1_i, m2_i = parts
  n = jnp.sum(count_i, axis)  # a count per part stays one count
  n_i = _expand_count(count_i, shift_i, axis)
  safe_n = jnp.maximum(jnp.sum(n_i, axis), 1.0)
  ref = jnp.sum(n_i * shift_i, axis) / safe_n
  delta = (shift_i - jnp.expand_dims(ref, axis)) + s1_i / jnp.maximum(n_i, 1.0)
  s1 = jnp.sum(n_i * delta, axis)
  e = delta - jnp.expand_dims(s1 / safe_n, axis)
  ne = n_i * e
  between = jnp.sum(ne * e, axis) - jnp.sum(ne, axis) ** 2 / safe_n
  m2 = jnp.sum(m2_i, axis) + jnp.maximum(between, 0.0)
  return Partial(n, ref, s1, m2)


def _expand_count(n_i, shift_i, axis):
  """A count per part (D,) becomes (D, 1, ...) to weigh per-channel values."""
  if n_i.ndim == 1 and shift_i.ndim > 1:
    shape = [1] * shift_i.ndim
    shape[axis] = n_i.shape[0]
    return n_i.reshape(shape)
  return n_i


def finalize(p: Partial) -> tuple[jax.Array, jax.Array]:
  """(mean, biased var). A channel with no values gets mean 0 and var 0."""
  safe_n = jnp.maximum(p.count, 1.0)
  mean = jnp.where(p.count > 0, p.shift + p.s1 / safe_n, 0.0)
  return mean, p.m2 / safe_n
