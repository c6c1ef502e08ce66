"""``sync='psum'``: one constant-size psum of shifted sums, and ``'auto'``.

Every shard sums ``(n, sum(x - K), sum((x - K)**2))`` around K, the
replicated running mean, and ONE psum adds them (2C + 9 floats whatever the
device count, 8 of them a fingerprint of K); then ``M2 = S2 - S1**2 / N``.
Where that cannot be trusted to 1e-5 the caller runs ``bnjax._sync``'s exact
gather in the same step (``bnjax._train._psum_stats``). ``'auto'`` chooses
between the two paths at trace time by an alpha-beta cost model. With
``bnjax._sync``, the only module that calls collectives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._sync import AxisName, _groups_arg, names

SYNC_MODES = ('auto', 'gather', 'psum')

# The alpha-beta cost model of benchmarks/sync_model.py on its faster link
# (5 us per step, 150 GB/s): 'auto' takes the psum where the gather, at its
# best algorithm, costs more than the psum at its best on this link. On the
# slower link the psum wins earlier, so this picks it only where it wins on
# both.
_ALPHA, _BETA = 5e-6, 1 / 150e9


def _model_us(kind: str, d: int, n_bytes: float) -> float:
  """Microseconds of one collective, best of ring and tree, alpha-beta."""
  frac = (d - 1) / d
  if kind == 'all_reduce':
    steps = min(2 * (d - 1), 2 * math.log2(d))
    return 1e6 * (steps * _ALPHA + 2 * frac * n_bytes * _BETA)
  steps = min(d - 1, math.log2(d))
  return 1e6 * (steps * _ALPHA + frac * n_bytes * _BETA)


def psum_payload(channels: int, masked: bool) -> int:
  """Floats per shard in the psum path: counts, S1, S2 and the shift's
  fingerprint (8 floats)."""
  return (channels if masked else 1) + 2 * channels + 2 * _HASHES


def gather_payload(channels: int, masked: bool) -> int:
  """Floats per shard in the gather path: (count, shift, s1, m2)."""
  return (channels if masked else 1) + 3 * channels


def auto_uses_psum(devices: int, channels: int, masked: bool = False) -> bool:
  """'auto''s choice at trace time: the model's crossover."""
  if devices < 2:
    return False
  gather = _model_us(
    'all_gather', devices, 4 * devices * gather_payload(channels, masked)
  )
  psum = _model_us('all_reduce', devices, 4 * psum_payload(channels, masked))
  return gather > psum


def resolve(
  fn: str, sync: str, axis_name: AxisName, groups, channels: int, masked: bool
) -> str:
  """The path a synced call takes: 'gather' or 'psum' (checked at trace time)."""
  if sync not in SYNC_MODES:
    raise ValueError(
      f"{fn}: sync={sync!r} must be one of {SYNC_MODES}: 'gather' all-gathers "
      "every shard's exact partial (D x (3C + 1) floats), 'psum' sums shifted "
      "sums (2C + 9 floats, exact fallback when needed), 'auto' picks by "
      'device count and channels'
    )
  if axis_name is None or sync == 'gather':
    return 'gather'
  if sync == 'psum':
    return 'psum'
  d = (
    max(len(g) for g in groups)
    if groups is not None
    else math.prod(lax.axis_size(n) for n in names(axis_name))
  )
  return 'psum' if auto_uses_psum(d, channels, masked) else 'gather'


# The psum path's error relative to the variance is about
# eps * (1 + (mean - K)**2 / var) for the shift K: the same bound as the
# one-pass formula's, so the same limit (bnjax._stats._ONE_PASS_MAX_RATIO).
_PSUM_MAX_RATIO = 8.0
# The shift's fingerprint: _HASHES hashes of its bits, each in [0, _MOD).
# Every shard adds (h, h**2); all shards used the same shift iff
# D * sum(h**2) == sum(h)**2 for every hash (checked in exact integers:
# the float32 sums stay below 2**24 up to 18000 shards). A disagreement
# escapes all four hashes with probability 31**-4, about 1e-6.
_HASHES, _MOD = 4, 31


def _fingerprint(shift: jax.Array) -> jax.Array:
  """(h_1..h_4, h_1**2..h_4**2) of the shift's bits, as exact float32."""
  bits = lax.bitcast_convert_type(
    jnp.ravel(shift).astype(jnp.float32), jnp.uint32
  )
  rng = np.random.default_rng(20261122)
  odd = rng.integers(1, 2**31, size=(_HASHES, bits.size), dtype=np.uint64)
  mult = jnp.asarray(odd * 2 + 1, jnp.uint32)  # odd: every bit matters
  h = jnp.sum(bits[None] * mult, axis=1, dtype=jnp.uint32) % _MOD
  h = h.astype(jnp.float32)
  return jnp.concatenate([h, h * h])


def _group_size(axis_name: AxisName, groups) -> jax.Array:
  """Shards whose sums the psum adds: the axis size, or the own group's."""
  if groups is None:
    return jnp.asarray(
      math.prod(lax.axis_size(n) for n in names(axis_name)), jnp.uint32
    )
  size = np.zeros(sum(len(g) for g in groups), np.uint32)
  for g in groups:
    size[list(g)] = len(g)
  return jnp.asarray(size)[lax.axis_index(names(axis_name)[0])]


def psum_moments(
  xf: jax.Array,
  lay,
  mask: jax.Array | None,
  shift: jax.Array,
  axis_name: AxisName,
  groups,
):
  """Global (count, mean, m2, ok) from ONE psum of sums around ``shift``.

  ``ok`` is False where the result cannot be trusted to 1e-5: the shards
  used different shifts, or (mean - shift)**2 > 8 var in some channel. It
  comes from psummed values only, so every shard agrees on it.
  """
  red = lay.reduction_axes
  k = lax.stop_gradient(shift).astype(xf.dtype)
  d = xf - lay.broadcast(k)
  if mask is None:
    n = jnp.asarray(lay.count, xf.dtype)
  else:
    d = jnp.where(mask, d, 0.0)
    n = jnp.sum(mask, red, dtype=xf.dtype)
  shape = k.shape
  s1 = jnp.sum(d, red)
  s2 = jnp.sum(d * d, red)
  flat = jnp.concatenate(
    [jnp.ravel(n), jnp.ravel(s1), jnp.ravel(s2), _fingerprint(k)]
  )
  for name in names(axis_name):
    flat = lax.psum(flat, name, axis_index_groups=_groups_arg(groups))
  c = math.prod(shape)
  nk = n.size
  total_n = flat[:nk].reshape(n.shape)
  total_s1 = flat[nk : nk + c].reshape(shape)
  total_s2 = flat[nk + c : nk + 2 * c].reshape(shape)
  h = flat[nk + 2 * c :].astype(jnp.uint32)
  h1, h2 = h[:_HASHES], h[_HASHES:]
  same_shift = jnp.all(_group_size(axis_name, groups) * h2 == h1 * h1)
  safe_n = jnp.maximum(total_n, 1.0)
  m2 = jnp.maximum(total_s2 - total_s1 * total_s1 / safe_n, 0.0)
  near = jnp.all(total_s1 * total_s1 <= _PSUM_MAX_RATIO * safe_n * m2)
  mean = jnp.where(total_n > 0, k + total_s1 / safe_n, 0.0)
  return total_n, mean, m2, same_shift & near
