"""``bnjax.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, ``nnx.BatchStat`` statistics named ``mean``/``var`` and
``nnx.Param`` ``scale``/``bias``; ``train()``/``eval()``, ``nnx.split/merge``,
``nnx.jit`` and ``nnx.value_and_grad`` work as with flax's. Only state
plumbing lives here, in one base shared by :class:`BatchNorm` and
:class:`BatchRenorm`; the statistics are the functional core's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from bnjax import _act, _checks, _convert, _core, _moments, _renorm
from bnjax._types import BatchStats, PooledStats, RenormStats

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


POOL = tuple(f'pooled_{f}' for f in PooledStats._fields)


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


class _Base(nnx.Module):
  """The constructor arguments and the call both nnx modules share (flax's
  BatchNorm's arguments, then bnjax's ``sync``)."""

  scale: nnx.Param | None
  bias: nnx.Param | None
  _STATE: Any = BatchStats  # the state type: its fields name the variables

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
    sync: str = 'auto',
    virtual_batch_size: int | None = None,
  ):
    fn = f'bnjax.nnx.{type(self).__name__}'
    _check_num_features(fn, num_features)
    _check_args(fn, locals())
    shape = (int(num_features),)
    mean_name, spread_name = self._STATE._fields
    setattr(self, mean_name, nnx.BatchStat(jnp.zeros(shape, jnp.float32)))
    setattr(self, spread_name, nnx.BatchStat(jnp.ones(shape, jnp.float32)))
    self.scale = nnx.data(None)
    self.bias = nnx.data(None)
    if use_scale:
      self.scale = nnx.Param(
        scale_init(rngs.params(), shape, param_dtype), **scale_metadata
      )
    if use_bias:
      self.bias = nnx.Param(
        bias_init(rngs.params(), shape, param_dtype), **bias_metadata
      )
    self.num_features = int(num_features)
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
    self.sync = sync
    self.virtual_batch_size = virtual_batch_size

  def _normalize(
    self,
    x,
    use_running_average,
    mask,
    *,
    virtual_batch_size: int | None = None,
    act: _act.Spec | None = None,
    renorm: tuple[Any, Any] | None = None,
  ):
    """Runs the core on the module's state; writes the new statistics."""
    fn = f'bnjax.nnx.{type(self).__name__}'
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
        f'{fn}: no use_running_average was given; pass it to the '
        'constructor or the call, or use model.train() / model.eval()'
      )
    _checks.check_use_running_average(fn, use_running_average)
    if not hasattr(x, 'dtype'):  # before flax's promotion, which says less
      x = _checks.check_floating(fn, x, complex_ok=self._STATE is BatchStats)
    names = self._STATE._fields
    stats = [getattr(self, n)[...] for n in names]
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, *stats, scale, bias = self.promote_dtype(
      (x, *stats, scale, bias), dtype=self.dtype
    )
    x = _checks.check_floating(fn, x, complex_ok=self._STATE is BatchStats)
    lay = _checks.layout(fn, x, self.axis)
    if lay.feature_shape != (self.num_features,):
      raise ValueError(_features_msg(fn, x, lay, self.axis, self.num_features))
    # The stored statistics keep their own dtype (the promotion above may
    # have cast them to a half dtype).
    if not use_running_average and hasattr(self, POOL[0]):
      names = POOL  # pooling (gradient accumulation): the stats stay put
    state = (PooledStats if names is POOL else self._STATE)(
      *(getattr(self, n)[...] for n in names)
    )
    correction = None if renorm is None else _renorm.variant(fn, *renorm)
    y, new = _core.normalize_batch(
      fn,
      x,
      state,
      scale,
      bias,
      use_running_average=bool(use_running_average),
      momentum=self.momentum,
      epsilon=self.epsilon,
      # As flax's: inference never syncs, so a model built with an
      # axis_name evaluates outside the mapping it trains in.
      axis_name=None if use_running_average else self.axis_name,
      axis_index_groups=(
        None if use_running_average else self.axis_index_groups
      ),
      mask=mask,
      use_fast_variance=self.use_fast_variance,
      dtype=x.dtype,
      virtual_batch_size=virtual_batch_size,
      sync=self.sync,
      correction=correction,
      single_value_ok=True,
      lay=lay,
      act=act,
    )
    if not use_running_average:
      for n, v in zip(names, new, strict=True):
        _store(getattr(self, n), v)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by ``nnx.view`` (and read by ``nnx.view_info``).

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _features_msg(fn, x, lay, axis, num_features) -> str:
  """x's features differ from num_features: the likely fix, the axis of x
  that has num_features (NCHW data) or the num_features x has."""
  found = lay.feature_shape
  msg = (
    f'{fn}: x of shape {tuple(x.shape)} has features of shape {found} on '
    f'axis {axis}, but the module was built with num_features={num_features}; '
  )
  other = _checks.other_axis(lay, (num_features,))
  n = found[0] if len(found) == 1 else found
  if other is not None:
    nchw = ' (channels-first data such as NCHW)' if other == 1 else ''
    return msg + (
      f'axis {other} of x has size {num_features}: if the features are '
      f'there{nchw}, build it with axis={other}; otherwise build it with '
      f'num_features={n}'
    )
  return msg + f'build it with num_features={n} (or the axis of the features)'


def _check_args(fn, a):
  """The constructor's arguments the call does not check (or checks only
  once a batch comes), so a bad one fails where it is written."""
  for name in ('use_bias', 'use_scale', 'use_fast_variance'):
    _checks.check_flag(fn, name, a[name])
  if a['use_running_average'] is not None:
    _checks.check_flag(fn, 'use_running_average', a['use_running_average'])
  _checks.check_hyper(fn, a['momentum'], a['epsilon'])
  _moments.check_mode(fn, a['sync'])
  if a['axis_name'] is not None:
    _moments.check_axis_name(fn, a['axis_name'])
  for name in ('dtype', 'param_dtype'):
    if a[name] is not None and not _inexact(a[name]):
      raise TypeError(
        f'{fn}: {name} must be a floating dtype, got {a[name]!r}; pass e.g. '
        f'{name}=jnp.float32'
      )
  need = [n for n in ('bias', 'scale') if a[f'use_{n}']]
  wrong = [
    (f'{n}_init', 'an initializer (key, shape, dtype) -> array')
    for n in need
    if not callable(a[f'{n}_init'])
  ] + [
    (f'{n}_metadata', 'a mapping of Param metadata')
    for n in need
    if not isinstance(a[f'{n}_metadata'], Mapping)
  ]
  if not callable(a['promote_dtype']):
    wrong.append(
      ('promote_dtype', 'a function, as flax.nnx.nn.dtypes.promote_dtype')
    )
  if need and not isinstance(a['rngs'], nnx.Rngs):
    wrong.append(('rngs', 'an nnx.Rngs, e.g. rngs=nnx.Rngs(0)'))
  for name, what in wrong:
    raise TypeError(f'{fn}: {name} must be {what}, got {a[name]!r}')


def _inexact(dtype) -> bool:
  try:
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.inexact))
  except TypeError:
    return False


def _check_num_features(fn, num_features):
  if (
    isinstance(num_features, (bool, np.bool_))
    or not isinstance(num_features, (int, np.integer))
    or num_features < 1
  ):
    raise TypeError(
      f'{fn}: num_features must be a positive int (the size of the feature '
      f'axis), got {num_features!r}; pass e.g. {fn.split(".")[-1]}(64, '
      'rngs=nnx.Rngs(0))'
    )


def _store(variable: nnx.Variable, value: jax.Array) -> None:
  """Writes a new running statistic. A complex batch mean replaces a real
  variable whole (flax's ``[...] =`` would drop the imaginary part)."""
  if value.dtype == variable[...].dtype:
    variable[...] = value
  else:
    variable.set_value(value)


class BatchNorm(_Base):
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


class BatchRenorm(_Base):
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


def _constructor_signature(cls) -> None:
  """``inspect.signature(cls)`` (and so the API reference) shows every
  constructor argument: nnx's metaclass would give (*args, **kwargs), and
  BatchRenorm's ``**kwargs`` are the base's (flax's BatchNorm's)."""
  own = list(inspect.signature(cls.__init__).parameters.values())[1:]
  base = list(inspect.signature(_Base.__init__).parameters.values())[2:]
  if own[-1].kind is inspect.Parameter.VAR_KEYWORD:  # BatchRenorm
    names = {p.name for p in own} | {'virtual_batch_size'}
    own = own[:-1] + [p for p in base if p.name not in names]
  cls.__signature__ = _ClassOnly(inspect.Signature(own))


class _ClassOnly:
  """A class attribute that instances do not have: ``inspect.signature`` of
  a module instance (flax's ``nnx.Sequential`` reads it to forward keyword
  arguments) must stay that of ``__call__``."""

  def __init__(self, value):
    self.value = value

  def __get__(self, obj, objtype=None):
    if obj is not None:
      raise AttributeError('__signature__')
    return self.value


_constructor_signature(BatchNorm)
_constructor_signature(BatchRenorm)


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


def _act_signature(cls) -> None:
  """BatchNormAct's signature: its own arguments, then BatchNorm's, which
  its ``**kwargs`` forward."""
  own = list(inspect.signature(cls.__init__).parameters.values())[1:-1]
  names = {p.name for p in own}
  base = [
    p
    for p in inspect.signature(BatchNorm).parameters.values()
    if p.name not in names
  ]
  cls.__signature__ = _ClassOnly(inspect.Signature(own + base))


_act_signature(BatchNormAct)
