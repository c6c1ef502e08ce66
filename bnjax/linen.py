"""``bnjax.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Same fields, same call, same variables (``params/{scale,bias}``,
``batch_stats/{mean,var}``), so checkpoints load both ways. Only parameter and
collection plumbing lives here, in one base shared by :class:`BatchNorm` and
:class:`BatchRenorm`; the statistics are the functional core's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from bnjax import _act
from bnjax._linen_base import MOMENTS as MOMENTS  # the pooling collection
from bnjax._linen_base import Base, normalize
from bnjax._linen_pool import apply_pooled
from bnjax._types import RenormStats

__all__ = [
  'BatchNorm',
  'BatchNormAct',
  'BatchRenorm',
  'apply_pooled',
]


class BatchNorm(Base):
  """BatchNorm with exact statistics, count-weighted sync and one residual.

  Fields and semantics are those of ``flax.linen.BatchNorm``. ``momentum`` is
  the decay of the running average, ``new = momentum * old + (1 - momentum)
  * batch``: PyTorch's momentum ``p`` is ``1 - p`` here (torch 0.1 is 0.9).

  Differences, all deliberate: statistics are exact at any ``|mean|/std`` (flax's
  default loses all precision at 1e3 to 1e4); with ``axis_name`` and a
  ``mask`` they are count-weighted over the global batch; reductions are
  always at least float32 (``force_float32_reductions=False`` only changes
  the dtype of the stored statistics, which start in ``param_dtype`` and are
  promoted as flax's are). As in flax, training on one value per channel
  returns the bias (the functional :func:`bnjax.batch_norm` raises instead),
  complex input has a complex mean and a real variance ``E|x - mean|^2``,
  and during ``init`` the statistics are not updated and ``axis_name`` is
  ignored.

  Attributes:
    use_running_average: True for inference (the stored statistics), False
      to train on the batch statistics; may be given at call time instead.
    axis: the feature axis, or a tuple of feature axes.
    momentum: EMA decay of the running statistics, ``new = momentum * old +
      (1 - momentum) * batch``; PyTorch's ``p`` is ``1 - p``.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: promoted from x and the parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: learn a per-channel bias (beta).
    use_scale: learn a per-channel scale (gamma).
    bias_init: the bias initializer.
    scale_init: the scale initializer.
    axis_name: a mapped axis name (or tuple) to sync statistics over; ignored
      during ``init``.
    axis_index_groups: groups of ``axis_name`` indices that sync separately.
    use_fast_variance: flax's formula choice; both are exact here.
    force_float32_reductions: reductions are always float32 or wider; False
      starts the stored statistics in ``param_dtype``, as flax does.
    sync: ``'auto'``, ``'gather'`` or ``'psum'`` (see :func:`bnjax.batch_norm`).
    virtual_batch_size: ghost batch norm: statistics per chunk of this many
      rows (see :func:`bnjax.batch_norm`).

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

  virtual_batch_size: int | None = None

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
    return normalize(
      self,
      x,
      use_running_average,
      mask,
      virtual_batch_size=self.virtual_batch_size,
    )


class BatchRenorm(Base):
  """Batch renormalization (Ioffe 2017) as a linen module.

  Fields as :class:`BatchNorm` (see there), plus ``r_max`` and ``d_max``
  (which the call may override with traced values, for the paper's warm-up
  schedule). The running statistics are ``batch_stats/{mean, std}``; see
  :func:`bnjax.batch_renorm`.

  Attributes:
    r_max: clip of r, >= 1 (renorm's default 3); may be given at call time.
    d_max: clip of d, >= 0 (default 5); may be given at call time.

  Example:
    >>> import jax, jax.numpy as jnp, bnjax.linen
    >>> m = bnjax.linen.BatchRenorm(use_running_average=False)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> v = m.init(jax.random.key(0), x)
    >>> y, upd = m.apply(v, x, r_max=1.0, d_max=0.0, mutable=['batch_stats'])
    >>> sorted(upd['batch_stats'])
    ['mean', 'std']
  """

  r_max: Any = 3.0
  d_max: Any = 5.0

  _STATE = RenormStats

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
      r_max: overrides the field (a traced value allowed), for the paper's
        schedule: 1 (plain BN) for a warm-up, then ramped up.
      d_max: overrides the field (a traced value allowed): 0 for the
        warm-up, then ramped up.

    Returns:
      The normalized x. In training with ``mutable=['batch_stats']`` the
      running statistics are updated.
    """
    limits = (
      self.r_max if r_max is None else r_max,
      self.d_max if d_max is None else d_max,
    )
    return normalize(self, x, use_running_average, mask, renorm=limits)


class BatchNormAct(BatchNorm):
  """BatchNorm then an invertible activation that keeps only its output.

  A drop-in for ``BatchNorm`` followed by ``nn.leaky_relu`` (or ``nn.elu``,
  or nothing), with :class:`BatchNorm`'s fields and variables (so a flax
  BatchNorm's checkpoint loads), plus ``activation`` and ``scale_floor``.
  Training keeps only the output for the backward (InPlace-ABN); see
  :func:`bnjax.batch_norm_act` for the maths, the ``|scale|`` floor, and
  what it costs.

  Attributes:
    activation: ``'leaky_relu'`` (slope 0.01, the default), ``'elu'``,
      ``'identity'``, or a :class:`bnjax.LeakyReLU` / :class:`bnjax.ELU`.
    scale_floor: the smallest ``|scale|`` used (default 1e-3).

  Example:
    >>> import jax, jax.numpy as jnp, bnjax, bnjax.linen
    >>> m = bnjax.linen.BatchNormAct(activation=bnjax.LeakyReLU(0.1))
    >>> x = jnp.array([[1.0], [3.0]])
    >>> v = m.init(jax.random.key(0), x, use_running_average=True)
    >>> y, _ = m.apply(v, x, use_running_average=False,
    ...                mutable=['batch_stats'])
    >>> y.round(3)
    Array([[-0.1],
           [ 1. ]], dtype=float32)
  """

  activation: Any = 'leaky_relu'
  scale_floor: float = 1e-3

  @nn.compact
  def __call__(
    self,
    x,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ):
    """As :meth:`BatchNorm.__call__`, then the activation."""
    act = _act.spec(
      'bnjax.linen.BatchNormAct', self.activation, self.scale_floor
    )
    return normalize(
      self,
      x,
      use_running_average,
      mask,
      virtual_batch_size=self.virtual_batch_size,
      act=act,
    )
