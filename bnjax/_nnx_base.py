"""The state plumbing both ``bnjax.nnx`` modules share: one base (flax's
BatchNorm's constructor arguments, then bnjax's ``sync``; the call into the
functional core), its argument checks, and the constructor signatures that
``inspect`` and the API reference show. The public classes are in
:mod:`bnjax.nnx`.
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

from bnjax import _act, _checks, _core, _moments, _renorm
from bnjax._types import BatchStats, PooledStats

# The variables a pooling BatchNorm holds (bnjax.nnx.PooledMoment), named
# after the PooledStats fields.
POOL = tuple(f'pooled_{f}' for f in PooledStats._fields)


class Base(nnx.Module):
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
    check_num_features(fn, num_features)
    check_args(fn, locals())
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
      raise ValueError(features_msg(fn, x, lay, self.axis, self.num_features))
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
        store(getattr(self, n), v)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by ``nnx.view`` (and read by ``nnx.view_info``).

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


def features_msg(fn, x, lay, axis, num_features) -> str:
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


def check_args(fn, a):
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
    if a[name] is not None and not inexact(a[name]):
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


def inexact(dtype) -> bool:
  try:
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.inexact))
  except TypeError:
    return False


def check_num_features(fn, num_features):
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


def store(variable: nnx.Variable, value: jax.Array) -> None:
  """Writes a new running statistic. A complex batch mean replaces a real
  variable whole (flax's ``[...] =`` would drop the imaginary part)."""
  if value.dtype == variable[...].dtype:
    variable[...] = value
  else:
    variable.set_value(value)


def constructor_signature(cls) -> None:
  """``inspect.signature(cls)`` (and so the API reference) shows every
  constructor argument: nnx's metaclass would give (*args, **kwargs), and
  BatchRenorm's ``**kwargs`` are the base's (flax's BatchNorm's)."""
  own = list(inspect.signature(cls.__init__).parameters.values())[1:]
  base = list(inspect.signature(Base.__init__).parameters.values())[2:]
  if own[-1].kind is inspect.Parameter.VAR_KEYWORD:  # BatchRenorm
    names = {p.name for p in own} | {'virtual_batch_size'}
    own = own[:-1] + [p for p in base if p.name not in names]
  cls.__signature__ = ClassOnly(inspect.Signature(own))


class ClassOnly:
  """A class attribute that instances do not have: ``inspect.signature`` of
  a module instance (flax's ``nnx.Sequential`` reads it to forward keyword
  arguments) must stay that of ``__call__``."""

  def __init__(self, value):
    self.value = value

  def __get__(self, obj, objtype=None):
    if obj is not None:
      raise AttributeError('__signature__')
    return self.value


def act_signature(cls) -> None:
  """BatchNormAct's signature: its own arguments, then its parent's
  (BatchNorm's), which its ``**kwargs`` forward."""
  own = list(inspect.signature(cls.__init__).parameters.values())[1:-1]
  names = {p.name for p in own}
  base = [
    p
    for p in inspect.signature(cls.__mro__[1]).parameters.values()
    if p.name not in names
  ]
  cls.__signature__ = ClassOnly(inspect.Signature(own + base))
