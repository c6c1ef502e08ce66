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

accumulated with Chan's exact merge, so it equals the biased variance of all
N batches' inputs pooled together. (fvcore instead averages the batch
variances, which leaves out the second term, the spread of the batch means:
it underestimates the population variance, most at small batches.)
Each layer sees the input produced by the layers before it with *their
training-mode* (batch-statistics) normalization, exactly as during training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx as _nnx

from bnjax import _checks, _moments
from bnjax import linen as _linen
from bnjax import nnx as _bnnx
from bnjax._running import population_stats
from bnjax._types import PooledStats

__all__ = [
  'linen_batch_stats',
  'update_nnx_batch_stats',
]


def _accumulate(step_moments, batches):
  """Scans step_moments over batches; returns {leaf: exact pooled stats}."""

  def step(acc, batch):
    moments = step_moments(batch)
    new = jax.tree.map(
      lambda a, m: _merge_one(a, m),
      acc,
      moments,
      is_leaf=lambda t: isinstance(t, _moments.Partial),
    )
    return new, None

  first = jax.tree.map(lambda leaf: leaf[0], batches)
  init = jax.tree.map(
    lambda m: _moments.Partial(
      jnp.zeros((), m[0].dtype),
      jnp.zeros_like(m[0]),
      jnp.zeros_like(m[0]),
      jnp.zeros_like(m[1]),
    ),
    jax.eval_shape(step_moments, first),
    is_leaf=lambda t: isinstance(t, tuple),
  )
  acc, _ = jax.lax.scan(step, init, batches)
  return jax.tree.map(
    lambda p: _moments.finalize(p),
    acc,
    is_leaf=lambda t: isinstance(t, _moments.Partial),
  )


def _merge_one(acc: _moments.Partial, mv):
  """The exact merge of the running pool with one batch (weight 1, m2 = var)."""
  mean, var = mv
  one = _moments.Partial(
    jnp.ones_like(acc.count), mean, jnp.zeros_like(mean), var
  )
  return _moments.merge(jax.tree.map(lambda a, b: jnp.stack([a, b]), acc, one))


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
  _checks.check_stacked('linen_batch_stats', batches)

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
  ``use_running_average`` is set to False and its momentum to 0 for the
  duration, and restored after) over N stacked batches under one
  ``jax.jit`` and ``lax.scan``, then writes the pooled population mean and
  biased variance into each layer (the estimator of
  :func:`linen_batch_stats`).

  Args:
    model: an nnx module holding :class:`bnjax.nnx.BatchNorm` layers; it is
      updated in place.
    batches: the inputs, stacked along a leading axis of N equal-sized
      batches (a pytree is fine).
    ``*args``, ``**kwargs``: passed to the model after the batch.

  Returns:
    None: the layers' ``mean`` and ``var`` are set in place.

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
  _checks.check_stacked('update_nnx_batch_stats', batches)
  layers = [
    m for _, m in _nnx.iter_modules(model) if isinstance(m, _bnnx.BatchNorm)
  ]
  if not layers:
    raise ValueError(
      'update_nnx_batch_stats: the model has no bnjax.nnx.BatchNorm layer'
    )
  saved = [(m.momentum, m.use_running_average) for m in layers]
  for m in layers:
    m.momentum, m.use_running_average = 0.0, False
  try:
    graphdef, state = _nnx.split(model)

    def moments(batch):
      # Fresh Variables at this trace level (nnx forbids mutating
      # Variables created outside the current trace).
      m = _nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
      m(batch, *args, **kwargs)
      bns = [
        mod
        for _, mod in _nnx.iter_modules(m)
        if isinstance(mod, _bnnx.BatchNorm)
      ]
      return {i: (bn.mean[...], bn.var[...]) for i, bn in enumerate(bns)}

    pooled = jax.jit(lambda b: _accumulate(moments, b))(batches)
  finally:
    for m, (mom, ura) in zip(layers, saved, strict=True):
      m.momentum, m.use_running_average = mom, ura
  for i, m in enumerate(layers):
    m.mean[...], m.var[...] = pooled[i]
