r"""BN modes across a model: train, eval, frozen (``set_mode`` for nnx,
``mode_fields`` for linen), and ``bn_param_mask`` for an optax mask over
BN's scale and bias."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx as _nnx
from flax.core import FrozenDict

from bnjax import _checks
from bnjax.training._select import NNX_LAYERS, pick_layers

# 'train': batch statistics, running statistics updated; 'eval': running
# statistics; 'frozen': batch statistics, running statistics bitwise
# unchanged (momentum 1, which the core treats as "never update").
MODES = ('train', 'eval', 'frozen')
_SAVED = '_bnjax_momentum'  # a frozen layer's own momentum, for 'train'


def _check_mode(fn, mode):
  if mode not in MODES:
    raise ValueError(
      f'{fn}: mode must be one of {MODES}, got {mode!r}: "train" (batch '
      'statistics, running ones updated), "eval" (running statistics) or '
      '"frozen" (batch statistics, running ones unchanged)'
    )


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
  for m in pick_layers(fn, model, only, NNX_LAYERS):
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
