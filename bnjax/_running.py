r"""Running-statistic rules: EMA, cumulative average and zero-debiased EMA.

The state type picks the rule, one row a type in :data:`RULES` (the
update, the population statistics, what inference and an empty masked
channel normalize with; the types are in :mod:`bnjax._types`):

* :class:`BatchStats`: Flax's EMA, :math:`s_t = m s_{t-1} + (1 - m) b_t`.
* :class:`CumulativeStats`: :math:`s_t = (1 - 1/t) s_{t-1} + b_t / t`.
* :class:`DebiasedStats`: hidden EMAs from 0 and their weight
  :math:`w_t = m w_{t-1} + (1 - m)`; inference uses :math:`s_t / w_t`.
* :class:`RenormStats`: EMAs of the batch mean and of
  :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}` (batch renorm).
* :class:`PooledStats`: no average at all: the batch's exact moments
  merged into the pool (Chan et al.), count-weighted.

``b_t`` is the batch mean or biased batch variance. Channels where ``valid``
is False (no unmasked values) keep their state. Results carry no gradient and
keep the dtypes of the state passed in, so a jitted step never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _checks, _moments
from bnjax._types import (
  BatchStats,
  CumulativeStats,
  DebiasedStats,
  PooledStats,
  RenormStats,
  RunningStats,
)

STATE_TYPES = (BatchStats, CumulativeStats, DebiasedStats, PooledStats)


def stored_dtype(old, new) -> jnp.dtype:
  """The dtype a running statistic keeps: its own, made complex by a complex
  batch mean (as flax's), never dropping the imaginary part."""
  if jnp.iscomplexobj(new) and not jnp.iscomplexobj(old):
    return jnp.promote_types(old.dtype, new.dtype)
  return old.dtype


def _mix(old, batch, keep, valid):
  """keep * old + (1 - keep) * batch, in batch's (>= float32) precision."""
  batch = lax.stop_gradient(batch)
  new = keep * old.astype(batch.dtype) + (1 - keep) * batch
  if valid is not None:
    new = jnp.where(valid, new, old.astype(batch.dtype))
  return new.astype(stored_dtype(old, new))


def ema(
  old, mean: jax.Array, var: jax.Array, momentum, valid: jax.Array | None = None
):
  """EMA of both fields of a two-field state (BatchStats, RenormStats)."""
  return type(old)(
    _mix(old[0], mean, momentum, valid), _mix(old[1], var, momentum, valid)
  )


def update(
  old,
  mean: jax.Array,
  var: jax.Array,
  momentum,
  valid: jax.Array | None = None,
  epsilon=0.0,
  count_lo: tuple[jax.Array, jax.Array] | None = None,
  spread: bool = True,
):
  """New running state after one batch, by the rule of ``type(old)``.

  ``count_lo``: ``(values per channel, mean_lo)`` of the batch (see
  ``bnjax._moments.finalize_lo``); only :class:`PooledStats` reads it, and
  ``spread`` (see :func:`pool`)."""
  rules = rules_of(old)
  if rules is None:
    raise TypeError(f'unknown running-statistics type {type(old).__name__}')
  if rules.ema and _is_one(momentum):
    # momentum 1 is "never update" (a frozen model's BN): the state comes
    # back bitwise, where 1 * old + 0 * batch would let a NaN batch in.
    return old
  return rules.update(
    old, Batch(mean, var, valid, count_lo, spread), momentum, epsilon
  )


def merge_pools(pools: PooledStats, axis: int = 0) -> PooledStats:
  """Pools stacked along ``axis`` merged into the pool of their union:
  exact and count-weighted (``bnjax._moments.merge``, each mean with its
  low-order part); pools with nothing in a channel weigh 0 there."""
  return from_partial(_moments.merge(as_partial(pools), axis))


def as_partial(p: PooledStats) -> _moments.Partial:
  """The pool as the engine's partial moments around its mean (at least
  float32), for ``bnjax._moments.merge`` and the gather."""
  f = jnp.promote_types(p.mean.dtype, jnp.float32)
  count = p.count.astype(f)
  return _moments.Partial(
    count, p.mean.astype(f), count * p.mean_lo.astype(f), p.m2.astype(f)
  )


def from_partial(p: _moments.Partial) -> PooledStats:
  """The pool of merged partial moments (inverse of :func:`as_partial`)."""
  mean, var, lo = _moments.finalize_lo(p)
  return PooledStats(p.count, mean, lo, var * p.count)


def pool(
  old: PooledStats, mean, var, count_lo, valid=None, spread=True
) -> PooledStats:
  """The pool merged with one batch: exact and count-weighted
  (:func:`merge_pools` of the two). ``spread=False`` (ghost batches:
  ``count`` chunks of averaged ``mean`` and ``var``) leaves out the spread
  of the means, as one ghost call's running-statistics average does."""
  count, lo = count_lo
  f = jnp.promote_types(jnp.result_type(old.mean, mean), jnp.float32)
  mean, var, lo = (lax.stop_gradient(v).astype(f) for v in (mean, var, lo))
  n = jnp.broadcast_to(lax.stop_gradient(count), mean.shape).astype(f)
  batch = PooledStats(n, mean, lo, n * var)
  both = PooledStats(
    *(jnp.stack([a.astype(f), b]) for a, b in zip(old, batch, strict=True))
  )
  new = merge_pools(both)
  if not spread:
    new = new._replace(m2=old.m2.astype(f) + batch.m2)
  if valid is not None:
    new = PooledStats(
      *(jnp.where(valid, a, b) for a, b in zip(new, old, strict=True))
    )
  return PooledStats(
    *(a.astype(b.dtype) for a, b in zip(new, old, strict=True))
  )


def _is_one(momentum) -> bool:
  return isinstance(momentum, (int, float)) and momentum == 1


def inference_params(state, epsilon) -> tuple[jax.Array, jax.Array]:
  """(mean, 1 / std) that inference normalizes with, for any state type."""
  return rules_of(state).inference(state, epsilon)


def fallback_stats(state, epsilon) -> tuple[jax.Array, jax.Array]:
  """(mean, var) whose normalization is what inference gives: for a channel
  with no masked-in value in training."""
  return rules_of(state).fallback(state, epsilon)


def population_stats(state: RunningStats) -> BatchStats:
  """The (mean, var) that inference normalizes with, for any state type.

  :class:`BatchStats` and :class:`CumulativeStats` as stored;
  :class:`DebiasedStats` as ``(mean / weight, var / weight)``, with mean 0
  and var 1 before any update (``weight == 0``); :class:`PooledStats` as
  ``(mean + mean_lo, m2 / count)``, mean 0 and var 1 with nothing pooled.

  Args:
    state: a running-statistics state.

  Returns:
    A :class:`BatchStats`.

  Raises:
    TypeError: not a running-statistics state, or float16 fields.
    ValueError: fields of different shapes; concrete NaN or inf values, a
      negative variance, m2, count or weight.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> s = bnjax.init_debiased_stats(2)
    >>> x = jnp.array([[1.0, 4.0], [3.0, 8.0]])
    >>> _, s = bnjax.batch_norm(x, s, use_running_average=False)
    >>> bnjax.population_stats(s)  # exactly the first batch's statistics
    BatchStats(mean=Array([2., 6.], dtype=float32), var=Array([1., 4.], dtype=float32))
  """
  return population_stats_as('bnjax.population_stats', state)


def population_stats_as(
  fn: str, state: RunningStats, *, check: bool = True
) -> BatchStats:
  """:func:`population_stats` for the public function ``fn``, every
  error prefixed by its name. ``check=False``: a converter that puts the
  result through the one value check of conversions (``_values``)."""
  if check and isinstance(state, STATE_TYPES):
    lay = _checks.stats_layout(fn, 'state.mean', state.mean)
    _checks.check_stats(fn, state, lay, STATE_TYPES, 'state')
    _checks.check_running_values(fn, state, 'state')
  population = rules_of(state).population
  if population is None:
    raise TypeError(
      f'bnjax.population_stats: state must be a BatchStats, CumulativeStats, '
      f'DebiasedStats or PooledStats, got {type(state).__name__}'
    )
  return population(state)


# ------------------------------------------------------------ the rules ---
# Each state type's rules, one row a type in RULES: a new state type is one
# row (and its NamedTuple in bnjax._types), and no function above branches
# on the type.


class Batch(NamedTuple):
  """One batch's statistics, as :func:`update` passes them to a rule."""

  mean: jax.Array
  var: jax.Array
  valid: jax.Array | None
  count_lo: tuple[jax.Array, jax.Array] | None
  spread: bool


def _ema_update(old, b: Batch, momentum, epsilon):
  return ema(old, b.mean, b.var, momentum, b.valid)


def _renorm_update(old: RenormStats, b: Batch, momentum, epsilon):
  return ema(old, b.mean, jnp.sqrt(b.var + epsilon), momentum, b.valid)


def _cumulative_update(old: CumulativeStats, b: Batch, momentum, epsilon):
  inc = 1 if b.valid is None else b.valid.astype(old.count.dtype)
  count = old.count + inc
  # (1 - 1/t) old + b/t: exactly b at t = 1.
  keep = 1 - 1 / jnp.maximum(count, 1).astype(b.mean.dtype)
  return CumulativeStats(
    _mix(old.mean, b.mean, keep, b.valid),
    _mix(old.var, b.var, keep, b.valid),
    count,
  )


def _debiased_update(old: DebiasedStats, b: Batch, momentum, epsilon):
  one = jnp.ones_like(b.mean)
  return DebiasedStats(
    _mix(old.mean, b.mean, momentum, b.valid),
    _mix(old.var, b.var, momentum, b.valid),
    _mix(old.weight, one, momentum, b.valid),
  )


def _pooled_update(old: PooledStats, b: Batch, momentum, epsilon):
  if b.count_lo is None:
    raise TypeError(
      'bnjax._running.update: a PooledStats update needs count_lo'
    )
  return pool(old, b.mean, b.var, b.count_lo, b.valid, b.spread)


def _not_a_state(old, b: Batch, momentum, epsilon):
  raise TypeError(f'unknown running-statistics type {type(old).__name__}')


def _stored(state) -> BatchStats:
  return BatchStats(state.mean, state.var)


def _debiased_population(state: DebiasedStats) -> BatchStats:
  seen = state.weight > 0
  w = jnp.where(seen, state.weight, 1)
  return BatchStats(
    jnp.where(seen, state.mean / w, 0).astype(state.mean.dtype),
    jnp.where(seen, state.var / w, 1).astype(state.var.dtype),
  )


def _pooled_population(state: PooledStats) -> BatchStats:
  seen = state.count > 0
  n = jnp.where(seen, state.count, 1).astype(state.m2.dtype)
  return BatchStats(
    jnp.where(seen, state.mean + state.mean_lo, 0).astype(state.mean.dtype),
    jnp.where(seen, state.m2 / n, 1).astype(state.m2.dtype),
  )


def _population_inference(state, epsilon):
  pop = population_stats(state)
  f = jnp.promote_types(pop.var.dtype, jnp.float32)
  return pop.mean, lax.rsqrt(pop.var.astype(f) + epsilon)


def _population_fallback(state, epsilon):
  pop = population_stats(state)
  return pop.mean, pop.var


def _renorm_inference(state: RenormStats, epsilon):
  return state.mean, 1 / state.std


def _renorm_fallback(state: RenormStats, epsilon):
  std = state.std.astype(jnp.promote_types(state.std.dtype, jnp.float32))
  return state.mean, jnp.square(std) - epsilon


class Rules(NamedTuple):
  """The rules of one running-statistics type: its row of :data:`RULES`."""

  # (old, batch, momentum, epsilon) -> the state after the batch.
  update: Callable[[Any, Batch, Any, Any], Any]
  # The (mean, var) inference normalizes with (population_stats); None for
  # a state that keeps no variance.
  population: Callable[[Any], BatchStats] | None
  # An EMA in momentum: momentum 1 returns the state bitwise.
  ema: bool = True
  # (state, epsilon) -> (mean, 1 / std) that inference normalizes with.
  inference: Callable[[Any, Any], tuple[jax.Array, jax.Array]] = (
    _population_inference
  )
  # (state, epsilon) -> the (mean, var) whose normalization is inference's.
  fallback: Callable[[Any, Any], tuple[jax.Array, jax.Array]] = (
    _population_fallback
  )
  # Its fields hold epsilon (a std of var + epsilon).
  reads_epsilon: bool = False
  # (mean, var, epsilon) -> the state that infers with that population (a
  # converter loading torch's or haiku's statistics); None: not loadable.
  from_population: Callable[[Any, Any, Any], Any] | None = None


RULES: dict[type, Rules] = {
  BatchStats: Rules(
    _ema_update,
    _stored,
    from_population=lambda mean, var, eps: BatchStats(mean, var),
  ),
  CumulativeStats: Rules(_cumulative_update, _stored, ema=False),
  DebiasedStats: Rules(
    _debiased_update,
    _debiased_population,
    from_population=lambda mean, var, eps: DebiasedStats(
      mean, var, jnp.ones_like(var)
    ),
  ),
  PooledStats: Rules(_pooled_update, _pooled_population, ema=False),
  RenormStats: Rules(
    _renorm_update,
    None,
    inference=_renorm_inference,
    fallback=_renorm_fallback,
    reads_epsilon=True,
    from_population=lambda mean, var, eps: RenormStats(
      mean, jnp.sqrt(var + jnp.asarray(eps, var.dtype))
    ),
  ),
}
# Not a state: update raises (after momentum 1, which keeps anything),
# population_stats raises its TypeError.
_NOT_A_STATE = Rules(_not_a_state, None)


def rules_of(state) -> Rules:
  """The rules of ``type(state)``, or of the state type it derives from."""
  for t in type(state).__mro__:
    if t in RULES:
      return RULES[t]
  return _NOT_A_STATE
