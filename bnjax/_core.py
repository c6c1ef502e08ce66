r"""The public functional core: ``normalize``, ``moments``, ``batch_norm``.

Every BN function, and every module adapter, goes through one private entry,
:func:`normalize_batch`, called with the caller's own name: it validates each
argument once, then runs inference (the stored statistics) or training (the
statistics engine, ``bnjax._moments``, and the custom JVP of
``bnjax._train``).
"""

from __future__ import annotations

import math
from typing import TypeVar

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _act, _checks, _ghost, _moments, _running, _train
from bnjax._types import (
  Axis,
  AxisIndexGroups,
  AxisName,
  BatchStats,
  DType,
  Layout,
  RenormStats,
  RunningStats,
  Scalar,
)

Array = jax.Array
# The state normalize_batch takes is the type it returns.
State = TypeVar('State', bound=RunningStats | RenormStats)


def normalize_batch(
  fn: str,
  x: Array,
  state: State,
  scale: Array | None,
  bias: Array | None,
  *,
  use_running_average: bool,
  axis: Axis = -1,
  momentum: Scalar = 0.99,
  epsilon: Scalar = 1e-5,
  axis_name: AxisName = None,
  axis_index_groups: AxisIndexGroups | None = None,
  mask: Array | None = None,
  use_fast_variance: bool = True,
  dtype: DType | None = None,
  virtual_batch_size: int | None = None,
  sync: str = 'auto',
  correction: _train.Correction | None = None,
  single_value_ok: bool = False,
  lay: Layout | None = None,
  act: _act.Spec | None = None,
) -> tuple[Array, State]:
  """The one private entry of every BN function and module.

  The arguments are :func:`batch_norm`'s (checked here, whatever their
  type), then: ``fn`` names the caller in every error. ``correction``: a
  variant's correction of the affine and the state type it runs on (batch
  renorm's, from ``bnjax._renorm.variant``); without one the state is one
  of ``bnjax._running.STATE_TYPES``. ``single_value_ok``: train on one
  value per channel (the modules do, as flax's). ``lay``: x's
  already-checked layout (a module that needed the feature shape first),
  so x is validated once. ``act``: the checked activation of BN +
  activation (from ``bnjax._act.spec``), or None.
  """
  _checks.check_use_running_average(fn, use_running_average)
  if lay is None:
    x = _checks.check_floating(
      fn, x, complex_ok=correction is None and act is None
    )
    lay = _checks.layout(fn, x, axis)
  elif act is not None:
    x = _checks.check_floating(fn, x, complex_ok=False)
  state_types = (
    _running.STATE_TYPES if correction is None else correction.state_type
  )
  _checks.check_stats(fn, state, lay, state_types)
  scale = _checks.check_per_channel(
    fn, 'scale', scale, lay, real=not _is_complex(x)
  )
  bias = _checks.check_per_channel(
    fn, 'bias', bias, lay, real=not _is_complex(x)
  )
  mask = _checks.check_mask(fn, mask, x)
  activation = None if act is None else act.activation
  if act is not None:
    scale = act.floor(scale)
  f = _moments.stats_dtype(x.dtype)
  _checks.check_hyper(fn, momentum, epsilon, _moments.real_dtype(f))
  _checks.check_flag(fn, 'use_fast_variance', use_fast_variance)
  out_dtype = _checks.out_dtype(fn, x, dtype)
  if act is not None:
    act.check_dtype(fn, out_dtype)
  groups = _moments.canonical_groups(fn, axis_name, axis_index_groups)
  _moments.check_mode(fn, sync)
  if virtual_batch_size is not None:
    _ghost.check(
      fn, x, lay, virtual_batch_size, single_value_ok or use_running_average
    )
  # Eagerly, a corrupt state raises in training too: an EMA step would
  # carry its NaN (or a negative variance) on, silently.
  _checks.check_running_values(fn, state)
  if use_running_average:
    mean, rstd = _running.inference_params(state, epsilon)
    y = _train.affine(
      x, mean.astype(f), rstd, scale, bias, lay, out_dtype, activation
    )
    return y, state
  mode = _sync_mode(fn, sync, axis_name, groups, x, lay, mask)
  shards = 1 if axis_name is None else _moments.num_shards(axis_name, groups)
  if not single_value_ok:
    _checks.check_training_count(
      fn, x, axis, lay.count * shards, axis_name, shards
    )
  cfg = _train.Cfg(
    lay,
    _moments.Sync(axis_name, groups, mode, fn),
    bool(use_fast_variance),
    out_dtype,
    None if correction is None else correction.rule,
    activation,
  )
  fallback = None if mask is None else _running.fallback_stats(state, epsilon)
  fix = () if correction is None else (state, *correction.args)
  if virtual_batch_size is not None:
    y, mean, var, count, lo = _ghost.train(
      x, scale, bias, epsilon, mask, cfg, virtual_batch_size, fallback
    )
  else:
    y, mean, var, count, lo = _train.train(
      x,
      scale,
      bias,
      epsilon,
      mask,
      cfg,
      fix=fix,
      fallback=fallback,
    )
  valid = None if mask is None else count > 0
  new = _running.update(
    state,
    mean,
    var,
    momentum,
    valid,
    epsilon,
    (count, lo),
    spread=virtual_batch_size is None,
  )
  return y, new


def _is_complex(x) -> bool:
  return jnp.iscomplexobj(x)


def _sync_mode(fn, sync, axis_name, groups, x, lay, mask) -> str:
  """The synced path, 'gather' or 'psum', resolved at trace time."""
  channels = math.prod(lay.feature_shape) * (2 if jnp.iscomplexobj(x) else 1)
  return _moments.resolve(
    fn, sync, axis_name, groups, channels, mask is not None
  )


def normalize(
  x: Array,
  mean: Array,
  var: Array,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  axis: Axis = -1,
  epsilon: Scalar = 1e-5,
  dtype: DType | None = None,
) -> Array:
  r"""Normalizes x with given per-channel statistics.

  .. math:: y = (x - \mu)\,(\sigma^2 + \epsilon)^{-1/2}\,\gamma + \beta

  Args:
    x: floating input.
    mean: the per-channel mean, of shape ``x.shape[axis]`` (or the shape
      of the feature axes when ``axis`` is a tuple).
    var: the per-channel variance, of the same shape.
    scale: optional per-channel :math:`\gamma`; None switches it off.
    bias: optional per-channel :math:`\beta`; None switches it off.
    axis: the feature axis or a tuple of feature axes.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: x's dtype). Arithmetic is at least float32.

  Returns:
    y, the shape of x.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> bnjax.normalize(jnp.array([[1.0], [3.0]]), jnp.array([2.0]),
    ...                 jnp.array([1.0]), epsilon=1e-12)
    Array([[-1.],
           [ 1.]], dtype=float32)
  """
  fn = 'bnjax.normalize'
  x = _checks.check_floating(fn, x, complex_ok=True)
  lay = _checks.layout(fn, x, axis)
  mean = _checks.check_per_channel(fn, 'mean', mean, lay)
  var = _checks.check_per_channel(fn, 'var', var, lay)
  real = not _is_complex(x)
  scale = _checks.check_per_channel(fn, 'scale', scale, lay, real=real)
  bias = _checks.check_per_channel(fn, 'bias', bias, lay, real=real)
  f = _moments.stats_dtype(x.dtype)
  _checks.check_hyper(fn, 0.0, epsilon, _moments.real_dtype(f))
  _checks.check_running_values(fn, BatchStats(mean, var), '')
  rstd = lax.rsqrt(var.astype(_moments.real_dtype(f)) + epsilon)
  return _train.affine(
    x, mean.astype(f), rstd, scale, bias, lay, _checks.out_dtype(fn, x, dtype)
  )


def moments(
  x: Array,
  *,
  axis: Axis = -1,
  mask: Array | None = None,
  axis_name: AxisName = None,
  axis_index_groups: AxisIndexGroups | None = None,
  sync: str = 'auto',
) -> tuple[Array, Array]:
  r"""Per-channel mean and biased variance of x, exact and count-weighted.

  Reduces over every axis except ``axis``. With ``mask``, only masked-in
  entries count; a channel with none gets mean 0 and var 0. With
  ``axis_name``, the statistics are those of the global batch over that
  mapped axis (``sync`` as in :func:`batch_norm`); an unbound name raises
  JAX's ``NameError``. Results are at least float32:

  .. math:: \mu = \tfrac1n \sum_i x_i, \qquad
     \sigma^2 = \tfrac1n \sum_i (x_i - \mu)^2
     \quad\text{(biased, over the masked-in } i\text{)}

  Args:
    x: floating (or complex) input.
    axis: the feature axis, or a tuple of feature axes; every other axis is
      reduced.
    mask: optional boolean array broadcastable to x.
    axis_name: a mapped axis name (or tuple of names) to reduce over too.
    axis_index_groups: optional groups of ``axis_name`` indices, each
      reduced separately (``pmap``).
    sync: ``'auto'``, ``'gather'`` or ``'psum'``, as in :func:`batch_norm`.

  Returns:
    ``(mean, var)``, each of the feature shape.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> bnjax.moments(jnp.array([[0.0, 1.0], [2.0, 5.0]]))
    (Array([1., 3.], dtype=float32), Array([1., 4.], dtype=float32))
  """
  fn = 'bnjax.moments'
  x = _checks.check_floating(fn, x, complex_ok=True)
  lay = _checks.layout(fn, x, axis)
  mask = _checks.check_mask(fn, mask, x)
  groups = _moments.canonical_groups(fn, axis_name, axis_index_groups)
  mode = _sync_mode(fn, sync, axis_name, groups, x, lay, mask)
  _, mean, var, _ = _moments.batch_moments(
    x, lay, mask, sync=_moments.Sync(axis_name, groups, mode, fn)
  )
  return mean, var


def batch_norm(
  x: Array,
  batch_stats: RunningStats,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  use_running_average: bool,
  axis: Axis = -1,
  momentum: Scalar = 0.99,
  epsilon: Scalar = 1e-5,
  axis_name: AxisName = None,
  axis_index_groups: AxisIndexGroups | None = None,
  mask: Array | None = None,
  use_fast_variance: bool = True,
  dtype: DType | None = None,
  virtual_batch_size: int | None = None,
  sync: str = 'auto',
) -> tuple[Array, RunningStats]:
  r"""Batch normalization as a pure function: returns ``(y, new_batch_stats)``.

  Training (``use_running_average=False``) normalizes with the batch mean and
  biased variance and returns

  .. math:: \text{new} = m \cdot \text{old} + (1 - m) \cdot \text{batch}

  with ``m = momentum`` (Flax's convention; PyTorch's momentum ``p`` is
  ``m = 1 - p``, so torch's 0.1 is 0.9 here). The returned statistics carry no
  gradient and have the structure, shapes and dtypes of ``batch_stats``.
  Inference (``use_running_average=True``) normalizes with the stored
  statistics and returns ``batch_stats`` unchanged.

  Statistics are exact whatever the summation order of the backend (see the
  numerics guide): on GPU and TPU by a branch-free shifted two-pass, on the
  CPU by flax's own formulas where every channel has ``mean**2 <= 8 var``
  (so ordinary input gets flax's numbers bit for bit) and by the same exact
  two-pass elsewhere. Half-precision input is reduced in float32.

  Args:
    x: floating input; statistics reduce over every axis except ``axis``.
    batch_stats: running statistics of the feature shape. The type picks
      the update rule: :class:`BatchStats` (Flax's EMA),
      :class:`CumulativeStats` (PyTorch's ``momentum=None``: the plain
      average of all batches, ``momentum`` unused) or
      :class:`DebiasedStats` (zero-debiased EMA). Inference normalizes with
      :func:`population_stats` of it.
    scale: optional per-channel scale (gamma); None switches it off.
    bias: optional per-channel bias (beta); None switches it off.
    use_running_average: keyword-only and required; True for inference.
    axis: the feature axis, or a tuple of feature axes.
    momentum: EMA decay of the running statistics, in [0, 1].
    epsilon: added to the variance, > 0 and a normal number in the
      statistics' dtype.
    axis_name: a mapped axis name (or tuple of names) of ``shard_map``,
      ``pmap`` or ``vmap`` to take statistics over the global batch. None
      means local statistics (under a sharded ``jit`` those are already
      global: XLA inserts the collective). An unbound name raises JAX's
      ``NameError``: bnjax never guesses the collective context.
    axis_index_groups: optional groups of indices of ``axis_name`` that
      normalize independently (JAX supports them under ``pmap`` only; with
      a mesh, sync over one axis of it instead, see the sync guide).
    mask: optional boolean array broadcastable to x; statistics cover the
      masked-in entries only. A channel with none keeps its running stats.
      Masked-out entries are normalized too, as in flax; a non-finite
      masked-out entry is read as the channel mean.
    use_fast_variance: accepted for Flax compatibility (a bool); both
      settings are exact.
    dtype: output dtype (default: x's dtype).
    virtual_batch_size: ghost batch norm (Hoffer et al. 2017): normalize
      each chunk of this many rows of axis 0 with its own statistics; the
      running statistics get the mean over chunks. Must divide the batch.
      With ``axis_name`` chunks are per shard, and only the running-stat
      average is synced.
    sync: how the shards' exact partials combine over ``axis_name``,
      branch-free and exact either way: ``'gather'`` (one all-gather of
      every shard's partial, bytes growing with the shard count),
      ``'psum'`` (a pmax of C floats for a shared reference, then two
      psums of sums, around it and around the mean that gives: constant
      size) or ``'auto'`` (by a cost model, at trace time). See the sync
      guide.

  Returns:
    ``(y, new_batch_stats)``.

  Raises:
    TypeError: non-floating x, wrong ``batch_stats`` type, non-bool flag.
    ValueError: bad axis, mismatched shapes, bad momentum or epsilon, an
      empty reduction, a mask that does not broadcast, or training with a
      single value per channel.

  Example:
    >>> import jax, jax.numpy as jnp, bnjax
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, stats = bnjax.batch_norm(x, bnjax.init_batch_stats(2),
    ...                             use_running_average=False, momentum=0.9)
    >>> y.round(4)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> stats.mean
    Array([0.2, 2. ], dtype=float32)
  """
  return normalize_batch(
    'bnjax.batch_norm',
    x,
    batch_stats,
    scale,
    bias,
    use_running_average=use_running_average,
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    mask=mask,
    use_fast_variance=use_fast_variance,
    dtype=dtype,
    virtual_batch_size=virtual_batch_size,
    sync=sync,
  )
