r"""Batch renormalization (Ioffe 2017, Algorithm 1); formulas in :func:`batch_renorm`.

Since r and d are constants for autodiff, this is the core's training BN with
the folded affine :math:`(\gamma r, \gamma d + \beta)`: same passes, same
single residual, same sync. The running :math:`\mu, \sigma` are EMAs of
:math:`\mu_B, \sigma_B`. With :math:`r_{max} = 1, d_{max} = 0` it is plain BN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bnjax import _checks, _core, _running, _stats, _sync, _train
from bnjax._types import (
  Axis,
  AxisIndexGroups,
  AxisName,
  BatchStats,
  DType,
  RenormStats,
  Scalar,
)

_STATE_MSG = (
  'batch_renorm: renorm_stats must be a bnjax.RenormStats(mean, std), got '
  '{got}. Batch renorm tracks the running standard deviation, not the '
  'variance: create one with bnjax.init_renorm_stats(feature_shape){conv}.'
)


def _check_limits(r_max, d_max):
  r = _checks._concrete(r_max)
  if r is not None and not r >= 1.0:
    raise ValueError(
      f'batch_renorm: r_max={r} must be >= 1 (r is clipped to '
      '[1/r_max, r_max]); pass r_max=1 for plain BN at start'
    )
  d = _checks._concrete(d_max)
  if d is not None and not d >= 0.0:
    raise ValueError(
      f'batch_renorm: d_max={d} must be >= 0 (d is clipped to '
      '[-d_max, d_max]); pass d_max=0 for plain BN at start'
    )


def batch_renorm(
  x: jax.Array,
  renorm_stats: RenormStats,
  scale: jax.Array | None = None,
  bias: jax.Array | None = None,
  *,
  use_running_average: bool,
  r_max: Scalar,
  d_max: Scalar,
  axis: Axis = -1,
  momentum: Scalar = 0.99,
  epsilon: Scalar = 1e-5,
  axis_name: AxisName = None,
  axis_index_groups: AxisIndexGroups | None = None,
  mask: jax.Array | None = None,
  use_fast_variance: bool = True,
  dtype: DType | None = None,
  sync: str = 'auto',
) -> tuple[jax.Array, RenormStats]:
  r"""Batch renormalization: returns ``(y, new_renorm_stats)``.

  Training normalizes with the batch statistics, then corrects towards the
  running ones (Ioffe 2017, Algorithm 1):

  .. math::
    r = \mathrm{sg}\big(\mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B/\sigma)\big),
    \quad
    d = \mathrm{sg}\big(\mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \mu)/\sigma)\big),
    \quad
    y = \gamma\,\big(\tfrac{x - \mu_B}{\sigma_B}\, r + d\big) + \beta

  with :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and ``sg``
  stop-gradient; inference computes :math:`\gamma (x - \mu)/\sigma + \beta`.
  ``r_max`` and ``d_max`` may be
  traced scalars, so a schedule (the paper trains plain BN, ``r_max=1,
  d_max=0``, for a warm-up, then ramps them to 3 and 5) runs under one jit.
  The running statistics update as
  ``new = momentum * old + (1 - momentum) * batch`` for the mean and for
  :math:`\sigma_B` (PyTorch's momentum ``p`` is ``1 - p`` here). Everything
  else (``axis``, ``mask``, ``axis_name``, ``dtype``) is as in
  :func:`bnjax.batch_norm`; with ``axis_name``, r and d come from the global
  batch and are the same on every shard.

  Args:
    x: real floating input.
    renorm_stats: a :class:`RenormStats` (running mean and std).
    scale, bias: optional per-channel affine parameters (None: off).
    use_running_average: keyword-only and required; True for inference.
    r_max: clip of r, >= 1 (1 with ``d_max=0`` is plain BN); may be traced.
    d_max: clip of d, >= 0; may be traced.
    axis: the feature axis, or a tuple of feature axes.
    momentum: EMA decay of the running mean and std, in [0, 1].
    epsilon: added to the variance, > 0.
    axis_name, axis_index_groups, sync: synced statistics, as in
      :func:`batch_norm`.
    mask: optional boolean array broadcastable to x.
    use_fast_variance: as in :func:`batch_norm`.
    dtype: output dtype (default: x's dtype).

  Returns:
    ``(y, new_renorm_stats)``.

  Raises:
    TypeError: ``renorm_stats`` is not a :class:`RenormStats`.
    ValueError: ``r_max < 1`` or ``d_max < 0`` (when concrete), and every
      error of :func:`bnjax.batch_norm`.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> s = bnjax.init_renorm_stats(1)
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y, s = bnjax.batch_renorm(x, s, use_running_average=False, r_max=3.0,
    ...                           d_max=5.0, momentum=0.0, epsilon=1e-12)
    >>> y.ravel(), s.mean, s.std  # r = 1, d = 2 against mean 0, std 1
    (Array([1., 3.], dtype=float32), Array([2.], dtype=float32), Array([1.], dtype=float32))
  """
  fn = 'batch_renorm'
  _checks.check_use_running_average(fn, use_running_average)
  x = _checks.check_floating(fn, x)
  lay = _checks.layout(fn, x, axis)
  if not isinstance(renorm_stats, RenormStats):
    conv = (
      ', or carry over BatchStats as RenormStats(stats.mean, '
      'jnp.sqrt(stats.var + epsilon))'
      if isinstance(renorm_stats, BatchStats)
      else ''
    )
    raise TypeError(
      _STATE_MSG.format(got=type(renorm_stats).__name__, conv=conv)
    )
  _checks.check_stats(fn, renorm_stats, lay, RenormStats)
  scale = _checks.check_per_channel(fn, 'scale', scale, lay)
  bias = _checks.check_per_channel(fn, 'bias', bias, lay)
  mask = _checks.check_mask(fn, mask, x)
  _checks.check_hyper(fn, momentum, epsilon)
  _check_limits(r_max, d_max)
  out_dtype = _core._out_dtype(fn, x, dtype)
  f = _stats.stats_dtype(x.dtype)
  if use_running_average:
    std = renorm_stats.std.astype(f)
    return _train._affine(
      x, renorm_stats.mean.astype(f), 1 / std, scale, bias, lay, out_dtype
    ), renorm_stats
  groups = _sync.canonical_groups(fn, axis_name, axis_index_groups)
  mode = _core._sync_mode(fn, sync, axis_name, groups, x, lay, mask)
  cfg = _train._Cfg(
    lay, axis_name, groups, bool(use_fast_variance), out_dtype, mode
  )
  limits = (
    renorm_stats.mean,
    renorm_stats.std,
    jnp.asarray(r_max, f),
    jnp.asarray(d_max, f),
  )
  # An empty masked channel is normalized as inference would: (x - mean)/std.
  fallback = (
    None
    if mask is None
    else (renorm_stats.mean, jnp.square(renorm_stats.std.astype(f)) - epsilon)
  )
  y, mean, var, count = _train.train(
    fn,
    x,
    scale,
    bias,
    epsilon,
    mask,
    cfg,
    renorm=limits,
    fallback=fallback,
    shift=renorm_stats.mean if mode == 'psum' else None,
  )
  valid = None if mask is None else count > 0
  sigma = jnp.sqrt(var + jnp.asarray(epsilon, f))
  return y, _running.ema(renorm_stats, mean, sigma, momentum, valid)
