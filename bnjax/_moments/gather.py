"""``sync='gather'``: every shard's exact partial, all-gathered and merged.

Forward statistics take ONE collective per axis name. Every shard has its
exact partial ``(count, shift, s1, m2)`` and gathers all D of them, then
merges them with Chan's pairwise update in one reduction
(:func:`bnjax._moments.combine.merge`): as exact as one call on the
concatenated batch whatever the shard means, and count-weighted, so masked,
uneven or empty shards give the global-batch result. Each shard sends 3C
floats: without a mask its count is the layout's, the same constant on
every shard, so it stays out of the buffer and XLA folds the merge's count
arithmetic. With a mask the counts travel (4C
floats), as with unequal groups (3C + 1), where a row may be empty. The
gather is

- under ``shard_map``: an all-gather whose output is replicated in
  shard_map's type system (``collectives.replicated_all_gather``), so new
  statistics can leave with ``out_specs=P()``;
- under ``pmap`` and ``vmap``, and with ``axis_index_groups`` (which the
  all-gather does not take): a ``psum`` of a zero ``(D, K)`` buffer in which
  each shard fills its own row. Groups may be unequal: the buffer has the
  largest group's rows, and a smaller group's unused rows weigh 0.

A tuple of axis names costs one collective per name (merged hierarchically,
still exact): JAX cannot reduce over a mix of vmap and shard_map axes in one
op.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._moments import axes, collectives
from bnjax._moments.combine import merge
from bnjax._moments.local import Partial


def gather_merge(p: Partial, axis_name, groups, fn: str) -> Partial:
  """Merges per-shard partials over ``axis_name`` (one collective per name)."""
  for name in axes.names(axis_name):
    p = _gather_merge_one(p, name, groups, fn)
  return p


def _gather_merge_one(p: Partial, name, groups, fn: str) -> Partial:
  shape = p.shift.shape
  # Without a mask every shard has the layout's count (a constant): it
  # travels only where rows may be empty (unequal groups).
  send_count = p.count.ndim > 0 or axes.uniform_shards(name, groups) is None
  count = jnp.broadcast_to(p.count, shape) if p.count.ndim else p.count
  # One dtype for the buffer: the counts are exact in it (x64 mode makes the
  # statistics float64 while a count may stay float32).
  dtype = jnp.result_type(count, p.shift, p.s1, p.m2)
  sent = (count,) * send_count + (p.shift, p.s1, p.m2)
  flat = jnp.concatenate([jnp.ravel(v).astype(dtype) for v in sent])
  gather = collectives.replicated_all_gather
  if (
    groups is None
    and gather is not None
    and name in collectives.mesh_axes(flat)
  ):
    g = gather(collectives.as_varying(flat, name), name)
  else:
    g = _psum_gather(flat, name, groups, fn)
  d = g.shape[0]
  k = count.size if send_count else 0
  c = math.prod(shape)
  if send_count:
    n_i = g[:, :k].reshape((d,) + count.shape).astype(p.count.dtype)
  else:
    n_i = jnp.broadcast_to(p.count, (d,))
  shift_i, s1_i, m2_i = (
    g[:, k + j * c : k + (j + 1) * c].reshape((d,) + shape) for j in range(3)
  )
  return merge(Partial(n_i, shift_i, s1_i, m2_i))


def _psum_gather(flat: jax.Array, name, groups, fn: str) -> jax.Array:
  """(D, K) rows of every shard's flat partial: each fills its row, one psum.

  With groups, D is the largest group's size and each shard fills the row of
  its position within its group; rows that a smaller group leaves empty hold
  zero counts, which the merge weighs 0.
  """
  idx, d = axes.position_in_group(name, groups)
  rows = jnp.zeros((d, flat.shape[0]), flat.dtype)
  rows = lax.dynamic_update_slice(
    rows, flat[None], (jnp.asarray(idx, jnp.int32), jnp.int32(0))
  )
  return collectives.psum(rows, name, groups, fn)
