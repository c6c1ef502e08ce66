"""``bnjax.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, ``nnx.BatchStat`` statistics named ``mean``/``var`` and
``nnx.Param`` ``scale``/``bias``; ``train()``/``eval()``, ``nnx.split/merge``,
``nnx.jit`` and ``nnx.value_and_grad`` work as with flax's. Only state
plumbing lives here; the statistics are the functional core's.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from bnjax import _checks
from bnjax._convert import convert
from bnjax._core import batch_norm
from bnjax._renorm import batch_renorm
from bnjax._types import BatchStats, RenormStats


class BatchNorm(nnx.Module):
  """BatchNorm with exact statistics, count-weighted sync and one residual.

  Arguments are those of ``flax.nnx.BatchNorm``. ``momentum`` is the decay of
  the running average (PyTorch's momentum ``p`` is ``1 - p`` here). Unlike
  flax's, the running statistics keep their float32 dtype when ``dtype`` is a
  half type (flax's promotion stores them in that dtype), and statistics are
  exact at any ``|mean|/std``.

  Args:
    num_features: the size of the feature axis.
    use_running_average: True for inference; ``eval()`` and ``train()`` set
      it, and the call may override it.
    axis: the feature axis, or a tuple of feature axes.
    momentum: EMA decay of the running statistics, ``new = momentum * old +
      (1 - momentum) * batch``; PyTorch's ``p`` is ``1 - p``.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: promoted from x and the parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale: learn a per-channel bias (beta) / scale (gamma).
    bias_init, scale_init: their initializers.
    axis_name: a mapped axis name (or tuple) to sync statistics over.
    axis_index_groups: groups of ``axis_name`` indices that sync separately.
    use_fast_variance: flax's formula choice; both are exact here.
    promote_dtype: the dtype-promotion function, as flax's.
    rngs: an ``nnx.Rngs`` for the parameter initializers.
    bias_metadata, scale_metadata: metadata for the parameter Variables.
    virtual_batch_size: ghost batch norm: statistics per chunk of this many
      rows (see :func:`bnjax.batch_norm`).
    sync: ``'auto'``, ``'gather'`` or ``'psum'`` (see :func:`bnjax.batch_norm`).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> bn = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.arange(12.0).reshape(4, 3))
    >>> bn.mean[...].round(2)
    Array([0.45, 0.55, 0.65], dtype=float32)
    >>> bn.eval(); bn.use_running_average
    True
  """

  scale: nnx.Param | None
  bias: nnx.Param | None

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: Any = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = initializers.zeros_init(),
    scale_init: Any = initializers.ones_init(),
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: Any = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    virtual_batch_size: int | None = None,
    sync: str = 'auto',
  ):
    shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    _affine_params(
      self,
      shape,
      use_scale,
      use_bias,
      scale_init,
      bias_init,
      param_dtype,
      rngs,
      scale_metadata,
      bias_metadata,
    )
    self.virtual_batch_size = virtual_batch_size
    self.sync = sync
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(
    self,
    x,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ):
    """Normalizes x, as ``flax.nnx.BatchNorm.__call__``.

    Args:
      x: the input; statistics reduce over every axis except ``axis``.
      use_running_average: overrides the field of the same name.
      mask: optional boolean array broadcastable to x: statistics cover
        the masked-in entries only.

    Returns:
      The normalized x. In training the ``mean``
      and ``var`` BatchStat variables are updated in place.
    """
    use_running_average = _mode(self, use_running_average)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    stats = BatchStats(self.mean[...], self.var[...])
    x, _, _, scale, bias = self.promote_dtype(
      (x, stats.mean, stats.var, scale, bias), dtype=self.dtype
    )
    with _checks.named('bnjax.nnx.BatchNorm'):
      y, new = batch_norm(
        x,
        stats,
        scale,
        bias,
        use_running_average=bool(use_running_average),
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        mask=mask,
        use_fast_variance=self.use_fast_variance,
        dtype=x.dtype,
        virtual_batch_size=self.virtual_batch_size,
        sync=self.sync,
      )
    if not use_running_average:
      _store(self.mean, new.mean)
      _store(self.var, new.var)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by ``nnx.view`` (and read by ``nnx.view_info``).

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _store(variable: nnx.Variable, value: jax.Array) -> None:
  """Writes a new running statistic. A complex batch mean replaces a real
  variable whole (flax's ``[...] =`` would drop the imaginary part)."""
  if value.dtype == variable[...].dtype:
    variable[...] = value
  else:
    variable.set_value(value)


def _mode(module, use_running_average) -> bool:
  """The call's use_running_average, else the module's; one must be given."""
  if use_running_average is None:
    use_running_average = module.use_running_average
  if use_running_average is None:
    raise ValueError(
      f'bnjax.nnx.{type(module).__name__}: no use_running_average was '
      'given; pass it to the constructor or the call, or use model.train() '
      '/ model.eval()'
    )
  return use_running_average


def _affine_params(
  module,
  shape,
  use_scale,
  use_bias,
  scale_init,
  bias_init,
  param_dtype,
  rngs,
  scale_metadata,
  bias_metadata,
):
  module.scale = nnx.data(None)
  module.bias = nnx.data(None)
  if use_scale:
    module.scale = nnx.Param(
      scale_init(rngs.params(), shape, param_dtype), **scale_metadata
    )
  if use_bias:
    module.bias = nnx.Param(
      bias_init(rngs.params(), shape, param_dtype), **bias_metadata
    )


class BatchRenorm(nnx.Module):
  """Batch renormalization (Ioffe 2017) as an nnx module.

  Arguments as :class:`BatchNorm`, plus ``r_max`` and ``d_max`` (the call may
  override them with traced values for a schedule). Statistics are
  ``nnx.BatchStat`` ``mean`` and ``std``; see :func:`bnjax.batch_renorm`.

  Args:
    num_features: the size of the feature axis.
    use_running_average: True for inference; ``eval()`` and ``train()`` set
      it, and the call may override it.
    axis: the feature axis, or a tuple of feature axes.
    momentum: EMA decay of the running mean and std, ``new = momentum * old +
      (1 - momentum) * batch``; PyTorch's ``p`` is ``1 - p``.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: promoted from x and the parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale: learn a per-channel bias (beta) / scale (gamma).
    bias_init, scale_init: their initializers.
    axis_name: a mapped axis name (or tuple) to sync statistics over.
    axis_index_groups: groups of ``axis_name`` indices that sync separately.
    use_fast_variance: flax's formula choice; both are exact here.
    r_max: clip of r, >= 1 (default 3); the call may override it.
    d_max: clip of d, >= 0 (default 5); the call may override it.
    sync: ``'auto'``, ``'gather'`` or ``'psum'`` (see :func:`bnjax.batch_norm`).
    rngs: an ``nnx.Rngs`` for the parameter initializers.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> m = bnjax.nnx.BatchRenorm(2, rngs=nnx.Rngs(0))
    >>> y = m(jnp.arange(8.0).reshape(4, 2), r_max=1.0, d_max=0.0)
    >>> m.std[...].round(3)
    Array([1.012, 1.012], dtype=float32)
  """

  scale: nnx.Param | None
  bias: nnx.Param | None

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: Any = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    r_max: Any = 3.0,
    d_max: Any = 5.0,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = initializers.zeros_init(),
    scale_init: Any = initializers.ones_init(),
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    sync: str = 'auto',
    rngs: nnx.Rngs,
  ):
    shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.std = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    _affine_params(
      self,
      shape,
      use_scale,
      use_bias,
      scale_init,
      bias_init,
      param_dtype,
      rngs,
      {},
      {},
    )
    self.use_running_average = use_running_average
    self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
    self.r_max, self.d_max = r_max, d_max
    self.dtype, self.param_dtype = dtype, param_dtype
    self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.sync = sync

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
      The normalized x. In training the ``mean``
      and ``std`` BatchStat variables are updated in place.
    """
    use_running_average = _mode(self, use_running_average)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, scale, bias = dtypes.promote_dtype((x, scale, bias), dtype=self.dtype)
    with _checks.named('bnjax.nnx.BatchRenorm'):
      y, new = batch_renorm(
        x,
        RenormStats(self.mean[...], self.std[...]),
        scale,
        bias,
        use_running_average=bool(use_running_average),
        r_max=self.r_max if r_max is None else r_max,
        d_max=self.d_max if d_max is None else d_max,
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        mask=mask,
        use_fast_variance=self.use_fast_variance,
        dtype=x.dtype,
        sync=self.sync,
      )
    if not use_running_average:
      self.mean[...] = new.mean
      self.std[...] = new.std
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by ``nnx.view`` (and read by ``nnx.view_info``).

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


__all__ = ['BatchNorm', 'BatchRenorm', 'convert']
