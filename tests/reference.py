"""A plain NumPy float64 implementation of batch normalization: the oracle."""

from __future__ import annotations

import numpy as np


def canonical_axes(ndim, axis):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  feat = tuple(sorted(a % ndim for a in axes))
  red = tuple(i for i in range(ndim) if i not in feat)
  return feat, red


def expand(v, red):
  return np.expand_dims(np.asarray(v, np.float64), red)


def moments(x, axis=-1, mask=None):
  """Per-channel mean and biased variance over the non-feature axes."""
  x = np.asarray(x, np.float64)
  _, red = canonical_axes(x.ndim, axis)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(
      np.asarray(mask, bool), x.shape)
  n = m.sum(red)
  safe = np.maximum(n, 1)
  mean = np.where(m, x, 0).sum(red) / safe
  d = np.where(m, x - np.expand_dims(mean, red), 0)
  var = (d * d).sum(red) / safe
  return mean, var, n


def normalize(x, mean, var, scale=None, bias=None, axis=-1, epsilon=1e-5):
  x = np.asarray(x, np.float64)
  _, red = canonical_axes(x.ndim, axis)
  y = (x - expand(mean, red)) / np.sqrt(expand(var, red) + epsilon)
  if scale is not None:
    y = y * expand(scale, red)
  if bias is not None:
    y = y + expand(bias, red)
  return y


def batch_norm(x, mean, var, scale=None, bias=None, *, use_running_average,
               axis=-1, momentum=0.99, epsilon=1e-5, mask=None):
  """Returns (y, new_mean, new_var) in float64, Flax's conventions."""
  if use_running_average:
    return normalize(x, mean, var, scale, bias, axis, epsilon), mean, var
  bm, bv, n = moments(x, axis, mask)
  y = normalize(x, bm, bv, scale, bias, axis, epsilon)
  old_m = np.asarray(mean, np.float64)
  old_v = np.asarray(var, np.float64)
  new_m = momentum * old_m + (1 - momentum) * bm
  new_v = momentum * old_v + (1 - momentum) * bv
  valid = n > 0
  return y, np.where(valid, new_m, old_m), np.where(valid, new_v, old_v)
