"""Shared test helpers."""

from __future__ import annotations

import numpy as np


def randn(shape, dtype=np.float32, loc=0.0, scale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def tol(dtype):
  """(rtol, atol) on normalized outputs for inputs of this dtype."""
  name = np.dtype(dtype).name
  return {'float64': (1e-10, 1e-10), 'float32': (2e-5, 2e-5),
          'bfloat16': (2e-2, 2e-2), 'float16': (2e-3, 2e-3)}[name]


def full_size_residuals(fn, *args):
  """Full-size residuals (arrays the shape of args[0]) kept for the backward."""
  from jax._src.ad_checkpoint import saved_residuals
  shape = np.shape(args[0])
  res = saved_residuals(fn, *args)
  return [(aval, why) for aval, why in res if tuple(aval.shape) == shape]
