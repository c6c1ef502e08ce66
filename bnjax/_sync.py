"""The gather path of synced statistics (with ``bnjax._psum``, the only
modules that call collectives).

Forward statistics take ONE collective per axis name. Every shard has its
exact partial ``(count, shift, s1, m2)`` (see ``bnjax._stats``), K = 3C + 1
floats, and every shard gathers all D partials and merges them with the
corrected two-pass over the shards' means. Carrying ``s1`` keeps each shard
mean's low-order bits, which a float32 mean would round away, so the merge is
as exact as one call on the concatenated batch from the first step, whatever
the shard means, and count-weighted, so masked, uneven or empty shards give
the global-batch result. The gather is

- under ``shard_map``: an all-gather whose output is replicated in
  shard_map's type system (JAX's ``all_gather_invariant``), so new statistics
  can leave with ``out_specs=P()``. ``lax.all_gather`` output is marked
  varying, which forbids that;
- under ``pmap`` and ``vmap``, and with ``axis_index_groups`` (which the
  all-gather does not take): a ``psum`` of a zero ``(D, K)`` buffer in which
  each shard fills its own row. Groups may be unequal: the buffer has the
  largest group's rows, and a smaller group's unused rows weigh 0.

Measured at 8 CPU devices the all-gather takes 0.39 to 0.51 ms against 0.45
to 0.56 ms for the psum-gather, and the alpha-beta model gives it half the
latency steps (``benchmarks/sync_model.py``). The backward needs two
per-channel sums, concatenated into ONE ``psum``.

Bytes per layer, for C channels over D devices: the forward gathers
``D * (3C + 1)`` floats (``4DC`` when a mask makes counts per-channel); the
backward all-reduces ``2C`` floats. A tuple of axis names costs one
collective per name (merged hierarchically, still exact): JAX cannot reduce
over a mix of vmap and shard_map axes in one op.

That is ``sync='gather'``. ``sync='psum'`` (``bnjax._psum``, the other
module with collectives) sends a constant ``2C + 9`` floats instead: sums
around the replicated running mean and a fingerprint of it, with this
gather as an in-step fallback where the sums cannot be trusted.
``sync='auto'`` picks between them at trace time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._stats import Partial, merge

AxisName = Any

# An all-gather whose output is replicated, unlike lax.all_gather's. It is
# JAX-private (0.8 to 0.10); where a release lacks it, the psum-gather (public
# API: the same statistics, also one collective) takes over.
# tests/test_sync.py forces that fallback and compares.
_all_gather_invariant: Callable[..., Any] | None
try:
  from jax._src.lax.parallel import (
    all_gather_invariant as _all_gather_invariant,
  )
except ImportError:  # pragma: no cover
  _all_gather_invariant = None


def names(axis_name: AxisName) -> tuple:
  return (
    tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  )


def canonical_groups(fn: str, axis_name: AxisName, groups: Any):
  """Validated groups as a tuple of tuples (None stays None).

  Groups must partition the indices of ``axis_name`` (each index exactly
  once); they may have unequal sizes. Checked at trace time, after checking
  that every name in ``axis_name`` is bound.
  """
  if axis_name is not None:
    check_bound(fn, axis_name)
  if groups is None:
    return None
  if axis_name is None:
    raise ValueError(
      f'{fn}: axis_index_groups={groups!r} was passed without axis_name, so '
      'there is no mapped axis for the groups to index; pass the axis_name '
      'of the pmap/shard_map axis, or drop axis_index_groups'
    )
  if len(names(axis_name)) != 1:
    raise ValueError(
      f'{fn}: axis_index_groups needs a single axis_name, got '
      f'{axis_name!r}; use one name, or a mesh axis per group level instead '
      'of groups'
    )
  try:
    canon = tuple(tuple(int(i) for i in g) for g in groups)
  except (TypeError, ValueError):
    raise TypeError(
      f'{fn}: axis_index_groups must be a list of lists of ints, got {groups!r}'
    ) from None
  size = lax.axis_size(names(axis_name)[0])
  flat = [i for g in canon for i in g]
  missing = sorted(set(range(size)) - set(flat))
  extra = sorted({i for i in flat if flat.count(i) > 1 or not 0 <= i < size})
  if missing or extra or not all(canon):
    raise ValueError(
      f'{fn}: axis_index_groups={[list(g) for g in canon]} must partition '
      f'the {size} indices 0..{size - 1} of axis {axis_name!r} into '
      f'non-empty groups, each index exactly once (missing: {missing}, '
      f'repeated or out of range: {extra}); add the missing indices as '
      'their own group'
    )
  return canon


def check_bound(fn: str, axis_name: AxisName) -> None:
  """Raises JAX's NameError, with the argument and the fix, if unbound."""
  for name in names(axis_name):
    try:
      lax.axis_size(name)
    except NameError:
      bound = _bound_names()
      where = (
        f'the names bound here are {bound}'
        if bound
        else 'no mapped axis is bound here'
      )
      raise NameError(
        f'{fn}: axis_name={axis_name!r} names the axis {name!r}, which is not '
        f'bound: {where}. Pass the axis name of the enclosing shard_map, '
        'pmap or vmap (a typo?), call this inside that mapping, or pass '
        'axis_name=None for local statistics (under a sharded jit they are '
        'already global).'
      ) from None


def _bound_names() -> list | None:
  """The axis names bound where this is traced, for messages only."""
  try:  # JAX-private; the message simply omits the list without it
    from jax._src import core

    return sorted(map(str, core.get_axis_env().axis_sizes))
  except Exception:  # pragma: no cover
    return None


def num_shards(axis_name: AxisName, groups) -> int:
  """Fewest shards whose statistics combine (raises NameError if unbound)."""
  if groups is not None:
    return min(len(g) for g in groups)
  return math.prod(lax.axis_size(n) for n in names(axis_name))


def gather_merge(p: Partial, axis_name: AxisName, groups) -> Partial:
  """Merges per-shard partials over ``axis_name`` (one collective per name)."""
  for name in names(axis_name):
    p = _gather_merge_one(p, name, groups)
  return p


def _gather_merge_one(p: Partial, name, groups) -> Partial:
  shape = p.shift.shape
  count = jnp.broadcast_to(p.count, shape) if p.count.ndim else p.count
  flat = jnp.concatenate([jnp.ravel(v) for v in (count, p.shift, p.s1, p.m2)])
  if (
    groups is None
    and _all_gather_invariant is not None
    and _is_mesh_axis(flat, name)
  ):
    g = _all_gather_invariant(as_varying(flat, name), name)
  else:
    g = _psum_gather(flat, name, groups)
  d = g.shape[0]
  k, c = count.size, math.prod(shape)
  n_i = g[:, :k].reshape((d,) + count.shape)
  shift_i, s1_i, m2_i = (
    g[:, k + j * c : k + (j + 1) * c].reshape((d,) + shape) for j in range(3)
  )
  return merge(Partial(n_i, shift_i, s1_i, m2_i))


def _psum_gather(flat: jax.Array, name, groups) -> jax.Array:
  """(D, K) rows of every shard's flat partial: each fills its row, one psum.

  With groups, D is the largest group's size and each shard fills the row of
  its position within its group; rows that a smaller group leaves empty hold
  zero counts, which the merge weighs 0.
  """
  idx = lax.axis_index(name)
  if groups is None:
    d = lax.axis_size(name)
  else:
    d = max(len(g) for g in groups)
    pos = np.zeros(sum(len(g) for g in groups), np.int32)
    for g in groups:
      pos[list(g)] = np.arange(len(g))
    idx = jnp.asarray(pos)[idx]
  rows = jnp.zeros((d, flat.shape[0]), flat.dtype)
  rows = lax.dynamic_update_slice(rows, flat[None], (idx, 0))
  return lax.psum(rows, name, axis_index_groups=_groups_arg(groups))


def psum_stacked(vs: Sequence[jax.Array], axis_name: AxisName, groups):
  """Sums same-shaped arrays over shards with a single psum.

  Mixed real and complex inputs travel as complex; each sum comes back in
  its input's dtype (a real input's sum is real).
  """
  out = jnp.stack(vs)
  for name in names(axis_name):
    out = lax.psum(out, name, axis_index_groups=_groups_arg(groups))
  return tuple(
    (out[i] if jnp.iscomplexobj(v) else jnp.real(out[i])).astype(v.dtype)
    for i, v in enumerate(vs)
  )


def as_varying(
  v: jax.Array, axis_name: AxisName, like: jax.Array | None = None
) -> jax.Array:
  """Marks a replicated per-channel value as varying over the mapped axes.

  Under shard_map, JAX inserts this cast implicitly wherever a replicated
  value meets a per-shard one, and transposes each cast into its own psum.
  Casting the stacked backward terms once makes the backward ONE psum.
  Outside shard_map's type system (pmap, vmap) this is the identity. With
  ``like`` (the per-shard input), only axes over which ``like`` varies are
  cast: under ``check_vma=False`` nothing is typed varying, and JAX 0.8
  would transpose the cast into an extra psum.
  """
  vma = _varying(v)
  if vma is None:
    return v
  aval = jax.typeof(v)
  mesh = getattr(getattr(aval, 'sharding', None), 'mesh', None)
  axes = set(getattr(mesh, 'axis_names', ()))
  if like is not None:
    axes &= _varying(like) or set()
  cast = tuple(n for n in names(axis_name) if n in axes and n not in vma)
  if not cast:
    return v
  if hasattr(lax, 'pcast'):  # lax.pvary's successor (JAX 0.10)
    return lax.pcast(v, cast, to='varying')
  return lax.pvary(v, cast)  # type: ignore[attr-defined]  # JAX < 0.10


def _varying(v: jax.Array):
  """The mesh axes v varies over in shard_map's type system, or None."""
  aval = jax.typeof(v)
  mat = getattr(aval, 'manual_axis_type', None)  # JAX >= 0.10
  return mat.varying if mat is not None else getattr(aval, 'vma', None)


def _is_mesh_axis(v: jax.Array, name) -> bool:
  """Whether ``name`` is a manual mesh axis of shard_map around ``v``."""
  aval = jax.typeof(v)
  mesh = getattr(getattr(aval, 'sharding', None), 'mesh', None)
  return name in set(getattr(mesh, 'axis_names', ()))


def _groups_arg(groups):
  return None if groups is None else [list(g) for g in groups]
