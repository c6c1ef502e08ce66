"""``bnjax.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, ``nnx.BatchStat`` statistics named ``mean``/``var`` and
``nnx.Param`` ``scale``/``bias``; ``train()``/``eval()``, ``nnx.split/merge``,
``nnx.jit`` and ``nnx.value_and_grad`` work as with flax's. Only state
plumbing lives here, in one base shared by :class:`BatchNorm` and
:class:`BatchRenorm`; the statistics are the functional core's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax import _act, _convert
from bnjax._nnx_base import (
  POOL,
  Base,
  act_signature,
  constructor_signature,
)
from bnjax._types import PooledStats, RenormStats

__all__ = [
  'BatchNorm',
  'BatchNormAct',
  'BatchRenorm',
  'PooledMoment',
  'convert',
]


class PooledMoment(nnx.BatchStat):
  """A field of the :class:`bnjax.PooledStats` a pooling BatchNorm holds.

  :func:`bnjax.training.start_pooling` adds four to each layer
  (``pooled_count``, ``pooled_mean``, ``pooled_mean_lo``, ``pooled_m2``);
  :func:`bnjax.training.stop_pooling` removes them. A ``BatchStat``, so
  optimizers over ``nnx.Param`` leave it alone, and
  ``nnx.state(model, nnx.BatchStat)`` checkpoints a pool in progress.

  Attributes:
    value: the array (per channel).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx, bnjax.training
    >>> bn = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    >>> bnjax.training.start_pooling(bn)
    >>> type(bn.pooled_count).__name__, isinstance(bn.pooled_m2, nnx.BatchStat)
    ('PooledMoment', True)
  """


def add_pool(m: Any) -> None:
  """Gives a BatchNorm an empty pool (:class:`PooledMoment` variables):
  its training calls then merge their moments there, count-weighted."""
  for name in POOL:
    setattr(m, name, PooledMoment(jnp.zeros_like(m.mean[...])))


def pool_of(m: Any) -> PooledStats:
  """The pool a BatchNorm holds."""
  return PooledStats(*(getattr(m, n)[...] for n in POOL))


def drop_pool(m: Any) -> None:
  for name in POOL:
    delattr(m, name)


class BatchNorm(Base):
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
    use_bias: learn a per-channel bias (beta).
    use_scale: learn a per-channel scale (gamma).
    bias_init: the bias initializer.
    scale_init: the scale initializer.
    axis_name: a mapped axis name (or tuple) to sync statistics over.
    axis_index_groups: groups of ``axis_name`` indices that sync separately.
    use_fast_variance: flax's formula choice; both are exact here.
    promote_dtype: the dtype-promotion function, as flax's.
    rngs: an ``nnx.Rngs`` for the parameter initializers.
    bias_metadata: metadata for the ``bias`` Param.
    scale_metadata: metadata for the ``scale`` Param.
    sync: ``'auto'``, ``'gather'`` or ``'psum'`` (see :func:`bnjax.batch_norm`).
    virtual_batch_size: ghost batch norm: statistics per chunk of this many
      rows (see :func:`bnjax.batch_norm`).

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

  mean: nnx.BatchStat
  var: nnx.BatchStat

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
    return self._normalize(
      x,
      use_running_average,
      mask,
      virtual_batch_size=self.virtual_batch_size,
    )


class BatchRenorm(Base):
  """Batch renormalization (Ioffe 2017) as an nnx module.

  Arguments as :class:`BatchNorm` (see there; all of flax's BatchNorm
  arguments), plus ``r_max`` and ``d_max`` (the call may override them with
  traced values for a schedule). Statistics are ``nnx.BatchStat`` ``mean``
  and ``std``; see :func:`bnjax.batch_renorm`.

  Args:
    num_features: the size of the feature axis.
    r_max: clip of r, >= 1 (default 3); the call may override it.
    d_max: clip of d, >= 0 (default 5); the call may override it.
    **kwargs: the other arguments of :class:`BatchNorm` (``rngs`` among
      them), except ``virtual_batch_size``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> m = bnjax.nnx.BatchRenorm(2, rngs=nnx.Rngs(0))
    >>> y = m(jnp.arange(8.0).reshape(4, 2), r_max=1.0, d_max=0.0)
    >>> m.std[...].round(3)
    Array([1.012, 1.012], dtype=float32)
  """

  _STATE = RenormStats
  mean: nnx.BatchStat
  std: nnx.BatchStat

  def __init__(
    self,
    num_features: int,
    *,
    r_max: Any = 3.0,
    d_max: Any = 5.0,
    **kwargs: Any,
  ):
    if 'virtual_batch_size' in kwargs:
      raise TypeError(
        'bnjax.nnx.BatchRenorm: virtual_batch_size is not an argument of '
        'BatchRenorm (ghost statistics are a BatchNorm variant); use '
        'bnjax.nnx.BatchNorm(virtual_batch_size=...)'
      )
    super().__init__(num_features, **kwargs)
    self.r_max, self.d_max = r_max, d_max

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
      The normalized x. In training the ``mean``
      and ``std`` BatchStat variables are updated in place.
    """
    limits = (
      self.r_max if r_max is None else r_max,
      self.d_max if d_max is None else d_max,
    )
    return self._normalize(x, use_running_average, mask, renorm=limits)


constructor_signature(BatchNorm)
constructor_signature(BatchRenorm)


def convert(model: Any, *, axis_name: Any = None, **overrides: Any) -> Any:
  """Replaces every ``flax.nnx.BatchNorm`` in an nnx model with bnjax's.

  Each replacement carries the original's settings and its ``scale``,
  ``bias``, ``mean`` and ``var`` variables (the same ``nnx.Variable``
  objects, so values, sharding metadata and sharing are kept): outputs in
  both modes are unchanged. A BatchNorm shared by several parents is
  replaced by one module everywhere. Like PyTorch's
  ``SyncBatchNorm.convert_sync_batchnorm``, ``axis_name`` switches on
  synchronized statistics, for a data-parallel ``shard_map``/``pmap``/
  ``vmap`` over that axis.

  Args:
    model: an nnx Module (converted in place), or a ``flax.nnx.BatchNorm``.
    axis_name: if not None, the mapped axis to sync statistics over.
    **overrides: other :class:`BatchNorm` constructor arguments to set on
      every converted layer (``momentum``, ``virtual_batch_size``, ...).

  Returns:
    The model (the new module when ``model`` itself is a BatchNorm).

  Raises:
    ValueError: the model holds no ``flax.nnx.BatchNorm``.
    TypeError: an unknown argument in ``overrides``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> model = bnjax.nnx.convert(model, axis_name='data')
    >>> type(model.layers[1]).__module__, model.layers[1].axis_name
    ('bnjax.nnx', 'data')
  """
  return _convert.swap(model, BatchNorm, axis_name, overrides)


class BatchNormAct(BatchNorm):
  """BatchNorm then an invertible activation that keeps only its output.

  A drop-in for :class:`BatchNorm` followed by ``nnx.leaky_relu`` (or
  ``nnx.elu``, or nothing): :class:`BatchNorm`'s arguments and variables,
  plus ``activation`` and ``scale_floor`` (see
  :func:`bnjax.batch_norm_act`). Training keeps only the output for the
  backward (InPlace-ABN).

  Args:
    num_features: the size of the feature axis.
    activation: ``'leaky_relu'`` (slope 0.01, the default), ``'elu'``,
      ``'identity'``, or a :class:`bnjax.LeakyReLU` / :class:`bnjax.ELU`.
    scale_floor: the smallest ``|scale|`` used (default 1e-3).
    **kwargs: :class:`BatchNorm`'s arguments (``rngs`` among them).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax, bnjax.nnx
    >>> bn = bnjax.nnx.BatchNormAct(1, activation=bnjax.LeakyReLU(0.1),
    ...                             rngs=nnx.Rngs(0))
    >>> bn(jnp.array([[1.0], [3.0]])).round(3)
    Array([[-0.1],
           [ 1. ]], dtype=float32)
  """

  def __init__(
    self,
    num_features: int,
    *,
    activation: Any = 'leaky_relu',
    scale_floor: float = 1e-3,
    **kwargs: Any,
  ):
    spec = _act.spec('bnjax.nnx.BatchNormAct', activation, scale_floor)
    super().__init__(num_features, **kwargs)
    self.activation = spec.activation
    self.scale_floor = spec.scale_floor

  def __call__(
    self,
    x,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ):
    """As :meth:`BatchNorm.__call__`, then the activation."""
    return self._normalize(
      x,
      use_running_average,
      mask,
      virtual_batch_size=self.virtual_batch_size,
      # Checked again: the attributes are public and may have changed.
      act=_act.spec(
        'bnjax.nnx.BatchNormAct', self.activation, self.scale_floor
      ),
    )


act_signature(BatchNormAct)
