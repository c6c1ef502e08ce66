"""PyTorch's conventions in Flax's terms: momentum and array layouts.

Public through :mod:`bnjax.interop`; the state-dict conversion lives there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def momentum_from_torch(p: float) -> float:
  """Flax/bnjax ``momentum`` for a torch BatchNorm ``momentum=p``: ``1 - p``.

  torch updates ``new = (1 - p) old + p batch``; Flax and bnjax update
  ``new = m old + (1 - m) batch``, so ``m = 1 - p``.

  Args:
    p: torch's ``momentum``, in [0, 1].

  Returns:
    ``1 - p``, rounded to 12 digits (0.1 gives 0.9, not 0.9000000000000000222).

  Raises:
    ValueError: ``p`` is None (torch's cumulative average, which no EMA
      momentum reproduces) or outside [0, 1].

  Example:
    >>> from bnjax import interop
    >>> interop.momentum_from_torch(0.1)   # torch's default
    0.9
  """
  fn = 'bnjax.interop.momentum_from_torch'
  if p is None:
    raise ValueError(
      f'{fn}: torch momentum=None is a cumulative average, not an EMA; no '
      'Flax momentum reproduces it'
    )
  return round(1.0 - _momentum(fn, "p (torch's momentum)", p), 12)


def momentum_to_torch(m: float) -> float:
  """torch ``momentum`` for a Flax/bnjax ``momentum=m``: ``1 - m``.

  Args:
    m: Flax's ``momentum`` (EMA decay), in [0, 1].

  Returns:
    ``1 - m``, rounded to 12 digits.

  Raises:
    ValueError: ``m`` outside [0, 1].

  Example:
    >>> from bnjax import interop
    >>> interop.momentum_to_torch(0.99)   # flax's default
    0.01
  """
  fn = 'bnjax.interop.momentum_to_torch'
  return round(1.0 - _momentum(fn, "m (Flax's momentum)", m), 12)


def _momentum(fn: str, name: str, m: Any) -> float:
  """A real momentum in [0, 1], as a float."""
  if isinstance(m, (bool, np.bool_)) or not isinstance(
    m, (int, float, np.integer, np.floating)
  ):
    raise TypeError(
      f'{fn}: {name} must be a real number in [0, 1], got {m!r} of type '
      f'{type(m).__name__}'
    )
  if not 0.0 <= m <= 1.0:
    raise ValueError(f'{fn}: {name} must be in [0, 1], got {m}')
  return float(m)


def _array(fn: str, name: str, v: Any, ndim: str, ok) -> np.ndarray:
  """v as a numeric NumPy array whose ndim passes ``ok``."""
  a = to_numpy(v)
  if a.dtype.kind not in 'biufc':
    raise TypeError(
      f'{fn}: {name} must be a numeric array, got {type(v).__name__} of '
      f'dtype {a.dtype}'
    )
  if not ok(a.ndim):
    raise ValueError(
      f'{fn}: {name} must have {ndim} dimensions, got shape {a.shape}'
    )
  return a


def nchw_to_nhwc(x: Any) -> Any:
  """Moves the channel axis of an N C ... array from 1 to last.

  Args:
    x: an array (or torch tensor) laid out ``(N, C, *spatial)``.

  Returns:
    A JAX array laid out ``(N, *spatial, C)``.

  Example:
    >>> import numpy as np
    >>> from bnjax import interop
    >>> interop.nchw_to_nhwc(np.zeros((8, 3, 32, 32))).shape
    (8, 32, 32, 3)
  """
  fn = 'bnjax.interop.nchw_to_nhwc'
  x = _array(fn, 'x', x, '>= 2 (N, C, *spatial)', lambda n: n >= 2)
  return jnp.moveaxis(jnp.asarray(x), 1, -1)


def nhwc_to_nchw(x: Any) -> Any:
  """Moves the channel axis of an N ... C array from last to 1.

  Args:
    x: an array laid out ``(N, *spatial, C)``.

  Returns:
    A JAX array laid out ``(N, C, *spatial)``.

  Example:
    >>> import numpy as np
    >>> from bnjax import interop
    >>> interop.nhwc_to_nchw(np.zeros((8, 32, 32, 3))).shape
    (8, 3, 32, 32)
  """
  fn = 'bnjax.interop.nhwc_to_nchw'
  x = _array(fn, 'x', x, '>= 2 (N, *spatial, C)', lambda n: n >= 2)
  return jnp.moveaxis(jnp.asarray(x), -1, 1)


def conv_kernel_from_torch(w: Any) -> jax.Array:
  """torch conv weight ``(O, I, *spatial)`` to a Flax kernel ``(*spatial, I, O)``.

  Args:
    w: a torch ``ConvNd`` weight (tensor or array).

  Returns:
    The kernel of the equivalent ``flax.linen.Conv`` / ``nnx.Conv``.

  Example:
    >>> import numpy as np
    >>> from bnjax import interop
    >>> interop.conv_kernel_from_torch(np.zeros((64, 3, 7, 7))).shape
    (7, 7, 3, 64)
  """
  fn = 'bnjax.interop.conv_kernel_from_torch'
  w = _array(fn, 'w', w, '>= 3 (O, I, *spatial)', lambda n: n >= 3)
  return jnp.asarray(np.moveaxis(w, (0, 1), (-1, -2)))


def dense_kernel_from_torch(w: Any) -> jax.Array:
  """torch Linear weight ``(out, in)`` to a Flax Dense kernel ``(in, out)``.

  Args:
    w: a torch ``Linear`` weight (tensor or array).

  Returns:
    The kernel of the equivalent ``flax.linen.Dense`` / ``nnx.Linear``.

  Example:
    >>> import numpy as np
    >>> from bnjax import interop
    >>> interop.dense_kernel_from_torch(np.zeros((10, 512))).shape
    (512, 10)
  """
  fn = 'bnjax.interop.dense_kernel_from_torch'
  w = _array(fn, 'w', w, '2 (out, in)', lambda n: n == 2)
  return jnp.asarray(w.T)


def to_numpy(v) -> np.ndarray:
  if hasattr(v, 'detach'):  # a torch tensor; no torch import needed
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':  # NumPy has no bfloat16: widen,
      v = v.float()  # which is exact
    # .numpy() shares the tensor's memory, and JAX may alias NumPy memory on
    # CPU: copy, or torch's in-place running-stat updates would leak into
    # the converted arrays.
    return v.numpy().copy()
  return np.asarray(v)
