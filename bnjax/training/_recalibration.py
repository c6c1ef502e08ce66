r"""Recalibration: precise BN (Wu & Johnson 2021), one route for every API.

EMA running statistics lag behind the weights and mix statistics of many
past models. Precise BN runs the *fixed* model in training mode over N
batches and replaces every BN layer's statistics with the population moments
of that layer's input over all N batches (fvcore's ``update_bn_stats``).

Estimator: each layer pools its input's exact moments over the N batches in
a :class:`bnjax.PooledStats` (Chan's merge, by count, each mean with its
low-order part: the one accumulation mechanism, as gradient accumulation's),
so the result is the mean and biased variance of all N batches' inputs
concatenated; by the law of total variance, over equal-sized batches,

.. math:: \sigma^2 = \tfrac1N \sum_b \sigma_b^2 + \tfrac1N \sum_b (\mu_b - \mu)^2.

(fvcore instead averages the batch variances, which leaves out the second
term, the spread of the batch means: it underestimates the population
variance, most at small batches.) Each layer sees the input produced by the
layers before it with *their training-mode* (batch-statistics)
normalization, exactly as during training. The three engines below (a
function, a linen model, an nnx model) differ only in where the pools live;
they share the write-back (:func:`recalibrated`) and the finite check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as _fl
from flax import nnx as _nnx

from bnjax import _checks, _running
from bnjax import linen as _linen
from bnjax import nnx as _bnnx
from bnjax._types import BatchStats, PooledStats


def recalibrate(
  model: Any, batches: Any, *args: Any, variables: Any = None, **kwargs: Any
) -> Any:
  r"""Recomputes every BN layer's population statistics from batches.

  Precise BN: the fixed model runs in training mode over the N stacked
  batches and each layer's running statistics become the exact mean and
  biased variance of its input over all of them (pooled by count, so
  masked batches of unequal sizes weigh by their values). Use it after
  averaging weights (SWA, an EMA of the parameters: the averaged model
  never produced the running statistics it carries), after pruning or
  merging, or on target-domain data (AdaBN). A layer (or channel) the
  batches never reach keeps its statistics.

  One call for every API; the return differs by what owns the statistics:
  an nnx model owns its variables, so it is updated in place (and
  returned); a linen model's and a function's statistics are values, so
  new ones come back. An Equinox model is a function of its
  ``eqx.nn.State``: pass ``f(state, batch) -> (y, state)`` and the state as
  ``variables``.

  Args:
    model: an ``nnx.Module`` (updated in place); a linen module (pass
      ``variables``); or a function ``f(batch_stats, batch, *args,
      **kwargs) -> (out, new_batch_stats)`` whose ``batch_stats`` is a
      pytree of :class:`bnjax.BatchStats` that it passes to
      :func:`bnjax.batch_norm` in training mode (pass the tree as
      ``variables``).
    batches: the inputs stacked along a leading axis of N batches (a pytree
      is fine: each leaf is ``(N, batch, ...)``).
    ``*args``, ``**kwargs``: passed after the batch; for nnx and linen they
      must select training mode (e.g. ``train=True``).
    variables: the linen variables, or the function's ``batch_stats``; None
      for an nnx model.

  Returns:
    nnx: the model; linen: the new variables; a function: the new
    ``batch_stats`` tree.

  Raises:
    ValueError: no BN layer trains on the batches, batches not stacked,
      non-finite statistics, or ``variables`` missing (linen, function) or
      given (nnx).
    TypeError: a model of another kind.

  Example:
    >>> import jax.numpy as jnp, bnjax, bnjax.training
    >>> def net(stats, x):
    ...   y, bn = bnjax.batch_norm(x, stats['bn'], use_running_average=False)
    ...   return y, {'bn': bn}
    >>> stats = bnjax.training.recalibrate(
    ...     net, jnp.arange(8.0).reshape(4, 2, 1),     # N = 4 batches of 2
    ...     variables={'bn': bnjax.init_batch_stats(1)})
    >>> stats['bn']
    BatchStats(mean=Array([3.5], dtype=float32), var=Array([5.25], dtype=float32))
  """
  fn = 'bnjax.training.recalibrate'
  if isinstance(model, _nnx.Module):
    if variables is not None:
      raise ValueError(
        f'{fn}: variables is for a linen model or a function; an nnx model '
        'holds its own statistics: leave variables out'
      )
    nnx_stats(fn, model, batches, args, kwargs)
    return model
  if variables is None:
    raise ValueError(
      f"{fn}: pass variables= (the linen variables, or the function's "
      'batch_stats tree)'
    )
  if isinstance(model, _fl.Module):
    return linen_stats(fn, model, variables, batches, args, kwargs)
  if not callable(model):
    raise TypeError(
      f'{fn}: model must be an nnx.Module, a linen Module or a function, '
      f'got {type(model).__name__}'
    )
  return function_stats(fn, model, variables, batches, args, kwargs)


def recalibrated(pool: PooledStats, old: BatchStats) -> BatchStats:
  """The pool's population statistics, in at least float32 and the old
  dtype; a channel (or layer) the batches never reached keeps ``old``."""
  pop = _running.population_stats(pool)
  return BatchStats(
    *(
      jnp.where(pool.count > 0, v, o).astype(
        jnp.promote_types(jnp.result_type(o), v.dtype)
      )
      for v, o in zip(pop, old, strict=True)
    )
  )


def check_finite(fn: str, pools: Mapping[Any, PooledStats]) -> None:
  """Recomputed pools ``{layer: pool}`` are finite, or the batches (or the
  layers before) hold NaN or inf: raise, naming them."""
  for where, p in pools.items():
    if not all(np.all(np.isfinite(np.asarray(v))) for v in (p.mean, p.m2)):
      raise ValueError(
        f'{fn}: the batches gave the BatchNorm at {where or "the top"} '
        'non-finite statistics; look for NaN or inf in batches (or in the '
        'layers before it)'
      )


def _is_stats(t) -> bool:
  return isinstance(t, BatchStats)


def _is_pool(t) -> bool:
  return isinstance(t, PooledStats)


def function_stats(fn: str, f: Callable, batch_stats, batches, args, kwargs):
  """Recalibration of a function: its BatchStats swapped for pools."""
  _checks.check_stacked(fn, batches)
  if not any(map(_is_stats, jax.tree.leaves(batch_stats, is_leaf=_is_stats))):
    raise ValueError(
      f"{fn}: variables holds no bnjax.BatchStats; pass the function's "
      'batch_stats tree'
    )
  empty = jax.tree.map(
    lambda s: (
      PooledStats(*(jnp.zeros_like(s.mean, jnp.float32),) * 4)
      if _is_stats(s)
      else s
    ),
    batch_stats,
    is_leaf=_is_stats,
  )

  def step(pool, batch):
    tree = jax.tree.structure(pool)  # before f: it may retire an eqx State
    out = f(pool, batch, *args, **kwargs)
    new = out[1] if type(out) is tuple and len(out) == 2 else None
    if jax.tree.structure(new) != tree:
      raise TypeError(
        f'{fn}: model must return (out, new batch_stats), the tree it was '
        f'given ({tree!s:.200}); it returned {type(out).__name__} '
        f'{jax.tree.structure(out)!s:.200}'
      )
    return new, None

  pool, _ = jax.jit(lambda p, b: jax.lax.scan(step, p, b))(empty, batches)
  pools = [p for p in jax.tree.leaves(pool, is_leaf=_is_pool) if _is_pool(p)]
  check_finite(fn, dict(enumerate(pools)))
  if not any(np.any(np.asarray(p.count) > 0) for p in pools):
    raise ValueError(
      f'{fn}: no BatchStats of variables reached bnjax.batch_norm in '
      'training mode; pass the arguments that make the function train '
      '(use_running_average=False)'
    )
  return jax.tree.map(
    lambda p, s: recalibrated(p, s) if _is_stats(s) else p,
    pool,
    batch_stats,
    is_leaf=lambda t: _is_stats(t) or _is_pool(t),
  )


def linen_stats(fn: str, model, variables, batches, args, kwargs) -> dict:
  """Recalibration of a linen model: pools in its batch_moments."""
  if not isinstance(model, _fl.Module):
    raise TypeError(
      f'{fn}: model must be a flax.linen Module, got {type(model).__name__}'
    )
  if not isinstance(variables, Mapping) or 'batch_stats' not in variables:
    raise TypeError(
      f"{fn}: variables must be the model's variables, a mapping with a "
      f"'batch_stats' collection, got {type(variables).__name__}"
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
        f'{fn}: no bnjax.linen.BatchNorm ran in training mode; pass the '
        'arguments that select training mode (e.g. train=True)'
      )
    return got

  def all_batches(batches):
    first = pool({}, jax.tree.map(lambda b: b[0], batches))
    rest = jax.tree.map(lambda b: b[1:], batches)
    return _pools(jax.lax.scan(lambda m, b: (pool(m, b), None), first, rest)[0])

  pooled = jax.jit(all_batches)(batches)
  check_finite(fn, {'/'.join(map(str, p)): v for p, v in pooled.items()})
  stats = dict(variables['batch_stats'])  # copied along each path below
  for path, p in pooled.items():  # path (): the model is one BatchNorm
    node = stats
    for k in path:
      node[k] = dict(node[k])
      node = node[k]
    node.update(
      recalibrated(p, BatchStats(node['mean'], node['var']))._asdict()
    )
  return {**variables, 'batch_stats': stats}


def _pools(tree, path=()) -> dict:
  """{module path: PooledStats} of a nested batch_moments collection."""
  if 'm2' in tree and not isinstance(tree['m2'], dict):
    return {path: PooledStats(*(tree[f] for f in PooledStats._fields))}
  out = {}
  for k, v in tree.items():
    out.update(_pools(v, path + (k,)))
  return out


def nnx_stats(fn: str, model, batches, args, kwargs) -> None:
  """Recalibration of an nnx model, in place: pools on its layers."""
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
  check_finite(fn, dict(enumerate(pooled)))
  for m, pool in zip(layers, pooled, strict=True):
    m.mean[...], m.var[...] = recalibrated(
      pool, BatchStats(m.mean[...], m.var[...])
    )
