r"""Precise BN: recompute population statistics (Wu & Johnson 2021).

EMA running statistics lag behind the weights and mix statistics of many
past models. Precise BN runs the *fixed* model in training mode over N
batches and replaces every bnjax BatchNorm layer's statistics with the
population moments of that layer's input over all N batches (fvcore's
``update_bn_stats``).

Estimator: each batch b gives the layer's batch mean :math:`\mu_b` and biased
variance :math:`\sigma_b^2` (over equal-sized batches). The population mean is
the mean of the :math:`\mu_b`; the population variance is, by the law of total
variance,

.. math:: \sigma^2 = \tfrac1N \sum_b \sigma_b^2 + \tfrac1N \sum_b (\mu_b - \mu)^2,

accumulated with Chan's exact merge, count-weighted and with each mean's
low-order part (a :class:`bnjax.PooledStats` per layer), so it equals the biased variance of all
N batches' inputs pooled together. (fvcore instead averages the batch
variances, which leaves out the second term, the spread of the batch means:
it underestimates the population variance, most at small batches.)
Each layer sees the input produced by the layers before it with *their
training-mode* (batch-statistics) normalization, exactly as during training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as _fl
from flax import nnx as _nnx

from bnjax import _checks
from bnjax import linen as _linen
from bnjax import nnx as _bnnx
from bnjax._running import population_stats
from bnjax._types import PooledStats

__all__ = [
  'linen_batch_stats',
  'update_nnx_batch_stats',
]


def linen_batch_stats(
  model: Any, variables: dict, batches: Any, *args: Any, **kwargs: Any
) -> dict:
  r"""Precise batch statistics for every bnjax.linen.BatchNorm of a model.

  Each layer's statistics become the population moments of its input over
  all N batches, by the law of total variance:

  .. math:: \mu = \tfrac1N \sum_b \mu_b, \qquad
     \sigma^2 = \tfrac1N \sum_b \sigma_b^2 + \tfrac1N \sum_b (\mu_b - \mu)^2

  Args:
    model: a linen module using :class:`bnjax.linen.BatchNorm`.
    variables: its variables (``params``, ``batch_stats``, ...).
    batches: the inputs, stacked along a leading axis of N equal-sized
      batches (a pytree is fine: each leaf is ``(N, batch, ...)``).
    ``*args``, ``**kwargs``: passed to ``model.apply`` after the batch; they must put
      the BN layers in training mode (e.g. ``train=True``).

  Returns:
    A copy of ``variables`` whose ``batch_stats`` hold the pooled population
    mean and biased variance of each BN layer's input. Layers that are not
    bnjax BatchNorm keep their statistics.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import bnjax.linen, bnjax.precise
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     return bnjax.linen.BatchNorm(use_running_average=not train)(x)
    >>> batches = jnp.arange(8.0).reshape(4, 2, 1)   # N = 4 batches of 2
    >>> v = Net().init(jax.random.key(0), batches[0], train=False)
    >>> v = bnjax.precise.linen_batch_stats(Net(), v, batches, train=True)
    >>> v['batch_stats']['BatchNorm_0']['mean'], v['batch_stats']['BatchNorm_0']['var']
    (Array([3.5], dtype=float32), Array([5.25], dtype=float32))
  """
  fn = 'linen_batch_stats'
  if not isinstance(model, _fl.Module):
    raise TypeError(
      f'{fn}: model must be a flax.linen Module, got {type(model).__name__}'
    )
  if not isinstance(variables, Mapping) or 'batch_stats' not in variables:
    raise TypeError(
      f"{fn}: variables must be the model's variables, a mapping with a "
      f"'batch_stats' collection, got {_describe(variables)}"
    )
  _checks.check_stacked(fn, batches)

  def pool(moments, batch):
    _, upd = model.apply(
      {**variables, _linen.MOMENTS: moments},
      batch,
      *args,
      mutable=['batch_stats', _linen.MOMENTS],
      **kwargs,
    )
    got = upd.get(_linen.MOMENTS, {})
    if not got:
      raise ValueError(
        'linen_batch_stats: no bnjax.linen.BatchNorm ran in training mode; '
        'pass the arguments that select training mode (e.g. train=True)'
      )
    return got

  def all_batches(batches):
    # Each layer pools its input over all N batches (bnjax.PooledStats).
    first = pool({}, jax.tree.map(lambda b: b[0], batches))
    rest = jax.tree.map(lambda b: b[1:], batches)
    return _pairs(jax.lax.scan(lambda m, b: (pool(m, b), None), first, rest)[0])

  pooled = jax.jit(all_batches)(batches)
  check_finite(fn, {'/'.join(map(str, p)): v for p, v in pooled.items()})
  stats = dict(variables['batch_stats'])  # copied along each path below
  for path, (mean, var) in pooled.items():
    if not path:  # the model is one BatchNorm: its statistics at the top
      stats.update(mean=mean, var=var)
      continue
    node = stats
    for p in path[:-1]:
      node[p] = dict(node[p])
      node = node[p]
    node[path[-1]] = dict(node[path[-1]], mean=mean, var=var)
  return {**variables, 'batch_stats': stats}


def check_finite(fn: str, pooled: dict) -> None:
  """Recomputed statistics ``{layer: (mean, var)}`` are finite, or the
  batches (or the layers before) hold NaN or inf: raise, naming them."""
  for where, stats in pooled.items():
    if not all(np.all(np.isfinite(np.asarray(v))) for v in stats):
      raise ValueError(
        f'{fn}: the batches gave the BatchNorm at {where or "the top"} '
        'non-finite statistics; look for NaN or inf in batches (or in the '
        'layers before it)'
      )


def _describe(v: Any) -> str:
  return type(v).__name__


def _pairs(tree, path=()):
  """{module path: (mean, var)} from a nested batch_moments collection."""
  if 'm2' in tree and not isinstance(tree['m2'], dict):
    pool = PooledStats(*(tree[f] for f in PooledStats._fields))
    return {path: tuple(population_stats(pool))}
  out = {}
  for k, v in tree.items():
    out.update(_pairs(v, path + (k,)))
  return out


def update_nnx_batch_stats(
  model: _nnx.Module, batches: Any, *args: Any, **kwargs: Any
) -> None:
  """Precise BN for an nnx model: sets every bnjax.nnx.BatchNorm's stats.

  Runs ``model(batch, *args, **kwargs)`` in training mode (each layer's
  ``use_running_average`` is set to False for the duration, and restored
  after) over N stacked batches under one ``jax.jit`` and ``lax.scan``,
  each layer pooling its input's exact moments (a :class:`bnjax.PooledStats`,
  count-weighted, as :func:`bnjax.training.start_pooling`), then writes the
  pooled population mean and biased variance into each layer (the
  estimator of :func:`linen_batch_stats`). A layer the batches never reach
  keeps its statistics.

  Args:
    model: an nnx module holding :class:`bnjax.nnx.BatchNorm` layers; it is
      updated in place.
    batches: the inputs, stacked along a leading axis of N equal-sized
      batches (a pytree is fine).
    ``*args``, ``**kwargs``: passed to the model after the batch.

  Returns:
    None: the layers' ``mean`` and ``var`` are set in place.

  Raises:
    ValueError: no bnjax.nnx.BatchNorm, or a layer pooling already.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx, bnjax.precise
    >>> bn = bnjax.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> bn.eval()
    >>> bnjax.precise.update_nnx_batch_stats(bn, jnp.arange(8.0).reshape(4, 2, 1))
    >>> bn.mean[...], bn.var[...], bn.use_running_average   # mode restored
    (Array([3.5], dtype=float32), Array([5.25], dtype=float32), True)
  """
  fn = 'update_nnx_batch_stats'
  if not isinstance(model, _nnx.Module):
    raise TypeError(
      f'{fn}: model must be an nnx.Module, got {type(model).__name__}'
    )
  _checks.check_stacked(fn, batches)
  layers = [
    m for _, m in _nnx.iter_modules(model) if isinstance(m, _bnnx.BatchNorm)
  ]
  if not layers:
    raise ValueError(f'{fn}: the model has no bnjax.nnx.BatchNorm layer')
  if any(hasattr(m, _bnnx.POOL[0]) for m in layers):
    raise ValueError(
      f'{fn}: a layer is pooling (bnjax.training.start_pooling); call '
      'bnjax.training.apply_pooled or stop_pooling first'
    )
  # Each layer pools its input over all N batches (bnjax.PooledStats: exact
  # and count-weighted, each mean with its low-order part), as the linen
  # and function paths do.
  saved = [m.use_running_average for m in layers]
  for m in layers:
    m.use_running_average = False
    _bnnx.add_pool(m)
  try:
    graphdef, pools, rest = _nnx.split(model, _bnnx.PooledMoment, ...)  # type: ignore[misc]

    def step(pools, batch):
      # Fresh Variables at this trace level (nnx forbids mutating
      # Variables created outside the current trace); only the pools are
      # carried, the rest of the model's state is left as it was.
      m = _nnx.merge(graphdef, pools, jax.tree.map(jnp.asarray, rest))
      m(batch, *args, **kwargs)
      return _nnx.state(m, _bnnx.PooledMoment), None

    scan = jax.jit(lambda p, b: jax.lax.scan(step, p, b)[0])
    _nnx.update(model, scan(pools, batches))
    pooled = [_bnnx.pool_of(m) for m in layers]
  finally:
    for m, ura in zip(layers, saved, strict=True):
      m.use_running_average = ura
      _bnnx.drop_pool(m)
  check_finite(fn, {i: (p.mean, p.m2) for i, p in enumerate(pooled)})
  for m, pool in zip(layers, pooled, strict=True):
    pop, seen = population_stats(pool), pool.count > 0
    # A layer (or channel) the batches never reach keeps its statistics.
    m.mean[...] = jnp.where(seen, pop.mean, m.mean[...]).astype(m.mean.dtype)
    m.var[...] = jnp.where(seen, pop.var, m.var[...]).astype(m.var.dtype)
