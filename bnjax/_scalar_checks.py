"""Trace-time checks of scalar arguments: flags, momentum, epsilon, dtypes.

Part of :mod:`bnjax._checks` (which re-exports these names): the checks of
one Python or 0-d value, apart from those of arrays and states. Every error
names the function, the argument, the value and the fix.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_TRACED_FLAG_MSG = (
  '{fn}: {name} must be a Python bool, got a traced value ({value!r}). It '
  'selects which computation runs (batch or stored statistics), which is '
  'fixed when the function is traced: pass it as a static argument '
  '(jax.jit(..., static_argnames=...)), or call both modes under '
  'jax.lax.cond.'
)


def check_hyper(fn: str, momentum: Any, epsilon: Any, dtype: Any = None):
  """momentum in [0, 1]; epsilon > 0 and a normal number of ``dtype`` (the
  statistics' real dtype), where a smaller one is 0 or flushed to 0 and a
  constant channel gives NaN. Traced values get a checkify.debug_check."""
  check_momentum(fn, momentum)
  check_epsilon(fn, epsilon, dtype)


def check_momentum(fn: str, momentum: Any):
  """A real scalar in [0, 1] (NaN is outside): the EMA decay."""
  check_scalar(fn, 'momentum', momentum)
  m = concrete(momentum)
  if m is not None and not 0.0 <= m <= 1.0:
    raise ValueError(
      f'{fn}: momentum={m} is outside [0, 1]. bnjax follows Flax: momentum is '
      'the decay of the running average, new = momentum * old + '
      '(1 - momentum) * batch. PyTorch momentum p is bnjax momentum 1 - p '
      '(torch 0.1 is bnjax 0.9).'
    )
  if m is None:
    checkify.debug_check(
      (momentum >= 0) & (momentum <= 1),
      f'{fn}: momentum must be in [0, 1] (got {{m}})',
      m=momentum,
    )


def check_epsilon(
  fn: str, epsilon: Any, dtype: Any = None, name: str = 'epsilon'
):
  """A real scalar, finite and a normal number of ``dtype`` (> 0); ``name``:
  the argument's name in the caller (Equinox's ``eps``)."""
  check_scalar(fn, name, epsilon)
  tiny = float(jnp.finfo(dtype or jnp.float32).tiny)
  e = concrete(epsilon)
  if e is not None and not tiny <= e < float('inf'):
    what = (
      f'is below the smallest normal {jnp.dtype(dtype or jnp.float32).name} '
      f'number {tiny:.3g}, so it is 0 or flushed to 0 there and a constant '
      'channel gives NaN'
      if 0.0 < e < tiny
      else f'must be finite and > 0 to keep rsqrt(var + {name}) finite'
    )
    raise ValueError(f'{fn}: {name}={e} {what}; pass e.g. {name}=1e-5')
  if e is None:
    checkify.debug_check(
      epsilon >= tiny,
      f'{fn}: {name} must be >= {tiny:.3g} (got {{e}})',
      e=epsilon,
    )


def check_scalar(fn: str, name: str, v: Any):
  """A real scalar: a Python number or a 0-d (possibly traced) array."""
  ok = not isinstance(v, (str, bytes, bool, np.bool_, complex)) and (
    isinstance(v, (int, float, np.integer, np.floating))
    or (
      hasattr(v, 'dtype')
      and jnp.ndim(v) == 0
      and (
        jnp.issubdtype(v.dtype, jnp.floating)
        or jnp.issubdtype(v.dtype, jnp.integer)
      )
    )
  )
  if not ok:
    raise TypeError(
      f'{fn}: {name} must be a real scalar (a float or a 0-d real array), got '
      f'{v!r} of type {type(v).__name__}; pass e.g. {name}='
      f'{"0.99" if name == "momentum" else "1e-5"}'
    )


def check_use_running_average(fn: str, value: Any):
  check_flag(fn, 'use_running_average', value)


def check_flag(fn: str, name: str, value: Any):
  """A Python bool (or NumPy bool): a traced one gets its own message."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(_TRACED_FLAG_MSG.format(fn=fn, name=name, value=value))
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{fn}: {name} must be a Python bool, got {value!r}')


def check_when(fn: str, when: Any) -> None:
  """A bool scalar, Python or array (traced is fine): where to apply."""
  dtype = getattr(when, 'dtype', None)
  ok = isinstance(when, (bool, np.bool_)) or (
    dtype is not None and dtype == jnp.bool_ and jnp.ndim(when) == 0
  )
  if not ok:
    raise TypeError(
      f'{fn}: when must be a bool or a 0-d bool array (e.g. step % k == '
      f'k - 1), got {when!r:.60}'
    )


def concrete(v: Any):
  try:
    return float(v)
  except (
    TypeError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
  ):
    return None


def is_int(v: Any, at_least: int | None = None) -> bool:
  """A Python or NumPy int, not a bool, and ``>= at_least`` where given."""
  return (
    isinstance(v, (int, np.integer))
    and not isinstance(v, (bool, np.bool_))
    and (at_least is None or bool(v >= at_least))
  )


def float_dtype(fn: str, name: str, dtype: Any, what: str) -> jnp.dtype:
  """``dtype`` as a real floating dtype; ``what``: what it is the dtype of."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(
      f'{fn}: {name}={dtype!r} is not a dtype; pass e.g. {name}=jnp.float32'
    ) from None
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
      f'{fn}: {name}={dt} must be a floating dtype ({what} are real '
      f'numbers); pass e.g. {name}=jnp.float32'
    )
  return dt
