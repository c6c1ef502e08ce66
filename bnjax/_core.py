r"""The functional core: ``normalize``, ``moments`` and ``batch_norm``.

Training-mode BN is one ``jax.custom_jvp`` whose tangent rule is linear in the
tangents, so JAX gets reverse mode by transposing it and forward mode for
free (``jax.jvp``, ``jacfwd``, ``hessian``). The rule is wrapped in
``jax.checkpoint`` so that reverse mode saves only ``x`` (in its own dtype)
and per-channel vectors, and recomputes ``x_hat`` inside the fused backward
passes: one full-size residual per call, where flax keeps two.

With :math:`\hat x = (x - \mu) r`, :math:`r = (\sigma^2 + \epsilon)^{-1/2}`
and :math:`\langle\cdot\rangle` the mean over the (global, unmasked) batch,

.. math::
  d\hat x = r\,(dx - \langle dx\rangle - \hat x \langle \hat x\, dx\rangle)
            - \tfrac12 \hat x\, r^2\, d\epsilon, \qquad
  dy = \gamma\, d\hat x + \hat x\, d\gamma + d\beta .
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _checks, _ghost, _running, _stats, _sync
from bnjax._checks import Layout
from bnjax._types import (
  Axis,
  AxisIndexGroups,
  AxisName,
  DType,
  RunningStats,
  Scalar,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Cfg:
  lay: Layout
  axis_name: Any
  groups: Any
  fast: bool
  out_dtype: Any


def _out_dtype(fn: str, x: Array, dtype: Any):
  if dtype is None:
    return x.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{fn}: dtype must be floating, got {jnp.dtype(dtype)}')
  return jnp.dtype(dtype)


def _affine(x, mean, rstd, scale, bias, lay: Layout, out_dtype):
  f = _stats.stats_dtype(x.dtype)
  mul = rstd if scale is None else rstd * scale.astype(f)
  # (x - mean) * mul, not x * mul - mean * mul: the latter cancels
  # catastrophically when |mean| >> std.
  y = (x.astype(f) - lay.broadcast(mean)) * lay.broadcast(mul)
  if bias is not None:
    y = y + lay.broadcast(bias.astype(f))
  return y.astype(out_dtype)


def _batch_stats(x, mask, cfg: _Cfg):
  p = _stats.local_partial(x, cfg.lay, mask, cfg.fast)
  if cfg.axis_name is not None:
    p = _sync.gather_merge(p, cfg.axis_name, cfg.groups)
  mean, var = _stats.finalize(p)
  return p.count, mean, var


def _forward(x, scale, bias, epsilon, mask, renorm, fallback, cfg: _Cfg):
  count, mean, var = _batch_stats(x, mask, cfg)
  norm_mean, var_eps = mean, var + epsilon
  if fallback is not None:
    # A channel with no masked-in value has no batch statistics: normalize it
    # with the running ones, as inference would (flax gives NaN there).
    empty = count == 0
    fb_mean, fb_var = (
      lax.stop_gradient(v.astype(mean.dtype)) for v in fallback
    )
    norm_mean = jnp.where(empty, fb_mean, mean)
    var_eps = jnp.where(empty, fb_var + epsilon, var_eps)
  rstd = lax.rsqrt(var_eps)
  rd = None
  if renorm is not None:
    rd = _renorm_correction(norm_mean, var_eps, *renorm)
    scale, bias = _fold(scale, bias, rd, mean.dtype)
  y = _affine(x, norm_mean, rstd, scale, bias, cfg.lay, cfg.out_dtype)
  return y, mean, var, count, norm_mean, rstd, rd


def _renorm_correction(mean, var_eps, run_mean, run_std, r_max, d_max):
  r"""Batch renorm's r and d (Ioffe 2017, Alg. 1), constants for autodiff."""
  run_std = run_std.astype(mean.dtype)
  r = jnp.clip(jnp.sqrt(var_eps) / run_std, 1 / r_max, r_max)
  d = jnp.clip((mean - run_mean.astype(mean.dtype)) / run_std, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def _fold(scale, bias, rd, f):
  """gamma (xhat r + d) + beta as an affine of xhat: (gamma r, gamma d + beta)."""
  r, d = rd
  g = jnp.ones_like(r) if scale is None else scale.astype(f)
  b = jnp.zeros_like(d) if bias is None else bias.astype(f)
  return g * r, g * d + b


@functools.partial(jax.custom_jvp, nondiff_argnums=(7,))
def _bn_train(x, scale, bias, epsilon, mask, renorm, fallback, cfg):
  y, mean, var, count, _, _, _ = _forward(
    x, scale, bias, epsilon, mask, renorm, fallback, cfg
  )
  return y, mean, var, count


@_bn_train.defjvp
def _bn_train_jvp(cfg, primals, tangents):
  x, scale, bias, epsilon, mask, renorm, fallback = primals
  dx, dscale, dbias, deps = tangents[:4]
  # The statistics take the same path as the undifferentiated forward. The
  # corrected two-pass needs sum(x - K) beside sum((x - K)**2): two
  # reductions with a fused subtraction, which XLA:CPU runs at half the speed
  # of a plain sum. Always running it made the train step 1.03 to 1.13x the
  # previous code's; with the plain-sum pass and the cond, 0.95 to 1.07x. The
  # price is compile time (1.2 to 1.6x flax's against 1.2 to 1.4x).
  y, mean, var, count, norm_mean, rstd, rd = _forward(
    x, scale, bias, epsilon, mask, renorm, fallback, cfg
  )
  if rd is not None:
    # r and d are constants: the tangent is BN's with the folded affine.
    f = mean.dtype
    if dscale is not None:
      dbias = dscale * rd[1] if dbias is None else dbias + dscale * rd[1]
      dscale = dscale * rd[0]
    scale, _ = _fold(scale, bias, rd, f)
  tangent = jax.checkpoint(functools.partial(_tangent, cfg))
  dy = tangent(x, norm_mean, rstd, count, scale, mask, dx, dscale, dbias, deps)
  zeros = (jnp.zeros_like(mean), jnp.zeros_like(var), jnp.zeros_like(count))
  return (y, mean, var, count), (dy,) + zeros


def _tangent(
  cfg: _Cfg, x, mean, rstd, count, scale, mask, dx, dscale, dbias, deps
):
  # Written as dy = (g r) dx + xhat v1 + v2 with per-channel v1, v2, so that
  # JAX's transpose needs only two reductions, sum(ct) and sum(ct * xhat),
  # and every full-size pass fuses (see the module docstring for the maths).
  lay = cfg.lay
  f = _stats.stats_dtype(x.dtype)
  b = lay.broadcast
  # Distinct copies of (mean, rstd) keep CSE from sharing xhat between the
  # reduction and the elementwise pass of the backward, which would write it
  # out as a full-size temporary.
  (mean_a, rstd_a), (mean_b, rstd_b) = lax.optimization_barrier(
    ((mean, rstd), (mean, rstd))
  )
  xhat = (x.astype(f) - b(mean_a)) * b(rstd_a)
  xhat_b = (x.astype(f) - b(mean_b)) * b(rstd_b)
  dxf = dx.astype(f)
  m = None if mask is None else jnp.broadcast_to(mask, x.shape)
  dxm = dxf if m is None else jnp.where(m, dxf, 0.0)
  s1 = jnp.sum(dxm, lay.reduction_axes)
  s2 = jnp.sum(dxm * xhat_b, lay.reduction_axes)
  if cfg.axis_name is not None:
    s1, s2 = _sync.psum_stacked((s1, s2), cfg.axis_name, cfg.groups)
  g = jnp.ones_like(rstd) if scale is None else scale.astype(f)
  gr = g * rstd
  gr_n = gr / jnp.maximum(count, 1.0)
  v1 = -gr_n * s2 - 0.5 * gr * rstd * deps
  if dscale is not None:
    v1 = v1 + dscale.astype(f)
  v2 = -gr_n * s1
  if dbias is not None:
    v2 = v2 + dbias.astype(f)
  if cfg.axis_name is not None:
    v1, v2 = _sync.as_varying(jnp.stack([v1, v2]), cfg.axis_name, like=x)
  dy = b(gr) * dxf + xhat * b(v1) + b(v2)
  return dy.astype(cfg.out_dtype)


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
  x = _checks.check_floating(fn, x)
  lay = _checks.layout(fn, x, axis)
  mean = _checks.check_per_channel(fn, 'mean', mean, lay)
  var = _checks.check_per_channel(fn, 'var', var, lay)
  scale = _checks.check_per_channel(fn, 'scale', scale, lay)
  bias = _checks.check_per_channel(fn, 'bias', bias, lay)
  _checks.check_hyper(fn, 0.0, epsilon)
  f = _stats.stats_dtype(x.dtype)
  rstd = lax.rsqrt(var.astype(f) + epsilon)
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
) -> tuple[Array, Array]:
  """Per-channel mean and biased variance of x, exact and count-weighted.

  Reduces over every axis except ``axis``. With ``mask``, only masked-in
  entries count; a channel with none gets mean 0 and var 0. With
  ``axis_name``, the statistics are those of the global batch over that
  mapped axis (one collective); an unbound name raises JAX's ``NameError``.
  Results are at least float32.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> bnjax.moments(jnp.array([[0.0, 1.0], [2.0, 5.0]]))
    (Array([1., 3.], dtype=float32), Array([1., 4.], dtype=float32))
  """
  fn = 'moments'
  x = _checks.check_floating(fn, x)
  lay = _checks.layout(fn, x, axis)
  mask = _checks.check_mask(fn, mask, x)
  cfg = _Cfg(
    lay,
    axis_name,
    _sync.canonical_groups(fn, axis_name, axis_index_groups),
    True,
    x.dtype,
  )
  _, mean, var = _batch_stats(x, mask, cfg)
  return mean, var


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

  Statistics are within 1e-5 of float64 at |mean|/std from 1e2 to 1e6
  (``benchmarks/numerics.py``), on one device and synced. With
  ``use_fast_variance=True`` (the default) the forward reads x for two plain
  sums and trusts ``E[x^2] - E[x]^2`` only where every channel has
  ``mean**2 <= 8 var``; otherwise a ``lax.cond`` runs the corrected
  two-pass (``bnjax._stats``), whose result does not depend on the order in
  which the backend sums, to first order. ``False`` and masks always take
  the corrected two-pass. Half-precision input is reduced in float32.

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
  x = _checks.check_floating(fn, x)
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
  cfg = _Cfg(lay, axis_name, groups, bool(use_fast_variance), out_dtype)
  fallback = None if mask is None else _running.population_stats(batch_stats)
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
      fn, x, scale, bias, epsilon, mask, cfg, fallback=fallback
    )
  valid = None if mask is None else count > 0
  return y, _running.update(batch_stats, mean, var, momentum, valid)


def train(
  fn, x, scale, bias, epsilon, mask, cfg: _Cfg, renorm=None, fallback=None
):
  """Checked training-mode BN: (y, batch mean, batch var, count).

  ``fallback``: the (mean, var) that channels with no masked-in value are
  normalized with (the running statistics), or None.
  """
  shards = (
    1 if cfg.axis_name is None else _sync.num_shards(cfg.axis_name, cfg.groups)
  )
  _checks.check_training_count(
    fn, x, cfg.lay, cfg.lay.feature_axes, cfg.lay.count * shards
  )
  f = _stats.stats_dtype(x.dtype)
  return _bn_train(
    x, scale, bias, jnp.asarray(epsilon, f), mask, renorm, fallback, cfg
  )


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
  """Frozen BN for fine-tuning: stored statistics, trainable affine.

  Normalizes with the stored (population) statistics whatever the mode, lets
  gradients reach ``scale`` and ``bias`` (and x) but never the statistics,
  and returns the statistics unchanged. This is the usual recipe for
  fine-tuning a pretrained network on small batches (detectron2's
  ``FrozenBatchNorm2d``): batch statistics of a small batch are noisy, and
  updating the running statistics would drift them away from pretraining.

  Example:
    >>> import jax, jax.numpy as jnp, bnjax
    >>> s = bnjax.BatchStats(jnp.array([1.0]), jnp.array([4.0]))
    >>> f = lambda g: bnjax.frozen_batch_norm(jnp.array([[3.0]]), s, g,
    ...                                       epsilon=1e-12)[0].sum()
    >>> jax.grad(f)(jnp.array([1.0]))
    Array([1.], dtype=float32)
  """
  fn = 'frozen_batch_norm'
  x = _checks.check_floating(fn, x)
  lay = _checks.layout(fn, x, axis)
  _checks.check_stats(fn, batch_stats, lay, _running.STATE_TYPES)
  pop = jax.tree.map(lax.stop_gradient, _running.population_stats(batch_stats))
  return normalize(
    x, pop.mean, pop.var, scale, bias, axis=axis, epsilon=epsilon, dtype=dtype
  ), batch_stats
