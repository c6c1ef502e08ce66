"""Gradient accumulation's last step: one running-statistics update from
the pooled moments of k micro-batches (:class:`bnjax.PooledStats`), by the
rule of the running state's type (:mod:`bnjax._running`), the one entry
under :func:`bnjax.apply_pooled` and the linen and nnx helpers."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from bnjax import _checks
from bnjax._running import STATE_TYPES, population_stats, rules_of, update
from bnjax._types import PooledStats, RenormStats, RunningStats, Scalar


def apply_pooled(
  batch_stats: RunningStats,
  pooled: PooledStats,
  *,
  momentum: Scalar = 0.99,
  epsilon: Scalar = 0.0,
  when: Any = True,
) -> tuple[RunningStats, PooledStats]:
  r"""One running-statistics update from pooled micro-batch moments.

  Gradient accumulation with k micro-batches: train each micro-batch with
  a :class:`PooledStats` (see there), then call this once. The result is
  the update one :func:`bnjax.batch_norm` call on the k micro-batches
  concatenated would make, by the rule of ``type(batch_stats)`` (Flax's
  EMA for :class:`BatchStats`, ``new = momentum * old + (1 - momentum) *
  pooled``; PyTorch's momentum ``p`` is ``1 - p`` here). Channels with
  nothing pooled keep their statistics.

  Args:
    batch_stats: the running statistics (any state type of
      :func:`bnjax.batch_norm`, or :class:`RenormStats` with ``epsilon``).
    pooled: the micro-batches' :class:`PooledStats`.
    momentum: EMA decay, as :func:`bnjax.batch_norm`'s.
    epsilon: :class:`RenormStats` only: its ``std`` includes it.
    when: a bool, traced or not (e.g. ``step % k == k - 1`` inside a
      jitted step): where False nothing is applied and the pool is kept.

  Returns:
    ``(new batch_stats, pooled)``: statistics of ``batch_stats``'s type,
    shapes and dtypes, and the pool emptied where applied (the shape of
    :func:`bnjax.linen.apply_pooled` and of every other entry).

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> pool = bnjax.init_pooled_stats(1)
    >>> for b in (jnp.array([[1.], [3.]]), jnp.array([[5.], [7.]])):
    ...   _, pool = bnjax.batch_norm(b, pool, use_running_average=False)
    >>> stats, pool = bnjax.apply_pooled(bnjax.init_batch_stats(1), pool,
    ...                                  momentum=0.9)
    >>> stats
    BatchStats(mean=Array([0.4], dtype=float32), var=Array([1.4], dtype=float32))
    >>> pool.count                                     # emptied
    Array([0.], dtype=float32)
  """
  return apply_pooled_as(
    'bnjax.apply_pooled', batch_stats, pooled, momentum, epsilon, when
  )


def apply_pooled_as(
  fn: str, batch_stats, pooled, momentum, epsilon=0.0, when=True
):
  """:func:`apply_pooled` for the public function ``fn`` (the linen and
  nnx helpers), every error prefixed by its name."""
  if not isinstance(pooled, PooledStats):
    raise TypeError(
      f'{fn}: pooled must be a bnjax.PooledStats (train the '
      'micro-batches with bnjax.init_pooled_stats(feature_shape) as their '
      f'batch_stats), got {type(pooled).__name__}'
    )
  if isinstance(batch_stats, PooledStats):
    raise TypeError(
      f'{fn}: batch_stats is a PooledStats; pass the running '
      'statistics the pool updates (e.g. a bnjax.BatchStats)'
    )
  # The checks batch_norm makes of its state and hyperparameters, with the
  # pool's feature shape in place of x's.
  lay = _checks.stats_layout(fn, 'pooled.mean', pooled.mean)
  _checks.check_stats(fn, pooled, lay, PooledStats, 'pooled')
  _checks.check_stats(fn, batch_stats, lay, STATE_TYPES + (RenormStats,))
  _checks.check_momentum(fn, momentum)
  if rules_of(batch_stats).reads_epsilon:
    _checks.check_epsilon(fn, epsilon)
  else:  # unused, but a wrong one is a sign of a mistake
    _checks.check_scalar(fn, 'epsilon', epsilon)
    e = _checks.concrete(epsilon)
    if e is not None and not 0 <= e < float('inf'):
      raise ValueError(
        f'{fn}: epsilon={e} must be finite and >= 0 (only a RenormStats '
        'batch_stats reads it); leave it out'
      )
  for arg, state in (('pooled', pooled), ('batch_stats', batch_stats)):
    _checks.check_running_values(fn, state, arg)
  _checks.check_when(fn, when)
  pop = population_stats(pooled)
  new = update(
    batch_stats, pop.mean, pop.var, momentum, pooled.count > 0, epsilon
  )
  if when is True:  # untraced: the update as it is, bitwise
    return new, PooledStats(*map(jnp.zeros_like, pooled))
  keep = lambda a, b: jnp.where(when, a, b).astype(a.dtype)
  return (
    type(new)(*map(keep, new, batch_stats)),
    PooledStats(*(keep(jnp.zeros_like(v), v) for v in pooled)),
  )
