r"""Exact per-channel moments of one shard, whatever order the backend sums in.

A partial is ``(count, shift, s1, m2)``: the moments of a channel's values
around a float32 ``shift`` K,

.. math::
  s_1 = \sum (x - K), \qquad \mu = K + s_1 / n, \qquad
  M_2 = \sum (x - \mu)^2 = \sum (x - K)^2 - s_1^2 / n

(the corrected two-pass of Chan, Golub & LeVeque, 1983).

**The error bound, for any summation order.** A float32 sum's error depends
on the order the compiler picks (it differs between JAX versions and between
CPU, GPU and TPU). Two things bound it here by construction:

1. *Blocked sums.* Every sum is taken in levels of at most ``BLOCK`` = 512
   values, with an optimization barrier between levels so that XLA cannot
   merge them back into one long reduction: the fewest levels (two up to
   :math:`n = 2^{18}`, three up to :math:`2^{27}`), of balanced sizes. A
   sum of n non-negative terms then has a relative error of at most
   :math:`\gamma = \sum_l (B_l - 1)\, u` (levels of :math:`B_l` values,
   u = 2^{-24}) in any order within a level: :math:`\gamma \le 2 \cdot 511
   u = 6.1 \cdot 10^{-5}` up to :math:`n = 2^{24}`
   (tests/core/test_exactness.py reads the levels off the traced
   program), against
   :math:`(n - 1) u` for one long sum; rounding errors of random sign make
   it about :math:`\sqrt{\sum_l B_l / 3}\, u` in practice (about 1e-6;
   benchmarks/numerics.py measures the worst case of its sweep).
2. *A shift near the mean.* K is the pivot-corrected mean
   :math:`K = p + \sum (x - p) / n`, where the pivot p is one of the
   channel's own values (or, with a mask, its blocked float32 mean). Its
   error is :math:`\gamma` times the *spread* :math:`\sum |x - p| / n`, not
   :math:`\gamma |\mu|` as for a plain mean, and any value is within
   :math:`\sqrt{n - 1}\,\sigma` of the mean (Samuelson), so
   :math:`|K - \mu| \le \gamma (1 + \sqrt{n})\, \sigma`: below
   :math:`0.04\sigma` up to :math:`n = 2^{18}` and :math:`0.25\sigma` up to
   :math:`2^{24}` (where :math:`\gamma \le 979 u`), whatever |mean|/std is.

The main pass then sums :math:`d = x - K` and :math:`d^2`. Since K is
within :math:`0.25\sigma` of the mean, :math:`\sum d^2 \le 1.07\, n
\sigma^2`: nothing overflows where :math:`n \sigma^2` fits in float32
(a mean of 1e20 with a std of 1e18, where ``x * x`` overflows and flax's
variance is NaN). The variance's relative error is at most
:math:`\gamma (1 + 3 \delta^2) + 2 \gamma \delta \sqrt{1 + \delta^2}` with
:math:`\delta = |K - \mu| / \sigma \le 0.25`: at most :math:`1.7 \gamma`.
This costs two reads of x (the refinement of K, and the sums); the mean
carries the low-order bits that a float32 mean alone rounds away.

:func:`flax_moments` is the CPU path of unsynced statistics: plain sums
(what XLA:CPU reduces fastest, and flax's own formulas, so ordinary input
gets flax's numbers bit for bit), trusted only where every channel has
``mean**2 <= 8 var`` and otherwise replaced by :func:`exact_sums` in a
``lax.cond`` (cheap to run on the CPU, which is the host; its compile cost
is in docs/guides/performance.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._types import Layout

Array = jax.Array

BLOCK = 512


class Partial(NamedTuple):
  """Per-channel moments around ``shift`` (see the module docstring).

  ``count`` is a scalar or per-channel (with a mask); ``shift``, ``s1`` and
  ``m2`` have the feature shape.
  """

  count: Array  # type: ignore[assignment]  # shadows tuple.count
  shift: Array
  s1: Array
  m2: Array


def stats_dtype(dtype) -> jnp.dtype:
  """Statistics are at least float32 (half-precision and float8 input is
  reduced in float32; complex in at least complex64)."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.promote_types(dtype, jnp.complex64)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
  """The real dtype of a (possibly complex) floating dtype: a variance's."""
  return jnp.finfo(dtype).dtype


# --------------------------------------------------------- blocked sums ---


def blocked_sums(vs: Sequence[Array], axes: Sequence[int]) -> list[Array]:
  """Sums of same-shaped arrays over ``axes``, in levels of <= BLOCK values.

  With m values per output, the sums take the fewest levels of at most
  ``BLOCK`` values (L = ceil(log_BLOCK m)), of balanced sizes near
  m ** (1/L): the error bound is the sum of the level sizes, which
  balance minimizes. A level splits an axis into ``(q, b)`` with b a
  divisor of it where one is at least half the target (a bitcast), else
  zero-pads it. The arrays of one level pass an optimization barrier
  together, so XLA keeps the levels apart (it merges a reduce of a reduce
  into one otherwise) and still fuses the sibling sums of one level into
  one read.
  """
  vs = list(vs)
  out_shape = tuple(s for a, s in enumerate(vs[0].shape) if a not in axes)
  shape, red = _merge_runs(vs[0].shape, set(axes))
  vs = [v.reshape(shape) for v in vs]
  while True:
    size = {a: vs[0].shape[a] for a in red}
    m = math.prod(size.values())
    if m <= BLOCK:
      return [jnp.sum(v, tuple(red)).reshape(out_shape) for v in vs]
    target = _level_size(m)
    a = red[-1]
    if size[a] <= target:
      inner, k = [a], size[a]
      for b in reversed(red[:-1]):
        if k * size[b] > target:
          break
        inner.append(b)
        k *= size[b]
      vs = [jnp.sum(v, tuple(inner)) for v in vs]
      red = [r - sum(i < r for i in inner) for r in red if r not in inner]
    else:
      blk = _divisor_near(size[a], target)
      q = -(-size[a] // blk)
      if q * blk != size[a]:
        pad = [(0, 0)] * vs[0].ndim
        pad[a] = (0, q * blk - size[a])
        vs = [jnp.pad(v, pad) for v in vs]
      split = vs[0].shape[:a] + (q, blk) + vs[0].shape[a + 1 :]
      vs = [jnp.sum(v.reshape(split), a + 1) for v in vs]
    vs = list(lax.optimization_barrier(tuple(vs)))


def _level_size(m: int) -> int:
  """The balanced level size for m values: ceil(m ** (1/L)), L levels."""
  levels = 1
  while BLOCK**levels < m:
    levels += 1
  b = max(2, math.ceil(m ** (1 / levels)))
  while b ** (levels - 1) * BLOCK < m:  # float rounding of the root
    b += 1
  return min(b, BLOCK)


def _divisor_near(size: int, target: int) -> int:
  """The largest divisor of size <= target if it is >= target / 2, else
  target (then the axis is zero-padded to a multiple of it)."""
  for d in range(target, (target + 1) // 2 - 1, -1):
    if size % d == 0:
      return d
  return target


def _merge_runs(shape, red) -> tuple[tuple[int, ...], list[int]]:
  """Merges each run of adjacent reduction axes into one axis (a bitcast)."""
  groups: list[tuple[bool, int]] = []
  for i, s in enumerate(shape):
    if groups and groups[-1][0] == (i in red):
      groups[-1] = (groups[-1][0], groups[-1][1] * s)
    else:
      groups.append((i in red, s))
  return tuple(s for _, s in groups), [i for i, g in enumerate(groups) if g[0]]


# ------------------------------------------------------- exact partials ---


def exact_partial(
  xf: Array, lay: Layout, mask: Array | None = None, *, split: bool = False
) -> Partial:
  """Exact partial moments of xf (float32 or wider), branch-free.

  See the module docstring for the bound. ``mask`` (broadcast to xf's
  shape) selects the values that count; masked-out values never enter the
  arithmetic, so NaN or inf padding there is harmless. ``split``: see
  :func:`sums_around`.
  """
  n, shift, s1, s2 = exact_sums(xf, lay, mask, split=split)
  return Partial(n, shift, s1, _m2(n, s1, s2))


def exact_sums(
  xf: Array, lay: Layout, mask: Array | None = None, *, split: bool = False
) -> tuple[Array, Array, Array, Array]:
  """``(count, shift, s1, s2)``: the sums of ``d = x - shift`` and ``d**2``
  around the pivot-corrected mean (the module docstring), before any
  per-channel arithmetic on them (:func:`finalize_sums` does that).
  ``split``: see :func:`sums_around`."""
  red = lay.reduction_axes
  if mask is None:
    n = jnp.asarray(lay.count, xf.dtype)
    pivot = _first(xf, red)
    dev = xf - pivot
  else:
    n = jnp.sum(mask, red, dtype=jnp.int32).astype(xf.dtype)
    xf = jnp.where(mask, xf, 0.0)
    (total,) = blocked_sums([xf], red)
    pivot = lay.broadcast(total / jnp.maximum(n, 1.0))
    dev = jnp.where(mask, xf - pivot, 0.0)
  (total_dev,) = blocked_sums([dev], red)
  shift = jnp.squeeze(pivot, red) + total_dev / jnp.maximum(n, 1.0)
  return (n, shift, *sums_around(xf, lay, shift, mask, split=split))


def partial_around(
  xf: Array,
  lay: Layout,
  shift: Array,
  n: Array,
  mask: Array | None = None,
) -> Partial:
  """The corrected two-pass around any ``shift`` (exact to first order in
  its distance from the mean; tests feed it a perturbed one)."""
  s1, s2 = sums_around(xf, lay, shift, mask)
  return Partial(n, shift, s1, _m2(n, s1, s2))


def sums_around(
  xf: Array,
  lay: Layout,
  shift: Array,
  mask: Array | None = None,
  *,
  split: bool = False,
) -> tuple[Array, Array]:
  """Blocked sums of ``d = x - shift`` and ``d**2``.

  ``split`` (the CPU path's): the shift passes an optimization barrier as
  two copies, so that each sum subtracts it inside its own reduction and
  no full-size ``d`` is written (CSE merges the two subtractions into one
  temporary otherwise). Without it the two sums share one read of x per
  level, which is what XLA:GPU and TPU fuse.
  """
  red = lay.reduction_axes
  if split:
    k1, k2 = lax.optimization_barrier((shift, shift))
    d1, d2 = xf - lay.broadcast(k1), xf - lay.broadcast(k2)
  else:
    d1 = d2 = xf - lay.broadcast(shift)
  if mask is not None:
    d1, d2 = jnp.where(mask, d1, 0.0), jnp.where(mask, d2, 0.0)
  if split:
    ((s1,), (s2,)) = blocked_sums([d1], red), blocked_sums([d2 * d2], red)
    return s1, s2
  s1, s2 = blocked_sums([d1, d2 * d2], red)
  return s1, s2


def _m2(n: Array, s1: Array, s2: Array) -> Array:
  return jnp.maximum(s2 - s1 * s1 / jnp.maximum(n, 1.0), 0.0)


def _first(xf: Array, red: Sequence[int]) -> Array:
  """The value at index 0 of every reduction axis: one of each channel's,
  kept broadcastable against xf (so the slice fuses into its consumers)."""
  start = [0] * xf.ndim
  limit = [1 if a in red else s for a, s in enumerate(xf.shape)]
  return lax.slice(xf, start, limit)


# ------------------------------------------------------------- CPU path ---

# The one-pass variance s2/n - mean**2 has a float32 relative error of about
# (1 + 2 mean**2/var) times that of a plain sum. These are flax's own
# numbers, which flax's tests compare bit for bit (they need the 8), so the
# CPU path keeps them up to this ratio, where the error stays below 1e-5
# (tests/core/test_exactness.py holds it, on the floor and newest JAX);
# beyond it exact_partial runs instead.
ONE_PASS_MAX_RATIO = 8.0


def flax_moments(
  xf: Array, lay: Layout, mask: Array | None, fast: bool
) -> tuple[Array, Array, Array, Array]:
  """``(count, mean, var, mean_lo)`` by flax's formulas where they are exact to the
  ratio bound above, else by :func:`exact_sums` (a ``lax.cond``).

  With ``fast``, ``mean(x**2) - mean(x)**2``; else ``mean((x - mean)**2)``;
  ``where=mask`` either way: the jnp operations flax runs, so such input
  gets flax's float32 results bit for bit. A channel with no masked-in value
  gets mean 0 and var 0 (flax's: NaN).

  The conditional returns the finished ``(mean, var, mean_lo)`` from
  either branch (the exact one finalizes its sums inside it), so the
  layer's arithmetic after it is the same whichever ran.
  """
  red = lay.reduction_axes
  if mask is None:
    n = jnp.asarray(lay.count, xf.dtype)
  else:
    n = jnp.sum(mask, red, dtype=jnp.int32).astype(xf.dtype)
    # Masked-out values never reach the arithmetic (NaN padding is harmless).
    xf = jnp.where(mask, xf, 0.0)
  # flax's own jnp operations, so that such input gets its float32 results
  # bit for bit. These arrays are what the plain path returns, and its
  # branch of the conditional passes them through: how XLA:CPU rounds a
  # sum depends on how it is fused, and a mean and var refinalized from
  # sums after the conditional were 1 ulp off flax's on jax 0.8.1, as were
  # plain sums passed through on jax 0.10.2 under flax's ref_variables mode
  # (tests/modules/test_flax_dropin.py, test_transforms.py).
  mean = jnp.mean(xf, red, where=mask)
  if fast:
    var = jnp.maximum(0.0, jnp.mean(xf * xf, red, where=mask) - mean * mean)
  else:
    var = jnp.mean(jnp.square(xf - lay.broadcast(mean)), red, where=mask)
  if mask is not None:  # 0/0 in an empty channel
    mean, var = (jnp.where(n > 0, v, 0.0) for v in (mean, var))
  # "not <=" so that an overflowed (inf or NaN) one-pass variance, as from
  # x * x at a mean of 1e20, takes the exact path too.
  inexact = jnp.any(~(mean * mean <= ONE_PASS_MAX_RATIO * var))
  # The plain branch passes flax's arrays through; mean_lo is 0 there:
  # |mean| <= 2.9 std, so the float32 mean's rounding is far below the
  # statistics' own error. The exact branch finalizes inside, so nothing
  # after the conditional depends on which branch ran (selects there kept
  # XLA:CPU from fusing the per-channel arithmetic across it:
  # docs/guides/performance.md has the compile cost).
  mean, var, lo = lax.cond(
    inexact,
    lambda: finalize_sums(n, *exact_sums(xf, lay, mask, split=True)[1:]),
    lambda: (mean, var, jnp.zeros_like(mean)),
  )
  return n, mean, var, lo


def finalize_sums(
  n: Array, shift: Array, s1: Array, s2: Array
) -> tuple[Array, Array, Array]:
  """``(mean, var, mean_lo)`` from the sums of ``d = x - shift`` and
  ``d**2``: with ``a = s1/n``, ``mean = shift + a`` and ``var = s2/n -
  a**2``; mean_lo as in :func:`finalize_lo`. Empty channels get zeros.
  (The sync paths finalize a :class:`Partial` with :func:`finalize_lo`;
  this one takes the raw sums of :func:`exact_sums`, as flax_moments's
  exact branch has them.)"""
  safe_n = jnp.maximum(n, 1.0)
  seen = n > 0
  a = s1 / safe_n
  mean = jnp.where(seen, shift + a, 0.0)
  var = jnp.where(seen, jnp.maximum(0.0, s2 / safe_n - a * a), 0.0)
  lo = jnp.where(seen, (shift - mean) + a, 0.0)
  return mean, var, lo


def finalize(p: Partial) -> tuple[Array, Array]:
  """(mean, biased var). A channel with no values gets mean 0 and var 0."""
  mean, var, _ = finalize_lo(p)
  return mean, var


def finalize_lo(p: Partial) -> tuple[Array, Array, Array]:
  """(mean, biased var, mean_lo): ``mean + mean_lo`` is the exact mean to
  about u**2 |mean| (``shift - mean`` is exact, Sterbenz), the low-order
  bits the float32 mean rounds away. Pooling micro-batches needs them:
  without them the spread of the micro-batch means is off by u |mean|."""
  safe_n = jnp.maximum(p.count, 1.0)
  seen = p.count > 0
  d = p.s1 / safe_n
  mean = jnp.where(seen, p.shift + d, 0.0)
  lo = jnp.where(seen, (p.shift - mean) + d, 0.0)
  return mean, p.m2 / safe_n, lo
