"""State types for bnjax: immutable NamedTuples whose fields match Flax's collections."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Axis = Union[int, Sequence[int]]
DType = Any


class BatchStats(NamedTuple):
  """Running statistics of one BatchNorm layer.

  The field names match the keys of Flax's ``batch_stats`` collection, so
  ``BatchStats(**variables['batch_stats'][layer])`` and ``stats._asdict()``
  convert one to one.

  Attributes:
    mean: running mean, shape ``feature_shape``.
    var: running biased variance, shape ``feature_shape``.
  """

  mean: Array
  var: Array


def _feature_shape(feature_shape: int | Sequence[int]) -> tuple[int, ...]:
  if isinstance(feature_shape, int):
    feature_shape = (feature_shape,)
  if isinstance(feature_shape, str):
    feature_shape = None
  try:
    shape = tuple(int(d) for d in feature_shape)
  except TypeError:
    raise TypeError(
        f'init_batch_stats: feature_shape must be an int or a tuple of ints, '
        f'got {feature_shape!r}') from None
  if any(d < 0 for d in shape):
    raise ValueError(
        f'init_batch_stats: feature_shape has a negative size: {shape}')
  return shape


def init_batch_stats(feature_shape: int | Sequence[int],
                     dtype: DType = jnp.float32) -> BatchStats:
  """Returns fresh running statistics: mean 0 and variance 1, as Flax does.

  Needs no mapped context, so it can be called at init time outside
  ``shard_map``/``pmap``.

  Args:
    feature_shape: the size of the feature axis, or the shape of the feature
      axes when ``axis`` is a tuple.
    dtype: dtype of the statistics (default float32; keep at least float32).

  Returns:
    A :class:`BatchStats`.

  Example:
    >>> import bnjax
    >>> bnjax.init_batch_stats(3)
    BatchStats(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32))
  """
  shape = _feature_shape(feature_shape)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'init_batch_stats: dtype must be floating, got {jnp.dtype(dtype)}; '
        'pass dtype=jnp.float32')
  return BatchStats(jnp.zeros(shape, dtype), jnp.ones(shape, dtype))
