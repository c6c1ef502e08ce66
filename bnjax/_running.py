r"""Running-statistic rules: EMA, cumulative average and zero-debiased EMA.

The state type picks the rule (see :mod:`bnjax._types`):

* :class:`BatchStats`: Flax's EMA, :math:`s_t = m s_{t-1} + (1 - m) b_t`.
* :class:`CumulativeStats`: :math:`s_t = (1 - 1/t) s_{t-1} + b_t / t`.
* :class:`DebiasedStats`: hidden EMAs from 0 and their weight
  :math:`w_t = m w_{t-1} + (1 - m)`; inference uses :math:`s_t / w_t`.
* :class:`RenormStats`: EMAs of the batch mean and of
  :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}` (batch renorm).

``b_t`` is the batch mean or biased batch variance. Channels where ``valid``
is False (no unmasked values) keep their state. Results carry no gradient and
keep the dtypes of the state passed in, so a jitted step never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._types import (
  BatchStats,
  CumulativeStats,
  DebiasedStats,
  RenormStats,
  RunningStats,
)

STATE_TYPES = (BatchStats, CumulativeStats, DebiasedStats)


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
):
  """New running state after one batch, by the rule of ``type(old)``."""
  if isinstance(old, RenormStats):
    return ema(old, mean, jnp.sqrt(var + epsilon), momentum, valid)
  if isinstance(old, BatchStats):
    return ema(old, mean, var, momentum, valid)
  if isinstance(old, CumulativeStats):
    inc = 1 if valid is None else valid.astype(old.count.dtype)
    count = old.count + inc
    # (1 - 1/t) old + b/t: exactly b at t = 1.
    keep = 1 - 1 / jnp.maximum(count, 1).astype(mean.dtype)
    return CumulativeStats(
      _mix(old.mean, mean, keep, valid), _mix(old.var, var, keep, valid), count
    )
  if isinstance(old, DebiasedStats):
    one = jnp.ones_like(mean)
    return DebiasedStats(
      _mix(old.mean, mean, momentum, valid),
      _mix(old.var, var, momentum, valid),
      _mix(old.weight, one, momentum, valid),
    )
  raise TypeError(f'unknown running-statistics type {type(old).__name__}')


def inference_params(state, epsilon) -> tuple[jax.Array, jax.Array]:
  """(mean, 1 / std) that inference normalizes with, for any state type."""
  if isinstance(state, RenormStats):
    return state.mean, 1 / state.std
  pop = population_stats(state)
  f = jnp.promote_types(pop.var.dtype, jnp.float32)
  return pop.mean, lax.rsqrt(pop.var.astype(f) + epsilon)


def fallback_stats(state, epsilon) -> tuple[jax.Array, jax.Array]:
  """(mean, var) whose normalization is what inference gives: for a channel
  with no masked-in value in training."""
  if isinstance(state, RenormStats):
    std = state.std.astype(jnp.promote_types(state.std.dtype, jnp.float32))
    return state.mean, jnp.square(std) - epsilon
  pop = population_stats(state)
  return pop.mean, pop.var


def population_stats(state: RunningStats) -> BatchStats:
  """The (mean, var) that inference normalizes with, for any state type.

  :class:`BatchStats` and :class:`CumulativeStats` as stored;
  :class:`DebiasedStats` as ``(mean / weight, var / weight)``, with mean 0
  and var 1 before any update (``weight == 0``).

  Args:
    state: a running-statistics state.

  Returns:
    A :class:`BatchStats`.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> s = bnjax.init_debiased_stats(2)
    >>> x = jnp.array([[1.0, 4.0], [3.0, 8.0]])
    >>> _, s = bnjax.batch_norm(x, s, use_running_average=False)
    >>> bnjax.population_stats(s)  # exactly the first batch's statistics
    BatchStats(mean=Array([2., 6.], dtype=float32), var=Array([1., 4.], dtype=float32))
  """
  if isinstance(state, (BatchStats, CumulativeStats)):
    return BatchStats(state.mean, state.var)
  if isinstance(state, DebiasedStats):
    seen = state.weight > 0
    w = jnp.where(seen, state.weight, 1)
    return BatchStats(
      jnp.where(seen, state.mean / w, 0).astype(state.mean.dtype),
      jnp.where(seen, state.var / w, 1).astype(state.var.dtype),
    )
  raise TypeError(
    f'population_stats: expected BatchStats, CumulativeStats or '
    f'DebiasedStats, got {type(state).__name__}'
  )
