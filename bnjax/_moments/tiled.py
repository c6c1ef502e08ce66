r"""Exact per-channel moments in one read of x: the accelerators' local path.

:func:`bnjax._moments.local.exact_partial` reads x twice (the pivot's
refinement, then the sums around the refined shift). On a GPU or TPU a BN
layer's statistics are bound by memory traffic, so that second read is the
whole of its cost over flax's one-pass formula (1.42x flax's forward on an
H200 at 128x112x112x64, ``benchmarks/results/device.json``). Here the
refinement runs on tile statistics, 1/b of x's size, instead:

1. *Tiles, one read.* The last run of reduction axes is split into tiles
   of b consecutive values (b = :data:`TILE`, or the largest divisor of
   the run between ``TILE // 2`` and ``TILE``). Each tile's first value
   :math:`p_t` is its pivot, and one fused read of x gives per tile

   .. math::
     a_t = \sum_{i \in t} (x_i - p_t), \qquad
     q_t = \sum_{i \in t} (x_i - p_t)^2, \qquad
     M_{2,t} = q_t - a_t^2 / b.

   Every value is within :math:`\sqrt{b - 1}\,\sigma_t` of its tile's mean
   (Samuelson; :math:`\sigma_t` the tile's own spread), so
   :math:`|\mu_t - p_t| \le \sqrt{b-1}\,\sigma_t` and the float32 error of
   :math:`M_{2,t}` is at most :math:`c_b u M_{2,t}` whatever the order of
   the b terms: :math:`c_b = b(b + 2) + 2(b + 1)(\sqrt{b - 1} + b - 1)`
   (930 at b = 16, about :math:`5.5 \cdot 10^{-5}`; random data, whose
   pivot is a typical value, stays near :math:`2 \sqrt{b/3}\, u`).
2. *The tiles' merge, exact.* The tile means enter only as deviations
   :math:`z_t = (p_t - K) + a_t / b`, never as rounded float32 means (at
   |mean|/std = 1e6 a float32 mean is rounded by 0.06 std). K is the
   pivot-corrected mean of local.py's bound, taken over the tiles:
   :math:`K = P + \sum_t ((p_t - P) + a_t/b) / T` with P the first pivot,
   so :math:`|K - \mu| \le \gamma (1 + \sqrt{n})\,\sigma` with
   :math:`\gamma` the blocked sums' (local.py: at most 1022 u). Then

   .. math::
     s_1 = b \sum_t z_t, \qquad
     M_2 = \sum_t M_{2,t} + b \Big(\sum_t z_t^2
           - \big(\textstyle\sum_t z_t\big)^2 / T\Big),

   the corrected two-pass over the tile means around K, in blocked sums
   (at most :math:`1.7 \gamma` relative, local.py's bound with T values).

So the variance's relative error is at most :math:`c_b u + 1.7 \gamma`
(:math:`1.6 \cdot 10^{-4}` at b = 16 up to :math:`2^{24}` values a
channel, against local.py's :math:`1.0 \cdot 10^{-4}`), in any summation
order, and about 1e-7 in practice (benchmarks/numerics.py's sweep, run on
this path by ``BNJAX_STATS_PATH=accelerator``). x is read once: the tile
sums are sibling reductions of one fusion, and the merge reads three
arrays of 1/b of x's size.

Masked input, no reduction axis (one value a channel, as per example
under vmap), or a reduction run with no divisor in the tile range (fewer
than ``TILE // 2`` values, or a prime count) takes local.exact_partial.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._moments import local
from bnjax._types import Layout

Array = jax.Array

TILE = 16


def tile_size(run: int, tile: int = TILE) -> int | None:
  """The largest divisor of ``run`` in [tile // 2, tile], or None."""
  for b in range(min(tile, run), tile // 2 - 1, -1):
    if b >= 2 and run % b == 0:
      return b
  return None


def tiled_partial(
  xf: Array,
  lay: Layout,
  mask: Array | None = None,
  *,
  tile: int = TILE,
  strided: bool = True,
) -> local.Partial:
  """Exact partial moments of xf (float32 or wider) in one read of x.

  See the module docstring for the bound; masked input, or a reduction run
  with no tile size, goes to :func:`local.exact_partial`.
  """
  shape, red = local._merge_runs(xf.shape, set(lay.reduction_axes))
  b = tile_size(shape[red[-1]], tile) if red else None
  if mask is not None or b is None:
    return local.exact_partial(xf, lay, mask)
  a = red[-1]
  # A tile's b values are T apart (strided) or adjacent: the same
  # arithmetic, but XLA:GPU reduces a major axis of b far faster than a
  # minor one (benchmarks/results/device.json, the statistics rows).
  split = (b, shape[a] // b) if strided else (shape[a] // b, b)
  tiles = xf.reshape(shape[:a] + split + shape[a + 1 :])
  t = a if strided else a + 1
  pivot = _median_of_three(tiles, t, b)
  d = tiles - pivot
  a_t, q_t = jnp.sum(d, t), jnp.sum(d * d, t)  # one read of x
  pivot = jnp.squeeze(pivot, t)
  mean_dev = a_t / b  # the tile mean's distance from its pivot
  m2_t = jnp.maximum(q_t - a_t * mean_dev, 0.0)
  count = math.prod(pivot.shape[i] for i in red)  # T tiles a channel
  first = local._first(pivot, red)
  (total,) = local.blocked_sums([(pivot - first) + mean_dev], red)
  shift = jnp.squeeze(first, red) + total / count
  z = (pivot - jnp.expand_dims(shift, red)) + mean_dev
  s1, s2, within = local.blocked_sums([z, z * z, m2_t], red)
  between = b * jnp.maximum(s2 - s1 * s1 / count, 0.0)
  feat = lay.feature_shape
  return local.Partial(
    jnp.asarray(lay.count, xf.dtype),
    shift.reshape(feat),
    (b * s1).reshape(feat),
    (within + between).reshape(feat),
  )


def _median_of_three(tiles: Array, axis: int, b: int) -> Array:
  """Each tile's pivot: the median of its first, middle and last values
  (kept as a size-1 axis). A single outlier in a tile is never its pivot,
  so it costs that tile's variance nothing (as the first value, it put
  about b u more error into it)."""
  first, mid, last = (
    lax.slice_in_dim(tiles, i, i + 1, axis=axis) for i in (0, b // 2, b - 1)
  )
  lo, hi = jnp.minimum(first, mid), jnp.maximum(first, mid)
  return jnp.maximum(lo, jnp.minimum(hi, last))
