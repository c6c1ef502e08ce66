"""The only module that calls collectives.

Forward statistics take ONE collective per axis name: each shard writes its
exact partial ``(count, mean, m2)`` into its own row of a zero ``(D, K)``
buffer and a single ``psum`` gathers the rows, which every shard merges with
Chan's formula. That is exact from the first step whatever the shard means,
and count-weighted, so masked or uneven shards give the global-batch result.
A psum rather than an ``all_gather`` because it runs under ``shard_map``,
``pmap`` and ``vmap`` alike, honours ``axis_index_groups``, and its result is
replicated in shard_map's type system, so new statistics can leave with
``out_specs=P()``. The backward needs two per-channel sums, concatenated into
ONE ``psum``.

Bytes per layer, for C channels over D devices: the forward all-reduces
``D * (2C + 1)`` floats (``3DC`` when a mask makes counts per-channel); the
backward all-reduces ``2C`` floats. A tuple of axis names costs one
collective per name (merged hierarchically, still exact): JAX cannot reduce
over a mix of vmap and shard_map axes in one op.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._stats import Partial, merge

AxisName = Any


def names(axis_name: AxisName) -> tuple:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def canonical_groups(groups: Any):
  if groups is None:
    return None
  return tuple(tuple(int(i) for i in g) for g in groups)


def num_shards(axis_name: AxisName, groups) -> int:
  """Number of shards whose statistics combine (raises NameError if unbound)."""
  if groups is not None and len(names(axis_name)) != 1:
    raise ValueError(
        f'axis_index_groups needs a single axis_name, got {axis_name!r}; '
        'use one name, or a mesh axis per group level instead of groups')
  if groups is not None:
    return len(groups[0])
  return math.prod(lax.axis_size(n) for n in names(axis_name))


def gather_merge(p: Partial, axis_name: AxisName, groups) -> Partial:
  """Merges per-shard partials over ``axis_name`` (one psum per name)."""
  for name in names(axis_name):
    p = _gather_merge_one(p, name, groups)
  return p


def _gather_merge_one(p: Partial, name, groups) -> Partial:
  shape = p.mean.shape
  count = jnp.broadcast_to(p.count, shape) if p.count.ndim else p.count
  flat = jnp.concatenate(
      [jnp.ravel(count), jnp.ravel(p.mean), jnp.ravel(p.m2)])
  idx = lax.axis_index(name)
  if groups is None:
    d = lax.axis_size(name)
  else:
    d = len(groups[0])
    pos = np.zeros(sum(len(g) for g in groups), np.int32)
    for g in groups:
      pos[list(g)] = np.arange(len(g))
    idx = jnp.asarray(pos)[idx]
  rows = jnp.zeros((d, flat.shape[0]), flat.dtype)
  rows = lax.dynamic_update_slice(rows, flat[None], (idx, 0))
  g = lax.psum(rows, name, axis_index_groups=_groups_arg(groups))
  k, c = count.size, math.prod(shape)
  n_i = g[:, :k].reshape((d,) + count.shape)
  if count.ndim == 0:
    n_i = n_i.reshape((d,) + (1,) * len(shape))
  mean_i = g[:, k:k + c].reshape((d,) + shape)
  m2_i = g[:, k + c:].reshape((d,) + shape)
  return merge(Partial(n_i, mean_i, m2_i))


def psum_stacked(vs: Sequence[jax.Array], axis_name: AxisName, groups):
  """Sums same-shaped arrays over shards with a single psum."""
  out = jnp.stack(vs)
  for name in names(axis_name):
    out = lax.psum(out, name, axis_index_groups=_groups_arg(groups))
  return tuple(out[i] for i in range(len(vs)))


def as_varying(v: jax.Array, axis_name: AxisName) -> jax.Array:
  """Marks a replicated per-channel value as varying over the mapped axes.

  Under shard_map, JAX inserts this cast implicitly wherever a replicated
  value meets a per-shard one, and transposes each cast into its own psum.
  Casting the stacked backward terms once makes the backward ONE psum.
  Outside shard_map's type system (pmap, vmap) this is the identity.
  """
  aval = jax.typeof(v)
  mat = getattr(aval, 'manual_axis_type', None)  # JAX >= 0.10
  vma = mat.varying if mat is not None else getattr(aval, 'vma', None)
  if vma is None:
    return v
  mesh = getattr(getattr(aval, 'sharding', None), 'mesh', None)
  mesh_axes = set(getattr(mesh, 'axis_names', ()))
  cast = tuple(n for n in names(axis_name) if n in mesh_axes and n not in vma)
  return lax.pcast(v, cast, to='varying') if cast else v


def _groups_arg(groups):
  return None if groups is None else [list(g) for g in groups]
