r"""The public BN variants: :func:`bnjax.batch_norm` plus what differs.

Each is the core's one private entry (``bnjax._core.normalize_batch``) with
a typed value that says what differs, owned by the variant's own module:
batch renorm's correction (``bnjax._renorm``), the activation of BN +
activation (``bnjax._act``). The modules' ``BatchRenorm`` and
``BatchNormAct`` pass the same values. Frozen BN is the core in inference
mode with the statistics' gradient stopped.
"""

from __future__ import annotations

import jax
from jax import lax

from bnjax import _act, _core, _renorm
from bnjax._types import (
  Axis,
  AxisIndexGroups,
  AxisName,
  DType,
  RenormStats,
  RunningStats,
  Scalar,
)

Array = jax.Array


def batch_renorm(
  x: Array,
  renorm_stats: RenormStats,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  use_running_average: bool,
  r_max: Scalar,
  d_max: Scalar,
  axis: Axis = -1,
  momentum: Scalar = 0.99,
  epsilon: Scalar = 1e-5,
  axis_name: AxisName = None,
  axis_index_groups: AxisIndexGroups | None = None,
  mask: Array | None = None,
  use_fast_variance: bool = True,
  dtype: DType | None = None,
  sync: str = 'auto',
) -> tuple[Array, RenormStats]:
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
    'bnjax.batch_renorm',
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
    correction=_renorm.variant('bnjax.batch_renorm', r_max, d_max),
  )


def batch_norm_act(
  x: Array,
  batch_stats: RunningStats,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  use_running_average: bool,
  activation: str | _act.Activation = 'leaky_relu',
  scale_floor: float = 1e-3,
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
  r"""BN then an invertible activation, keeping only the output for the
  backward (InPlace-ABN): returns ``(activation(y), new_batch_stats)``.

  .. math:: \text{out} = \phi(\gamma' \hat x + \beta), \qquad
     \gamma' = \operatorname{sign}(\gamma)\max(|\gamma|, \text{scale\_floor})

  The same function as :func:`bnjax.batch_norm` followed by the activation
  (where ``|scale| >= scale_floor``), with the same arguments, state types
  and statistics. In training its ``jax.custom_vjp`` saves the output (named
  ``'bnjax_bn_act_output'`` for ``jax.checkpoint`` policies) and
  per-channel vectors, not x: in a conv + BN + activation network the one
  full-size array a layer is the output the next convolution saves anyway
  (flax's BN + leaky ReLU keeps four, ``batch_norm`` + activation three).
  The backward recovers :math:`\hat x = (\phi^{-1}(\text{out}) - \beta) /
  \gamma'`; its relative error is about the output dtype's epsilon times
  :math:`|\hat x| + |\beta / \gamma'|`. See the InPlace-ABN guide.

  Reverse mode, grad of grad and ``jax.hessian`` (forward over reverse) work;
  forward mode on it directly (``jax.jvp``, ``jacfwd``) raises JAX's
  custom_vjp ``TypeError``: use :func:`bnjax.batch_norm` there.

  Args:
    x: real floating input.
    batch_stats: running statistics, as :func:`bnjax.batch_norm`.
    scale: optional per-channel scale (gamma); None switches it off.
    bias: optional per-channel bias (beta); None switches it off.
    use_running_average: keyword-only and required; True for inference.
    activation: ``'leaky_relu'`` (slope 0.01, the default), ``'elu'``
      (alpha 1), ``'identity'``, or :class:`bnjax.LeakyReLU`\
      ``(negative_slope)`` / :class:`bnjax.ELU`\ ``(alpha)`` for other
      parameters (Python numbers > 0). ReLU is refused: it has no inverse.
    scale_floor: the smallest ``|scale|`` used, a Python number > 0:
      smaller scales are replaced by ``±scale_floor`` (the sign kept, + at
      0) in training and inference, with their gradient passed through.
    axis: as :func:`bnjax.batch_norm`.
    momentum: as :func:`bnjax.batch_norm` (Flax's: PyTorch's ``p`` is
      ``1 - p``).
    epsilon: as :func:`bnjax.batch_norm`.
    axis_name: as :func:`bnjax.batch_norm`.
    axis_index_groups: as :func:`bnjax.batch_norm`.
    mask: as :func:`bnjax.batch_norm`.
    use_fast_variance: as :func:`bnjax.batch_norm`.
    dtype: output dtype, as :func:`bnjax.batch_norm`; the output is the
      saved residual, so ELU needs at least float32.
    virtual_batch_size: as :func:`bnjax.batch_norm`.
    sync: as :func:`bnjax.batch_norm`.

  Returns:
    ``(out, new_batch_stats)``.

  Raises:
    TypeError: as :func:`bnjax.batch_norm`, complex x, an activation of
      another type, or a non-number parameter.
    ValueError: as :func:`bnjax.batch_norm`, ReLU, an unknown name, or a
      parameter that is not finite and > 0.

  Example:
    >>> import jax, jax.numpy as jnp, bnjax
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y, _ = bnjax.batch_norm_act(x, bnjax.init_batch_stats(1),
    ...     use_running_average=False, activation=bnjax.LeakyReLU(0.1))
    >>> y.round(3)
    Array([[-0.1],
           [ 1. ]], dtype=float32)
  """
  fn = 'bnjax.batch_norm_act'
  return _core.normalize_batch(
    fn,
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
    act=_act.spec(fn, activation, scale_floor),
  )


def frozen_batch_norm(
  x: Array,
  batch_stats: RunningStats,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  axis: Axis = -1,
  epsilon: Scalar = 1e-5,
  dtype: DType | None = None,
) -> tuple[Array, RunningStats]:
  r"""Frozen BN for fine-tuning: stored statistics, trainable affine.

  Normalizes with the stored (population) statistics whatever the mode, lets
  gradients reach ``scale`` and ``bias`` (and x) but never the statistics,
  and returns the statistics unchanged. This is the usual recipe for
  fine-tuning a pretrained network on small batches (detectron2's
  ``FrozenBatchNorm2d``): batch statistics of a small batch are noisy, and
  updating the running statistics would drift them away from pretraining.

  .. math:: y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta,
     \qquad (\mu, \sigma^2) = \text{population\_stats(batch\_stats)}

  Args:
    x: floating input.
    batch_stats: any running-statistics state (:class:`BatchStats`,
      :class:`CumulativeStats`, :class:`DebiasedStats`).
    scale: optional per-channel scale (gamma); None switches it off.
    bias: optional per-channel bias (beta); None switches it off.
    axis: the feature axis, or a tuple of feature axes.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: x's dtype).

  Returns:
    ``(y, batch_stats)``, the statistics unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, bnjax
    >>> s = bnjax.BatchStats(jnp.array([1.0]), jnp.array([4.0]))
    >>> f = lambda g: bnjax.frozen_batch_norm(jnp.array([[3.0]]), s, g,
    ...                                       epsilon=1e-12)[0].sum()
    >>> jax.grad(f)(jnp.array([1.0]))
    Array([1.], dtype=float32)
  """
  y, _ = _core.normalize_batch(
    'bnjax.frozen_batch_norm',
    x,
    jax.tree.map(lax.stop_gradient, batch_stats),
    scale,
    bias,
    use_running_average=True,
    axis=axis,
    epsilon=epsilon,
    dtype=dtype,
  )
  return y, batch_stats
