"""The collectives bnjax uses, in one place: psum, pmax, the replicated
all-gather, and shard_map's varying cast. Every other module calls these.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._moments import axes

AxisName = Any


def psum(v, axis_name: AxisName, groups, fn: str):
  """``lax.psum`` over each name in turn (one collective per name), with
  JAX's bare NotImplementedError for groups under shard_map/vmap replaced
  by bnjax's error naming the supported alternative."""
  return _reduce(lax.psum, v, axis_name, groups, fn)


def pmax(v, axis_name: AxisName, groups, fn: str):
  """``lax.pmax``, as :func:`psum`."""
  return _reduce(lax.pmax, v, axis_name, groups, fn)


def _reduce(op, v, axis_name: AxisName, groups, fn: str):
  for name in axes.names(axis_name):
    try:
      v = op(v, name, axis_index_groups=axes.groups_arg(groups))
    except NotImplementedError:
      if groups is None:
        raise
      raise ValueError(
        axes.GROUPS_UNSUPPORTED.format(fn=fn, groups=[list(g) for g in groups])
      ) from None
  return v


def psum_stacked(vs: Sequence[jax.Array], axis_name: AxisName, groups, fn):
  """Sums same-shaped arrays over shards with a single psum.

  Mixed real and complex inputs travel as complex; each sum comes back in
  its input's dtype (a real input's sum is real).
  """
  out = psum(jnp.stack(vs), axis_name, groups, fn)
  return tuple(
    (out[i] if jnp.iscomplexobj(v) else jnp.real(out[i])).astype(v.dtype)
    for i, v in enumerate(vs)
  )


# An all-gather whose output is replicated (invariant) in shard_map's type
# system, so statistics built from it can leave with out_specs=P(). JAX 0.10
# and later take lax.all_gather(..., to='invarying'); 0.8 and 0.9 have only
# the private all_gather_invariant. Where neither exists the caller falls
# back to the psum-gather (the same statistics, also one collective).
def _find_replicated_all_gather() -> Callable[..., Any] | None:
  if 'to' in inspect.signature(lax.all_gather).parameters:
    return lambda v, name: lax.all_gather(v, name, to='invarying')
  try:  # pragma: no cover - JAX < 0.10
    from jax._src.lax.parallel import all_gather_invariant

    return all_gather_invariant
  except ImportError:  # pragma: no cover
    return None


replicated_all_gather = _find_replicated_all_gather()


def as_varying(
  v: jax.Array, axis_name: AxisName, like: jax.Array | None = None
) -> jax.Array:
  """Marks a replicated per-channel value as varying over the mapped axes.

  Under shard_map, JAX inserts this cast implicitly wherever a replicated
  value meets a per-shard one, and transposes each cast into its own psum.
  Outside shard_map's type system (pmap, vmap) this is the identity. With
  ``like`` (the per-shard input), only axes over which ``like`` varies are
  cast: under ``check_vma=False`` nothing is typed varying, and JAX 0.8
  would transpose the cast into an extra psum.
  """
  cast = _cast_axes(v, axis_name, like)
  return _pcast(v, cast) if cast else v


def as_varying_stacked(
  vs: Sequence[jax.Array], axis_name: AxisName, like: jax.Array
) -> tuple[jax.Array, ...]:
  """:func:`as_varying` of same-shaped arrays, cast stacked so that the
  backward is ONE psum. Where nothing is cast (pmap, vmap,
  ``check_vma=False``) they are returned as they are: a stack and its
  unstack there only add a pad and a slice per array to the backward."""
  cast = _cast_axes(vs[0], axis_name, like)
  if not cast:
    return tuple(vs)
  return tuple(_pcast(jnp.stack(vs), cast))


def _cast_axes(v: jax.Array, axis_name: AxisName, like) -> tuple:
  vma = varying_axes(v)
  if vma is None:
    return ()
  return tuple(
    n
    for n in axes.names(axis_name)
    if n in mesh_axes(v)
    and n not in vma
    and (like is None or n in (varying_axes(like) or set()))
  )


def _pcast(v: jax.Array, cast: tuple) -> jax.Array:
  if hasattr(lax, 'pcast'):  # lax.pvary's successor (JAX 0.10)
    return lax.pcast(v, cast, to='varying')
  return lax.pvary(v, cast)  # type: ignore[attr-defined]  # JAX < 0.10


def varying_axes(v: jax.Array) -> set | None:
  """The mesh axes v varies over in shard_map's type system, or None."""
  return aval_varying_axes(jax.typeof(v))


def aval_varying_axes(aval) -> set | None:
  """:func:`varying_axes` of an abstract value (a lowering rule's)."""
  mat = getattr(aval, 'manual_axis_type', None)  # JAX >= 0.10
  vma = mat.varying if mat is not None else getattr(aval, 'vma', None)
  return None if vma is None else set(vma)


def mesh_axes(v: jax.Array) -> set:
  """The manual mesh axes of the shard_map around ``v`` (empty outside)."""
  aval = jax.typeof(v)
  mesh = getattr(getattr(aval, 'sharding', None), 'mesh', None)
  return set(getattr(mesh, 'axis_names', ()))


def replicated_by_type(v: jax.Array, like: jax.Array, axis_name) -> bool:
  """Whether shard_map's type system proves ``v`` equal on every shard of
  ``axis_name``: ``like`` (the per-shard input) is typed varying over each
  name, so typing is on, and ``v`` is not."""
  vv, vl = varying_axes(v), varying_axes(like)
  if vv is None or vl is None:
    return False
  return all(n in vl and n not in vv for n in axes.names(axis_name))
