r"""Batch renormalization (Ioffe 2017, Algorithm 1): its correction, as a value.

The formulas are in :func:`bnjax.batch_renorm`: the core's BN with the
:class:`bnjax._train.Correction` that :func:`variant` builds, as are the
modules' ``BatchRenorm``.

Since r and d are constants for autodiff, this is the core's training BN with
the folded affine :math:`(\gamma r, \gamma d + \beta)`: same passes, same
single residual, same sync. The running :math:`\mu, \sigma` are EMAs of
:math:`\mu_B, \sigma_B`. With :math:`r_{max} = 1, d_{max} = 0` it is plain BN.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from bnjax import _checks, _train
from bnjax._types import RenormStats, Scalar


def correction(mean, var_eps, state: RenormStats, r_max, d_max):
  r"""Batch renorm's r and d (Ioffe 2017, Alg. 1), constants for autodiff."""
  run_std = state.std.astype(mean.dtype)
  r = jnp.clip(jnp.sqrt(var_eps) / run_std, 1 / r_max, r_max)
  d = jnp.clip((mean - state.mean.astype(mean.dtype)) / run_std, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def variant(fn: str, r_max: Scalar, d_max: Scalar) -> _train.Correction:
  """Batch renorm for :func:`bnjax._core.normalize_batch`: its state type
  and its correction, with r_max and d_max checked (traced ones allowed)."""
  _check_limits(fn, r_max, d_max)
  limits = (jnp.asarray(r_max, jnp.float32), jnp.asarray(d_max, jnp.float32))
  return _train.Correction(RenormStats, correction, limits)


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
