"""``bnjax.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Same fields, same call, same variables (``params/{scale,bias}``,
``batch_stats/{mean,var}``), so checkpoints load both ways. Only parameter and
collection plumbing lives here, in one base shared by :class:`BatchNorm` and
:class:`BatchRenorm`; the statistics are the functional core's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes, initializers

from bnjax import _act, _checks, _core, _renorm, _running
from bnjax._linen_pool import apply_pooled
from bnjax._types import BatchStats, PooledStats, RenormStats

__all__ = [
  'BatchNorm',
  'BatchNormAct',
  'BatchRenorm',
  'apply_pooled',
]

# The collection in which a training BatchNorm pools its batches' exact
# moments instead of updating batch_stats, when it is mutable: gradient
# accumulation and precise BN (see apply_pooled).
MOMENTS = 'batch_moments'


class _Base(nn.Module):
  """The fields and the call both linen modules share (flax's BatchNorm's
  fields, in flax's order, then bnjax's ``sync``)."""

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
  sync: str = 'auto'  # see bnjax.batch_norm

  # The state type; its fields name the variables.
  _STATE: ClassVar[Any] = BatchStats


# Module-level, not methods: flax intercepts module methods (nn.tabulate
# re-runs them outside the compact scope), and these create variables.
def _normalize(
  module,
  x,
  use_running_average,
  mask,
  *,
  virtual_batch_size: int | None = None,
  act: _act.Spec | None = None,
  renorm: tuple[Any, Any] | None = None,
):
  """Creates the variables, runs the core, writes the new statistics.

  ``renorm``: batch renorm's ``(r_max, d_max)``; ``act``: BN +
  activation's checked activation."""
  fn = f'bnjax.linen.{type(module).__name__}'
  given = (module.use_running_average, use_running_average)
  if (given[0] is None) == (given[1] is None):
    raise ValueError(_ONE_FLAG.format(fn=fn, given=given))
  use_running_average = given[0] if given[1] is None else given[1]
  _checks.check_use_running_average(fn, use_running_average)
  complex_ok = module._STATE is BatchStats
  x = _checks.check_floating(fn, x, complex_ok=complex_ok)
  lay = _checks.layout(fn, x, module.axis)
  _check_fields(fn, module, x, lay)
  variables = _variables(module, x, lay.feature_shape)
  scale = bias = None
  if module.use_scale:
    scale = module.param(
      'scale', module.scale_init, lay.feature_shape, module.param_dtype
    )
  if module.use_bias:
    bias = module.param(
      'bias', module.bias_init, lay.feature_shape, module.param_dtype
    )
  # Statistics are updated in at least float32 and at least the reduction's
  # dtype (float64 input: float64, or a float64 mean loses its low digits
  # in a float32 EMA), and stored back in the dtype flax's variable would
  # have (see _stored_dtype).
  red = jnp.finfo(jnp.result_type(module.dtype or x.dtype)).dtype
  state = module._STATE(
    *(
      v.value.astype(
        jnp.promote_types(jnp.promote_types(v.value.dtype, red), jnp.float32)
      )
      for v in variables
    )
  )
  initializing = module.is_initializing()
  train = not use_running_average
  recording = (
    module._STATE is BatchStats
    and train
    and not initializing
    and module.is_mutable_collection(MOMENTS)
  )
  if recording:  # pool this batch's moments; batch_stats stay as they are
    pooled = _pool_variables(module, lay.feature_shape)
    state = PooledStats(*(v.value for v in pooled))
  correction = None if renorm is None else _renorm.variant(fn, *renorm)
  y, new = _core.normalize_batch(
    fn,
    x,
    state,
    scale,
    bias,
    use_running_average=not train,
    epsilon=module.epsilon,
    # As flax's: init and inference never sync, so a model built with an
    # axis_name evaluates outside the mapping it trains in.
    axis_name=module.axis_name if train and not initializing else None,
    axis_index_groups=(
      module.axis_index_groups if train and not initializing else None
    ),
    mask=mask,
    use_fast_variance=module.use_fast_variance,
    dtype=_out_dtype(module.dtype, x, scale, bias),
    momentum=module.momentum,
    virtual_batch_size=virtual_batch_size,
    sync=module.sync,
    correction=correction,
    single_value_ok=True,
    lay=lay,
    act=act,
  )
  if recording:
    for v, new_v in zip(pooled, new, strict=True):
      v.value = new_v
    module.put_variable(MOMENTS, 'momentum', jnp.float32(module.momentum))
  elif train and not initializing:
    for v, new_v in zip(variables, new, strict=True):
      v.value = new_v.astype(_stored_dtype(module, v.value, new_v, x))
  return y


def _variables(module, x, shape):
  """The running-statistics variables, named by the state's fields."""
  sdt = jnp.float32 if module.force_float32_reductions else module.param_dtype
  # Complex input has a complex mean (flax's variable turns complex at the
  # first update; this one is complex from init, so its dtype is stable).
  mdt = jnp.promote_types(sdt, x.dtype) if jnp.iscomplexobj(x) else sdt
  mean_name, spread_name = module._STATE._fields
  return (
    module.variable(
      'batch_stats', mean_name, lambda s: jnp.zeros(s, mdt), shape
    ),
    module.variable(
      'batch_stats', spread_name, lambda s: jnp.ones(s, sdt), shape
    ),
  )


def _pool_variables(module, shape):
  """The pooled moments of MOMENTS (empty at the first micro-batch)."""
  return tuple(
    module.variable(MOMENTS, name, lambda: jnp.zeros(shape, jnp.float32))
    for name in PooledStats._fields
  )


def _stored_dtype(module, old, new, x):
  """flax's: the variable's dtype promoted with that of flax's reduction
  (float32 at least, unless force_float32_reductions=False), so a float16
  param_dtype stores float32 statistics from float32 input rather than an
  overflowing float16 variance; never drops a complex mean's imaginary part."""
  red = jnp.result_type(module.dtype or x.dtype)
  if module.force_float32_reductions:
    red = jnp.promote_types(red, jnp.float32)
  return jnp.promote_types(_running.stored_dtype(old, new), red)


_ONE_FLAG = (
  '{fn}: pass use_running_average to the constructor or to the call, '
  'exactly one of them (as flax), got {given[0]!r} and {given[1]!r}'
)


def _check_fields(fn, module, x, lay):
  """The fields the core does not see, and x against existing variables."""
  _check_param_dtype(fn, module.param_dtype)
  for name in ('use_bias', 'use_scale', 'force_float32_reductions'):
    _checks.check_flag(fn, name, getattr(module, name))
  for name in ('bias_init', 'scale_init'):
    if getattr(module, f'use_{name[:-5]}') and not callable(
      getattr(module, name)
    ):
      raise TypeError(
        f'{fn}: {name} must be an initializer, a function (key, shape, '
        f'dtype) -> array, got {getattr(module, name)!r}; pass e.g. '
        'flax.linen.initializers.zeros'
      )
  if module.dtype is not None:
    _checks.out_dtype(fn, x, module.dtype)
  mean_name = module._STATE._fields[0]
  if module.has_variable('batch_stats', mean_name):
    shape = tuple(module.get_variable('batch_stats', mean_name).shape)
    if shape != lay.feature_shape:
      axis = _checks.other_axis(lay, shape)
      raise ValueError(
        f'{fn}: x of shape {lay.shape} has features of shape '
        f"{lay.feature_shape} on axis {module.axis}, but the module's "
        f'batch_stats hold {shape}; '
        + (
          f'axis {axis} of x has size {shape[0]}: if the features are there '
          f'(channels-first data such as NCHW), build it with axis={axis}'
          if axis is not None
          else f'pass x with features of shape {shape}'
        )
      )


def _check_param_dtype(fn, param_dtype):
  try:
    ok = jnp.issubdtype(jnp.dtype(param_dtype), jnp.inexact)
  except TypeError:
    ok = False
  if not ok:
    raise TypeError(
      f'{fn}: param_dtype must be a floating dtype (the dtype of scale and '
      f'bias), got {param_dtype!r}; pass e.g. param_dtype=jnp.float32'
    )


def _out_dtype(dtype, *arrays):
  """Flax's rule: the given dtype, else the promoted dtype of x and params."""
  return dtypes.canonicalize_dtype(
    *[a for a in arrays if a is not None], dtype=dtype
  )


class BatchNorm(_Base):
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
    return _normalize(
      self,
      x,
      use_running_average,
      mask,
      virtual_batch_size=self.virtual_batch_size,
    )


class BatchRenorm(_Base):
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
    return _normalize(self, x, use_running_average, mask, renorm=limits)


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
    return _normalize(
      self,
      x,
      use_running_average,
      mask,
      virtual_batch_size=self.virtual_batch_size,
      act=act,
    )
