"""Mapped axes and groups: names, sizes and validation, checked at trace time.

Nothing here communicates: ``lax.axis_size`` and ``lax.axis_index`` are
answered at trace time (or locally). The collectives are in ``gather``,
``psum`` and ``dispatch``, through :func:`psum`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AxisName = Any

GROUPS_UNSUPPORTED = (
  '{fn}: axis_index_groups={groups!r} is not supported by JAX under '
  'shard_map or vmap (only under pmap). To normalize groups of devices '
  'separately, give the mesh one axis per level instead, e.g. '
  "jax.make_mesh((replicas, group_size), ('replica', 'bn_group')) with the "
  "batch sharded over both axes, and pass axis_name='bn_group': each "
  "'replica' row then syncs its own group (see the sync guide)."
)


def names(axis_name: AxisName) -> tuple:
  return (
    tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  )


def check_axis_name(fn: str, axis_name: AxisName) -> None:
  """A hashable name, or a tuple of them, none of them an int or bool
  (JAX reads an int as a positional axis: a confusing error later)."""
  for name in names(axis_name):
    if (
      isinstance(name, (bool, int, np.integer, float))
      or name is None
      or not isinstance(name, Hashable)
    ):
      raise TypeError(
        f'{fn}: axis_name={axis_name!r} must be the name of a mapped axis '
        '(a string such as "batch", as given to shard_map, pmap or vmap), or '
        f'a tuple of names; got {name!r} of type {type(name).__name__}'
      )


def canonical_groups(fn: str, axis_name: AxisName, groups: Any):
  """Validated groups as a tuple of tuples (None stays None).

  Groups must partition the indices of ``axis_name`` (each index exactly
  once); they may have unequal sizes. Checked at trace time, after checking
  that every name in ``axis_name`` is bound.
  """
  if axis_name is not None:
    check_axis_name(fn, axis_name)
    check_bound(fn, axis_name)
  if groups is None:
    return None
  if axis_name is None:
    raise ValueError(
      f'{fn}: axis_index_groups={groups!r} was passed without axis_name, so '
      'there is no mapped axis for the groups to index; pass the axis_name '
      'of the pmap axis, or drop axis_index_groups'
    )
  if len(names(axis_name)) != 1:
    raise ValueError(
      f'{fn}: axis_index_groups needs a single axis_name, got '
      f'{axis_name!r}; use one name, or a mesh axis per group level instead '
      'of groups'
    )
  canon = _integer_groups(fn, groups)
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


def _integer_groups(fn: str, groups: Any) -> tuple[tuple[int, ...], ...]:
  """Groups of exact integers: 1.5 or True is refused, never truncated."""
  bad = TypeError(
    f'{fn}: axis_index_groups must be a list of lists of int indices, got '
    f'{groups!r}; pass e.g. [[0, 1], [2, 3]]'
  )
  try:
    rows = [list(g) for g in groups]
  except TypeError:
    raise bad from None
  out = []
  for row in rows:
    ints = []
    for i in row:
      if isinstance(i, (bool, np.bool_)) or not isinstance(
        i, (int, np.integer)
      ):
        raise bad
      ints.append(int(i))
    out.append(tuple(ints))
  return tuple(out)


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


def largest_group(axis_name: AxisName, groups) -> int:
  """Shards in the largest combining group: the devices a collective spans."""
  if groups is not None:
    return max(len(g) for g in groups)
  return math.prod(lax.axis_size(n) for n in names(axis_name))


def uniform_shards(axis_name: AxisName, groups) -> int | None:
  """Shards whose statistics combine, where every shard combines as many
  (no groups, or groups of one size); None with unequal groups. Without a
  mask, a layer's global count is then a constant: the layout's times this."""
  if groups is not None and len({len(g) for g in groups}) > 1:
    return None
  return num_shards(axis_name, groups)


def position_in_group(name, groups) -> tuple[jax.Array, int]:
  """(this shard's row among its group's, the largest group's size)."""
  idx = lax.axis_index(name)
  if groups is None:
    return idx, lax.axis_size(name)
  pos = np.zeros(sum(len(g) for g in groups), np.int32)
  for g in groups:
    pos[list(g)] = np.arange(len(g))
  return jnp.asarray(pos)[idx], max(len(g) for g in groups)


def own_group_size(axis_name: AxisName, groups) -> jax.Array:
  """Shards whose values the psum adds here: the axis size, or this shard's
  own group's size."""
  if groups is None:
    return jnp.asarray(num_shards(axis_name, None), jnp.float32)
  size = np.zeros(sum(len(g) for g in groups), np.float32)
  for g in groups:
    size[list(g)] = len(g)
  return jnp.asarray(size)[lax.axis_index(names(axis_name)[0])]


def groups_arg(groups):
  return None if groups is None else [list(g) for g in groups]
