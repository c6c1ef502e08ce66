"""The parameter and collection plumbing both ``bnjax.linen`` modules share:
one base (flax's BatchNorm's fields, in flax's order, then bnjax's
``sync``), the call into the functional core, and its checks. The public
classes are in :mod:`bnjax.linen`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes, initializers

from bnjax import _act, _checks, _core, _renorm, _running
from bnjax._types import BatchStats, PooledStats

# The collection in which a training BatchNorm pools its batches' exact
# moments instead of updating batch_stats, when it is mutable: gradient
# accumulation and precise BN (see apply_pooled).
MOMENTS = 'batch_moments'


class Base(nn.Module):
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
def normalize(
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
    raise ValueError(ONE_FLAG.format(fn=fn, given=given))
  use_running_average = given[0] if given[1] is None else given[1]
  _checks.check_use_running_average(fn, use_running_average)
  complex_ok = module._STATE is BatchStats
  x = _checks.check_floating(fn, x, complex_ok=complex_ok)
  lay = _checks.layout(fn, x, module.axis)
  check_fields(fn, module, x, lay)
  variables = make_variables(module, x, lay.feature_shape)
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
    pooled = pool_variables(module, lay.feature_shape)
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
    dtype=out_dtype(module.dtype, x, scale, bias),
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
      v.value = new_v.astype(stored_dtype(module, v.value, new_v, x))
  return y


def make_variables(module, x, shape):
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


def pool_variables(module, shape):
  """The pooled moments of MOMENTS (empty at the first micro-batch)."""
  return tuple(
    module.variable(MOMENTS, name, lambda: jnp.zeros(shape, jnp.float32))
    for name in PooledStats._fields
  )


def stored_dtype(module, old, new, x):
  """flax's: the variable's dtype promoted with that of flax's reduction
  (float32 at least, unless force_float32_reductions=False), so a float16
  param_dtype stores float32 statistics from float32 input rather than an
  overflowing float16 variance; never drops a complex mean's imaginary part."""
  red = jnp.result_type(module.dtype or x.dtype)
  if module.force_float32_reductions:
    red = jnp.promote_types(red, jnp.float32)
  return jnp.promote_types(_running.stored_dtype(old, new), red)


ONE_FLAG = (
  '{fn}: pass use_running_average to the constructor or to the call, '
  'exactly one of them (as flax), got {given[0]!r} and {given[1]!r}'
)


def check_fields(fn, module, x, lay):
  """The fields the core does not see, and x against existing variables."""
  check_param_dtype(fn, module.param_dtype)
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


def check_param_dtype(fn, param_dtype):
  try:
    ok = jnp.issubdtype(jnp.dtype(param_dtype), jnp.inexact)
  except TypeError:
    ok = False
  if not ok:
    raise TypeError(
      f'{fn}: param_dtype must be a floating dtype (the dtype of scale and '
      f'bias), got {param_dtype!r}; pass e.g. param_dtype=jnp.float32'
    )


def out_dtype(dtype, *arrays):
  """Flax's rule: the given dtype, else the promoted dtype of x and params."""
  return dtypes.canonicalize_dtype(
    *[a for a in arrays if a is not None], dtype=dtype
  )
