"""The only module that calls collectives.

Forward statistics take ONE collective per axis name. Every shard has its
exact partial ``(count, mean, m2)``, K = 2C + 1 floats, and every shard
gathers all D partials and merges them with Chan's formula. That is exact
from the first step whatever the shard means, and count-weighted, so masked
or uneven shards give the global-batch result. The gather is

- under ``shard_map``: an all-gather whose output is replicated in
  shard_map's type system (JAX's ``all_gather_invariant``), so new statistics
  can leave with ``out_specs=P()``. ``lax.all_gather`` output is marked
  varying, which forbids that;
- under ``pmap`` and ``vmap``, and with ``axis_index_groups`` (which the
  all-gather does not take): a ``psum`` of a zero ``(D, K)`` buffer in which
  each shard fills its own row.

Measured at 8 CPU devices the all-gather takes 0.39 to 0.51 ms against 0.45
to 0.56 ms for the psum-gather, and the alpha-beta model gives it half the
latency steps (``benchmarks/sync_model.py``). The backward needs two
per-channel sums, concatenated into ONE ``psum``.

Bytes per layer, for C channels over D devices: the forward gathers
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

try:  # replicated output, unlike lax.all_gather (JAX-private in 0.10)
  from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant
except ImportError:  # pragma: no cover
  _all_gather_invariant = None


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
  """Merges per-shard partials over ``axis_name`` (one collective per name)."""
  for name in names(axis_name):
    p = _gather_merge_one(p, name, groups)
  return p


def _gather_merge_one(p: Partial, name, groups) -> Partial:
  shape = p.mean.shape
  count = jnp.broadcast_to(p.count, shape) if p.count.ndim else p.count
  flat = jnp.concatenate(
      [jnp.ravel(count), jnp.ravel(p.mean), jnp.ravel(p.m2)])
  if groups is None and _all_gather_invariant is not None and _is_mesh_axis(
      flat, name):
    g = _all_gather_invariant(as_varying(flat, name), name)
  else:
    g = _psum_gather(flat, name, groups)
  d = g.shape[0]
  k, c = count.size, math.prod(shape)
  n_i = g[:, :k].reshape((d,) + count.shape)
  if count.ndim == 0:
    n_i = n_i.reshape((d,) + (1,) * len(shape))
  mean_i = g[:, k:k + c].reshape((d,) + shape)
  m2_i = g[:, k + c:].reshape((d,) + shape)
  return merge(Partial(n_i, mean_i, m2_i))


def _psum_gather(flat: jax.Array, name, groups) -> jax.Array:
  """(D, K) rows of every shard's flat partial: each fills its row, one psum."""
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
  return lax.psum(rows, name, axis_index_groups=_groups_arg(groups))


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


def _is_mesh_axis(v: jax.Array, name) -> bool:
  """Whether ``name`` is a manual mesh axis of shard_map around ``v``."""
  aval = jax.typeof(v)
  mesh = getattr(getattr(aval, 'sharding', None), 'mesh', None)
  return name in set(getattr(mesh, 'axis_names', ()))


def _groups_arg(groups):
  return None if groups is None else [list(g) for g in groups]
