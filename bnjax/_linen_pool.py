"""``bnjax.linen.apply_pooled``: gradient accumulation's one update for
linen, over the ``batch_stats`` and ``batch_moments`` collections (the
collection walk; the update is :func:`bnjax.apply_pooled`'s)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

from bnjax import _checks, _pooled
from bnjax._types import BatchStats, PooledStats

__all__ = ['apply_pooled']

# A layer's entry in the batch_moments collection: its PooledStats fields
# and the momentum the update takes.
_POOL_KEYS = (*PooledStats._fields, 'momentum')


def apply_pooled(
  batch_stats: Any,
  pooled: Any = None,
  *,
  when: Any = True,
  batch_moments: Any = None,
) -> tuple[Any, Any]:
  r"""One running-statistics update per layer from its pooled moments.

  Gradient accumulation: apply each of k micro-batches with
  ``mutable=['batch_stats', bnjax.linen.MOMENTS]`` (threading the returned
  ``batch_moments`` into the next call). Each :class:`BatchNorm` then pools
  the micro-batches' exact moments (:class:`bnjax.PooledStats`, by count)
  and leaves ``batch_stats`` as they are; this applies one EMA step per
  layer, with that layer's ``momentum``, equal to one step on the k
  micro-batches concatenated. The call and return of
  :func:`bnjax.apply_pooled`, over collections: the momentum is each
  layer's own, recorded in ``batch_moments``, so it is not an argument.

  Args:
    batch_stats: the model's ``batch_stats`` collection.
    pooled: the pooled ``batch_moments`` collection.
    when: a bool (traced is fine, e.g. ``step % k == k - 1`` inside a jitted
      step): where False, nothing is applied and the pool is kept.
    batch_moments: deprecated name of ``pooled`` (warns); pass ``pooled``.

  Returns:
    ``(new batch_stats, pooled)``, the pool emptied where applied, with
    the structure, shapes and dtypes of the inputs (half-precision
    statistics come back float32, as a plain training step stores them).

  Example:
    >>> import jax, jax.numpy as jnp, bnjax.linen
    >>> bn = bnjax.linen.BatchNorm(use_running_average=False, momentum=0.9)
    >>> v = bn.init(jax.random.key(0), jnp.zeros((2, 1)))
    >>> moments = {}
    >>> for b in (jnp.array([[1.], [3.]]), jnp.array([[5.], [7.]])):
    ...   _, upd = bn.apply({**v, bnjax.linen.MOMENTS: moments}, b,
    ...                     mutable=['batch_stats', bnjax.linen.MOMENTS])
    ...   moments = upd[bnjax.linen.MOMENTS]
    >>> stats, moments = bnjax.linen.apply_pooled(v['batch_stats'], moments)
    >>> stats['mean'], stats['var']         # one step to mean 4, var 5
    (Array([0.4], dtype=float32), Array([1.4], dtype=float32))
  """
  fn = 'bnjax.linen.apply_pooled'
  pooled = _renamed(fn, pooled, batch_moments)
  for name, tree in (('batch_stats', batch_stats), ('pooled', pooled)):
    if not isinstance(tree, Mapping):
      raise TypeError(
        f"{fn}: {name} must be a mapping (the model's "
        f'{"batch_moments" if name == "pooled" else name} collection), '
        f'got {type(tree).__name__}'
      )
  _checks.check_when(fn, when)
  stats, pool = _apply_pooled_tree(batch_stats, pooled, when, ())
  # A FrozenDict comes back a FrozenDict: a jitted step's carry keeps its
  # tree structure.
  return _like(batch_stats, stats), _like(pooled, pool)


def _like(tree, out):
  return FrozenDict(out) if isinstance(tree, FrozenDict) else out


def _renamed(fn, pooled, batch_moments):
  """``pooled``, or its deprecated name ``batch_moments`` (warns)."""
  if batch_moments is None:
    if pooled is None:
      raise TypeError(
        f'{fn}: pooled is missing; pass the batch_moments collection as pooled'
      )
    return pooled
  if pooled is not None:
    raise TypeError(
      f'{fn}: batch_moments is the deprecated name of pooled; pass pooled only'
    )
  warnings.warn(
    f'{fn}: batch_moments= is deprecated (the same name as every '
    'apply_pooled entry); pass pooled= or the collection positionally',
    DeprecationWarning,
    stacklevel=3,
  )
  return batch_moments


def _apply_pooled_tree(stats, moments, when, path):
  fn = 'bnjax.linen.apply_pooled'
  where = '/'.join(path) or 'the top'
  if not isinstance(moments, Mapping):
    raise TypeError(
      f'{fn}: pooled at {where} is of type {type(moments).__name__}, not a '
      "mapping of layers or a layer's pool ("
      f'{", ".join(_POOL_KEYS)}); pass the batch_moments collection'
    )
  if 'm2' in moments and not isinstance(moments['m2'], Mapping):
    if not isinstance(stats, Mapping) or not {'mean', 'var'} <= set(stats):
      raise ValueError(
        f'{fn}: pooled has a pool at {where} but '
        'batch_stats has no BatchNorm statistics (mean, var) there; pass '
        'the batch_stats of the same model'
      )
    return _apply_layer(stats, moments, when, path)
  if not isinstance(stats, Mapping):
    raise ValueError(
      f'{fn}: pooled has layers under {where} but batch_stats there is of '
      f'type {type(stats).__name__}; pass the batch_stats of the same model'
    )
  out_stats, out_moments = dict(stats), dict(moments)
  for k, m in moments.items():
    if k not in stats:
      raise ValueError(
        f'{fn}: pooled has {"/".join(path + (k,))} but batch_stats does '
        'not; pass the batch_stats of the same model'
      )
    out_stats[k], out_moments[k] = _apply_pooled_tree(
      stats[k], m, when, path + (k,)
    )
  return out_stats, out_moments


def _apply_layer(stats, moments, when, path):
  """One layer's update: its statistics and its pool (``moments``)."""
  fn = 'bnjax.linen.apply_pooled'
  where = '/'.join(path) or 'the top'
  missing = [k for k in _POOL_KEYS if k not in moments]
  if missing:
    raise ValueError(
      f'{fn}: the pool in pooled at {where} lacks {missing} (a pool has '
      f'{", ".join(_POOL_KEYS)}); pass the batch_moments collection a '
      'bnjax.linen layer wrote, unedited'
    )
  pool = PooledStats(*(moments[f] for f in PooledStats._fields))
  # Stored in at least the pool's float32, as a plain training step
  # stores them (a float16 param_dtype's variance past 65504 is inf).
  old = BatchStats(
    *(
      jnp.asarray(stats[k]).astype(
        jnp.promote_types(jnp.result_type(stats[k]), pool.m2.dtype)
      )
      for k in BatchStats._fields
    )
  )
  _check_pool(path, old, pool, moments['momentum'])
  new, emptied = _pooled.apply_pooled_as(
    fn, old, pool, moments['momentum'], when=when
  )
  return {**stats, **new._asdict()}, {**moments, **emptied._asdict()}


def _check_pool(path, old, pool, momentum):
  """One layer's statistics and pool, named by their collection and path
  (apply_pooled_as checks them again, by its own argument names)."""
  fn = 'bnjax.linen.apply_pooled'
  shapes = {
    '/'.join((c, *path, k)): jnp.shape(v)
    for c, tree in (('batch_stats', old), ('pooled', pool))
    for k, v in tree._asdict().items()
  }
  if len(set(shapes.values())) > 1:
    raise ValueError(
      f'{fn}: the statistics and pool of one layer must have one shape, got '
      f'{shapes}; pass the batch_stats and batch_moments of the same model'
    )
  where = '/'.join(path) or 'the top'
  _checks.check_hyper(f'{fn}: pooled at {where}', momentum, 1e-5)
  for name, state in (('batch_stats', old), ('pooled', pool)):
    _checks.check_running_values(f'{fn}: {name} at {where}', state, name)
