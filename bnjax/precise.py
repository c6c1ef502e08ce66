"""Deprecated: precise BN is :func:`bnjax.training.recalibrate`.

``bnjax.precise.linen_batch_stats`` and
``bnjax.precise.update_nnx_batch_stats`` were a second public route to the
recalibration that :func:`bnjax.training.recalibrate` runs for functions,
linen and nnx models alike. They stay one release as aliases that warn
(``DeprecationWarning``) and then run that recalibration, with their own
call shapes and returns; the estimator is described in
:func:`bnjax.training.recalibrate`.
"""

from __future__ import annotations

import warnings
from typing import Any

from flax import nnx as _nnx

from bnjax.training import _recalibration as _r

__all__ = [
  'linen_batch_stats',
  'update_nnx_batch_stats',
]


def _deprecated(fn: str, instead: str) -> None:
  warnings.warn(
    f'{fn} is deprecated and will be removed in the next release; use '
    f'{instead}',
    DeprecationWarning,
    stacklevel=3,
  )


def linen_batch_stats(
  model: Any, variables: dict, batches: Any, *args: Any, **kwargs: Any
) -> dict:
  r"""Deprecated alias: ``bnjax.training.recalibrate(model, batches, *args,
  variables=variables, **kwargs)``.

  Warns with a ``DeprecationWarning``, then recalibrates as
  :func:`bnjax.training.recalibrate` does for a linen model.

  Args:
    model: a linen module using :class:`bnjax.linen.BatchNorm`.
    variables: its variables (``params``, ``batch_stats``, ...).
    batches: the inputs, stacked along a leading axis of N batches.
    ``*args``, ``**kwargs``: passed to ``model.apply`` after the batch; they
      must put the BN layers in training mode (e.g. ``train=True``).

  Returns:
    A copy of ``variables`` with the recalibrated ``batch_stats``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, warnings
    >>> import bnjax.linen, bnjax.precise
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     return bnjax.linen.BatchNorm(use_running_average=not train)(x)
    >>> batches = jnp.arange(8.0).reshape(4, 2, 1)   # N = 4 batches of 2
    >>> v = Net().init(jax.random.key(0), batches[0], train=False)
    >>> with warnings.catch_warnings(record=True) as w:
    ...   warnings.simplefilter('always')
    ...   v = bnjax.precise.linen_batch_stats(Net(), v, batches, train=True)
    >>> w[0].category.__name__, 'bnjax.training.recalibrate' in str(w[0].message)
    ('DeprecationWarning', True)
    >>> v['batch_stats']['BatchNorm_0']['var']
    Array([5.25], dtype=float32)
  """
  fn = 'bnjax.precise.linen_batch_stats'
  _deprecated(
    fn, 'bnjax.training.recalibrate(model, batches, ..., variables=variables)'
  )
  return _r.linen_stats(fn, model, variables, batches, args, kwargs)


def update_nnx_batch_stats(
  model: _nnx.Module, batches: Any, *args: Any, **kwargs: Any
) -> None:
  """Deprecated alias: ``bnjax.training.recalibrate(model, batches, *args,
  **kwargs)`` for an nnx model.

  Warns with a ``DeprecationWarning``, then recalibrates the model in place
  as :func:`bnjax.training.recalibrate` does (which returns the model; this
  returns None, as it did).

  Args:
    model: an nnx module holding :class:`bnjax.nnx.BatchNorm` layers; it is
      updated in place.
    batches: the inputs, stacked along a leading axis of N batches.
    ``*args``, ``**kwargs``: passed to the model after the batch.

  Returns:
    None: the layers' ``mean`` and ``var`` are set in place.

  Example:
    >>> import jax.numpy as jnp, warnings
    >>> from flax import nnx
    >>> import bnjax.nnx, bnjax.precise
    >>> bn = bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> with warnings.catch_warnings(record=True) as w:
    ...   warnings.simplefilter('always')
    ...   bnjax.precise.update_nnx_batch_stats(bn, jnp.arange(8.0).reshape(4, 2, 1))
    >>> w[0].category.__name__, bn.var[...]
    ('DeprecationWarning', Array([5.25], dtype=float32))
  """
  fn = 'bnjax.precise.update_nnx_batch_stats'
  _deprecated(fn, 'bnjax.training.recalibrate(model, batches, ...)')
  _r.nnx_stats(fn, model, batches, args, kwargs)
