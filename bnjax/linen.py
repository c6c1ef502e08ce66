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

from bnjax import _checks
from bnjax._core import batch_norm
from bnjax._types import BatchStats

_NAME = 'bnjax.linen.BatchNorm'


def _out_dtype(dtype, *arrays):
  """Flax's rule: the given dtype, else the promoted dtype of x and params."""
  return dtypes.canonicalize_dtype(*[a for a in arrays if a is not None],
                                   dtype=dtype)


class BatchNorm(nn.Module):
  """BatchNorm with exact statistics, count-weighted sync and one residual.

  Fields and semantics are those of ``flax.linen.BatchNorm``. ``momentum`` is
  the decay of the running average, ``new = momentum * old + (1 - momentum)
  * batch``: PyTorch's momentum ``p`` is ``1 - p`` here (torch 0.1 is 0.9).

  Differences, all deliberate: statistics are exact at any |mean|/std (flax's
  default loses all precision at 1e3 to 1e4); with ``axis_name`` and a
  ``mask`` they are count-weighted over the global batch; reductions are
  always at least float32 (``force_float32_reductions=False`` only sets the
  dtype of the stored statistics to ``param_dtype``); training on one value
  per channel raises instead of returning the bias. During ``init`` the
  statistics are not updated and ``axis_name`` is ignored, as in flax; an
  init batch with one value per channel is normalized with the initial
  running statistics.

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

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalizes x; see ``flax.linen.BatchNorm.__call__``."""
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    x = _checks.check_floating(_NAME, x)
    lay = _checks.layout(_NAME, x, self.axis)
    shape = lay.feature_shape
    sdt = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda s: jnp.zeros(s, sdt), shape)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, sdt),
                           shape)
    scale = bias = None
    if self.use_scale:
      scale = self.param('scale', self.scale_init, shape, self.param_dtype)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, shape, self.param_dtype)
    stats = BatchStats(ra_mean.value, ra_var.value)
    initializing = self.is_initializing()
    train = not use_running_average
    if initializing and train and lay.count < 2:
      train = False  # flax accepts a 1-example init batch; nothing is stored.
    y, new = batch_norm(
        x, stats, scale, bias, use_running_average=not train, axis=self.axis,
        momentum=self.momentum, epsilon=self.epsilon,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        mask=mask, use_fast_variance=self.use_fast_variance,
        dtype=_out_dtype(self.dtype, x, scale, bias))
    if train and not initializing:
      ra_mean.value, ra_var.value = new.mean, new.var
    return y
