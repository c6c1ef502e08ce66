"""State types for bnjax: immutable NamedTuples whose fields match Flax's collections."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Axis = int | Sequence[int]
DType = Any
# A real scalar: a Python number or a 0-d (possibly traced) array.
Scalar = float | Array
# A mapped axis name (hashable) or a tuple of them.
AxisName = Any
AxisIndexGroups = Sequence[Sequence[int]]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the features are in x, and what the statistics reduce over."""

  ndim: int
  feature_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  feature_shape: tuple[int, ...]
  count: int  # values per channel in the (local) reduction
  shape: tuple[int, ...] = ()  # x's shape, for error messages
  name: str = 'x'  # x's argument name, for error messages

  def broadcast(self, v: jax.Array) -> jax.Array:
    """Reshapes a per-channel array of shape feature_shape to broadcast with x."""
    return jnp.expand_dims(v, self.reduction_axes)


class BatchStats(NamedTuple):
  """Running statistics of one BatchNorm layer.

  The field names match the keys of Flax's ``batch_stats`` collection, so
  ``BatchStats(**variables['batch_stats'][layer])`` and ``stats._asdict()``
  convert one to one.

  Attributes:
    mean: running mean, shape ``feature_shape``.
    var: running biased variance, shape ``feature_shape``.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> variables = {'batch_stats': {'BatchNorm_0': {
    ...     'mean': jnp.zeros(2), 'var': jnp.ones(2)}}}
    >>> stats = bnjax.BatchStats(**variables['batch_stats']['BatchNorm_0'])
    >>> sorted(stats._asdict())
    ['mean', 'var']
  """

  mean: Array
  var: Array


def _is_int(d) -> bool:
  return isinstance(d, (int, np.integer)) and not isinstance(
    d, (bool, np.bool_)
  )


def _feature_shape(
  feature_shape: int | Sequence[int], fn: str = 'bnjax.init_batch_stats'
) -> tuple[int, ...]:
  """A tuple of int sizes. Floats and bools are refused, not truncated
  (``(2.5,)`` was shape (2,), ``True`` shape (1,))."""
  dims: Any = (
    (feature_shape,)
    if _is_int(feature_shape) or isinstance(feature_shape, (bool, np.bool_))
    else feature_shape
  )
  if (
    isinstance(dims, (str, bytes))
    or not isinstance(dims, Sequence)
    or not (all(_is_int(d) for d in dims))
  ):
    raise TypeError(
      f'{fn}: feature_shape must be an int or a tuple of ints '
      f'(the sizes of the feature axes), got {feature_shape!r}; pass e.g. '
      f'{fn}(64) or {fn}((8, 64))'
    )
  shape = tuple(int(d) for d in dims)
  if any(d < 0 for d in shape):
    raise ValueError(
      f'{fn}: feature_shape has a negative size: {shape}; pass sizes >= 0'
    )
  return shape


def init_batch_stats(
  feature_shape: int | Sequence[int], dtype: DType = jnp.float32
) -> BatchStats:
  """Returns fresh running statistics: mean 0 and variance 1, as Flax does.

  Needs no mapped context, so it can be called at init time outside
  ``shard_map``/``pmap``.

  Args:
    feature_shape: the size of the feature axis, or the shape of the feature
      axes when ``axis`` is a tuple.
    dtype: dtype of the statistics (default float32; float16 is refused:
      it overflows past 65504).

  Returns:
    A :class:`BatchStats`.

  Example:
    >>> import bnjax
    >>> bnjax.init_batch_stats(3)
    BatchStats(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32))
  """
  return _init_batch_stats(feature_shape, dtype, 'bnjax.init_batch_stats')


def _init_batch_stats(feature_shape, dtype, fn: str) -> BatchStats:
  """init_batch_stats for the public function ``fn`` (its errors' name)."""
  shape = _feature_shape(feature_shape, fn)
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating) or dt == jnp.float16:
    raise TypeError(
      f'{fn}: dtype must be float32, float64 or bfloat16, got '
      f'{dtype if dt is None else dt} (float16 overflows past 65504); '
      'pass dtype=jnp.float32'
    )
  return BatchStats(jnp.zeros(shape, dt), jnp.ones(shape, dt))


class CumulativeStats(NamedTuple):
  r"""Running statistics as a cumulative (equal-weight) average of batches.

  PyTorch's ``momentum=None``. After ``count`` updates, ``mean`` and ``var``
  are the plain averages of the batch means and biased batch variances:

  .. math:: s_t = (1 - 1/t)\, s_{t-1} + (1/t)\, b_t

  so the first update stores the batch statistics exactly. ``count`` is
  per channel (a channel with no unmasked values is not counted).

  Attributes:
    mean: average of the batch means so far (0 before any update).
    var: average of the biased batch variances so far (1 before any).
    count: int32 number of batches averaged, per channel.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> s = bnjax.init_cumulative_stats(1)
    >>> for b in (jnp.array([[1.], [3.]]), jnp.array([[5.], [7.]])):
    ...   _, s = bnjax.batch_norm(b, s, use_running_average=False)
    >>> s.mean, s.var, s.count        # means 2 and 6; variances 1 and 1
    (Array([4.], dtype=float32), Array([1.], dtype=float32), Array([2], dtype=int32))
  """

  mean: Array
  var: Array
  count: Array  # type: ignore[assignment]  # shadows tuple.count, as Flax names it


class DebiasedStats(NamedTuple):
  r"""Zero-debiased EMA of the batch statistics (haiku's ExponentialMovingAverage).

  ``mean`` and ``var`` are EMAs that start at 0 (both of them) and
  ``weight`` is the same EMA applied to the constant 1, i.e.
  :math:`1 - m^t` after t updates with a fixed momentum m. The statistics
  used for inference are ``mean / weight`` and ``var / weight``
  (:func:`bnjax.population_stats`): the first update gives the batch
  statistics exactly, instead of Flax's 99% pull towards the initial 0 and 1.
  Because both hidden EMAs start at 0, the debiasing is exact for the
  variance too (equinox starts it at 1 and debiases as if it started at 0,
  which inflates the variance by about ``1/(1 - m)`` after one step).
  Before any update (weight 0) inference uses mean 0 and var 1.

  Attributes:
    mean: hidden EMA of the batch means, from 0.
    var: hidden EMA of the biased batch variances, from 0.
    weight: the EMA of 1, :math:`1 - m^t` for a fixed momentum.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> x = jnp.array([[1.], [3.]])          # mean 2, biased variance 1
    >>> _, d = bnjax.batch_norm(x, bnjax.init_debiased_stats(1),
    ...                         use_running_average=False, momentum=0.99)
    >>> bnjax.population_stats(d)            # exactly the batch's
    BatchStats(mean=Array([2.], dtype=float32), var=Array([1.], dtype=float32))
  """

  mean: Array
  var: Array
  weight: Array


class RenormStats(NamedTuple):
  r"""Running statistics of batch renormalization (Ioffe 2017).

  The paper tracks the standard deviation, not the variance:
  ``std`` is the running :math:`\sigma = \sqrt{\sigma_B^2 + \epsilon}`
  (epsilon included), and inference computes ``(x - mean) / std``.

  Attributes:
    mean: running mean, shape ``feature_shape``.
    std: running standard deviation with epsilon, shape ``feature_shape``.

  Example:
    >>> import bnjax
    >>> bnjax.init_renorm_stats(2)
    RenormStats(mean=Array([0., 0.], dtype=float32), std=Array([1., 1.], dtype=float32))
  """

  mean: Array
  std: Array


class PooledStats(NamedTuple):
  r"""Exact moments pooled over every batch seen: gradient accumulation.

  Training with a :class:`PooledStats` merges each batch's moments into the
  pool by Chan's exact merge instead of taking an EMA step: after k
  micro-batches ``mean`` and ``m2 / count`` are the mean and biased variance
  of all k micro-batches concatenated (count-weighted, so uneven or masked
  micro-batches and synced shards pool correctly). Each micro-batch is
  still normalized by its own statistics (ghost BN); inference with the
  pool normalizes by the whole batch's. :func:`bnjax.apply_pooled` then
  applies *one* running-statistics update from the pool, where k calls of
  :func:`bnjax.batch_norm` would apply k EMA steps on small batches.

  The pool is exact at any ``|mean|/std``: ``mean + mean_lo`` carries the
  mean to twice float32's precision, since the spread of the micro-batch
  means, which the pooled variance includes, is otherwise lost to the
  rounding of a large mean.

  Attributes:
    count: float32 number of values pooled, per channel.
    mean: the pooled mean (0 before any batch).
    mean_lo: the low-order part of the pooled mean.
    m2: the pooled sum of squared deviations from the mean.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> pool = bnjax.init_pooled_stats(1)
    >>> for b in (jnp.array([[1.], [3.]]), jnp.array([[5.], [7.]])):
    ...   _, pool = bnjax.batch_norm(b, pool, use_running_average=False)
    >>> bnjax.population_stats(pool)     # of [1, 3, 5, 7]
    BatchStats(mean=Array([4.], dtype=float32), var=Array([5.], dtype=float32))
  """

  count: Array  # type: ignore[assignment]  # shadows tuple.count
  mean: Array
  mean_lo: Array
  m2: Array


# The running-statistics types that batch_norm takes (each picks a rule).
RunningStats = BatchStats | CumulativeStats | DebiasedStats | PooledStats


def init_cumulative_stats(
  feature_shape: int | Sequence[int], dtype: DType = jnp.float32
) -> CumulativeStats:
  """Fresh :class:`CumulativeStats`: mean 0, var 1, count 0.

  Args:
    feature_shape: the size of the feature axis, or the shape of the feature
      axes when ``axis`` is a tuple.
    dtype: dtype of the statistics (float32 by default; float16 refused).

  Example:
    >>> import bnjax
    >>> bnjax.init_cumulative_stats(2).count
    Array([0, 0], dtype=int32)
  """
  s = _init_batch_stats(feature_shape, dtype, 'bnjax.init_cumulative_stats')
  return CumulativeStats(s.mean, s.var, jnp.zeros(s.mean.shape, jnp.int32))


def init_debiased_stats(
  feature_shape: int | Sequence[int], dtype: DType = jnp.float32
) -> DebiasedStats:
  """Fresh :class:`DebiasedStats`: hidden mean, var and weight all 0.

  Args:
    feature_shape: the size of the feature axis, or the shape of the feature
      axes when ``axis`` is a tuple.
    dtype: dtype of the statistics (float32 by default; float16 refused).

  Example:
    >>> import bnjax
    >>> bnjax.population_stats(bnjax.init_debiased_stats(2))  # weight 0
    BatchStats(mean=Array([0., 0.], dtype=float32), var=Array([1., 1.], dtype=float32))
  """
  s = _init_batch_stats(feature_shape, dtype, 'bnjax.init_debiased_stats')
  z = jnp.zeros_like(s.mean)
  return DebiasedStats(z, z, z)


def init_pooled_stats(
  feature_shape: int | Sequence[int], dtype: DType = jnp.float32
) -> PooledStats:
  """An empty :class:`PooledStats`: every field 0.

  Args:
    feature_shape: the size of the feature axis, or the shape of the feature
      axes when ``axis`` is a tuple.
    dtype: dtype of the moments (float32 by default; float16 refused).

  Example:
    >>> import bnjax
    >>> bnjax.population_stats(bnjax.init_pooled_stats(2))   # nothing pooled
    BatchStats(mean=Array([0., 0.], dtype=float32), var=Array([1., 1.], dtype=float32))
  """
  s = _init_batch_stats(feature_shape, dtype, 'bnjax.init_pooled_stats')
  z = jnp.zeros_like(s.mean)
  return PooledStats(z.astype(jnp.promote_types(dtype, jnp.float32)), z, z, z)


def init_renorm_stats(
  feature_shape: int | Sequence[int], dtype: DType = jnp.float32
) -> RenormStats:
  """Fresh :class:`RenormStats`: mean 0, std 1.

  Args:
    feature_shape: the size of the feature axis, or the shape of the feature
      axes when ``axis`` is a tuple.
    dtype: dtype of the statistics (float32 by default; float16 refused).

  Example:
    >>> import bnjax
    >>> bnjax.init_renorm_stats((2, 3)).std.shape
    (2, 3)
  """
  s = _init_batch_stats(feature_shape, dtype, 'bnjax.init_renorm_stats')
  return RenormStats(s.mean, s.var)
