"""Averaging per-device running statistics (``bnjax.training.average_stats``).

A weighted mean over devices for EMA states; the exact pool of the union
for :class:`bnjax.PooledStats` (``bnjax._running.merge_pools``, or the
engine's gather under an axis name). Weights and state values are checked
here, so nothing averages into NaN quietly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from bnjax import _checks, _moments, _running
from bnjax._moments.gather import gather_merge
from bnjax._types import PooledStats, RenormStats


def average_stats(
  stats: Any,
  axis_name: Any = None,
  *,
  weight: Any = None,
  axis_index_groups: Any = None,
) -> Any:
  r"""Averages per-device running statistics, weighted, for evaluation.

  Local-BN data parallelism leaves each device its own running statistics.
  Before evaluating or checkpointing, replace each by the weighted mean
  over devices, :math:`\sum_d w_d s_d / \sum_d w_d` (equal weights: the
  plain mean), one collective for the whole tree. Running variances are
  averaged like means: what the per-step spread of the devices' batch
  means added to the global variance is not recoverable from EMAs (for
  that, recompute with :func:`recalibrate`). A :class:`bnjax.PooledStats`
  is exact moments, so it becomes the pool of the devices' union (merged
  by its own counts, spread of the means included; ``weight`` does not
  apply to it).

  Args:
    stats: a pytree of running statistics (``BatchStats``, a linen
      ``batch_stats`` collection, ``nnx.state(model, nnx.BatchStat)``).
      Floating leaves are averaged; integer leaves (counts) are kept.
    axis_name: the mapped axis (``shard_map``, ``pmap``) the devices are
      on; every device gets the average. None: ``stats`` hold the devices
      stacked on a leading axis (e.g. shard_map's output with
      ``out_specs=P('data')`` reshaped to ``(devices, ...)``) and the
      average drops it.
    weight: each device's weight (a scalar per device: the number of
      examples its statistics saw, or a mask count), finite and >= 0 with
      a positive total; None: equal.
    axis_index_groups: groups of ``axis_name`` averaged separately.

  Returns:
    ``stats`` averaged (without the leading axis when ``axis_name`` is None).

  Raises:
    ValueError: a weight of the wrong shape, non-finite or negative, or
      weights summing to 0 (traced weights: a ``checkify`` check).

  Example:
    >>> import jax.numpy as jnp, bnjax, bnjax.training
    >>> per_device = bnjax.BatchStats(jnp.array([[0.0], [2.0]]),
    ...                               jnp.array([[1.0], [3.0]]))
    >>> bnjax.training.average_stats(per_device, weight=jnp.array([1.0, 3.0]))
    BatchStats(mean=Array([1.5], dtype=float32), var=Array([2.5], dtype=float32))
  """
  fn = 'bnjax.training.average_stats'
  is_pool = lambda t: isinstance(t, PooledStats)
  _check_stats_values(fn, stats)
  leaves, treedef = jax.tree.flatten(stats, is_leaf=is_pool)
  floats = [
    not is_pool(v) and jnp.issubdtype(jnp.result_type(v), jnp.inexact)
    for v in leaves
  ]
  groups = _moments.canonical_groups(fn, axis_name, axis_index_groups)
  if axis_name is None:
    return jax.tree.unflatten(
      treedef,
      [
        _running.merge_pools(v)
        if is_pool(v)
        else _stacked_mean(fn, v, weight)
        if f
        else v[0]
        for v, f in zip(leaves, floats, strict=True)
      ],
    )
  w = _check_weight(fn, weight, ())
  picked = [jnp.ravel(v) for v, f in zip(leaves, floats, strict=True) if f]
  dtype = jnp.result_type(jnp.float32, *picked)
  flat = jnp.concatenate([w[None].astype(dtype)] + [w * v for v in picked])
  (total,) = _moments.psum_stacked([flat], axis_name, groups, fn)
  _check_total(fn, total[0])
  mean, out = total[1:] / total[0], []
  for v, f in zip(leaves, floats, strict=True):
    if is_pool(v):
      p = gather_merge(_running.as_partial(v), axis_name, groups, fn)
      out.append(
        PooledStats(
          *(
            a.astype(b.dtype)
            for a, b in zip(_running.from_partial(p), v, strict=True)
          )
        )
      )
    elif f:
      size = v.size
      out.append(mean[:size].reshape(v.shape).astype(v.dtype))
      mean = mean[size:]
    else:
      out.append(v)
  return jax.tree.unflatten(treedef, out)


_STATES = (*_running.STATE_TYPES, RenormStats)


def _check_stats_values(fn, stats) -> None:
  """Numeric leaves; concrete states usable (finite, variances >= 0)."""
  is_state = lambda t: isinstance(t, _STATES)
  for leaf in jax.tree.leaves(stats, is_leaf=is_state):
    if is_state(leaf):
      _checks.check_running_values(fn, leaf, 'stats')
      continue
    ok = hasattr(leaf, 'dtype') or isinstance(leaf, (int, float))
    if not ok or not jnp.issubdtype(jnp.result_type(leaf), jnp.number):
      raise TypeError(
        f'{fn}: stats must be a pytree of arrays (running statistics), got '
        f'a leaf {leaf!r:.40} of type {type(leaf).__name__}'
      )
    if not isinstance(leaf, jax.core.Tracer) and not np.all(
      np.isfinite(np.asarray(leaf))
    ):
      raise ValueError(
        f'{fn}: stats holds a non-finite statistic ({np.asarray(leaf)!r:.60})'
        '; reinitialize or reload it before averaging'
      )


def _check_weight(fn, weight, shape) -> jax.Array:
  """Weights of ``shape``: real, finite and >= 0 (concrete ones raise here,
  traced ones get a checkify check); None: ones."""
  if weight is None:
    return jnp.ones(shape, jnp.float32)
  if (
    isinstance(weight, (str, bytes))
    or not jnp.issubdtype(jnp.result_type(weight), jnp.integer)
    and not jnp.issubdtype(jnp.result_type(weight), jnp.floating)
  ):
    raise TypeError(
      f'{fn}: weight must be a real number per device (a float or int array), '
      f'got {weight!r:.60}'
    )
  w = jnp.asarray(
    weight, jnp.promote_types(jnp.result_type(weight), jnp.float32)
  )
  if w.shape != shape:
    where = 'under axis_name' if shape == () else 'stacked on the leading axis'
    raise ValueError(
      f'{fn}: weight of shape {w.shape} must have one entry per device, '
      f'{shape} {where}'
    )
  if isinstance(w, jax.core.Tracer):
    checkify.debug_check(
      jnp.all(jnp.isfinite(w) & (w >= 0)),
      f'{fn}: weight must be finite and >= 0',
    )
    return w
  a = np.asarray(w)
  if not np.all(np.isfinite(a) & (a >= 0)):
    raise ValueError(
      f'{fn}: weight must be finite and >= 0 (a count of examples), got '
      f'{a.tolist()}'
    )
  return w


def _check_total(fn, total):
  """The weights' total is positive (else the average is 0/0)."""
  msg = (
    f'{fn}: the weights sum to 0, so the average is 0/0; give at least one '
    'device a positive weight'
  )
  if isinstance(total, jax.core.Tracer):
    checkify.debug_check(total > 0, msg)
  elif not total > 0:
    raise ValueError(msg)


def _stacked_mean(fn, v, weight):
  if jnp.ndim(v) < 1:
    raise ValueError(
      f'{fn}: with axis_name=None the statistics must be stacked along a '
      'leading device axis; got a scalar leaf'
    )
  w = _check_weight(fn, weight, v.shape[:1])
  total = jnp.sum(w)
  _check_total(fn, total)
  w = w.reshape(w.shape + (1,) * (v.ndim - 1)).astype(
    jnp.result_type(v, jnp.float32)
  )
  return (jnp.sum(w * v, 0) / total.astype(w.dtype)).astype(v.dtype)
