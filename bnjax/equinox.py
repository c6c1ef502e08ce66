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

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
  import equinox as eqx
except ImportError as e:  # pragma: no cover - the extra is absent
  raise ImportError(
    'bnjax.equinox needs Equinox: pip install "bnjax[equinox]"'
  ) from e

from bnjax import _act, _checks, _core, _moments, _renorm, _running, _values
from bnjax._state_dict import load_state_dict
from bnjax._types import (
  BatchStats,
  DebiasedStats,
  RenormStats,
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

_EMA_MODE = (
  '{fn}: mode="{mode}" normalizes training batches by a running average '
  '(equinox\'s default "legacy" is its "ema"), which gives gradient '
  'spikes (equinox#659); bnjax always normalizes by the batch statistics '
  'and keeps an EMA for inference. Pass mode="batch" (or leave it out); '
  'for the debiased running statistics of equinox\'s mode="batch" pass '
  'debias=True'
)


_NO_BATCH = (
  '{fn}: training with axis_name=None and batch_axis=None has no batch: x is '
  'one example, and its statistics would be its own. Pass axis_name and '
  'call the layer inside jax.vmap(..., axis_name=...) over the batch (as '
  'eqx.nn.BatchNorm, which requires axis_name), or build it with '
  'batch_axis=0 and pass the whole batch'
)


_NOT_PLACED = (
  '{fn}: x is sharded over the mesh axes {axes} (a jit over NamedSharding '
  'inputs), but the eqx.nn.State is not placed on that mesh, and '
  'State.set refuses statistics whose type gains a mesh; place the state '
  'on it first, replicated: state = jax.device_put(state, '
  'NamedSharding(mesh, P()))'
)
_NOT_STATE = (
  '{fn}: state must be an eqx.nn.State (from eqx.nn.make_with_state), got {got}'
)


def _check_eps(fn, eps):
  _checks.check_scalar(fn, 'eps', eps)
  e = _checks.concrete(eps)
  tiny = float(jnp.finfo(jnp.float32).tiny)
  if e is not None and not tiny <= e < float('inf'):
    raise ValueError(
      f'{fn}: eps={e} must be finite and >= {tiny:.3g} (the smallest normal '
      'float32) to keep rsqrt(var + eps) finite; pass e.g. eps=1e-5'
    )


def _param_dtype(fn, dtype):
  try:
    dt = jnp.dtype(jnp.float32 if dtype is None else dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
      f'{fn}: dtype must be a floating dtype (of weight and bias), got '
      f'{dtype!r}; pass e.g. dtype=jnp.float32'
    )
  return dt


class _Base(eqx.nn.StatefulLayer):
  """Fields and call shared by BatchNorm and BatchRenorm."""

  weight: jax.Array | None
  bias: jax.Array | None
  state_index: eqx.nn.StateIndex
  inference: bool
  axis_name: Hashable | Sequence[Hashable] | None = eqx.field(static=True)
  input_size: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float = eqx.field(static=True)
  batch_axis: int | None = eqx.field(static=True)
  sync: str = eqx.field(static=True)

  def _setup(self, fn, input_size, dtype, init_state, **fields):
    if (
      isinstance(input_size, bool)
      or not isinstance(input_size, int)
      or input_size < 1
    ):
      raise TypeError(
        f'{fn}: input_size must be a positive int (the number of channels), '
        f'got {input_size!r}'
      )
    batch_axis = fields['batch_axis']
    if batch_axis is not None and (
      isinstance(batch_axis, bool) or not isinstance(batch_axis, int)
    ):
      raise TypeError(
        f'{fn}: batch_axis must be None (per-example calls inside '
        f'jax.vmap) or an int (the batch axis of x), got {batch_axis!r}'
      )
    _checks.check_flag(fn, 'inference', fields['inference'])
    _checks.check_flag(fn, 'channelwise_affine', fields['channelwise_affine'])
    _check_eps(fn, fields['eps'])
    _checks.check_hyper(fn, fields['momentum'], fields['eps'])
    _moments.check_mode(fn, fields['sync'])
    dtype = _param_dtype(fn, dtype)
    if fields['channelwise_affine']:
      self.weight = jnp.ones((input_size,), dtype)
      self.bias = jnp.zeros((input_size,), dtype)
    else:
      self.weight = self.bias = None
    self.state_index = eqx.nn.StateIndex(init_state(input_size))
    self.input_size = input_size
    for name, value in fields.items():
      setattr(self, name, value)

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


def _mesh_names(v) -> tuple:
  mesh = getattr(getattr(jax.typeof(v), 'sharding', None), 'mesh', None)
  return tuple(getattr(mesh, 'axis_names', ()))


def _set_state(fn: str, state, index, old, new):
  """``state.set(index, new)``. eqx.nn.State.set refuses a value whose type
  differs from the old one, sharding included, with a message that prints
  the two as equal: where the cause is a state left off the mesh of a
  sharded batch, say so and name the fix."""
  try:
    return state.set(index, new)
  except ValueError as e:
    if _mesh_names(new.mean) and not _mesh_names(old.mean):
      raise ValueError(
        _NOT_PLACED.format(fn=fn, axes=_mesh_names(new.mean))
      ) from e
    raise


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
    fn = 'bnjax.equinox.BatchNorm'
    if mode in ('ema', 'legacy'):
      raise ValueError(_EMA_MODE.format(fn=fn, mode=mode))
    if mode != 'batch':
      raise ValueError(f'{fn}: mode must be "batch", got {mode!r}')
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
    input_size: the number of channels.
    axis_name: as :class:`BatchNorm`'s.
    eps: added to the variance.
    channelwise_affine: learn a per-channel ``weight`` and ``bias``.
    momentum: EMA decay of the running statistics.
    inference: use the running statistics.
    dtype: dtype of ``weight`` and ``bias``.
    r_max: clip of r, >= 1.
    d_max: clip of d, >= 0.
    batch_axis: as :class:`BatchNorm`'s.
    sync: as :class:`BatchNorm`'s.

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
      x: as :meth:`BatchNorm.__call__`.
      state: the ``eqx.nn.State``.
      key: ignored.
      inference: overrides the field.
      mask: as :meth:`BatchNorm.__call__`.
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


# ------------------------------------------------------- PyTorch state ---

Where = Callable[[Any], BatchNorm]


def from_torch(
  model: Any, state: eqx.nn.State, state_dict: Any, layers: Mapping[str, Where]
) -> tuple[Any, eqx.nn.State]:
  """Loads PyTorch BatchNorm layers into an Equinox model and its State.

  ``weight``/``bias`` become the layer's ``weight``/``bias`` (by
  ``eqx.tree_at``) and ``running_mean``/``running_var`` the statistics its
  inference uses, in the layer's state type: a :class:`bnjax.BatchStats`
  as they are, a :class:`bnjax.DebiasedStats` with weight 1, a
  :class:`BatchRenorm`'s ``std = sqrt(running_var + eps)`` (torch's
  running variance averages the unbiased batch variance: see
  :mod:`bnjax.interop`). Torch's momentum ``p`` is ``1 - p`` here. The
  values go through the check :func:`bnjax.interop.from_torch` uses.

  Args:
    model: an Equinox model holding :class:`BatchNorm` or
      :class:`BatchRenorm` layers.
    state: its ``eqx.nn.State``.
    state_dict: a torch state dict (any source
      :func:`bnjax.interop.load_state_dict` reads).
    layers: ``{torch prefix: where}``, ``where(model)`` picking the layer
      (as for ``eqx.tree_at``), e.g. ``{'bn1': lambda m: m.bn1}``.

  Returns:
    ``(model, state)``, new.

  Raises:
    TypeError: ``layers`` is not a mapping of functions picking a layer.
    ValueError: a key is missing, or a value is invalid (a size other than
      ``input_size``, non-finite, a negative variance), each named; nothing
      is loaded.

  Example:
    >>> import numpy as np, equinox as eqx, bnjax.equinox
    >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(2, 'b')
    >>> sd = {'bn.weight': np.ones(2), 'bn.bias': np.zeros(2),
    ...       'bn.running_mean': np.array([1.0, 2.0]),
    ...       'bn.running_var': np.array([3.0, 4.0])}
    >>> bn, state = bnjax.equinox.from_torch(bn, state, sd, {'bn': lambda m: m})
    >>> state.get(bn.state_index).var
    Array([3., 4.], dtype=float32)
  """
  fn = 'bnjax.equinox.from_torch'
  picked = _pick(fn, model, state, layers)
  sd = load_state_dict(state_dict)
  loaded, problems = {}, []
  for prefix, layer in picked.items():
    names = _TORCH if layer.weight is not None else _TORCH[2:]
    vectors = {k: _torch_vector(fn, sd, f'{prefix}.{k}') for k in names}
    problems += _values.layer_problems(
      {f'{prefix}.{k}': v for k, v in vectors.items()},
      variances=(f'{prefix}.running_var',),
      size=layer.input_size,
    )
    loaded[prefix] = vectors
  _values.report(fn, problems, 'state_dict')
  for prefix, where in layers.items():
    layer, v = picked[prefix], loaded[prefix]
    if layer.weight is not None:
      dtype = layer.weight.dtype
      model = eqx.tree_at(
        functools.partial(_affine, where),
        model,
        (jnp.asarray(v['weight'], dtype), jnp.asarray(v['bias'], dtype)),
      )
    state = state.set(layer.state_index, _from_population(layer, state, v))
  return model, state


_TORCH = ('weight', 'bias', 'running_mean', 'running_var')


def _affine(where, model):
  return where(model).weight, where(model).bias


def _pick(fn, model, state, layers) -> dict[str, _Base]:
  """``{prefix: layer}``, each a bnjax.equinox layer."""
  if not isinstance(state, eqx.nn.State):
    raise TypeError(_NOT_STATE.format(fn=fn, got=type(state).__name__))
  if not isinstance(layers, Mapping):
    raise TypeError(
      f'{fn}: layers must map torch prefixes to functions picking the layer, '
      f"e.g. {{'bn1': lambda m: m.bn1}}, got {type(layers).__name__}"
    )
  picked = {}
  for prefix, where in layers.items():
    layer = where(model) if callable(where) else where
    if not callable(where) or not isinstance(layer, _Base):
      raise TypeError(
        f'{fn}: layers[{prefix!r}] must be a function of the model that '
        'picks a bnjax.equinox.BatchNorm or BatchRenorm, e.g. lambda m: '
        f'm.bn1; it gives a {type(layer).__name__}'
      )
    picked[prefix] = layer
  return picked


def _from_population(layer, state, v):
  """The layer's state type holding torch's population (mean, var)."""
  mean = jnp.asarray(v['running_mean'])
  var = jnp.asarray(v['running_var'])
  old = state.get(layer.state_index)
  if isinstance(old, RenormStats):
    return RenormStats(mean, jnp.sqrt(var + jnp.float32(layer.eps)))
  if isinstance(old, DebiasedStats):
    return DebiasedStats(mean, var, jnp.ones_like(var))
  return BatchStats(mean, var)


def _population(fn, layer, stats) -> tuple[np.ndarray, np.ndarray]:
  """The (mean, var) that inference normalizes with, as torch stores them:
  a debiased EMA debiased, a renorm std as ``std**2 - eps``."""
  if isinstance(stats, RenormStats):
    std = np.asarray(stats.std, np.float64)
    return np.asarray(stats.mean), std * std - layer.eps
  # The converters' one value check (_values) judges the result, by key.
  pop = _running.population_stats_as(fn, stats, check=False)
  return np.asarray(pop.mean), np.asarray(pop.var)


def to_torch(
  model: Any, state: eqx.nn.State, layers: Mapping[str, Where]
) -> dict[str, np.ndarray]:
  """The PyTorch state dict entries of an Equinox model's BatchNorm layers.

  The inverse of :func:`from_torch` (``num_batches_tracked`` is 0: bnjax
  does not count batches): ``running_mean``/``running_var`` are the
  statistics inference uses (:func:`bnjax.population_stats`; a
  :class:`BatchRenorm`'s ``std**2 - eps``), which torch's eval
  ``(x - running_mean) / sqrt(running_var + eps)`` reproduces. Non-finite
  values and negative variances are refused, each named.

  Args:
    model: an Equinox model holding :class:`BatchNorm` or
      :class:`BatchRenorm` layers.
    state: its ``eqx.nn.State``.
    layers: ``{torch prefix: where}``, as :func:`from_torch`'s.

  Returns:
    ``{prefix.weight, prefix.bias, prefix.running_mean, prefix.running_var,
    prefix.num_batches_tracked: NumPy array}``.

  Example:
    >>> import equinox as eqx, bnjax.equinox
    >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(2, 'b')
    >>> sorted(bnjax.equinox.to_torch(bn, state, {'bn': lambda m: m}))
    ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var', 'bn.weight']
  """
  fn = 'bnjax.equinox.to_torch'
  out, problems = {}, []
  for prefix, layer in _pick(fn, model, state, layers).items():
    mean, var = _population(fn, layer, state.get(layer.state_index))
    vectors: dict[str, Any] = {'running_mean': mean, 'running_var': var}
    if layer.weight is not None:
      vectors.update(weight=layer.weight, bias=layer.bias)
    vectors = {
      f'{prefix}.{k}': np.array(v, np.float32) for k, v in vectors.items()
    }
    problems += _values.layer_problems(
      vectors, variances=(f'{prefix}.running_var',), size=layer.input_size
    )
    out.update(vectors)
    out[f'{prefix}.num_batches_tracked'] = np.asarray(0, np.int64)
  _values.report(fn, problems, 'model and state')
  return out


def _torch_vector(fn, sd, name):
  if name not in sd:
    raise ValueError(
      f'{fn}: state_dict has no {name!r}; its BatchNorm prefixes are '
      f'{sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith("running_mean")})}'
    )
  return np.asarray(sd[name], np.float32).reshape(-1)


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
