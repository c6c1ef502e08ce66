r"""Batch renormalization (Ioffe 2017, Algorithm 1); formulas in :func:`batch_renorm`.

Since r and d are constants for autodiff, this is the core's training BN with
the folded affine :math:`(\gamma r, \gamma d + \beta)`: same passes, same
single residual, same sync. The running :math:`\mu, \sigma` are EMAs of
:math:`\mu_B, \sigma_B`. With :math:`r_{max} = 1, d_{max} = 0` it is plain BN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _checks, _core
from bnjax._types import (
  Axis,
  AxisIndexGroups,
  AxisName,
  DType,
  RenormStats,
  Scalar,
)


def correction(mean, var_eps, run_mean, run_std, r_max, d_max):
  r"""Batch renorm's r and d (Ioffe 2017, Alg. 1), constants for autodiff."""
  run_std = run_std.astype(mean.dtype)
  r = jnp.clip(jnp.sqrt(var_eps) / run_std, 1 / r_max, r_max)
  d = jnp.clip((mean - run_mean.astype(mean.dtype)) / run_std, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def core_kwargs(fn, state, r_max, d_max) -> dict:
  """normalize_batch's arguments for batch renorm: the state type and the
  correction with its arrays (r_max and d_max checked, traced ones allowed)."""
  _check_limits(fn, r_max, d_max)
  fix = (
    getattr(state, 'mean', None),
    getattr(state, 'std', None),
    jnp.asarray(r_max, jnp.float32),
    jnp.asarray(d_max, jnp.float32),
  )
  return dict(state_types=RenormStats, correction=(correction, fix))


def _check_limits(fn, r_max, d_max):
  _checks.check_scalar(fn, 'r_max', r_max)
  _checks.check_scalar(fn, 'd_max', d_max)
  r = _checks.concrete(r_max)
  if r is not None and not r >= 1.0:
    raise ValueError(
      f'{fn}: r_max={r} must be >= 1 (r is clipped to '
      '[1/r_max, r_max]); pass r_max=1 for plain BN at start'
    )
  d = _checks.concrete(d_max)
  if d is not None and not d >= 0.0:
    raise ValueError(
      f'{fn}: d_max={d} must be >= 0 (d is clipped to '
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
    scale: optional per-channel scale (gamma); None switches it off.
    bias: optional per-channel bias (beta); None switches it off.
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
  return _core.normalize_batch(
    'batch_renorm',
    x,
    renorm_stats,
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
    sync=sync,
    **core_kwargs('batch_renorm', renorm_stats, r_max, d_max),
  )
