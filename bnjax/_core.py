r"""The public functional core: ``normalize``, ``moments``, ``batch_norm``.

Training mode goes through ``bnjax._train`` (the statistics, the forward and
its custom JVP); this module checks the arguments and picks the path.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _checks, _ghost, _psum, _running, _stats, _sync
from bnjax._train import _affine, _batch_stats, _Cfg, train
from bnjax._types import (
  Axis,
  AxisIndexGroups,
  AxisName,
  DType,
  RunningStats,
  Scalar,
)

Array = jax.Array


def _out_dtype(fn: str, x: Array, dtype: Any):
  if dtype is None:
    return x.dtype
  kind = jnp.complexfloating if jnp.iscomplexobj(x) else jnp.floating
  if not jnp.issubdtype(dtype, kind):
    what = 'complex, as x is' if kind is jnp.complexfloating else 'floating'
    raise TypeError(
      f'{fn}: dtype must be {what}, got {jnp.dtype(dtype)}; pass e.g. '
      f'dtype={"jnp.complex64" if what != "floating" else "jnp.float32"}'
    )
  return jnp.dtype(dtype)


def normalize(
  x: Array,
  mean: Array,
  var: Array,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  axis: Axis = -1,
  epsilon: Scalar = 1e-5,
  dtype: DType | None = None,
) -> Array:
  r"""Normalizes x with given per-channel statistics.

  .. math:: y = (x - \mu)\,(\sigma^2 + \epsilon)^{-1/2}\,\gamma + \beta

  Args:
    x: floating input.
    mean, var: per-channel statistics of shape ``x.shape[axis]`` (or the shape
      of the feature axes when ``axis`` is a tuple).
    scale, bias: optional per-channel :math:`\gamma`, :math:`\beta`; None
      switches that part of the affine transform off.
    axis: the feature axis or a tuple of feature axes.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: x's dtype). Arithmetic is at least float32.

  Returns:
    y, the shape of x.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> bnjax.normalize(jnp.array([[1.0], [3.0]]), jnp.array([2.0]),
    ...                 jnp.array([1.0]), epsilon=1e-12)
    Array([[-1.],
           [ 1.]], dtype=float32)
  """
  fn = 'normalize'
  x = _checks.check_floating(fn, x, complex_ok=True)
  lay = _checks.layout(fn, x, axis)
  mean = _checks.check_per_channel(fn, 'mean', mean, lay)
  var = _checks.check_per_channel(fn, 'var', var, lay)
  scale = _checks.check_per_channel(fn, 'scale', scale, lay)
  bias = _checks.check_per_channel(fn, 'bias', bias, lay)
  _checks.check_hyper(fn, 0.0, epsilon)
  f = _stats.stats_dtype(x.dtype)
  rstd = lax.rsqrt(var.astype(_stats.real_dtype(f)) + epsilon)
  return _affine(
    x, mean.astype(f), rstd, scale, bias, lay, _out_dtype(fn, x, dtype)
  )


def moments(
  x: Array,
  *,
  axis: Axis = -1,
  mask: Array | None = None,
  axis_name: AxisName = None,
  axis_index_groups: AxisIndexGroups | None = None,
  sync: str = 'auto',
) -> tuple[Array, Array]:
  r"""Per-channel mean and biased variance of x, exact and count-weighted.

  Reduces over every axis except ``axis``. With ``mask``, only masked-in
  entries count; a channel with none gets mean 0 and var 0. With
  ``axis_name``, the statistics are those of the global batch over that
  mapped axis (one collective; ``sync`` as in :func:`batch_norm`, where
  the psum path's shift is 0 here, so uncentered data take the exact
  fallback); an unbound name raises JAX's ``NameError``. Results are at
  least float32:

  .. math:: \mu = \tfrac1n \sum_i x_i, \qquad
     \sigma^2 = \tfrac1n \sum_i (x_i - \mu)^2
     \quad\text{(biased, over the masked-in } i\text{)}

  Args:
    x: floating (or complex) input.
    axis: the feature axis, or a tuple of feature axes; every other axis is
      reduced.
    mask: optional boolean array broadcastable to x.
    axis_name: a mapped axis name (or tuple of names) to reduce over too.
    axis_index_groups: optional groups of ``axis_name`` indices, each
      reduced separately (``pmap``).
    sync: ``'auto'``, ``'gather'`` or ``'psum'``, as in :func:`batch_norm`.

  Returns:
    ``(mean, var)``, each of the feature shape.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> bnjax.moments(jnp.array([[0.0, 1.0], [2.0, 5.0]]))
    (Array([1., 3.], dtype=float32), Array([1., 4.], dtype=float32))
  """
  fn = 'moments'
  x = _checks.check_floating(fn, x, complex_ok=True)
  lay = _checks.layout(fn, x, axis)
  mask = _checks.check_mask(fn, mask, x)
  groups = _sync.canonical_groups(fn, axis_name, axis_index_groups)
  mode = _sync_mode(fn, sync, axis_name, groups, x, lay, mask)
  cfg = _Cfg(lay, axis_name, groups, True, x.dtype, mode)
  _, mean, var = _batch_stats(x, mask, cfg)
  return mean, var


def _sync_mode(fn, sync, axis_name, groups, x, lay, mask) -> str:
  """The synced path, 'gather' or 'psum', resolved at trace time."""
  channels = math.prod(lay.feature_shape) * (2 if jnp.iscomplexobj(x) else 1)
  return _psum.resolve(fn, sync, axis_name, groups, channels, mask is not None)


def batch_norm(
  x: Array,
  batch_stats: RunningStats,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  use_running_average: bool,
  axis: Axis = -1,
  momentum: Scalar = 0.99,
  epsilon: Scalar = 1e-5,
  axis_name: AxisName = None,
  axis_index_groups: AxisIndexGroups | None = None,
  mask: Array | None = None,
  use_fast_variance: bool = True,
  dtype: DType | None = None,
  virtual_batch_size: int | None = None,
  sync: str = 'auto',
) -> tuple[Array, RunningStats]:
  r"""Batch normalization as a pure function: returns ``(y, new_batch_stats)``.

  Training (``use_running_average=False``) normalizes with the batch mean and
  biased variance and returns

  .. math:: \text{new} = m \cdot \text{old} + (1 - m) \cdot \text{batch}

  with ``m = momentum`` (Flax's convention; PyTorch's momentum ``p`` is
  ``m = 1 - p``, so torch's 0.1 is 0.9 here). The returned statistics carry no
  gradient and have the structure, shapes and dtypes of ``batch_stats``.
  Inference (``use_running_average=True``) normalizes with the stored
  statistics and returns ``batch_stats`` unchanged.

  Statistics are within 1e-5 of float64 at ``|mean|/std`` from 1e2 to 1e6
  (``benchmarks/numerics.py``), on one device and synced. Unsynced, the
  forward computes flax's formulas (``E[x^2] - E[x]^2`` with
  ``use_fast_variance=True``, the default; ``E[(x - E[x])^2]`` with False;
  masked with ``where=``), so it matches flax bit for bit, and trusts them
  only where every channel has ``mean**2 <= 8 var``; otherwise a
  ``lax.cond`` runs the corrected two-pass (``bnjax._stats``), whose result
  does not depend on the order in which the backend sums, to first order.
  Half-precision input is reduced in float32.

  Args:
    x: floating input; statistics reduce over every axis except ``axis``.
    batch_stats: running statistics of the feature shape. The type picks
      the update rule: :class:`BatchStats` (Flax's EMA),
      :class:`CumulativeStats` (PyTorch's ``momentum=None``: the plain
      average of all batches, ``momentum`` unused) or
      :class:`DebiasedStats` (zero-debiased EMA). Inference normalizes with
      :func:`population_stats` of it.
    scale, bias: optional per-channel affine parameters (None: off).
    use_running_average: keyword-only and required; True for inference.
    axis: the feature axis, or a tuple of feature axes.
    momentum: EMA decay of the running statistics, in [0, 1].
    epsilon: added to the variance, > 0.
    axis_name: a mapped axis name (or tuple of names) of ``shard_map``,
      ``pmap`` or ``vmap`` to take statistics over the global batch. None
      means local statistics (under a sharded ``jit`` those are already
      global: XLA inserts the collective). An unbound name raises JAX's
      ``NameError``: bnjax never guesses the collective context.
    axis_index_groups: optional groups of indices of ``axis_name`` that
      normalize independently (supported by JAX under ``pmap``).
    mask: optional boolean array broadcastable to x; statistics cover the
      masked-in entries only. A channel with none keeps its running stats.
    use_fast_variance: accepted for Flax compatibility; both settings exact.
    dtype: output dtype (default: x's dtype).
    virtual_batch_size: ghost batch norm (Hoffer et al. 2017): normalize
      each chunk of this many rows of axis 0 with its own statistics; the
      running statistics get the mean over chunks. Must divide the batch.
      With ``axis_name`` chunks are per shard, and only the running-stat
      average is synced (see ``bnjax._ghost``).
    sync: how statistics combine over ``axis_name``, one collective either
      way. ``'gather'`` all-gathers every shard's exact partial, D x
      (3C + 1) floats. ``'psum'`` psums ``(n, sum(x - K), sum((x - K)**2))``
      around K = the running mean, 2C + 9 floats whatever D (8 of them
      check that every shard has the same K), and takes ``M2 = S2 -
      S1**2 / N``; where that is not exact to 1e-5 (``(mean - K)**2 > 8
      var`` in some channel, as at the first steps from a zero running
      mean, or shards whose K differ) the step runs the gather as well,
      chosen from the psum's result so every shard agrees. ``'auto'`` picks
      at trace time by the alpha-beta model of
      ``benchmarks/sync_model.py``: the psum where the gather would cost
      more (for example C = 2048 from 256 devices, C = 256 from 4096).
      Ignored without ``axis_name`` and for ghost batches (whose sync is one
      psum already).

  Returns:
    ``(y, new_batch_stats)``.

  Raises:
    TypeError: non-floating x, wrong ``batch_stats`` type, non-bool flag.
    ValueError: bad axis, mismatched shapes, bad momentum or epsilon, an
      empty reduction, a mask that does not broadcast, or training with a
      single value per channel.

  Example:
    >>> import jax, jax.numpy as jnp, bnjax
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, stats = bnjax.batch_norm(x, bnjax.init_batch_stats(2),
    ...                             use_running_average=False, momentum=0.9)
    >>> y.round(4)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> stats.mean
    Array([0.2, 2. ], dtype=float32)
  """
  fn = 'batch_norm'
  _checks.check_use_running_average(fn, use_running_average)
  x = _checks.check_floating(fn, x, complex_ok=True)
  lay = _checks.layout(fn, x, axis)
  _checks.check_stats(fn, batch_stats, lay, _running.STATE_TYPES)
  scale = _checks.check_per_channel(fn, 'scale', scale, lay)
  bias = _checks.check_per_channel(fn, 'bias', bias, lay)
  mask = _checks.check_mask(fn, mask, x)
  _checks.check_hyper(fn, momentum, epsilon)
  out_dtype = _out_dtype(fn, x, dtype)
  if use_running_average:
    pop = _running.population_stats(batch_stats)
    y = normalize(
      x,
      pop.mean,
      pop.var,
      scale,
      bias,
      axis=axis,
      epsilon=epsilon,
      dtype=out_dtype,
    )
    return y, batch_stats
  groups = _sync.canonical_groups(fn, axis_name, axis_index_groups)
  mode = _sync_mode(fn, sync, axis_name, groups, x, lay, mask)
  cfg = _Cfg(lay, axis_name, groups, bool(use_fast_variance), out_dtype, mode)
  pop = _running.population_stats(batch_stats)
  fallback = None if mask is None else pop
  if virtual_batch_size is not None:
    y, mean, var, count = _ghost.train(
      train,
      fn,
      x,
      scale,
      bias,
      epsilon,
      mask,
      cfg,
      virtual_batch_size,
      fallback,
    )
  else:
    y, mean, var, count = train(
      fn,
      x,
      scale,
      bias,
      epsilon,
      mask,
      cfg,
      fallback=fallback,
      shift=pop.mean if mode == 'psum' else None,
    )
  valid = None if mask is None else count > 0
  return y, _running.update(batch_stats, mean, var, momentum, valid)


def frozen_batch_norm(
  x: Array,
  batch_stats: RunningStats,
  scale: Array | None = None,
  bias: Array | None = None,
  *,
  axis: Axis = -1,
  epsilon: Scalar = 1e-5,
  dtype: DType | None = None,
) -> tuple[Array, RunningStats]:
  r"""Frozen BN for fine-tuning: stored statistics, trainable affine.

  Normalizes with the stored (population) statistics whatever the mode, lets
  gradients reach ``scale`` and ``bias`` (and x) but never the statistics,
  and returns the statistics unchanged. This is the usual recipe for
  fine-tuning a pretrained network on small batches (detectron2's
  ``FrozenBatchNorm2d``): batch statistics of a small batch are noisy, and
  updating the running statistics would drift them away from pretraining.

  .. math:: y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta,
     \qquad (\mu, \sigma^2) = \text{population\_stats(batch\_stats)}

  Args:
    x: floating input.
    batch_stats: any running-statistics state (:class:`BatchStats`,
      :class:`CumulativeStats`, :class:`DebiasedStats`).
    scale, bias: optional per-channel affine parameters (None: off).
    axis: the feature axis, or a tuple of feature axes.
    epsilon: added to the variance, > 0.
    dtype: output dtype (default: x's dtype).

  Returns:
    ``(y, batch_stats)``, the statistics unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, bnjax
    >>> s = bnjax.BatchStats(jnp.array([1.0]), jnp.array([4.0]))
    >>> f = lambda g: bnjax.frozen_batch_norm(jnp.array([[3.0]]), s, g,
    ...                                       epsilon=1e-12)[0].sum()
    >>> jax.grad(f)(jnp.array([1.0]))
    Array([1.], dtype=float32)
  """
  fn = 'frozen_batch_norm'
  x = _checks.check_floating(fn, x, complex_ok=True)
  lay = _checks.layout(fn, x, axis)
  _checks.check_stats(fn, batch_stats, lay, _running.STATE_TYPES)
  pop = jax.tree.map(lax.stop_gradient, _running.population_stats(batch_stats))
  return normalize(
    x, pop.mean, pop.var, scale, bias, axis=axis, epsilon=epsilon, dtype=dtype
  ), batch_stats
