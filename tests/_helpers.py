"""Shared test helpers."""

from __future__ import annotations

import numpy as np
import pytest

from bnjax._moments import forced_path

# BNJAX_STATS_PATH=accelerator runs the GPU/TPU statistics on the CPU. The
# CPU path evaluates flax's own formulas (bit for bit on ordinary input); the
# accelerator path is exact, so against flax it differs by flax's own float32
# rounding (measured: at most 5 ulps on these tests' inputs).
ACCELERATOR_PATH = forced_path() == 'accelerator'
FLAX_ULPS = 16 if ACCELERATOR_PATH else 4
cpu_path_only = pytest.mark.skipif(
  ACCELERATOR_PATH,
  reason='a property of the CPU path (flax formulas, bit for bit)',
)


def randn(shape, dtype=np.float32, loc=0.0, scale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def tol(dtype):
  """(rtol, atol) on normalized outputs for inputs of this dtype.

  Half-precision input is reduced and normalized in float32 and the output
  rounded once to the input's dtype: at most half an ulp, 2**-9 (bfloat16)
  or 2**-12 (float16) relative, against the float64 oracle on the same
  (half-precision) values. rtol allows one ulp; atol is float32's, for the
  float32 arithmetic before the rounding (outputs near 0).
  """
  name = np.dtype(dtype).name
  return {
    'float64': (1e-10, 1e-10),
    'float32': (2e-5, 2e-5),
    'bfloat16': (2.0**-8, 2e-5),
    'float16': (2.0**-11, 2e-5),
  }[name]


def full_size_residuals(fn, *args):
  """Full-size residuals (arrays the shape of args[0]) kept for the backward."""
  from jax._src.ad_checkpoint import saved_residuals

  shape = np.shape(args[0])
  res = saved_residuals(fn, *args)
  return [(aval, why) for aval, why in res if tuple(aval.shape) == shape]


def pairwise(*axes):
  """Cases covering every value of every axis and every pair of values of
  any two axes (not the full product): greedy, deterministic.

  Where a test's axes interact at most two at a time (a dtype and a layout,
  a mask and a dtype), this keeps what the product would test at a fraction
  of the cases: 5 axes of sizes (3, 2, 2, 3, 2) give 72 cases as a product
  and about 10 pairwise.
  """
  import itertools

  n = len(axes)
  todo = {
    (i, a, j, b)
    for i, j in itertools.combinations(range(n), 2)
    for a in range(len(axes[i]))
    for b in range(len(axes[j]))
  }
  cases = []
  while todo:
    best, best_gain = None, -1
    for case in itertools.product(*(range(len(a)) for a in axes)):
      gain = sum(
        (i, case[i], j, case[j]) in todo
        for i, j in itertools.combinations(range(n), 2)
      )
      if gain > best_gain:
        best, best_gain = case, gain
    cases.append(tuple(axes[i][k] for i, k in enumerate(best)))
    todo -= {
      (i, best[i], j, best[j]) for i, j in itertools.combinations(range(n), 2)
    }
  return cases


def import_torch():
  """PyTorch, or a skip that says how to install it (it is optional)."""
  return pytest.importorskip(
    'torch',
    reason='the torch extra is not installed: pip install -e ".[torch]"',
  )


def aligned(a, alignment=64):
  """A copy of ``a`` whose buffer starts at a multiple of ``alignment``
  bytes: what XLA:CPU may alias instead of copying (``jnp.asarray``)."""
  a = np.asarray(a)
  buf = np.empty(a.nbytes + alignment, np.uint8)
  start = -buf.ctypes.data % alignment
  out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
  out[...] = a
  return out
