r"""BN inside training loops: accumulation, freezing, syncing, recalibration.

Model-level tools over the functional core, for the four things a training
loop needs from its BN layers:

* **Gradient accumulation.** k micro-batches should update the running
  statistics once, as one batch of all k would, not k times on small batches.
  Functional: train the micro-batches with a :class:`bnjax.PooledStats` and
  call :func:`bnjax.apply_pooled`; linen: the ``batch_moments`` collection and
  :func:`bnjax.linen.apply_pooled`; nnx: :func:`start_pooling`,
  :func:`apply_pooled`, :func:`stop_pooling`.
* **Freezing BN** across a model or a sub-model (fine-tuning, detection
  backbones): :func:`set_mode` for nnx, :func:`mode_fields` for linen, and
  :func:`bn_param_mask` for an optax mask over BN's scale and bias.
* **Syncing per-device statistics** of local-BN data-parallel training
  before evaluation or a checkpoint: :func:`average_stats`.
* **Recalibration** after weight averaging (SWA, an EMA of parameters),
  pruning or a change of data (AdaBN): :func:`recalibrate`, precise BN
  (:mod:`bnjax.precise`) for any of the three APIs.

See the guide "BN in training loops".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as _fl
from flax import nnx as _nnx
from flax.core import FrozenDict

from bnjax import _checks, _running, precise
from bnjax import nnx as _bnnx
from bnjax._average import average_stats
from bnjax._types import BatchStats, PooledStats

__all__ = [
  'apply_pooled',
  'average_stats',
  'bn_param_mask',
  'mode_fields',
  'recalibrate',
  'set_mode',
  'start_pooling',
  'stop_pooling',
]

# 'train': batch statistics, running statistics updated; 'eval': running
# statistics; 'frozen': batch statistics, running statistics bitwise
# unchanged (momentum 1, which the core treats as "never update").
MODES = ('train', 'eval', 'frozen')
_SAVED = '_bnjax_momentum'  # a frozen layer's own momentum, for 'train'
# The nnx BatchNorm layers the training helpers act on: bnjax's and flax's.
_NNX_LAYERS = (_bnnx.BatchNorm, _bnnx.BatchRenorm, _nnx.BatchNorm)


def _check_mode(fn, mode):
  if mode not in MODES:
    raise ValueError(
      f'{fn}: mode must be one of {MODES}, got {mode!r}: "train" (batch '
      'statistics, running ones updated), "eval" (running statistics) or '
      '"frozen" (batch statistics, running ones unchanged)'
    )


def _check_model(fn, model):
  if not isinstance(model, _nnx.Module):
    raise TypeError(
      f'{fn}: model must be an nnx.Module, got {type(model).__name__}; for '
      'linen, see bnjax.training.mode_fields and bnjax.linen.apply_pooled'
    )


def _layers(fn, model, only, types):
  _check_model(fn, model)
  pick = (lambda path, m: True) if only is None else _predicate(fn, only)
  found = [
    m
    for path, m in _nnx.iter_modules(model)
    if isinstance(m, types) and pick(path, m)
  ]
  if not found:
    raise ValueError(
      f'{fn}: the model has no BatchNorm layer'
      + ('' if only is None else f' selected by only={only!r}')
    )
  return found


def _predicate(fn, only):
  """nnx's predicate of the Filter ``only``; anything else is refused here,
  not inside flax (which fails formatting its own message on an int)."""
  try:
    return _nnx.filterlib.to_predicate(only)
  except Exception:  # flax raises TypeError or ValueError, by version
    raise TypeError(
      f'{fn}: only must be an nnx Filter (a callable (path, module) -> '
      "bool, a type, a path string such as 'backbone', or a tuple of "
      f'them), got {only!r:.60} of type {type(only).__name__}'
    ) from None


def set_mode(model: _nnx.Module, mode: str, *, only: Any = None) -> None:
  """Switches every BatchNorm of an nnx model (or those ``only`` picks).

  Works on :class:`bnjax.nnx.BatchNorm`, :class:`bnjax.nnx.BatchRenorm` and
  ``flax.nnx.BatchNorm`` alike. To freeze a sub-model's BN while the rest of
  the model trains its own, pass the sub-model (``set_mode(model.backbone,
  'frozen')``) or a filter.

  Args:
    model: an nnx module; its layers are switched in place.
    mode: ``'train'`` (batch statistics; running statistics updated),
      ``'eval'`` (running statistics) or ``'frozen'`` (batch statistics;
      the running statistics stay bitwise unchanged: momentum 1, restored
      by the next ``'train'`` or ``'eval'``).
    only: an nnx Filter over ``(path, module)`` picking the layers, e.g.
      ``lambda path, m: 'head' not in path``; None: all.

  Returns:
    None.

  Raises:
    ValueError: an unknown mode, or no BatchNorm layer picked.
    TypeError: ``only`` is not an nnx Filter.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx, bnjax.training
    >>> bn = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    >>> bnjax.training.set_mode(bn, 'frozen')
    >>> _ = bn(jnp.array([[1.0, 2.0], [3.0, 6.0]]))   # batch statistics
    >>> bn.mean[...]                                   # not updated
    Array([0., 0.], dtype=float32)
  """
  fn = 'bnjax.training.set_mode'
  _check_mode(fn, mode)
  for m in _layers(fn, model, only, _NNX_LAYERS):
    if mode == 'frozen':
      if not hasattr(m, _SAVED):
        setattr(m, _SAVED, m.momentum)
      m.momentum = 1.0
    elif hasattr(m, _SAVED):
      m.momentum = getattr(m, _SAVED)
      delattr(m, _SAVED)
    if isinstance(m, _nnx.BatchNorm):
      m.__class__ = _FrozenFlaxBatchNorm if mode == 'frozen' else _nnx.BatchNorm
    m.use_running_average = mode == 'eval'


class _FrozenFlaxBatchNorm(_nnx.BatchNorm):
  """A ``flax.nnx.BatchNorm`` in ``'frozen'`` mode (:func:`set_mode` swaps
  the class, and back): flax stores ``momentum * old + (1 - momentum) *
  batch`` even at momentum 1, where a NaN batch gives NaN; this keeps the
  statistics bitwise, as bnjax's layers do at momentum 1."""

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    kept = self.mean[...], self.var[...]
    y = super().__call__(*args, **kwargs)
    self.mean[...], self.var[...] = kept
    return y


def mode_fields(mode: str, momentum: float = 0.99) -> dict[str, Any]:
  """The BatchNorm fields for a linen model's shared BN mode.

  linen modules are built per call, so a model selects its BN mode by a
  field or argument that its layers read:
  ``bnjax.linen.BatchNorm(**mode_fields(self.bn_mode))``. A sub-model given
  ``'frozen'`` keeps its statistics while an outer module trains its own.

  Args:
    mode: ``'train'``, ``'eval'`` or ``'frozen'`` (see :func:`set_mode`).
    momentum: the layers' momentum in ``'train'``.

  Returns:
    ``{'use_running_average': ..., 'momentum': ...}``.

  Example:
    >>> import bnjax.training
    >>> bnjax.training.mode_fields('frozen')
    {'use_running_average': False, 'momentum': 1.0}
  """
  _check_mode('bnjax.training.mode_fields', mode)
  _checks.check_momentum('bnjax.training.mode_fields', momentum)
  return {
    'use_running_average': mode == 'eval',
    'momentum': 1.0 if mode == 'frozen' else momentum,
  }


def bn_param_mask(params: Any, batch_stats: Any) -> Any:
  """A params-shaped tree of bools: True at the scale and bias of BN layers.

  A BN layer is a module whose path also holds running statistics in
  ``batch_stats`` (linen collections, plain or ``FrozenDict``, or
  ``nnx.state(model, nnx.Param)`` with ``nnx.state(model, nnx.BatchStat)``).
  For optax, give the frozen leaves ``optax.set_to_zero()`` and the others
  the optimizer with ``optax.multi_transform`` (or mask *after* the
  optimizer, ``optax.chain(opt, optax.masked(optax.set_to_zero(), mask))``):
  a mask before it lets a transform that adds to the update, such as
  ``optax.adamw``'s weight decay, move the frozen leaves. With the negated
  mask only BN's affine trains (TENT).

  Args:
    params: the parameters (a nested dict, a ``FrozenDict`` or an
      ``nnx.State``).
    batch_stats: the running statistics of the same model.

  Returns:
    A tree of Python bools with the structure of ``params``: a dict, a
    ``FrozenDict`` for a ``FrozenDict``, an ``nnx.State`` for an
    ``nnx.State`` (which ``nnx.Optimizer``'s optax transforms take).

  Raises:
    TypeError: ``params`` or ``batch_stats`` is not a nested mapping.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, bnjax.linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return bnjax.linen.BatchNorm(use_running_average=True)(nn.Dense(2)(x))
    >>> v = Net().init(jax.random.key(0), jnp.ones((1, 3)))
    >>> mask = bnjax.training.bn_param_mask(v['params'], v['batch_stats'])
    >>> mask
    {'Dense_0': {'kernel': False, 'bias': False}, 'BatchNorm_0': {'scale': True, 'bias': True}}
    >>> tx = optax.multi_transform(
    ...     {'train': optax.adamw(1e-3, weight_decay=0.1),
    ...      'frozen': optax.set_to_zero()},
    ...     jax.tree.map(lambda bn: 'frozen' if bn else 'train', mask))
  """
  fn = 'bnjax.training.bn_param_mask'

  def mark(p, s):
    is_bn = isinstance(s, dict) and any(
      not isinstance(v, dict) for v in s.values()
    )
    return {
      k: (
        is_bn
        if not isinstance(v, dict)
        else mark(v, s.get(k) if isinstance(s, dict) else None)
      )
      for k, v in p.items()
    }

  p, s = (
    _to_dict(fn, 'params', params),
    _to_dict(fn, 'batch_stats', batch_stats),
  )
  mask = mark(p, s)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(
      f'{fn}: no module of params has running statistics in batch_stats, so '
      'nothing is a BN layer; pass the batch_stats of the same model (for '
      "linen variables['batch_stats'], for nnx nnx.state(model, "
      'nnx.BatchStat))'
    )
  if isinstance(params, _nnx.State):
    return _nnx.State(mask)
  if isinstance(params, FrozenDict):
    return FrozenDict(mask)
  return mask


def _to_dict(fn, name, tree):
  """A nested plain dict of a dict, FrozenDict or nnx.State."""
  if isinstance(tree, _nnx.State):
    # nnx.to_pure_dict where it exists (the method is deprecated there).
    to_dict = getattr(_nnx, 'to_pure_dict', None)
    tree = to_dict(tree) if to_dict else tree.to_pure_dict()
  if not isinstance(tree, Mapping):
    raise TypeError(
      f'{fn}: {name} must be a nested dict, a FrozenDict or an nnx.State '
      f"(the model's {name}), got {type(tree).__name__}"
    )
  return {
    k: _to_dict(fn, name, v) if isinstance(v, Mapping) else v
    for k, v in tree.items()
  }


# ---------------------------------------------------------------- pooling ---


def _poolable(fn, model, only):
  layers = _layers(fn, model, only, _NNX_LAYERS)
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
  (it adds variables); the jitted step then carries the pool.

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
  _check_model(fn, model)
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
  Works inside ``nnx.jit``.

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
    pool = _bnnx.pool_of(m)
    old = BatchStats(m.mean[...], m.var[...])
    new = _running.apply_pooled_as(
      'bnjax.training.apply_pooled', old, pool, m.momentum
    )
    m.mean[...] = jnp.where(when, new[0], old.mean)
    m.var[...] = jnp.where(when, new[1], old.var)
    for n, v in zip(_bnnx.POOL, pool, strict=True):
      getattr(m, n)[...] = jnp.where(when, jnp.zeros_like(v), v)


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


# ------------------------------------------------------------ averaging ---

# average_stats lives in bnjax._average, beside its weight checks.

# -------------------------------------------------------- recalibration ---


def recalibrate(
  model: Any, batches: Any, *args: Any, variables: Any = None, **kwargs: Any
) -> Any:
  r"""Recomputes every BN layer's population statistics from batches.

  Precise BN (:mod:`bnjax.precise`): the fixed model runs in training mode
  over the N stacked batches and each layer's running statistics become the
  exact pooled mean and biased variance of its input over all of them. Use
  it after averaging weights (SWA, an EMA of the parameters: the averaged
  model never produced the running statistics it carries), after pruning or
  merging, or on target-domain data (AdaBN).

  Args:
    model: an ``nnx.Module`` (updated in place); a linen module (pass
      ``variables``); or a function ``f(batch_stats, batch, *args,
      **kwargs) -> (out, new_batch_stats)`` whose ``batch_stats`` is a
      pytree of :class:`bnjax.BatchStats` that it passes to
      :func:`bnjax.batch_norm` in training mode (pass the tree as
      ``variables``).
    batches: the inputs stacked along a leading axis of N batches.
    ``*args``, ``**kwargs``: passed after the batch; for nnx and linen they
      must select training mode (e.g. ``train=True``).
    variables: the linen variables, or the function's ``batch_stats``.

  Returns:
    nnx: the model; linen: the new variables; a function: the new
    ``batch_stats`` tree.

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
  if isinstance(model, _nnx.Module):
    precise.update_nnx_batch_stats(model, batches, *args, **kwargs)
    return model
  if variables is None:
    raise ValueError(
      'bnjax.training.recalibrate: pass variables= (the linen variables, or '
      "the function's batch_stats tree)"
    )
  if isinstance(model, _fl.Module):
    return precise.linen_batch_stats(model, variables, batches, *args, **kwargs)
  if not callable(model):
    raise TypeError(
      'bnjax.training.recalibrate: model must be an nnx.Module, a linen '
      f'Module or a function, got {type(model).__name__}'
    )
  return _recalibrate_fn(model, variables, batches, args, kwargs)


def _recalibrate_fn(f: Callable, batch_stats, batches, args, kwargs):
  _checks.check_stacked('recalibrate', batches)
  is_stats = lambda s: isinstance(s, BatchStats)
  if not any(map(is_stats, jax.tree.leaves(batch_stats, is_leaf=is_stats))):
    raise ValueError(
      'bnjax.training.recalibrate: variables holds no bnjax.BatchStats; pass '
      "the function's batch_stats tree"
    )
  empty = jax.tree.map(
    lambda s: (
      PooledStats(*(jnp.zeros_like(s.mean, jnp.float32),) * 4)
      if is_stats(s)
      else s
    ),
    batch_stats,
    is_leaf=is_stats,
  )

  def step(pool, batch):
    return f(pool, batch, *args, **kwargs)[1], None

  pool, _ = jax.jit(lambda p, b: jax.lax.scan(step, p, b))(empty, batches)
  pools = [p for p in jax.tree.leaves(pool, is_leaf=_is_pool) if _is_pool(p)]
  precise.check_finite(
    'bnjax.training.recalibrate',
    {i: (p.mean, p.m2) for i, p in enumerate(pools)},
  )
  if not any(np.any(np.asarray(p.count) > 0) for p in pools):
    raise ValueError(
      'bnjax.training.recalibrate: no BatchStats of variables reached '
      'bnjax.batch_norm in training mode; pass the arguments that make the '
      'function train (use_running_average=False)'
    )
  return jax.tree.map(
    lambda p, s: _recalibrated(p, s) if is_stats(s) else p,
    pool,
    batch_stats,
    is_leaf=lambda t: isinstance(t, (BatchStats, PooledStats)),
  )


def _is_pool(t) -> bool:
  return isinstance(t, PooledStats)


def _recalibrated(pool: PooledStats, old: BatchStats) -> BatchStats:
  """The pool's population statistics; a channel (or layer) the batches
  never reached keeps its statistics, as nnx's and linen's do."""
  pop = _running.population_stats(pool)
  return BatchStats(
    *(
      jnp.where(pool.count > 0, v, o).astype(o.dtype)
      for v, o in zip(pop, old, strict=True)
    )
  )
