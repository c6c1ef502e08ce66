"""Ghost (virtual) batch normalization (Hoffer, Hubara & Soudry 2017).

The batch axis (axis 0) is cut into chunks of ``virtual_batch_size`` rows and
each chunk is normalized with its own statistics. It is the core on a
reshaped x: ``(B, ...)`` becomes ``(B // v, v, ...)`` and the chunk axis joins
the feature axes, so each chunk is a "channel" of the reduction; ``scale`` and
``bias`` broadcast over chunks and receive the sum of their gradients.

The running statistics are updated once per call with the mean over chunks of
the chunk means and biased chunk variances (chunks with no unmasked values are
left out). With ``axis_name``, chunks are per shard: normalization stays
local to each chunk, and only that running-statistics average is taken over
all chunks of all shards (one psum), so every shard stores the same
statistics and sync over k shards equals one call on the concatenated batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _checks, _moments, _train

_NOT_DIVISIBLE = (
  '{fn}: x has batch size {b} on axis 0, which virtual_batch_size={v} does '
  'not divide; pass a virtual_batch_size that divides {b} (for example '
  '{hint}), or pad the batch and mask the padding'
)


def _check_shards(fn, x, b, v):
  """On a mesh with Explicit axes the batch axis's sharding is part of x's
  type, and JAX reshapes (b,) into (b / v, v) only where the chunks split
  evenly over the shards: say so rather than let JAX's ShardingTypeError
  out."""
  spec = getattr(getattr(jax.typeof(x), 'sharding', None), 'spec', None)
  mesh = getattr(getattr(jax.typeof(x), 'sharding', None), 'mesh', None)
  if not spec or spec[0] is None or mesh is None:
    return
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  k = math.prod(mesh.shape[n] for n in names)
  if b % v == 0 and (b // v) % k:
    raise ValueError(
      f'{fn}: virtual_batch_size={v} cuts the batch of {b} rows, sharded '
      f'over {k} devices (mesh axes {names}), into {b // v} chunks, which do '
      f'not split evenly over the shards; pass a virtual_batch_size that '
      f'divides the {b // k} rows of each shard, or shard over a mesh with '
      'Auto axes'
    )


def check(fn, x, lay, v, single_value_ok=False):
  """virtual_batch_size: a positive int dividing axis 0, a batch axis, and
  (unless ``single_value_ok``) giving each chunk more than one value per
  channel."""
  if 0 in lay.feature_axes:
    raise ValueError(
      f'{fn}: virtual_batch_size chunks axis 0, but axis 0 is a feature '
      f'axis (axis={lay.feature_axes}); put the batch first'
    )
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
    raise TypeError(
      f'{fn}: virtual_batch_size must be a positive int, got {v!r}'
    )
  if v < 1:
    raise ValueError(
      f'{fn}: virtual_batch_size must be a positive int, got {v!r}'
    )
  b = x.shape[0]
  _check_shards(fn, x, b, v)
  if b % v:
    divisors = [d for d in range(1, b + 1) if b % d == 0 and d > 1]
    hint = ' or '.join(map(str, divisors[-3:-1] or divisors)) or '1'
    raise ValueError(_NOT_DIVISIBLE.format(fn=fn, b=b, v=v, hint=hint))
  per_chunk = lay.count // b * v
  if not single_value_ok:
    _checks.check_training_count(
      fn,
      x,
      lay.feature_axes,
      per_chunk,
      fix=f'pass a virtual_batch_size > {v} (each chunk of {v} row(s) '
      f'holds {per_chunk} value(s) per channel)',
    )


def train(x, scale, bias, epsilon, mask, cfg, v, fallback=None):
  """Ghost-batch training: (y, chunk-mean batch mean, var, chunks, 0).

  ``chunks`` (per channel, chunks with values) is the weight of these
  averages: a pool merges them by it without their spread (see
  ``bnjax._running.pool``), so pooled ghost micro-batches give what one
  ghost call on their concatenation stores."""
  lay, fn = cfg.lay, cfg.sync.fn
  k = x.shape[0] // v
  xr = x.reshape((k, v) + x.shape[1:])
  glay = _checks.layout(fn, xr, (0,) + tuple(a + 1 for a in lay.feature_axes))
  per_chunk = lambda p: (
    None if p is None else jnp.broadcast_to(p, (k,) + lay.feature_shape)
  )
  mr = (
    None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(xr.shape)
  )
  gcfg = dataclasses.replace(cfg, lay=glay, sync=_moments.Sync(fn=fn))
  fb = None if fallback is None else tuple(per_chunk(s) for s in fallback)
  y, mean_k, var_k, count_k, _ = _train.train(
    xr, per_chunk(scale), per_chunk(bias), epsilon, mr, gcfg, fallback=fb
  )
  w = jnp.broadcast_to((count_k > 0).astype(mean_k.dtype), mean_k.shape)
  sums = [jnp.sum(w * mean_k, 0), jnp.sum(w * var_k, 0), jnp.sum(w, 0)]
  sync = cfg.sync
  if sync.axis_name is not None:
    # The chunk count is global too, so that a shard whose values are all
    # masked out still updates its running statistics like every other one.
    sums = list(
      _moments.psum_stacked(sums, sync.axis_name, sync.groups, sync.fn)
    )
  n = jnp.maximum(sums[2], 1.0)
  mean = sums[0] / n
  return y.reshape(x.shape), mean, sums[1] / n, sums[2], jnp.zeros_like(mean)
