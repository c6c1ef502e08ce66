r"""Training-mode BN: the forward and its custom JVP.

Training-mode BN is one ``jax.custom_jvp`` whose tangent rule is linear in the
tangents, so JAX gets reverse mode by transposing it and forward mode for
free (``jax.jvp``, ``jacfwd``, ``hessian``). The rule is wrapped in
``jax.checkpoint`` so that reverse mode saves only ``x`` (in its own dtype)
and per-channel vectors, and recomputes ``x_hat`` inside the fused backward
passes: one full-size residual per call, where flax keeps two. The
statistics come from the engine (``bnjax._moments``).

With :math:`\hat x = (x - \mu) r`, :math:`r = (\sigma^2 + \epsilon)^{-1/2}`
and :math:`\langle\cdot\rangle` the mean over the (global, unmasked) batch,

.. math::
  d\hat x = r\,(dx - \langle dx\rangle - \hat x \langle \hat x\, dx\rangle)
            - \tfrac12 \hat x\, r^2\, d\epsilon, \qquad
  dy = \gamma\, d\hat x + \hat x\, d\gamma + d\beta .

A variant may fold a per-channel correction into the affine (a
:class:`Correction`, whose rule is ``Cfg.correction``): batch renorm's
:math:`\gamma (\hat x r + d) + \beta` is the affine
:math:`(\gamma r, \gamma d + \beta)` of :math:`\hat x`, with r and d
constants for autodiff.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from bnjax import _moments
from bnjax._types import Layout

Array = jax.Array


class Correction(NamedTuple):
  r"""A variant of training BN as a value (as optax passes a transformation
  as a named pair of pure functions, ``GradientTransformation``): a
  per-channel correction of the affine, :math:`\gamma (\hat x r + d) +
  \beta`.

  Attributes:
    state_type: the running-statistics type the variant runs on.
    rule: ``(mean, var + eps, state, *args) -> (r, d)``, per channel, taken
      as constants for autodiff.
    args: the rule's other (checked, possibly traced) arguments.
  """

  state_type: type
  rule: Callable[..., tuple[Array, Array]]
  args: tuple[Array, ...] = ()


@dataclasses.dataclass(frozen=True)
class Cfg:
  """Static settings of one training-mode call (hashable: a nondiff arg)."""

  lay: Layout
  sync: _moments.Sync
  fast: bool
  out_dtype: Any
  # A Correction's rule, or None.
  correction: Callable[..., tuple[Array, Array]] | None = None
  # An invertible activation applied to the output (bnjax._act), or None.
  act: Any = None


def affine(x, mean, rstd, scale, bias, lay: Layout, out_dtype, act=None):
  """``act((x - mean) * rstd * scale + bias)`` in at least float32 (no
  activation where ``act`` is None)."""
  f = _moments.stats_dtype(x.dtype)
  mul = rstd if scale is None else rstd * scale.astype(f)
  # (x - mean) * mul, not x * mul - mean * mul: the latter cancels
  # catastrophically when |mean| >> std.
  y = (x.astype(f) - lay.broadcast(mean.astype(f))) * lay.broadcast(mul)
  if bias is not None:
    y = y + lay.broadcast(bias.astype(f))
  if act is not None:
    y = act(y)
  return y.astype(out_dtype)


def _safe(x, mask, mean, lay: Layout):
  """x with every non-finite masked-out value replaced by the mean: a
  masked-out NaN then reaches neither the output's other entries nor any
  gradient (finite masked-out values are normalized, as flax does)."""
  if mask is None:
    return x
  m = jnp.broadcast_to(mask, x.shape) | jnp.isfinite(x)
  return jnp.where(m, x, lay.broadcast(mean).astype(x.dtype))


def _forward(x, scale, bias, epsilon, mask, fix, fallback, cfg: Cfg):
  count, mean, var, lo = _moments.batch_moments(
    x, cfg.lay, mask, fast=cfg.fast, sync=cfg.sync
  )
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
  folded = None
  if cfg.correction is not None:
    r, d = cfg.correction(norm_mean, var_eps, *fix)
    folded = (lax.stop_gradient(r), lax.stop_gradient(d))
    scale, bias = fold_affine(scale, bias, folded, mean.dtype)
  x = _safe(x, mask, norm_mean, cfg.lay)
  y = affine(x, norm_mean, rstd, scale, bias, cfg.lay, cfg.out_dtype, cfg.act)
  return y, (mean, var, count, lo), norm_mean, rstd, folded


def fold_affine(scale, bias, rd, f):
  """gamma (xhat r + d) + beta as an affine of xhat: (gamma r, gamma d + beta)."""
  r, d = rd
  g = jnp.ones_like(r) if scale is None else scale.astype(f)
  b = jnp.zeros_like(d) if bias is None else bias.astype(f)
  return g * r, g * d + b


@functools.partial(jax.custom_jvp, nondiff_argnums=(7,))
def _bn_train(x, scale, bias, epsilon, mask, fix, fallback, cfg):
  y, stats, _, _, _ = _forward(
    x, scale, bias, epsilon, mask, fix, fallback, cfg
  )
  return y, *stats


@_bn_train.defjvp
def _bn_train_jvp(cfg, primals, tangents):
  x, scale, bias, epsilon, mask, fix, fallback = primals
  dx, dscale, dbias, deps = tangents[:4]
  y, stats, norm_mean, rstd, folded = _forward(
    x, scale, bias, epsilon, mask, fix, fallback, cfg
  )
  count = stats[2]
  if folded is not None:
    # r and d are constants: the tangent is BN's with the folded affine.
    if dscale is not None:
      dbias = (
        dscale * folded[1] if dbias is None else dbias + dscale * folded[1]
      )
      dscale = dscale * folded[0]
    scale, _ = fold_affine(scale, bias, folded, norm_mean.dtype)
  x = _safe(x, mask, norm_mean, cfg.lay)
  tangent = jax.checkpoint(functools.partial(_tangent_jit, cfg))
  dy = tangent(x, norm_mean, rstd, count, scale, mask, dx, dscale, dbias, deps)
  zeros = tuple(jnp.zeros_like(s) for s in stats)
  return (y, *stats), (dy, *zeros)


def _tangent(
  cfg: Cfg, x, mean, rstd, count, scale, mask, dx, dscale, dbias, deps
):
  # Written as dy = (g r) dx + xhat v1 + v2 with per-channel v1, v2, so that
  # JAX's transpose needs only two reductions, sum(ct) and sum(ct * xhat),
  # and every full-size pass fuses (see the module docstring for the maths).
  lay = cfg.lay
  f = _moments.stats_dtype(x.dtype)
  b = lay.broadcast
  xhat, xhat_b = _moments.on_platform(
    lambda: _xhat_pair_cpu(x, mean, rstd, lay, f),
    lambda: (_xhat(x, mean, rstd, lay, f),) * 2,
  )
  dxf = dx.astype(f)
  m = None if mask is None else jnp.broadcast_to(mask, x.shape)
  dxm = dxf if m is None else jnp.where(m, dxf, 0.0)
  s1 = jnp.sum(dxm, lay.reduction_axes)
  # d var / 2 = <Re(conj(x - mean) dx)>: for real x just <(x - mean) dx>.
  s2 = jnp.sum(jnp.real(jnp.conj(xhat_b) * dxm), lay.reduction_axes)
  sync = cfg.sync
  if sync.axis_name is not None:
    s1, s2 = _moments.psum_stacked(
      (s1, s2), sync.axis_name, sync.groups, sync.fn
    )
  g = jnp.ones_like(rstd) if scale is None else scale.astype(f)
  gr = g * rstd
  gr_n = gr / _count(cfg, mask, count)
  v1 = -gr_n * s2 - 0.5 * gr * rstd * deps
  if dscale is not None:
    v1 = v1 + dscale.astype(f)
  v2 = -gr_n * s1
  if dbias is not None:
    v2 = v2 + dbias.astype(f)
  if sync.axis_name is not None:
    v1, v2 = _moments.as_varying_stacked((v1, v2), sync.axis_name, like=x)
  elif jnp.iscomplexobj(v2):
    v1 = v1.astype(v2.dtype)
  dy = b(gr) * dxf + xhat * b(v1) + b(v2)
  return dy.astype(cfg.out_dtype)


# Jitted: traced once per (cfg, shapes) and shared by every layer with them
# (cheaper tracing and partial evaluation under autodiff; XLA inlines it).
_tangent_jit = jax.jit(_tangent, static_argnums=0)


def _count(cfg: Cfg, mask, count):
  """The global count, at least 1: without a mask the layout's times the
  shards', a constant XLA folds (the traced one has passed the
  checkpoint's barrier and costs a kernel of its own)."""
  shards: int | None = 1
  if cfg.sync.axis_name is not None:
    shards = _moments.uniform_shards(cfg.sync.axis_name, cfg.sync.groups)
  if mask is None and shards is not None:
    return max(cfg.lay.count * shards, 1)
  return jnp.maximum(count, 1.0)


def _xhat(x, mean, rstd, lay: Layout, f):
  return (x.astype(f) - lay.broadcast(mean)) * lay.broadcast(rstd)


def _xhat_pair_cpu(x, mean, rstd, lay: Layout, f):
  # XLA:CPU: distinct copies of (mean, rstd) keep CSE from sharing xhat
  # between the reduction and the elementwise pass of the backward, which
  # would write it out as a full-size temporary.
  (mean_a, rstd_a), (mean_b, rstd_b) = lax.optimization_barrier(
    ((mean, rstd), (mean, rstd))
  )
  return _xhat(x, mean_a, rstd_a, lay, f), _xhat(x, mean_b, rstd_b, lay, f)


def train(
  x,
  scale,
  bias,
  epsilon,
  mask,
  cfg: Cfg,
  fix=(),
  fallback=None,
):
  """Training-mode BN: (y, batch mean, batch var, count, mean_lo).

  ``fix``: what ``cfg.correction`` takes after (mean, var + eps): the
  running state and the :class:`Correction`'s args.
  ``fallback``: the (mean, var) that channels with no masked-in value are
  normalized with (the running statistics), or None.
  """
  f = _moments.real_dtype(_moments.stats_dtype(x.dtype))
  epsilon = jnp.asarray(epsilon, f)
  if cfg.act is not None:
    return _bn_act_train(x, scale, bias, epsilon, mask, fallback, cfg, x.dtype)
  return _bn_train(x, scale, bias, epsilon, mask, fix, fallback, cfg)


# The name of the one full-size residual of BN + activation (its output), for
# jax.checkpoint policies: ``save_only_these_names(SAVED_OUTPUT)``.
SAVED_OUTPUT = 'bnjax_bn_act_output'


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _bn_act_train(x, scale, bias, epsilon, mask, fallback, cfg, dt):
  y, stats, _, _, _ = _forward(x, scale, bias, epsilon, mask, (), fallback, cfg)
  return y, *stats


def _bn_act_fwd(x, scale, bias, epsilon, mask, fallback, cfg, dt):
  # InPlace-ABN (Rota Bulo et al. 2018): the residual is the output y and
  # per-channel vectors; x is not kept, the backward recovers x_hat from y.
  y, stats, _, rstd, _ = _forward(
    x, scale, bias, epsilon, mask, (), fallback, cfg
  )
  y = checkpoint_name(y, SAVED_OUTPUT)
  res = (y, scale, bias, epsilon, rstd, stats[2], mask, fallback)
  return (y, *stats), res


def _bn_act_bwd(cfg: Cfg, dt, res, cts):
  # BN's backward (the transpose of _tangent, the same maths), on x_hat
  # recovered from y. Written out rather than transposed by JAX: a custom_vjp
  # backward under vmap may not trace a collective inside a nested jax.vjp.
  y, scale, bias, epsilon, rstd, count, mask, fallback = res
  f = _moments.stats_dtype(dt)
  lay, act, sync, b = cfg.lay, cfg.act, cfg.sync, cfg.lay.broadcast
  yf = y.astype(f)
  dz = cts[0].astype(f) * act.slope(yf)
  g = jnp.ones_like(rstd) if scale is None else scale.astype(f)
  beta = jnp.zeros_like(rstd) if bias is None else bias.astype(f)
  # On the CPU, y + 0 * dz: the value of y, but computed from the cotangent,
  # so that XLA:CPU cannot hoist the inverse, a function of y alone, into the
  # forward, where it would live as a full-size temporary until the backward
  # reaches this layer (XLA:CPU's reduction fusions do not take it in).
  tied = _moments.on_platform(lambda: yf + 0 * dz, lambda: yf)
  xhat = _xhat(act.inverse(tied), beta, 1 / g, lay, f)
  local = (
    jnp.sum(dz * xhat, lay.reduction_axes),
    jnp.sum(dz, lay.reduction_axes),
  )
  total = local
  if sync.axis_name is not None:
    total = _moments.psum_stacked(local, sync.axis_name, sync.groups, sync.fn)
  gr = g * rstd
  # The traced count when synced: a custom_vjp backward under vmap has no
  # bound axis to size (lax.axis_size raises there).
  if mask is None and sync.axis_name is None:
    gr_n = gr / max(lay.count, 1)
  else:
    gr_n = gr / jnp.maximum(count, 1.0)
  m = 1.0 if mask is None else jnp.broadcast_to(mask, y.shape).astype(f)
  dx = b(gr) * dz - m * (xhat * b(gr_n * total[0]) + b(gr_n * total[1]))
  ct = functools.partial(_per_channel, sync=sync, like=y)
  dg = ct(rstd if scale is None else scale, local[0], total[0])
  db = ct(rstd if bias is None else bias, local[1], total[1])
  deps = ct(
    epsilon, *(jnp.sum(-0.5 * gr * rstd * t[0]) for t in (local, total))
  ).astype(epsilon.dtype)
  zero = functools.partial(jax.tree.map, jnp.zeros_like)
  return (
    dx.astype(dt),
    None if scale is None else dg.astype(scale.dtype),
    None if bias is None else db.astype(bias.dtype),
    deps,
    None,
    zero(fallback),
  )


def _per_channel(v, local, total, sync, like):
  """A per-channel cotangent: the global sum where shard_map types the
  per-channel input as replicated (batch_norm's backward psums it there, the
  transpose of its varying cast), else the shard's own (pmap, vmap,
  check_vma=False: the caller sums, as with batch_norm)."""
  if sync.axis_name is None:
    return local
  cast = _moments.as_varying(v, sync.axis_name, like=like) is not v
  return total if cast else local


_bn_act_train.defvjp(_bn_act_fwd, _bn_act_bwd)
