"""The only module that calls collectives.

Forward statistics use ONE ``all_gather`` of each shard's exact partial
``(count, mean, m2)``, merged with Chan's formula: exact from the first step
whatever the shard means, and count-weighted, so masked or uneven shards give
the global-batch result. The backward needs two per-channel sums, which are
concatenated into ONE ``psum``.

Bytes per layer, for C channels over D devices: the all_gather receives
``D * (2C + 1)`` floats (``D * 3C`` when a mask makes counts per-channel);
the backward psum reduces ``2C`` floats.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
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
  if groups is not None:
    return len(groups[0])
  return math.prod(lax.axis_size(n) for n in names(axis_name))


def _as_arg(axis_name: AxisName):
  n = names(axis_name)
  return n[0] if len(n) == 1 else n


def gather_merge(p: Partial, axis_name: AxisName, groups) -> Partial:
  """Merges per-shard partials over ``axis_name`` with one all_gather."""
  shape = p.mean.shape
  count = jnp.broadcast_to(p.count, shape) if p.count.ndim else p.count
  flat = jnp.concatenate(
      [jnp.ravel(count), jnp.ravel(p.mean), jnp.ravel(p.m2)])
  g = lax.all_gather(flat, _as_arg(axis_name),
                     axis_index_groups=_groups_arg(groups))
  g = g.reshape(-1, flat.shape[0])
  k = count.size
  c = math.prod(shape)
  n_i = g[:, :k].reshape((-1,) + count.shape)
  mean_i = g[:, k:k + c].reshape((-1,) + shape)
  m2_i = g[:, k + c:].reshape((-1,) + shape)
  if count.ndim == 0:
    n_i = n_i.reshape((-1,) + (1,) * len(shape))
  merged = merge(Partial(n_i, mean_i, m2_i))
  return merged


def psum_stacked(vs: Sequence[jax.Array], axis_name: AxisName, groups):
  """Sums same-shaped arrays over shards with a single psum."""
  stacked = jnp.stack(vs)
  out = lax.psum(stacked, _as_arg(axis_name),
                 axis_index_groups=_groups_arg(groups))
  return tuple(out[i] for i in range(len(vs)))


def _groups_arg(groups):
  return None if groups is None else [list(g) for g in groups]
