"""The exact, count-weighted merge of stacked partials (:class:`Partial`):
the gather's merge across shards, the kernel's across tiles, and pooled
running statistics (``bnjax._running.merge_pools``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._moments.local import Partial


def merge(parts: Partial, axis: int = 0) -> Partial:
  r"""Count-weighted exact merge of partials stacked along ``axis``.

  One variadic reduction over the parts whose combiner is Chan's pairwise
  update (Chan, Golub & LeVeque, 1979): two partials ``a`` and ``b``, with
  means :math:`\mu = K + s_1/n`, merge into

  .. math::
    n = n_a + n_b, \qquad
    M_2 = M_{2,a} + M_{2,b} + \frac{n_a n_b}{n} (\mu_a - \mu_b)^2,

  around the shift of the larger of the two, with :math:`s_1` carried
  around it (:math:`s_{1,b} + n_b (K_b - K_a)` added to :math:`s_{1,a}`),
  so the merged mean keeps the low-order bits a float32 mean would round
  away. Every term of :math:`M_2` is non-negative and the between-part
  term is taken from the difference of the two means, not as a difference
  of large sums, so nothing cancels whichever part is an outlier: in any
  order XLA combines D parts, :math:`M_2`'s relative error is at most
  about :math:`(D + 3) u`, as for a plain sum of D values
  (tests/core/test_sync.py and test_exactness.py check it against the
  float64 global batch with an outlier shard). Parts with no values weigh
  0.

  Dependent reductions (a reference mean, then the deviations around it)
  compile into a kernel each on XLA:CPU; this is one, which is most of
  what keeps the synced compile near flax's (benchmarks/sync_compile.py).
  The derivative is a ``custom_jvp`` (XLA's reduction has none): with
  :math:`\mu` the merged mean, :math:`d\mu = \sum_i n_i\, d\mu_i / N`
  and :math:`dM_2 = \sum_i dM_{2,i} + 2 \sum_i n_i (\mu_i - \mu)\,
  d\mu_i`, one sibling reduction whose transpose is a broadcast.
  """
  count_i, shift_i, s1_i, m2_i = parts
  n_i = _expand_count(count_i, shift_i, axis)
  n_i = jnp.broadcast_to(n_i, shift_i.shape).astype(shift_i.dtype)
  s1_i = jnp.where(n_i > 0, s1_i, 0.0)  # an empty part's s1 weighs 0 too
  n, shift, s1, m2 = _chan_reduce(
    lax.stop_gradient(n_i), shift_i, s1_i, m2_i, axis
  )
  if count_i.ndim == 1 and shift_i.ndim > 1:  # one count per part: scalar
    n = jnp.sum(count_i)
  return Partial(n, shift, s1, m2)


def _chan(a, b):
  """Chan's merge of two partials ``(n, shift, s1, m2)`` (see merge)."""
  na, ka, sa, ma = a
  nb, kb, sb, mb = b
  n = na + nb
  keep_a = na >= nb
  shift = jnp.where(keep_a, ka, kb)
  s1 = jnp.where(keep_a, sa + (sb + nb * (kb - ka)), sb + (sa + na * (ka - kb)))
  dmu = (ka - kb) + (sa / jnp.maximum(na, 1.0) - sb / jnp.maximum(nb, 1.0))
  w = jnp.where(n > 0, na * (nb / jnp.maximum(n, 1.0)), 0.0)
  return n, shift, s1, ma + mb + w * dmu * dmu


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _chan_reduce(n_i, shift_i, s1_i, m2_i, axis):
  zero = jnp.zeros((), shift_i.dtype)
  return lax.reduce((n_i, shift_i, s1_i, m2_i), (zero,) * 4, _chan, (axis,))


@_chan_reduce.defjvp
def _chan_reduce_jvp(axis, primals, tangents):
  n_i, shift_i, s1_i, m2_i = primals
  _, dshift, ds1, dm2 = tangents
  out = n, shift, s1, m2 = _chan_reduce(*primals, axis)
  safe_i = jnp.maximum(n_i, 1.0)
  mu_shift = lambda v: jnp.expand_dims(v, axis)
  dmu = dshift + ds1 / safe_i
  dev = (shift_i - mu_shift(shift)) + (
    s1_i / safe_i - mu_shift(s1 / jnp.maximum(n, 1.0))
  )
  nd = n_i * dmu
  ds1_out, dm2_out = jnp.sum(jnp.stack([nd, dm2 + 2.0 * dev * nd]), axis + 1)
  zero = jnp.zeros_like(shift)
  return out, (jnp.zeros_like(n), zero, ds1_out, dm2_out)


def _expand_count(n_i, shift_i, axis):
  """A count per part (D,) becomes (D, 1, ...) to weigh per-channel values."""
  if n_i.ndim == 1 and shift_i.ndim > 1:
    shape = [1] * shift_i.ndim
    shape[axis] = n_i.shape[0]
    return n_i.reshape(shape)
  return n_i
