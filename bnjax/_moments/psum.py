r"""``sync='psum'``: one constant-size psum of shifted sums, and ``'auto'``.

Every shard sums ``(n, sum(x - K), sum((x - K)**2))`` around K, the
replicated running mean, and ONE psum adds them; then
:math:`M_2 = S_2 - S_1^2 / N`. The result is used only where it is exact:

- **every shard used the same K.** Where shard_map's type system proves it
  (the running statistics enter replicated, ``in_specs=P()``, and x varies
  over the axis) nothing is sent for it: ``2C + 1`` floats per layer.
  Elsewhere (vmap, or a shard_map with ``check_vma=False``) the psum also
  carries an exact equality test of the shifts: K's bits in 8-bit chunks h,
  with :math:`\sum h` and :math:`\sum h^2` (exact small integers in
  float32), and all shards agree iff :math:`D \sum h^2 = (\sum h)^2` for
  every chunk (Lagrange's identity: the difference is
  :math:`\sum_{i<j} (h_i - h_j)^2`). That is ``8C`` more floats (4-bit chunks,
  ``16C``, from 259 to 8738 shards; beyond that only the gather is exact).
- **K is near the batch mean:** :math:`(\mu - K)^2 \le \sigma^2` in every
  channel, where the corrected form's error is at most about 7 times one
  float32 sum's (see ``local``).

Otherwise the same step runs the exact gather (a ``lax.cond`` on psummed
values, so every shard agrees): on a GPU that conditional waits for the
host once per layer. ``'auto'`` chooses the path at trace time by an
alpha-beta cost model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._moments import axes, collectives
from bnjax._moments.local import blocked_sums

SYNC_MODES = ('auto', 'gather', 'psum')

# The alpha-beta cost model of benchmarks/sync_model.py on its faster link
# (5 us per step, 150 GB/s): 'auto' takes the psum where the gather, at its
# best algorithm, costs more than the psum at its best on this link. On the
# slower link the psum wins earlier, so this picks it only where it wins on
# both.
_ALPHA, _BETA = 5e-6, 1 / 150e9

# Where (mean - K)**2 <= ratio * var the psum's result is used.
PSUM_MAX_RATIO = 1.0

# Shift-equality chunks: (bits, most shards whose sums stay exact). With b-bit
# chunks h < 2**b, sum(h**2) < 2**24 keeps float32 exact, and the Lagrange
# difference D*sum(h**2) - sum(h)**2 <= D**2/4 * (2**b - 1)**2 < 2**32 keeps
# it exact in uint32 arithmetic.
_CHUNKS = ((8, 258), (4, 8738))


def _model_us(kind: str, d: int, n_bytes: float) -> float:
  """Microseconds of one collective, best of ring and tree, alpha-beta."""
  frac = (d - 1) / d
  if kind == 'all_reduce':
    steps = min(2 * (d - 1), 2 * math.log2(d))
    return 1e6 * (steps * _ALPHA + 2 * frac * n_bytes * _BETA)
  steps = min(d - 1, math.log2(d))
  return 1e6 * (steps * _ALPHA + frac * n_bytes * _BETA)


def chunk_bits(devices: int) -> int | None:
  """Bits per chunk of the shift-equality test for this many shards."""
  for bits, most in _CHUNKS:
    if devices <= most:
      return bits
  return None


def psum_payload(
  channels: int, masked: bool, devices: int = 2, proven: bool = True
) -> int:
  """Floats per shard in the psum path: counts, S1, S2 and, where the
  shift's equality is not proven by types, its exact test."""
  check = 0
  if not proven:
    bits = chunk_bits(devices) or 4
    check = 2 * (32 // bits) * channels
  return (channels if masked else 1) + 2 * channels + check


def gather_payload(channels: int, masked: bool) -> int:
  """Floats per shard in the gather path: (count, shift, s1, m2)."""
  return (channels if masked else 1) + 3 * channels


def auto_uses_psum(
  devices: int, channels: int, masked: bool = False, proven: bool = True
) -> bool:
  """'auto''s choice at trace time: the model's crossover."""
  if devices < 2 or (not proven and chunk_bits(devices) is None):
    return False
  gather = _model_us(
    'all_gather', devices, 4 * devices * gather_payload(channels, masked)
  )
  payload = psum_payload(channels, masked, devices, proven)
  return gather > _model_us('all_reduce', devices, 4 * payload)


def check_mode(fn: str, sync: object) -> None:
  """``sync`` is one of SYNC_MODES (checked in inference too, where it is
  unused: a typo must not wait for the first training step)."""
  if not isinstance(sync, str) or sync not in SYNC_MODES:
    raise ValueError(
      f"{fn}: sync={sync!r} must be one of {SYNC_MODES}: 'gather' all-gathers "
      "every shard's exact partial, 'psum' adds sums around the running mean "
      "(with the gather as its fallback), 'auto' picks by device count and "
      'channels'
    )


def resolve(
  fn: str,
  sync: str,
  axis_name,
  groups,
  channels: int,
  masked: bool,
  proven: bool,
) -> str:
  """The path a synced call takes: 'gather' or 'psum' (checked at trace time)."""
  check_mode(fn, sync)
  if axis_name is None or sync == 'gather':
    return 'gather'
  d = axes.largest_group(axis_name, groups)
  if sync == 'psum':
    if not proven and chunk_bits(d) is None:
      raise ValueError(
        f"{fn}: sync='psum' over {d} shards cannot check that every shard "
        'has the same running mean (the exact test covers at most '
        f"{_CHUNKS[-1][1]}): pass sync='gather', or the running statistics "
        'replicated into a shard_map (in_specs=P()), where types prove it'
      )
    return 'psum'
  return 'psum' if auto_uses_psum(d, channels, masked, proven) else 'gather'


def psum_moments(xf, lay, mask, shift, axis_name, groups, fn: str):
  """Global (count, mean, m2, ok, mean_lo) from ONE psum of sums around
  ``shift`` (``mean_lo``: see ``local.finalize_lo``).

  ``ok`` is False where the result cannot be trusted (see the module
  docstring). It comes from psummed values only, so every shard agrees.
  """
  red = lay.reduction_axes
  k = lax.stop_gradient(shift).astype(xf.dtype)
  d = xf - lay.broadcast(k)
  if mask is None:
    n = jnp.asarray(lay.count, xf.dtype)
  else:
    d = jnp.where(mask, d, 0.0)
    n = jnp.sum(mask, red, dtype=jnp.int32).astype(xf.dtype)
  s1, s2 = blocked_sums([d, d * d], red)
  proven = collectives.replicated_by_type(k, xf, axis_name)
  check = [] if proven else [_chunks(k, axis_name, groups)]
  flat = jnp.concatenate(
    [jnp.ravel(n), jnp.ravel(s1), jnp.ravel(s2)]
    + [c.astype(xf.dtype) for c in check]
  )
  flat = collectives.psum(flat, axis_name, groups, fn)
  c, nk = s1.size, n.size
  total_n = flat[:nk].reshape(n.shape)
  total_s1 = flat[nk : nk + c].reshape(k.shape)
  total_s2 = flat[nk + c : nk + 2 * c].reshape(k.shape)
  same = jnp.asarray(True)
  if check:
    same = _same_everywhere(flat[nk + 2 * c :], axis_name, groups)
  safe_n = jnp.maximum(total_n, 1.0)
  m2 = jnp.maximum(total_s2 - total_s1 * total_s1 / safe_n, 0.0)
  near = jnp.all(total_s1 * total_s1 <= PSUM_MAX_RATIO * safe_n * m2)
  offset = total_s1 / safe_n
  mean = jnp.where(total_n > 0, k + offset, 0.0)
  lo = jnp.where(total_n > 0, (k - mean) + offset, 0.0)  # local.finalize_lo
  return total_n, mean, m2, same & near, lo


def _chunks(k: jax.Array, axis_name, groups) -> jax.Array:
  """(h, h**2) of every b-bit chunk of K's float32 bits, as float32."""
  bits = chunk_bits(axes.largest_group(axis_name, groups)) or 4
  u = lax.bitcast_convert_type(jnp.ravel(k).astype(jnp.float32), jnp.uint32)
  shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
  h = ((u[:, None] >> shifts) & np.uint32(2**bits - 1)).astype(jnp.float32)
  return jnp.concatenate([jnp.ravel(h), jnp.ravel(h * h)])


def _same_everywhere(sums: jax.Array, axis_name, groups) -> jax.Array:
  """D * sum(h**2) == sum(h)**2 for every chunk, in exact uint32."""
  half = sums.shape[0] // 2
  s = sums[:half].astype(jnp.uint32)
  q = sums[half:].astype(jnp.uint32)
  d = axes.own_group_size(axis_name, groups).astype(jnp.uint32)
  return jnp.all(d * q - s * s == 0)
