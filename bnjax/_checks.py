"""Trace-time validation of user input, shared by every public function.

Every error names the function (or module), the argument, the offending
shape or value and the fix. Checks run on static shapes, so they fire at
trace time under jit. Values that only exist at run time (a traced momentum)
get a ``checkify.debug_check``: free without ``checkify``, an error with it.

Here: arrays (x, per-channel vectors, masks, axes) and states. The checks of
one scalar argument (flags, momentum, epsilon) are in
:mod:`bnjax._scalar_checks`, re-exported here so that every caller imports
one module.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Re-exported (F401): the callers' one import of the checks.
from bnjax._scalar_checks import (  # noqa: F401
  check_epsilon,
  check_flag,
  check_hyper,
  check_momentum,
  check_scalar,
  check_use_running_average,
  check_when,
  concrete,
  float_dtype,
  is_int,
)
from bnjax._types import BatchStats, Layout, RenormStats

_ONE_VALUE_MSG = (
  '{fn}: training mode needs more than one value per channel, but x of shape '
  '{shape} with axis={axis} reduces over {count} value(s) per channel, so the '
  'batch variance is 0 and the output would be just the bias. Pass '
  'use_running_average=True for inference, use a larger batch, or {fix}.'
)
_STATS_TYPE_MSG = (
  '{fn}: batch_stats must be a bnjax.BatchStats(mean, var) (or '
  'CumulativeStats / DebiasedStats / PooledStats), got {got}. '
  'Create one with bnjax.init_batch_stats(feature_shape) or convert a Flax '
  "collection with bnjax.BatchStats(**variables['batch_stats'][name])."
)
_RENORM_TYPE_MSG = (
  '{fn}: renorm_stats must be a bnjax.RenormStats(mean, std), got {got}. '
  'Batch renorm tracks the running standard deviation, not the variance: '
  'create one with bnjax.init_renorm_stats(feature_shape){conv}.'
)
_HALF_STATS_MSG = (
  '{fn}: {name}.{field} has dtype {dtype}, which overflows past 65504: '
  'a variance of 1e5 would be stored as inf and inference would then output '
  'the bias. Keep running statistics in float32, e.g. jax.tree.map(lambda '
  'v: v.astype(jnp.float32), {name}) (bfloat16 also works, with 3 '
  'significant digits); the input x may stay float16.'
)


def check_floating(
  fn: str, x: Any, name: str = 'x', complex_ok: bool = False
) -> jax.Array:
  """A real floating array (or complex, where ``complex_ok``)."""
  dtype = getattr(x, 'dtype', None)
  if dtype is None:
    try:
      x = jnp.asarray(x)
    except (TypeError, ValueError):  # a string, a list of strings, None
      raise TypeError(
        f'{fn}: {name} must be a floating-point array, got '
        f'{type(x).__name__} {x!r:.60}; pass e.g. a jnp.float32 array'
      ) from None
    dtype = x.dtype
  if complex_ok and jnp.issubdtype(dtype, jnp.complexfloating):
    return x
  if not jnp.issubdtype(dtype, jnp.floating):
    kinds = 'a floating-point or complex' if complex_ok else 'a real floating'
    raise TypeError(
      f'{fn}: {name} must be {kinds} array, got dtype {dtype}; '
      f'cast it first, e.g. {name}.astype(jnp.float32)'
    )
  return x


def layout(fn: str, x: jax.Array, axis: Any, name: str = 'x') -> Layout:
  """Canonicalizes the feature axis (int or tuple) against x's rank."""
  ndim = x.ndim
  axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
  if isinstance(axes, (str, bytes)) or not all(
    isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))
    for a in _iter(axes)
  ):
    raise TypeError(
      f'{fn}: axis must be an int or a tuple of ints, got {axis!r} '
      f'(a {type(axis).__name__}); pass e.g. axis=-1 or axis=(1, 2)'
    )
  axes = tuple(int(a) for a in axes)
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
        f'{fn}: axis {a} is out of range for x of shape {x.shape} '
        f'(ndim {ndim}); pass an axis in [{-ndim}, {ndim - 1}]'
      )
  canon = tuple(sorted(a % ndim for a in axes))
  if len(set(canon)) != len(canon):
    raise ValueError(
      f'{fn}: axis={axis!r} names the same axis twice for x of shape '
      f'{x.shape}; pass each feature axis once'
    )
  red = tuple(i for i in range(ndim) if i not in canon)
  count = math.prod(x.shape[i] for i in red)
  if count == 0:
    raise ValueError(
      f'{fn}: the reduction is empty: x has shape {x.shape} and axis={axis!r}, '
      f'so statistics reduce over axes {red} holding 0 values; pass a '
      'non-empty batch'
    )
  return Layout(
    ndim,
    canon,
    red,
    tuple(x.shape[i] for i in canon),
    count,
    tuple(x.shape),
    name,
  )


def check_per_channel(
  fn: str,
  name: str,
  v: Any,
  lay: Layout,
  floating: bool = True,
  real: bool = False,
):
  """Checks that scale, bias, mean or var has the feature shape.

  A variance or std is real; with ``real`` (real x) so are scale and bias:
  a complex one would lose its imaginary part silently.
  """
  if v is None:
    return None
  stat = name.endswith('var') or name.endswith('std')
  if floating:
    v = check_floating(fn, v, name, complex_ok=not (stat or real))
  else:
    v = jnp.asarray(v)
  if tuple(v.shape) != lay.feature_shape:
    raise ValueError(
      f'{fn}: {name} has shape {tuple(v.shape)} but {lay.name} of shape '
      f'{lay.shape} '
      f'has features of shape {lay.feature_shape} on axis {_axis_str(lay)}; '
      + _per_channel_fix(name, tuple(v.shape), lay)
    )
  return v


def _per_channel_fix(name: str, shape: tuple[int, ...], lay: Layout) -> str:
  """The likely fix: another axis of x has the size (NCHW data), or a shape."""
  axis = other_axis(lay, shape)
  if axis is not None:
    nchw = ' (channels-first data such as NCHW)' if axis == 1 else ''
    return (
      f'axis {axis} of x has size {shape[0]}: if the features are there'
      f'{nchw}, pass axis={axis}; otherwise pass {name} of shape '
      f'{lay.feature_shape}'
    )
  return f'pass {name} of shape {lay.feature_shape}'


def other_axis(lay: Layout, shape: tuple[int, ...]) -> int | None:
  """The first axis of x, not a feature axis, of the size of a 1-D shape."""
  axes = [
    i
    for i in range(lay.ndim)
    if len(shape) == 1
    and lay.shape[i] == shape[0]
    and i not in lay.feature_axes
  ]
  return axes[0] if axes else None


def check_stats(
  fn: str,
  stats: Any,
  lay: Layout,
  types: Any = BatchStats,
  name: str = 'batch_stats',
):
  """A state of ``types`` whose fields have the feature shape; no float16
  (a variance past 65504 would be stored as inf)."""
  if not isinstance(stats, types):
    if isinstance(types, type) and issubclass(types, RenormStats):
      conv = (
        ', or carry over BatchStats as RenormStats(stats.mean, '
        'jnp.sqrt(stats.var + epsilon))'
        if isinstance(stats, BatchStats)
        else ''
      )
      raise TypeError(
        _RENORM_TYPE_MSG.format(fn=fn, got=_describe(stats), conv=conv)
      )
    raise TypeError(_STATS_TYPE_MSG.format(fn=fn, got=_describe(stats)))
  for field, v in zip(stats._fields, stats, strict=True):
    v = check_per_channel(
      fn, f'{name}.{field}', v, lay, floating=field != 'count'
    )
    if field != 'count' and v.dtype == jnp.float16:
      raise TypeError(
        _HALF_STATS_MSG.format(fn=fn, name=name, field=field, dtype=v.dtype)
      )
  return stats


def stats_layout(fn: str, name: str, v: Any) -> Layout:
  """The layout of a state alone (no x): its features are ``v``'s shape,
  so the other states are checked against it with :func:`check_stats`."""
  v = check_floating(fn, v, name, complex_ok=True)
  shape = tuple(v.shape)
  return Layout(len(shape), tuple(range(len(shape))), (), shape, 1, shape, name)


def check_mask(fn: str, mask: Any, x: jax.Array):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
      f'{fn}: mask must be a boolean array, got dtype {mask.dtype}; '
      'pass mask.astype(bool)'
    )
  try:
    shape = jnp.broadcast_shapes(mask.shape, x.shape)
  except ValueError:
    shape = None
  if shape != tuple(x.shape):
    raise ValueError(
      f'{fn}: mask of shape {mask.shape} does not broadcast to x of shape '
      f'{x.shape}; pass a mask whose shape broadcasts to x, e.g. '
      f'{x.shape[:1] + (1,) * (x.ndim - 1)} for per-example masking'
    )
  return mask


def check_training_count(
  fn: str,
  x,
  axis,
  global_count: int,
  axis_name: Any = None,
  shards: int = 1,
  fix: str | None = None,
):
  """More than one value per channel over the (smallest) synced group (or
  the ghost chunk, with ``fix`` saying how to grow it)."""
  if global_count <= 1:
    fix = fix or (
      'pass axis_name to take statistics over the global batch'
      if axis_name is None
      else f'sync over more devices: with axis_name={axis_name!r} the '
      f'smallest group of axis_index_groups has {shards} device(s)'
    )
    raise ValueError(
      _ONE_VALUE_MSG.format(
        fn=fn, shape=tuple(x.shape), axis=axis, count=global_count, fix=fix
      )
    )


def out_dtype(fn: str, x: jax.Array, dtype: Any):
  """The output dtype: x's, or a floating (complex, for complex x) dtype."""
  if dtype is None:
    return x.dtype
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  kind = jnp.complexfloating if jnp.iscomplexobj(x) else jnp.floating
  if dt is None or not jnp.issubdtype(dt, kind):
    what = 'complex, as x is' if kind is jnp.complexfloating else 'floating'
    raise TypeError(
      f'{fn}: dtype must be {what}, got {dtype!r}; pass e.g. '
      f'dtype={"jnp.complex64" if what != "floating" else "jnp.float32"}'
    )
  return dt


def check_running_values(fn: str, state: Any, arg: str = 'batch_stats') -> None:
  """Where the running statistics are concrete (eager calls, fold,
  apply_pooled), their values must be usable: finite, a variance >= 0, a
  renorm std > 0. Under ``jit`` they are traced and not checked (a NaN or
  negative variance there gives NaN outputs; see the numerics guide).
  ``arg``: the argument's name in the message (empty: the fields are the
  arguments, as normalize's mean and var)."""
  if any(isinstance(v, jax.core.Tracer) for v in state):
    return
  for name, v in zip(type(state)._fields, state, strict=True):
    if not hasattr(v, 'dtype') or not jnp.issubdtype(v.dtype, jnp.inexact):
      continue
    a = np.asarray(v)
    bad = ~np.isfinite(a)
    why = 'is not finite'
    if not bad.any() and name in ('var', 'm2', 'count', 'weight'):
      bad, why = a < 0, f'is negative ({name} is >= 0)'
    if not bad.any() and name == 'std':
      bad, why = a <= 0, 'is <= 0 (a standard deviation is > 0)'
    if bad.any():
      where = [
        int(i[0]) if len(i) == 1 else tuple(int(j) for j in i)
        for i in np.argwhere(bad)[:5]
      ]
      raise ValueError(
        f'{fn}: the running statistic {name} {why} at channels {where}: '
        f'{a[bad][:5].tolist()} ({f"{arg}." if arg else ""}{name}). It '
        'normalizes every output '
        'in inference; '
        'reinitialize it (init_batch_stats) or reload a checkpoint, and '
        'look for non-finite input in training (NaN or inf poisons the '
        'running average)'
      )


def check_stacked(fn: str, batches: Any) -> None:
  """Batches stacked along a leading axis (for a scan over them)."""
  leaves = jax.tree.leaves(batches)
  if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
    raise ValueError(
      f'{fn}: batches must be stacked along a leading axis of '
      'N batches, e.g. x.reshape(N, batch, ...)'
    )
  sizes = sorted({jnp.shape(leaf)[0] for leaf in leaves})
  if len(sizes) > 1 or sizes[0] == 0:
    # 0 batches would leave every statistic as it was, silently.
    raise ValueError(
      f'{fn}: batches holds {" or ".join(map(str, sizes))} batches (the '
      'leading axis of its leaves); pass N >= 1 batches stacked along the '
      'leading axis of every leaf'
    )


def _iter(v: Any):
  try:
    return list(v)
  except TypeError:
    return [v]


def _axis_str(lay: Layout) -> str:
  a = lay.feature_axes
  return str(a[0]) if len(a) == 1 else str(a)


def _describe(v: Any) -> str:
  if isinstance(v, dict):
    return f'a dict with keys {sorted(v)}'
  return type(v).__name__
