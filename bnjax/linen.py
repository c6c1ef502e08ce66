"""``bnjax.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Same fields, same call, same variables (``params/{scale,bias}``,
``batch_stats/{mean,var}``), so checkpoints load both ways. Only parameter and
collection plumbing lives here; the statistics are the functional core's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes, initializers

from bnjax import _checks, _running
from bnjax._core import batch_norm
from bnjax._renorm import batch_renorm
from bnjax._types import BatchStats, RenormStats

__all__ = [
  'BatchNorm',
  'BatchRenorm',
]

_NAME = 'bnjax.linen.BatchNorm'
# Collection in which BatchNorm records its batch statistics for precise BN.
MOMENTS = 'batch_moments'


def _out_dtype(dtype, *arrays):
  """Flax's rule: the given dtype, else the promoted dtype of x and params."""
  return dtypes.canonicalize_dtype(
    *[a for a in arrays if a is not None], dtype=dtype
  )


class BatchNorm(nn.Module):
  """BatchNorm with exact statistics, count-weighted sync and one residual.

  Fields and semantics are those of ``flax.linen.BatchNorm``. ``momentum`` is
  the decay of the running average, ``new = momentum * old + (1 - momentum)
  * batch``: PyTorch's momentum ``p`` is ``1 - p`` here (torch 0.1 is 0.9).

  Differences, all deliberate: statistics are exact at any ``|mean|/std`` (flax's
  default loses all precision at 1e3 to 1e4); with ``axis_name`` and a
  ``mask`` they are count-weighted over the global batch; reductions are
  always at least float32 (``force_float32_reductions=False`` only sets the
  dtype of the stored statistics to ``param_dtype``). As in flax, training
  on one value per channel returns the bias (the functional
  :func:`bnjax.batch_norm` raises instead), complex input has a complex mean
  and a real variance ``E|x - mean|^2``, and during ``init`` the statistics
  are not updated and ``axis_name`` is ignored.

  Attributes:
    use_running_average: True for inference (the stored statistics), False
      to train on the batch statistics; may be given at call time instead.
    axis: the feature axis, or a tuple of feature axes.
    momentum: EMA decay of the running statistics, ``new = momentum * old +
      (1 - momentum) * batch``; PyTorch's ``p`` is ``1 - p``.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: promoted from x and the parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale: learn a per-channel bias (beta) / scale (gamma).
    bias_init, scale_init: their initializers.
    axis_name: a mapped axis name (or tuple) to sync statistics over; ignored
      during ``init``.
    axis_index_groups: groups of ``axis_name`` indices that sync separately.
    use_fast_variance: flax's formula choice; both are exact here.
    force_float32_reductions: reductions are always float32 or wider; False
      stores the statistics in ``param_dtype``, as flax does.
    virtual_batch_size: ghost batch norm: statistics per chunk of this many
      rows (see :func:`bnjax.batch_norm`).
    sync: ``'auto'``, ``'gather'`` or ``'psum'`` (see :func:`bnjax.batch_norm`).

  Example:
    >>> import jax, jax.numpy as jnp, bnjax.linen
    >>> bn = bnjax.linen.BatchNorm(momentum=0.9)
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> v = bn.init(jax.random.key(0), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, v)
    {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    >>> y, upd = bn.apply(v, x, use_running_average=False,
    ...                   mutable=['batch_stats'])
    >>> upd['batch_stats']['mean'].round(2)
    Array([0.45, 0.55, 0.65], dtype=float32)
  """

  use_running_average: bool | None = None
  axis: Any = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  virtual_batch_size: int | None = None
  sync: str = 'auto'  # see bnjax.batch_norm

  @nn.compact
  def __call__(
    self,
    x,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ):
    """Normalizes x, as ``flax.linen.BatchNorm.__call__``.

    Args:
      x: the input; statistics reduce over every axis except ``axis``.
      use_running_average: overrides the field of the same name.
      mask: optional boolean array broadcastable to x: statistics cover
        the masked-in entries only.

    Returns:
      The normalized x. In training with ``mutable=['batch_stats']`` the
      running statistics are updated.
    """
    use_running_average = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    x = _checks.check_floating(_NAME, x, complex_ok=True)
    lay = _checks.layout(_NAME, x, self.axis)
    shape = lay.feature_shape
    sdt = jnp.float32 if self.force_float32_reductions else self.param_dtype
    # Complex input has a complex mean (flax's variable turns complex at the
    # first update; this one is complex from init, so its dtype is stable).
    mdt = jnp.promote_types(sdt, x.dtype) if jnp.iscomplexobj(x) else sdt
    ra_mean = self.variable(
      'batch_stats', 'mean', lambda s: jnp.zeros(s, mdt), shape
    )
    ra_var = self.variable(
      'batch_stats', 'var', lambda s: jnp.ones(s, sdt), shape
    )
    scale, bias = _affine_params(self, shape)
    # With force_float32_reductions=False the stored statistics may be half
    # precision (as flax's): update them in float32, store them back as kept.
    stats = BatchStats(
      *(
        v.astype(jnp.promote_types(v.dtype, jnp.float32))
        for v in (ra_mean.value, ra_var.value)
      )
    )
    initializing = self.is_initializing()
    train = not use_running_average
    # Recording for precise BN (bnjax.precise): momentum 0 makes the new
    # statistics exactly this batch's.
    recording = (
      train and not initializing and self.is_mutable_collection(MOMENTS)
    )
    with _checks.named('bnjax.linen.BatchNorm'):
      y, new = batch_norm(
        x,
        stats,
        scale,
        bias,
        use_running_average=not train,
        axis=self.axis,
        momentum=0.0 if recording else self.momentum,
        epsilon=self.epsilon,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        mask=mask,
        use_fast_variance=self.use_fast_variance,
        dtype=_out_dtype(self.dtype, x, scale, bias),
        virtual_batch_size=self.virtual_batch_size,
        sync=self.sync,
      )
    if recording:
      self.put_variable(MOMENTS, 'mean', new.mean)
      self.put_variable(MOMENTS, 'var', new.var)
    elif train and not initializing:
      for v, new_v in ((ra_mean, new.mean), (ra_var, new.var)):
        v.value = new_v.astype(_running.stored_dtype(v.value, new_v))
    return y


def _affine_params(module, shape):
  scale = bias = None
  if module.use_scale:
    scale = module.param('scale', module.scale_init, shape, module.param_dtype)
  if module.use_bias:
    bias = module.param('bias', module.bias_init, shape, module.param_dtype)
  return scale, bias


class BatchRenorm(nn.Module):
  """Batch renormalization (Ioffe 2017) as a linen module.

  Fields as :class:`BatchNorm`, plus ``r_max`` and ``d_max`` (which the call
  may override with traced values, for the paper's warm-up schedule). The
  running statistics are ``batch_stats/{mean, std}``; see
  :func:`bnjax.batch_renorm`.

  Attributes:
    use_running_average: True for inference (the stored statistics), False
      to train on the batch statistics; may be given at call time instead.
    axis: the feature axis, or a tuple of feature axes.
    momentum: EMA decay of the running mean and std, ``new = momentum * old +
      (1 - momentum) * batch``; PyTorch's ``p`` is ``1 - p``.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: promoted from x and the parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale: learn a per-channel bias (beta) / scale (gamma).
    bias_init, scale_init: their initializers.
    axis_name: a mapped axis name (or tuple) to sync statistics over; ignored
      during ``init``.
    axis_index_groups: groups of ``axis_name`` indices that sync separately.
    use_fast_variance: flax's formula choice; both are exact here.
    r_max: clip of r, >= 1 (renorm's default 3); may be given at call time.
    d_max: clip of d, >= 0 (default 5); may be given at call time.
    sync: ``'auto'``, ``'gather'`` or ``'psum'`` (see :func:`bnjax.batch_norm`).

  Example:
    >>> import jax, jax.numpy as jnp, bnjax.linen
    >>> m = bnjax.linen.BatchRenorm(use_running_average=False)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> v = m.init(jax.random.key(0), x)
    >>> y, upd = m.apply(v, x, r_max=1.0, d_max=0.0, mutable=['batch_stats'])
    >>> sorted(upd['batch_stats'])
    ['mean', 'std']
  """

  use_running_average: bool | None = None
  axis: Any = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  r_max: Any = 3.0
  d_max: Any = 5.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  sync: str = 'auto'  # see bnjax.batch_norm

  @nn.compact
  def __call__(
    self,
    x,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
    r_max=None,
    d_max=None,
  ):
    """Renormalizes x; see :func:`bnjax.batch_renorm`.

    Args:
      x: the input; statistics reduce over every axis except ``axis``.
      use_running_average: overrides the field of the same name.
      mask: optional boolean array broadcastable to x.
      r_max, d_max: override the fields (traced values allowed), for the
        paper's schedule: plain BN (1, 0) for a warm-up, then ramp up.

    Returns:
      The normalized x. In training with ``mutable=['batch_stats']`` the
      running statistics are updated.
    """
    use_running_average = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    name = 'bnjax.linen.BatchRenorm'
    x = _checks.check_floating(name, x)
    shape = _checks.layout(name, x, self.axis).feature_shape
    ra_mean = self.variable(
      'batch_stats', 'mean', jnp.zeros, shape, jnp.float32
    )
    ra_std = self.variable('batch_stats', 'std', jnp.ones, shape, jnp.float32)
    scale, bias = _affine_params(self, shape)
    initializing = self.is_initializing()
    train = not use_running_average and not initializing
    with _checks.named('bnjax.linen.BatchRenorm'):
      y, new = batch_renorm(
        x,
        RenormStats(ra_mean.value, ra_std.value),
        scale,
        bias,
        use_running_average=not train,
        r_max=self.r_max if r_max is None else r_max,
        d_max=self.d_max if d_max is None else d_max,
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        mask=mask,
        use_fast_variance=self.use_fast_variance,
        dtype=_out_dtype(self.dtype, x, scale, bias),
        sync=self.sync,
      )
    if train:
      ra_mean.value, ra_std.value = new.mean, new.std
    return y
