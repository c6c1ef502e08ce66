"""``bnjax.nnx.convert``: flax.nnx.BatchNorm -> bnjax.nnx.BatchNorm in a model."""

from __future__ import annotations

from collections.abc import MutableMapping, MutableSequence
from typing import Any

from flax import nnx


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
  settings = dict(overrides)
  if axis_name is not None:
    settings['axis_name'] = axis_name
  unknown = sorted(
    set(settings) - set(_CONVERT_FIELDS + ('virtual_batch_size',))
  )
  if unknown:
    raise TypeError(
      f'bnjax.nnx.convert: unknown BatchNorm arguments {unknown}; pass '
      f'any of {sorted(_CONVERT_FIELDS + ("virtual_batch_size",))}'
    )
  return _swap(model, {}, settings)


# flax.nnx.BatchNorm's constructor arguments that it keeps as attributes.
_CONVERT_FIELDS = (
  'use_running_average',
  'axis',
  'momentum',
  'epsilon',
  'dtype',
  'param_dtype',
  'use_bias',
  'use_scale',
  'axis_name',
  'axis_index_groups',
  'use_fast_variance',
  'promote_dtype',
)


def _convert_one(old: nnx.BatchNorm, settings: dict):
  from bnjax.nnx import BatchNorm  # the module that re-exports this one

  kwargs = {f: getattr(old, f) for f in _CONVERT_FIELDS if hasattr(old, f)}
  kwargs.update(settings)
  new = BatchNorm(old.num_features, rngs=nnx.Rngs(0), **kwargs)
  new.mean, new.var = old.mean, old.var
  new.scale, new.bias = old.scale, old.bias
  return new


def _swap(node: Any, memo: dict, settings: dict) -> Any:
  """node with flax BatchNorms replaced, in place where node is mutable."""
  if isinstance(node, nnx.BatchNorm):
    if id(node) not in memo:
      memo[id(node)] = (node, _convert_one(node, settings))
    return memo[id(node)][1]
  if id(node) in memo:
    return memo[id(node)][1]
  if isinstance(node, MutableSequence):
    memo[id(node)] = (node, node)
    for i, child in enumerate(list(node)):
      new = _swap(child, memo, settings)
      if new is not child:
        node[i] = new
    return node
  if isinstance(node, MutableMapping):
    memo[id(node)] = (node, node)
    for k, child in list(node.items()):
      new = _swap(child, memo, settings)
      if new is not child:
        node[k] = new
    return node
  if isinstance(node, nnx.Module):
    memo[id(node)] = (node, node)
    for k, child in list(vars(node).items()):
      if k.startswith('_'):
        continue
      new = _swap(child, memo, settings)
      if new is not child:
        setattr(node, k, new)
    return node
  if isinstance(node, tuple):
    items = [_swap(child, memo, settings) for child in node]
    if all(a is b for a, b in zip(items, node, strict=True)):
      return node
    return type(node)(*items) if hasattr(node, '_fields') else tuple(items)
  return node
