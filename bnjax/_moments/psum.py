r"""``sync='psum'``: exact partials merged by constant-size all-reduces.

Every shard takes its exact partial ``(n_i, K_i, s_{1,i}, M_{2,i})``
(``local.exact_partial``, as the gather path does), whose mean is
:math:`\mu_i = K_i + s_{1,i}/n_i`. Then, per axis name:

1. **a shared reference** :math:`R = \max_i K_i` over the shards that have
   values: a ``pmax`` of C floats. A maximum is exact whatever order the
   backend reduces in, so every shard holds the same R bit for bit (no
   equality test, no trust in the running mean);
2. **a psum of the first moments around R**, :math:`(n_i,\ n_i (\mu_i -
   R))`: ``C + 1`` floats (``2C`` with a mask), so that :math:`K = R +
   \sum n_i (\mu_i - R) / N` is the global mean to within :math:`\gamma`
   times the spread of the shard means (R is one of the shards' own
   shifts: never :math:`\gamma |\mu|`);
3. **a psum of the sums around K**, :math:`(n_i \epsilon_i,\ M_{2,i} + n_i
   \epsilon_i^2)` with :math:`\epsilon_i = (K_i - K) + s_{1,i}/n_i`:
   ``2C`` floats, and

.. math::
  S_1 = \sum n_i \epsilon_i, \quad
  M_2 = \sum_i M_{2,i} + \sum_i n_i \epsilon_i^2 - S_1^2 / N,

the corrected two-pass over the shard means around K, with the sums over
shards taken by all-reduces (the gather path merges the gathered partials
with Chan's update instead, ``combine.merge``: a sum of all-reduced terms
cannot take a pairwise combiner). K is within a rounding of the
global mean, so the between-shard term has nothing left to cancel; one
pass around R alone left up to D times it (an outlier shard 3000 std away:
2.6e-6 relative variance error at 8 shards, 3.3e-5 at 64; this way 1.6e-7
and 4.0e-7, ``tests/core/test_sync_program.py``). A K that differs in its
last bits between shards (an all-reduce need not give every shard the same
bits) changes M_2 only at second order.

No branch on any platform: the program is the same whatever the data, so
XLA:GPU never waits on the host for a predicate. Versus the gather, the
bytes do not grow with the shard count; the cost is three (small)
collectives for one. ``'auto'`` chooses between them at trace time by an
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
# best algorithm, costs more than the psum's three all-reduces at theirs. On
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


def psum_payload(channels: int, masked: bool) -> tuple[int, int, int]:
  """Floats per shard in the psum path's three all-reduces: the reference
  (pmax); the counts and the first moments around it; the first and
  second moments around the mean that gives."""
  return channels, (channels if masked else 1) + channels, 2 * channels


def gather_payload(channels: int, masked: bool) -> int:
  """Floats per shard in the gather path: (shift, s1, m2), and the counts
  with a mask (without one the count is a constant and stays home; with
  unequal groups one more float)."""
  return (channels if masked else 0) + 3 * channels


def psum_us(devices: int, channels: int, masked: bool = False) -> float:
  """The model's time of the psum path's three all-reduces."""
  return sum(
    _model_us('all_reduce', devices, 4 * n)
    for n in psum_payload(channels, masked)
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
      "shards' shifts, then two psums of sums: around it, then around the "
      "mean that gives), 'auto' picks by "
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
  the shifts and two psums of sums (the module docstring)."""
  for name in axes.names(axis_name):
    p = _psum_merge_one(p, name, groups, fn)
  return p


def _psum_merge_one(p: Partial, name, groups, fn: str) -> Partial:
  shape = p.shift.shape
  n_i = jnp.broadcast_to(p.count, shape)
  seen = n_i > 0
  safe_i = jnp.maximum(n_i, 1.0)
  # The result does not depend on R or K (the mean is sum(n_i mu_i) / N and
  # M2 the sum of squares around it, whatever the reference), so neither
  # carries a gradient: pmax has none, and K's is stopped.
  k = lax.stop_gradient(jnp.where(seen, p.shift, -jnp.inf))
  ref = collectives.pmax(k, name, groups, fn)
  ref = jnp.where(ref > -jnp.inf, ref, 0.0)  # no shard has values
  # 1. The count and the shard means' first moment around R.
  delta = jnp.where(seen, (p.shift - ref) + p.s1 / safe_i, 0.0)
  count = p.count.astype(p.shift.dtype)
  n, first = _psum_parts(count, [n_i * delta], name, groups, fn)
  safe_n = jnp.maximum(jnp.broadcast_to(n, shape), 1.0)
  # 2. K, the global mean to within gamma of the shard means' spread; the
  # sums around it.
  shift = lax.stop_gradient(ref + first[0] / safe_n)
  eps = jnp.where(seen, (p.shift - shift) + p.s1 / safe_i, 0.0)
  ne = n_i * eps
  _, (s1, total) = _psum_parts(None, [ne, p.m2 + ne * eps], name, groups, fn)
  m2 = jnp.maximum(total - s1 * s1 / safe_n, 0.0)
  return Partial(n.astype(p.count.dtype), shift, s1, m2)


def _psum_parts(count, parts, name, groups, fn: str):
  """One psum of ``count`` (if not None) and the same-shaped ``parts``, as
  one flat buffer: ``(summed count or None, [summed parts])``."""
  head = [] if count is None else [jnp.ravel(count)]
  flat = jnp.concatenate(head + [jnp.ravel(v) for v in parts])
  flat = collectives.psum(flat, name, groups, fn)
  nk = 0 if count is None else count.size
  c = parts[0].size
  n = None if count is None else flat[:nk].reshape(count.shape)
  return n, [
    flat[nk + j * c : nk + (j + 1) * c].reshape(parts[0].shape)
    for j in range(len(parts))
  ]
