"""``bnjax.nnx.convert``: flax.nnx.BatchNorm -> bnjax.nnx.BatchNorm in a model."""

from __future__ import annotations

from collections.abc import MutableMapping, MutableSequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from bnjax import _values


def swap(model: Any, cls: type, axis_name: Any, overrides: dict) -> Any:
  """Replaces every ``flax.nnx.BatchNorm`` in ``model`` with ``cls`` (see
  :func:`bnjax.nnx.convert`, which passes bnjax's BatchNorm)."""
  settings = dict(overrides)
  if axis_name is not None:
    settings['axis_name'] = axis_name
  known = _CONVERT_FIELDS + ('virtual_batch_size', 'sync')
  unknown = sorted(set(settings) - set(known))
  if unknown:
    raise TypeError(
      f'bnjax.nnx.convert: unknown BatchNorm arguments {unknown}; pass '
      f'any of {sorted(known)}'
    )
  _check_values(model)
  memo: dict = {}
  out = _swap(model, memo, lambda old: _convert_one(old, cls, settings))
  if not memo or not any(
    isinstance(old, nnx.BatchNorm) for old, _ in memo.values()
  ):
    raise ValueError(
      f'bnjax.nnx.convert: found no flax.nnx.BatchNorm in the '
      f'{type(model).__name__} passed; pass an nnx model that holds '
      'flax.nnx.BatchNorm layers (a bnjax one needs no conversion)'
    )
  return out


def _check_values(model: Any) -> None:
  """Every flax.nnx.BatchNorm's concrete state through the one value check
  of conversions, before anything is swapped."""
  problems = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.BatchNorm):
      continue
    at = '/'.join(map(str, path)) or 'model'
    vectors = {
      f'{at}.{k}': v[...]
      for k in ('mean', 'var', 'scale', 'bias')
      if isinstance(v := getattr(node, k, None), nnx.Variable)
      and isinstance(v[...], (jax.Array, np.ndarray))
      and not isinstance(v[...], jax.core.Tracer)
    }
    problems += _values.layer_problems(
      vectors, variances=(f'{at}.var',), complex_ok=(f'{at}.mean',)
    )
  _values.report('bnjax.nnx.convert', problems, 'model')


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


def _convert_one(old: nnx.BatchNorm, cls: type, settings: dict):
  kwargs = {f: getattr(old, f) for f in _CONVERT_FIELDS if hasattr(old, f)}
  kwargs.update(settings)
  new = cls(old.num_features, rngs=nnx.Rngs(0), **kwargs)
  new.mean, new.var = old.mean, old.var
  new.scale, new.bias = old.scale, old.bias
  return new


def _swap(node: Any, memo: dict, make) -> Any:
  """node with flax BatchNorms replaced, in place where node is mutable."""
  if isinstance(node, nnx.BatchNorm):
    if id(node) not in memo:
      memo[id(node)] = (node, make(node))
    return memo[id(node)][1]
  if id(node) in memo:
    return memo[id(node)][1]
  if isinstance(node, MutableSequence):
    memo[id(node)] = (node, node)
    for i, child in enumerate(list(node)):
      new = _swap(child, memo, make)
      if new is not child:
        node[i] = new
    return node
  if isinstance(node, MutableMapping):
    memo[id(node)] = (node, node)
    for k, child in list(node.items()):
      new = _swap(child, memo, make)
      if new is not child:
        node[k] = new
    return node
  if isinstance(node, nnx.Module):
    memo[id(node)] = (node, node)
    for k, child in list(vars(node).items()):
      if k.startswith('_'):
        continue
      new = _swap(child, memo, make)
      if new is not child:
        setattr(node, k, new)
    return node
  if isinstance(node, tuple):
    items = [_swap(child, memo, make) for child in node]
    if all(a is b for a, b in zip(items, node, strict=True)):
      return node
    return type(node)(*items) if hasattr(node, '_fields') else tuple(items)
  return node
