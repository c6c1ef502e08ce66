r"""Exact per-channel moments in one read of x through XLA: tried on an H200
and dropped (``python -m benchmarks run device``, the statistics rows).

bnjax's accelerator path (``bnjax._moments.local.exact_partial``) reads x
twice: the pivot's refinement, then the sums around the refined shift. On
a GPU a BN layer's statistics are bound by memory traffic, so that second
read is its whole cost over flax's one-pass formula. This variant moves the
refinement onto tile statistics of 1/b of x's size:

1. *Tiles, one read.* The last run of reduction axes splits into tiles of
   b values (strided: a major axis of b; or adjacent). Each tile's pivot
   :math:`p_t` is the median of its first, middle and last values (a
   single outlier is never a pivot), and one fused read gives
   :math:`a_t = \sum_t (x - p_t)`, :math:`q_t = \sum_t (x - p_t)^2`,
   :math:`M_{2,t} = q_t - a_t^2 / b`. Every value is within
   :math:`\sqrt{b - 1}\,\sigma_t` of its tile's mean (Samuelson), so
   :math:`M_{2,t}`'s float32 error is at most
   :math:`[b(b + 2) + 2(b + 1)(\sqrt{b - 1} + b - 1)]\, u` relative (930 u
   at b = 16) in any order.
2. *The merge, exact.* The tile means enter only as deviations
   :math:`z_t = (p_t - K) + a_t / b` around the pivot-corrected mean K of
   the tiles, and :math:`M_2 = \sum_t M_{2,t} + b(\sum z_t^2 - (\sum
   z_t)^2 / T)` in blocked sums (local.py's bound over T values).

Measured on an H200 (jax 0.11.2, ``results/device_tiled.json``): at
128x112x112x64 the statistics took 2.1x flax's one-pass time at b = 16 and
3.1x at b = 32, strided or adjacent alike, against 1.9 to 2.0x for the two
reads: XLA:GPU's fusion of the tile sums and the merge's passes over the
tile arrays cost more than the read they save. A one-read path that wins
needs a kernel that keeps a tile on chip (Pallas), not XLA's fusions.
Its variance error is within 2.9e-7 of float64 on the numerics layouts
(|mean|/std 0 to 1e6, sorted, an outlier first).
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
  # A tile's b values are T apart (strided: a major axis of b) or adjacent
  # (a minor one): the same arithmetic, and on the H200 the same time
  # (results/device_tiled.json, the statistics rows).
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
