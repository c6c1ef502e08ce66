"""``bnjax.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, ``nnx.BatchStat`` statistics named ``mean``/``var`` and
``nnx.Param`` ``scale``/``bias``; ``train()``/``eval()``, ``nnx.split/merge``,
``nnx.jit`` and ``nnx.value_and_grad`` work as with flax's. Only state
plumbing lives here; the statistics are the functional core's.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from bnjax._core import batch_norm
from bnjax._types import BatchStats


class BatchNorm(nnx.Module):
  """BatchNorm with exact statistics, count-weighted sync and one residual.

  Arguments are those of ``flax.nnx.BatchNorm``. ``momentum`` is the decay of
  the running average (PyTorch's momentum ``p`` is ``1 - p`` here). Unlike
  flax's, the running statistics keep their float32 dtype when ``dtype`` is a
  half type (flax's promotion stores them in that dtype), and statistics are
  exact at any |mean|/std.

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

  def __init__(self, num_features: int, *,
               use_running_average: bool | None = False, axis: Any = -1,
               momentum: float = 0.99, epsilon: float = 1e-5,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               use_bias: bool = True, use_scale: bool = True,
               bias_init: Any = initializers.zeros_init(),
               scale_init: Any = initializers.ones_init(),
               axis_name: Any = None, axis_index_groups: Any = None,
               use_fast_variance: bool = True,
               promote_dtype: Any = dtypes.promote_dtype, rngs: nnx.Rngs,
               bias_metadata: Mapping[str, Any] = MappingProxyType({}),
               scale_metadata: Mapping[str, Any] = MappingProxyType({})):
    shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.scale = nnx.data(None)
    self.bias = nnx.data(None)
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype),
                             **scale_metadata)
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype),
                            **bias_metadata)
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

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalizes x; see ``flax.nnx.BatchNorm.__call__``."""
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          'bnjax.nnx.BatchNorm: no use_running_average was given; pass it to '
          'the constructor or the call, or use model.train() / model.eval()')
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    stats = BatchStats(self.mean[...], self.var[...])
    x, _, _, scale, bias = self.promote_dtype(
        (x, stats.mean, stats.var, scale, bias), dtype=self.dtype)
    y, new = batch_norm(
        x, stats, scale, bias, use_running_average=bool(use_running_average),
        axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        mask=mask, use_fast_variance=self.use_fast_variance, dtype=x.dtype)
    if not use_running_average:
      self.mean[...] = new.mean
      self.var[...] = new.var
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``, as flax's."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
