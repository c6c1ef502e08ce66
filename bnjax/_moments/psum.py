r"""``sync='psum'``: exact partials merged by constant-size all-reduces.

Every shard takes its exact partial ``(n_i, K_i, s_{1,i}, M_{2,i})``
(``local.exact_partial``, as the gather path does). Then, per axis name:

1. **a shared reference** :math:`R = \max_i K_i` over the shards that have
   values: a ``pmax`` of C floats. A maximum is exact whatever order the
   backend reduces in, so every shard holds the same R bit for bit (no
   equality test, no trust in the running mean);
2. **one psum** of :math:`(n_i,\ n_i \delta_i,\ n_i \delta_i^2,\ M_{2,i})`
   with :math:`\delta_i = (K_i - R) + s_{1,i}/n_i`, the shard mean's
   distance from R: ``3C + 1`` floats (``4C`` with a mask). Then

.. math::
  N = \sum n_i, \quad S_1 = \sum n_i \delta_i, \quad
  M_2 = \sum_i M_{2,i} + \sum_i n_i \delta_i^2 - S_1^2 / N,

the corrected two-pass over the shard means around R: the same merge as
the gather path's (``local.merge``), with the sums over shards taken by the
all-reduce instead of after an all-gather. The within-shard part is each
shard's exact partial; the between-shard part is exact to first order in
R's distance from the global mean, and R is one of the shard means' own
shifts, so that distance is at most the spread of the shard means (never
|mean| / std, which is where a running-mean shift fails: the first steps
from a zero running mean, a distribution shift).

No branch on any platform: the program is the same whatever the data, so
XLA:GPU never waits on the host for a predicate. Versus the gather, the
bytes do not grow with the shard count; the cost is one more (tiny)
collective. ``'auto'`` chooses between them at trace time by an
alpha-beta cost model (:func:`auto_uses_psum`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from bnjax._moments import axes, collectives
from bnjax._moments.local import Partial

SYNC_MODES = ('auto', 'gather', 'psum')

# The alpha-beta cost model of benchmarks/sync_model.py on its faster link
# (5 us per step, 150 GB/s): 'auto' takes the psum where the gather, at its
# best algorithm, costs more than the psum's two all-reduces at theirs. On
# the slower link the psum wins earlier, so this picks it only where it wins
# on both.
_ALPHA, _BETA = 5e-6, 1 / 150e9


def _model_us(kind: str, d: int, n_bytes: float) -> float:
  """Microseconds of one collective, best of ring and tree, alpha-beta."""
  frac = (d - 1) / d
  if kind == 'all_reduce':
    steps = min(2 * (d - 1), 2 * math.log2(d))
    return 1e6 * (steps * _ALPHA + 2 * frac * n_bytes * _BETA)
  steps = min(d - 1, math.log2(d))
  return 1e6 * (steps * _ALPHA + frac * n_bytes * _BETA)


def psum_payload(channels: int, masked: bool) -> tuple[int, int]:
  """Floats per shard in the psum path's two all-reduces: the reference
  (pmax), then the counts, first and second moments."""
  return channels, (channels if masked else 1) + 3 * channels


def gather_payload(channels: int, masked: bool) -> int:
  """Floats per shard in the gather path: (shift, s1, m2), and the counts
  with a mask (without one the count is a constant and stays home; with
  unequal groups one more float)."""
  return (channels if masked else 0) + 3 * channels


def psum_us(devices: int, channels: int, masked: bool = False) -> float:
  """The model's time of the psum path's two all-reduces."""
  ref, sums = psum_payload(channels, masked)
  return _model_us('all_reduce', devices, 4 * ref) + _model_us(
    'all_reduce', devices, 4 * sums
  )


def gather_us(devices: int, channels: int, masked: bool = False) -> float:
  """The model's time of the gather path's one all-gather."""
  n_bytes = 4 * devices * gather_payload(channels, masked)
  return _model_us('all_gather', devices, n_bytes)


def auto_uses_psum(devices: int, channels: int, masked: bool = False) -> bool:
  """'auto''s choice at trace time: the model's crossover."""
  if devices < 2:
    return False
  return gather_us(devices, channels, masked) > psum_us(
    devices, channels, masked
  )


def check_mode(fn: str, sync: object) -> None:
  """``sync`` is one of SYNC_MODES (checked in inference too, where it is
  unused: a typo must not wait for the first training step)."""
  if not isinstance(sync, str) or sync not in SYNC_MODES:
    raise ValueError(
      f"{fn}: sync={sync!r} must be one of {SYNC_MODES}: 'gather' all-gathers "
      "every shard's exact partial, 'psum' all-reduces them (a pmax of the "
      "shards' shifts, then one psum of sums around it), 'auto' picks by "
      'device count and channels'
    )


def resolve(
  fn: str, sync: str, axis_name, groups, channels: int, masked: bool
) -> str:
  """The path a synced call takes: 'gather' or 'psum' (at trace time)."""
  check_mode(fn, sync)
  if axis_name is None or sync == 'gather':
    return 'gather'
  if sync == 'psum':
    return 'psum'
  d = axes.largest_group(axis_name, groups)
  return 'psum' if auto_uses_psum(d, channels, masked) else 'gather'


def psum_merge(p: Partial, axis_name, groups, fn: str) -> Partial:
  """Merges per-shard partials over ``axis_name``: per name, one pmax of
  the shifts and one psum of sums around it (the module docstring)."""
  for name in axes.names(axis_name):
    p = _psum_merge_one(p, name, groups, fn)
  return p


def _psum_merge_one(p: Partial, name, groups, fn: str) -> Partial:
  shape = p.shift.shape
  n_i = jnp.broadcast_to(p.count, shape)
  seen = n_i > 0
  # The result does not depend on R (the mean is sum(n_i mu_i) / N whatever
  # R is), so R carries no gradient: pmax has none.
  k = lax.stop_gradient(jnp.where(seen, p.shift, -jnp.inf))
  ref = collectives.pmax(k, name, groups, fn)
  ref = jnp.where(ref > -jnp.inf, ref, 0.0)  # no shard has values
  delta = jnp.where(seen, (p.shift - ref) + p.s1 / jnp.maximum(n_i, 1.0), 0.0)
  nd = n_i * delta
  count = p.count.astype(p.shift.dtype)
  flat = jnp.concatenate([jnp.ravel(v) for v in (count, nd, nd * delta, p.m2)])
  flat = collectives.psum(flat, name, groups, fn)
  nk, c = count.size, math.prod(shape)
  n = flat[:nk].reshape(p.count.shape).astype(p.count.dtype)
  s1, sq, within = (
    flat[nk + j * c : nk + (j + 1) * c].reshape(shape) for j in range(3)
  )
  safe_n = jnp.maximum(jnp.broadcast_to(n, shape), 1.0)
  between = jnp.maximum(sq - s1 * s1 / safe_n, 0.0)
  return Partial(n, ref, s1, within + between)
