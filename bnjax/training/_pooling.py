"""Gradient accumulation for nnx models: pools on the BatchNorm layers.

The nnx entry of the one accumulation mechanism (:class:`bnjax.PooledStats`
merged by count by the core, applied by :func:`bnjax.apply_pooled`'s rule):
:func:`start_pooling` gives each layer a pool, its training calls fill it,
:func:`apply_pooled` applies and empties it, :func:`stop_pooling` removes it.
"""

from __future__ import annotations

from typing import Any

from flax import nnx as _nnx

from bnjax import _checks, _pooled
from bnjax import nnx as _bnnx
from bnjax._types import BatchStats
from bnjax.training._select import NNX_LAYERS, check_model, pick_layers


def _poolable(fn, model, only):
  layers = pick_layers(fn, model, only, NNX_LAYERS)
  bad = [type(m).__name__ for m in layers if not isinstance(m, _bnnx.BatchNorm)]
  if bad:
    raise TypeError(
      f'{fn}: only bnjax.nnx.BatchNorm layers pool their moments; the model '
      f'has {sorted(set(bad))}. Convert flax layers with bnjax.nnx.convert, '
      'or pick the layers with only='
    )
  return layers


def start_pooling(model: _nnx.Module, *, only: Any = None) -> None:
  r"""Makes the model's BatchNorm layers pool micro-batches' moments.

  From now on a training call of each :class:`bnjax.nnx.BatchNorm` merges
  its batch's exact moments into a :class:`bnjax.PooledStats` it holds
  (``pooled_count``, ``pooled_mean``, ``pooled_mean_lo``, ``pooled_m2``,
  :class:`bnjax.nnx.PooledMoment` variables) and leaves ``mean`` and
  ``var`` as they are; each micro-batch is normalized by its own
  statistics. :func:`apply_pooled` then makes the one update that a
  single batch of all the micro-batches would. Call it outside ``nnx.jit``
  (it adds variables); the jitted step then carries the pool. Only nnx
  needs this step: a functional pool is a value
  (:func:`bnjax.init_pooled_stats`) and linen pools whenever the
  ``batch_moments`` collection is mutable, but an nnx layer owns its
  variables, so the pool must be added to it.

  Args:
    model: an nnx module with :class:`bnjax.nnx.BatchNorm` layers.
    only: an nnx Filter over ``(path, module)``; None: all BatchNorm layers.

  Returns:
    None.

  Raises:
    TypeError: a picked layer is not a bnjax.nnx.BatchNorm.
    ValueError: a layer is pooling already.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx, bnjax.training
    >>> bn = bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> bnjax.training.start_pooling(bn)
    >>> _ = bn(jnp.array([[1.], [3.]]))
    >>> bn.mean[...], bn.pooled_mean[...], bn.pooled_count[...]
    (Array([0.], dtype=float32), Array([2.], dtype=float32), Array([2.], dtype=float32))
  """
  fn = 'bnjax.training.start_pooling'
  for m in _poolable(fn, model, only):
    if hasattr(m, _bnnx.POOL[0]):
      raise ValueError(
        f'{fn}: a layer of model is pooling already; call apply_pooled or '
        'stop_pooling first'
      )
    _bnnx.add_pool(m)


def _pooling(fn, model):
  check_model(fn, model)
  layers = [
    m
    for _, m in _nnx.iter_modules(model)
    if isinstance(m, _bnnx.BatchNorm) and hasattr(m, _bnnx.POOL[0])
  ]
  if not layers:
    raise ValueError(
      f'{fn}: no BatchNorm layer of the model is pooling; call '
      'bnjax.training.start_pooling(model) first'
    )
  return layers


def apply_pooled(model: _nnx.Module, *, when: Any = True) -> None:
  """One running-statistics update per pooling layer; empties its pool.

  Each layer's ``mean`` and ``var`` take one step with its own momentum
  towards the pooled moments (:func:`bnjax.apply_pooled`): the update one
  training call on all the pooled micro-batches concatenated would make.
  Works inside ``nnx.jit``. The nnx entry of :func:`bnjax.apply_pooled`
  (``when`` as there); it differs in shape because nnx modules own their
  variables: the statistics and the pools live in the model, so it takes
  the model and updates both in place, returning nothing, as
  ``nnx.Optimizer.update`` does.

  Args:
    model: an nnx module after :func:`start_pooling`.
    when: a bool, traced or not (e.g. ``step % k == k - 1``): where False
      nothing changes, so one jitted step serves every micro-batch.

  Returns:
    None.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx, bnjax.training
    >>> bn = bnjax.nnx.BatchNorm(1, momentum=0.9, rngs=nnx.Rngs(0))
    >>> bnjax.training.start_pooling(bn)
    >>> for b in (jnp.array([[1.], [3.]]), jnp.array([[5.], [7.]])):
    ...   _ = bn(b)
    >>> bnjax.training.apply_pooled(bn)      # one step to mean 4, var 5
    >>> bn.mean[...], bn.var[...]
    (Array([0.4], dtype=float32), Array([1.4], dtype=float32))
  """
  fn = 'bnjax.training.apply_pooled'
  _checks.check_when(fn, when)
  for m in _pooling(fn, model):
    old = BatchStats(m.mean[...], m.var[...])
    new, emptied = _pooled.apply_pooled_as(
      fn, old, _bnnx.pool_of(m), m.momentum, when=when
    )
    m.mean[...], m.var[...] = new
    for n, v in zip(_bnnx.POOL, emptied, strict=True):
      getattr(m, n)[...] = v


def stop_pooling(model: _nnx.Module) -> None:
  """Removes the pools :func:`start_pooling` added (outside ``nnx.jit``).

  The layers update their running statistics per call again; a pool not
  yet applied is discarded.

  Args:
    model: an nnx module after :func:`start_pooling`.

  Returns:
    None.

  Example:
    >>> from flax import nnx
    >>> import bnjax.nnx, bnjax.training
    >>> bn = bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> bnjax.training.start_pooling(bn)
    >>> bnjax.training.stop_pooling(bn)
    >>> hasattr(bn, 'pooled_count')
    False
  """
  for m in _pooling('bnjax.training.stop_pooling', model):
    _bnnx.drop_pool(m)
