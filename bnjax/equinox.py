"""``bnjax.equinox``: BatchNorm and BatchRenorm as Equinox stateful layers.

Equinox's conventions: the running statistics live in an ``eqx.nn.State``
(one ``eqx.nn.StateIndex`` per layer, holding a bnjax state type), the call
is ``layer(x, state, *, key=None, inference=None) -> (y, state)``,
``eqx.nn.inference_mode`` switches to the running statistics and
``eqx.nn.Sequential`` threads the state. Two calling conventions give the
same, exact statistics:

* **per example** (Equinox's): ``x`` of shape ``(channels, *spatial)``
  inside ``jax.vmap(..., axis_name=...)``, with that ``axis_name`` (the
  batch is the mapped axis; more names sync over more axes or devices);
* **batched**: ``batch_axis=0`` and ``x`` of shape ``(batch, channels,
  *spatial)``; no ``vmap`` needed, and under a sharded ``jit`` the
  statistics are global with no ``axis_name``.

Differences from ``eqx.nn.BatchNorm``, all deliberate (the docs list them):
training always normalizes by the batch statistics (equinox's default
``mode="ema"`` normalizes by a running average, which gives gradient spikes,
equinox#659; ``mode="ema"`` is refused with that explanation); the running
statistics are Flax's EMA of the biased variance (``debias=True``: the
zero-debiased EMA, debiased correctly, where equinox's ``mode="batch"``
debiases a variance EMA that starts at 1 as if it started at 0);
inference before any training uses mean 0 and variance 1 (equinox's
``mode="ema"`` reads ``jnp.empty`` buffers); ``axis_name`` is a static field
(equinox#1074). Parameters and arithmetic are the functional core's.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax

try:
  import equinox as eqx
except ImportError as e:  # pragma: no cover - the extra is absent
  raise ImportError(
    'bnjax.equinox needs Equinox: pip install "bnjax[equinox]"'
  ) from e

from bnjax import _act, _checks, _core, _renorm
from bnjax._equinox_layer import NOT_STATE as _NOT_STATE  # _call's names
from bnjax._equinox_layer import Layer, check_mode
from bnjax._equinox_layer import set_state as _set_state
from bnjax._equinox_torch import from_torch, to_torch
from bnjax._types import (
  init_batch_stats,
  init_debiased_stats,
  init_renorm_stats,
)

__all__ = [
  'BatchNorm',
  'BatchNormAct',
  'BatchRenorm',
  'from_torch',
  'to_torch',
]

_NO_BATCH = (
  '{fn}: training with axis_name=None and batch_axis=None has no batch: x is '
  'one example, and its statistics would be its own. Pass axis_name and '
  'call the layer inside jax.vmap(..., axis_name=...) over the batch (as '
  'eqx.nn.BatchNorm, which requires axis_name), or build it with '
  'batch_axis=0 and pass the whole batch'
)


class _Base(Layer):
  """The call shared by the layers (their fields: :class:`Layer`)."""

  def _call(
    self,
    fn,
    x,
    state,
    inference,
    mask,
    *,
    act: _act.Spec | None = None,
    renorm: tuple[Any, Any] | None = None,
  ):
    if inference is None:
      inference = self.inference
    if isinstance(inference, jax.core.Tracer):
      raise TypeError(
        f'{fn}: inference is traced, but it selects which computation runs; '
        'jit the model with eqx.filter_jit (which keeps Python bools '
        'static), not jax.jit, or pass inference= at the call'
      )
    _checks.check_flag(fn, 'inference', inference)
    if not inference and self.axis_name is None and self.batch_axis is None:
      raise ValueError(_NO_BATCH.format(fn=fn))
    if not isinstance(state, eqx.nn.State):
      raise TypeError(_NOT_STATE.format(fn=fn, got=type(state).__name__))
    lay_x = _checks.check_floating(fn, x, complex_ok=False)
    # The channel axis: first of an example, or right after the batch axis.
    if self.batch_axis is None:
      axis = 0
    elif not -lay_x.ndim <= self.batch_axis < lay_x.ndim:
      raise ValueError(
        f'{fn}: batch_axis={self.batch_axis} is out of range for x of shape '
        f'{tuple(lay_x.shape)}; x is (batch, channels, *spatial): pass '
        'batch_axis=0'
      )
    else:
      axis = 1 if self.batch_axis % lay_x.ndim == 0 else 0
    lay = _checks.layout(fn, lay_x, axis)
    if lay.feature_shape != (self.input_size,):
      raise ValueError(
        f'{fn}: x of shape {tuple(x.shape)} has {lay.feature_shape} '
        f'channels on axis {axis}, but the layer was built with '
        f'input_size={self.input_size}; x is '
        + (
          '(channels, *spatial) per example (batch_axis=None)'
          if self.batch_axis is None
          else f'(batch, channels, *spatial) with batch_axis={self.batch_axis}'
        )
      )
    stats = state.get(self.state_index)
    correction = None if renorm is None else _renorm.variant(fn, *renorm)
    y, new = _core.normalize_batch(
      fn,
      lay_x,
      stats,
      self.weight,
      self.bias,
      use_running_average=bool(inference),
      momentum=self.momentum,
      epsilon=self.eps,
      # As the Flax modules: inference never syncs, so a model trained
      # inside vmap evaluates outside it.
      axis_name=None if inference else self.axis_name,
      mask=mask,
      sync=self.sync,
      correction=correction,
      single_value_ok=True,
      lay=lay,
      act=act,
    )
    if not inference:
      state = _set_state(fn, state, self.state_index, stats, new)
    return y, state


class BatchNorm(_Base):
  """BatchNorm as an Equinox stateful layer, exact and synced.

  Arguments as ``eqx.nn.BatchNorm``'s (``input_size``, ``axis_name``,
  ``eps``, ``channelwise_affine``, ``momentum``, ``inference``, ``dtype``,
  ``mode``), plus bnjax's. ``momentum`` is the decay of the running
  average, ``new = momentum * old + (1 - momentum) * batch`` (Equinox's and
  Flax's convention; PyTorch's momentum ``p`` is ``1 - p``).

  Replacing ``eqx.nn.BatchNorm(..., mode="batch")``: pass ``debias=True``,
  which keeps the same zero-debiased running mean (and variance, less
  equinox's start error ``m**t / (1 - m**t)``). The default keeps Flax's
  EMA from mean 0 and variance 1, which after t steps still weighs that
  start by ``m**t``. ``mode="ema"`` and equinox's default ``"legacy"``
  raise (see the module docstring). Training needs a batch: ``axis_name``
  inside ``jax.vmap``, or ``batch_axis``; with neither the call raises.

  Args:
    input_size: the number of channels.
    axis_name: the ``vmap``/``pmap``/``shard_map`` axis name (or names) the
      batch is on; None with ``batch_axis`` set: local (or, under a sharded
      ``jit``, global) statistics. Static.
    eps: added to the variance.
    channelwise_affine: learn a per-channel ``weight`` and ``bias``.
    momentum: EMA decay of the running statistics, in [0, 1].
    inference: use the running statistics; ``eqx.nn.inference_mode`` sets
      it and the call may override it.
    dtype: dtype of ``weight`` and ``bias`` (statistics are float32).
    mode: ``"batch"`` only (see the module docstring for ``"ema"`` and
      ``"legacy"``).
    batch_axis: None (per-example calls inside ``jax.vmap``) or the batch
      axis of x (then x is ``(batch, channels, *spatial)``).
    debias: keep a zero-debiased EMA (:class:`bnjax.DebiasedStats`), as
      ``eqx.nn.BatchNorm(mode="batch")`` does: the faithful replacement.
    sync: ``'auto'``, ``'gather'`` or ``'psum'`` (see :func:`bnjax.batch_norm`).

  Attributes:
    weight: the affine scale, shape ``(input_size,)``, or None.
    bias: the affine shift, shape ``(input_size,)``, or None.
    state_index: the ``eqx.nn.StateIndex`` of the running statistics (a
      :class:`bnjax.BatchStats`, or :class:`bnjax.DebiasedStats`).

  Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx, bnjax.equinox
    >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    ...     3, axis_name='batch', momentum=0.9)
    >>> x = jnp.arange(12.0).reshape(4, 3)        # 4 examples of 3 channels
    >>> y, state = jax.vmap(bn, axis_name='batch', in_axes=(0, None),
    ...                     out_axes=(0, None))(x, state)
    >>> state.get(bn.state_index).mean.round(2)
    Array([0.45, 0.55, 0.65], dtype=float32)
  """

  def __init__(
    self,
    input_size: int,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: float = 0.99,
    inference: bool = False,
    dtype: Any = None,
    mode: str = 'batch',
    *,
    batch_axis: int | None = None,
    debias: bool = False,
    sync: str = 'auto',
  ):
    # BatchNormAct's checks are named after it.
    fn = next(
      f'bnjax.equinox.{c.__name__}'
      for c in type(self).__mro__
      if c.__module__ == __name__
    )
    check_mode(fn, mode)
    _checks.check_flag(fn, 'debias', debias)
    init = init_debiased_stats if debias else init_batch_stats
    self._setup(
      fn,
      input_size,
      dtype,
      init,
      inference=inference,
      axis_name=axis_name,
      eps=eps,
      channelwise_affine=channelwise_affine,
      momentum=momentum,
      batch_axis=batch_axis,
      sync=sync,
    )

  def __call__(
    self,
    x: jax.Array,
    state: eqx.nn.State,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """Normalizes x; returns ``(y, new state)``.

    Args:
      x: ``(channels, *spatial)`` per example, or ``(batch, channels,
        *spatial)`` with ``batch_axis``.
      state: the ``eqx.nn.State``.
      key: ignored (Equinox's layer protocol).
      inference: overrides the field of the same name.
      mask: optional boolean array broadcastable to x: statistics cover
        the masked-in entries only (count-weighted over ``axis_name``).

    Returns:
      ``(y, state)``; in training the state holds the updated statistics.
    """
    del key
    return self._call('bnjax.equinox.BatchNorm', x, state, inference, mask)


class BatchRenorm(_Base):
  """Batch renormalization (Ioffe 2017) as an Equinox stateful layer.

  Arguments as :class:`BatchNorm` (without ``mode`` and ``debias``), plus
  ``r_max`` and ``d_max``, which the call may override with traced values
  for the paper's warm-up schedule; the state is a
  :class:`bnjax.RenormStats`. See :func:`bnjax.batch_renorm`.

  Args:
    input_size: the number of channels; this and ``axis_name``, ``eps``,
      ``channelwise_affine``, ``momentum``, ``inference``, ``dtype``,
      ``batch_axis`` and ``sync`` as :class:`BatchNorm`'s.
    r_max: clip of r, >= 1.
    d_max: clip of d, >= 0.

  Example:
    >>> import jax.numpy as jnp, equinox as eqx, bnjax.equinox
    >>> rn, state = eqx.nn.make_with_state(bnjax.equinox.BatchRenorm)(
    ...     2, batch_axis=0)
    >>> y, state = rn(jnp.arange(8.0).reshape(4, 2), state, r_max=1.0,
    ...               d_max=0.0)
    >>> type(state.get(rn.state_index)).__name__
    'RenormStats'
  """

  r_max: Any = eqx.field(static=True)
  d_max: Any = eqx.field(static=True)

  def __init__(
    self,
    input_size: int,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: float = 0.99,
    inference: bool = False,
    dtype: Any = None,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    batch_axis: int | None = None,
    sync: str = 'auto',
  ):
    self._setup(
      'bnjax.equinox.BatchRenorm',
      input_size,
      dtype,
      init_renorm_stats,
      inference=inference,
      axis_name=axis_name,
      eps=eps,
      channelwise_affine=channelwise_affine,
      momentum=momentum,
      batch_axis=batch_axis,
      sync=sync,
      r_max=r_max,
      d_max=d_max,
    )

  def __call__(
    self,
    x: jax.Array,
    state: eqx.nn.State,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
    r_max: Any = None,
    d_max: Any = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """Renormalizes x; see :meth:`BatchNorm.__call__` and
    :func:`bnjax.batch_renorm` (``r_max``/``d_max`` override the fields).

    Args:
      x: as :meth:`BatchNorm.__call__`, and so are ``state``, ``key``,
        ``inference`` and ``mask``.
      r_max: overrides the field (a traced value allowed).
      d_max: overrides the field (a traced value allowed).

    Returns:
      ``(y, state)``.
    """
    del key
    limits = (
      self.r_max if r_max is None else r_max,
      self.d_max if d_max is None else d_max,
    )
    return self._call(
      'bnjax.equinox.BatchRenorm', x, state, inference, mask, renorm=limits
    )


class BatchNormAct(BatchNorm):
  """BatchNorm then an invertible activation that keeps only its output.

  A drop-in for :class:`BatchNorm` followed by ``jax.nn.leaky_relu`` (or
  ``jax.nn.elu``, or nothing): :class:`BatchNorm`'s arguments, fields and
  state, plus ``activation`` and ``scale_floor`` (keyword-only; see
  :func:`bnjax.batch_norm_act`). Training keeps only the output for the
  backward (InPlace-ABN).

  Args:
    input_size: the number of channels.
    *args: :class:`BatchNorm`'s positional arguments.
    activation: ``'leaky_relu'`` (slope 0.01, the default), ``'elu'``,
      ``'identity'``, or a :class:`bnjax.LeakyReLU` / :class:`bnjax.ELU`.
    scale_floor: the smallest ``|weight|`` used (default 1e-3).
    **kwargs: :class:`BatchNorm`'s keyword arguments.

  Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx, bnjax, bnjax.equinox
    >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNormAct)(
    ...     1, batch_axis=0, activation=bnjax.LeakyReLU(0.1))
    >>> y, state = bn(jnp.array([[1.0], [3.0]]), state)
    >>> y.round(3)
    Array([[-0.1],
           [ 1. ]], dtype=float32)
  """

  activation: Any = eqx.field(static=True)
  scale_floor: float = eqx.field(static=True)

  def __init__(
    self,
    input_size: int,
    *args: Any,
    activation: Any = 'leaky_relu',
    scale_floor: float = 1e-3,
    **kwargs: Any,
  ):
    spec = _act.spec('bnjax.equinox.BatchNormAct', activation, scale_floor)
    super().__init__(input_size, *args, **kwargs)
    self.activation = spec.activation
    self.scale_floor = spec.scale_floor

  def __call__(
    self,
    x: jax.Array,
    state: eqx.nn.State,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """As :meth:`BatchNorm.__call__`, then the activation."""
    del key
    return self._call(
      'bnjax.equinox.BatchNormAct',
      x,
      state,
      inference,
      mask,
      act=_act.Spec(self.activation, self.scale_floor),
    )
