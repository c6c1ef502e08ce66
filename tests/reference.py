"""A plain NumPy float64 implementation of batch normalization: the oracle."""

from __future__ import annotations

import numpy as np


def canonical_axes(ndim, axis):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  feat = tuple(sorted(a % ndim for a in axes))
  red = tuple(i for i in range(ndim) if i not in feat)
  return feat, red


def _f64(v):
  """float64, or complex128 for complex input."""
  return np.asarray(v, np.complex128 if np.iscomplexobj(v) else np.float64)


def expand(v, red):
  return np.expand_dims(_f64(v), red)


def moments(x, axis=-1, mask=None):
  """Per-channel mean and biased variance E|x - mean|^2 (real) over the
  non-feature axes."""
  x = _f64(x)
  _, red = canonical_axes(x.ndim, axis)
  m = (
    np.ones(x.shape, bool)
    if mask is None
    else np.broadcast_to(np.asarray(mask, bool), x.shape)
  )
  n = m.sum(red)
  safe = np.maximum(n, 1)
  mean = np.where(m, x, 0).sum(red) / safe
  d = np.where(m, x - np.expand_dims(mean, red), 0)
  var = (np.abs(d) ** 2).sum(red) / safe
  return mean, var, n


def normalize(x, mean, var, scale=None, bias=None, axis=-1, epsilon=1e-5):
  x = _f64(x)
  _, red = canonical_axes(x.ndim, axis)
  y = (x - expand(mean, red)) / np.sqrt(expand(var, red) + epsilon)
  if scale is not None:
    y = y * expand(scale, red)
  if bias is not None:
    y = y + expand(bias, red)
  return y


def batch_norm(
  x,
  mean,
  var,
  scale=None,
  bias=None,
  *,
  use_running_average,
  axis=-1,
  momentum=0.99,
  epsilon=1e-5,
  mask=None,
):
  """Returns (y, new_mean, new_var) in float64, Flax's conventions."""
  if use_running_average:
    return normalize(x, mean, var, scale, bias, axis, epsilon), mean, var
  bm, bv, n = moments(x, axis, mask)
  old_m = _f64(mean)
  old_v = _f64(var)
  valid = n > 0
  # A channel with no masked-in value is normalized with the running stats.
  y = normalize(
    x,
    np.where(valid, bm, old_m),
    np.where(valid, bv, old_v),
    scale,
    bias,
    axis,
    epsilon,
  )
  new_m = momentum * old_m + (1 - momentum) * bm
  new_v = momentum * old_v + (1 - momentum) * bv
  return y, np.where(valid, new_m, old_m), np.where(valid, new_v, old_v)


def batch_renorm(
  x,
  mean,
  std,
  scale=None,
  bias=None,
  *,
  use_running_average,
  r_max,
  d_max,
  axis=-1,
  momentum=0.99,
  epsilon=1e-5,
):
  """Ioffe 2017, Algorithm 1, in float64: (y, new_mean, new_std)."""
  x = np.asarray(x, np.float64)
  _, red = canonical_axes(x.ndim, axis)
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  if use_running_average:
    y = (x - expand(mean, red)) / expand(std, red)
  else:
    bm, bv, _ = moments(x, axis)
    sb = np.sqrt(bv + epsilon)
    r = np.clip(sb / std, 1 / r_max, r_max)
    d = np.clip((bm - mean) / std, -d_max, d_max)
    y = (x - expand(bm, red)) / expand(sb, red) * expand(r, red) + expand(
      d, red
    )
    mean = momentum * mean + (1 - momentum) * bm
    std = momentum * std + (1 - momentum) * sb
  if scale is not None:
    y = y * expand(scale, red)
  if bias is not None:
    y = y + expand(bias, red)
  return y, mean, std


def ghost_batch_norm(
  x,
  mean,
  var,
  scale=None,
  bias=None,
  *,
  virtual_batch_size,
  axis=-1,
  momentum=0.99,
  epsilon=1e-5,
):
  """Chunks of axis 0 normalized separately; running stats get their mean."""
  x = np.asarray(x, np.float64)
  chunks = np.split(x, x.shape[0] // virtual_batch_size)
  ys, ms, vs = [], [], []
  for c in chunks:
    bm, bv, _ = moments(c, axis)
    ys.append(normalize(c, bm, bv, scale, bias, axis, epsilon))
    ms.append(bm)
    vs.append(bv)
  new_m = momentum * np.asarray(mean, np.float64) + (1 - momentum) * np.mean(
    ms, 0
  )
  new_v = momentum * np.asarray(var, np.float64) + (1 - momentum) * np.mean(
    vs, 0
  )
  return np.concatenate(ys), new_m, new_v


def cumulative_update(mean, var, count, bm, bv):
  """PyTorch's momentum=None: the plain average of all batch statistics."""
  t = count + 1
  return mean + (bm - mean) / t, var + (bv - var) / t, t


def debiased_update(hm, hv, w, bm, bv, momentum):
  """Haiku's EMA from zero, and its weight 1 - momentum**t."""
  k = momentum
  return k * hm + (1 - k) * bm, k * hv + (1 - k) * bv, k * w + (1 - k)


def jax_batch_norm_f64(
  x, mean, var, scale, bias, *, mask=None, momentum=0.99, epsilon=1e-5
):
  """The textbook formulas in float64 jax.numpy, for gradients: no bnjax.

  Features on the last axis. Returns (y, (new_mean, new_var)); call it under
  float64 (``jax.enable_x64``) and differentiate it with ``jax.grad``. A
  channel with no masked-in value is normalized with the running stats.
  """
  import jax
  import jax.numpy as jnp

  f = jnp.float64
  x, mean, var = (jnp.asarray(v, f) for v in (x, mean, var))
  red = tuple(range(x.ndim - 1))
  m = (
    jnp.ones(x.shape, bool)
    if mask is None
    else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
  )
  n = jnp.sum(m, red)
  safe = jnp.maximum(n, 1)
  bm = jnp.sum(jnp.where(m, x, 0), red) / safe
  bv = jnp.sum(jnp.where(m, (x - bm) ** 2, 0), red) / safe
  valid = n > 0
  use_m, use_v = jnp.where(valid, bm, mean), jnp.where(valid, bv, var)
  y = (x - use_m) / jnp.sqrt(use_v + epsilon)
  y = y * jnp.asarray(scale, f) + jnp.asarray(bias, f)
  sg = jax.lax.stop_gradient
  new_m = jnp.where(valid, momentum * mean + (1 - momentum) * sg(bm), mean)
  new_v = jnp.where(valid, momentum * var + (1 - momentum) * sg(bv), var)
  return y, (new_m, new_v)
