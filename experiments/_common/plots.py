"""The two figure shapes the experiments share (matplotlib, Agg backend)."""

from __future__ import annotations

import numpy as np


def _plt():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def errorbars(
  xs,
  series: dict,
  *,
  xlabel: str,
  ylabel: str,
  title: str,
  xscale: str = 'log',
  scale: float = 1.0,
):
  """One line per series; each value is an (len(xs), seeds) array."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, a in series.items():
    a = scale * np.asarray(a)
    ax.errorbar(xs, a.mean(1), a.std(1), marker='o', label=name, capsize=3)
  ax.set(xscale=xscale, xlabel=xlabel, ylabel=ylabel, title=title)
  ax.legend()
  return fig, ax


def bars(groups, series: dict, *, ylabel: str, title: str, scale: float = 1.0):
  """Grouped bars; series maps a name to one (seeds,) array per group."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  w = 0.8 / len(series)
  for i, (name, vals) in enumerate(series.items()):
    ax.bar(
      np.arange(len(groups)) + i * w,
      [scale * np.mean(v) for v in vals],
      w,
      yerr=[scale * np.std(v) for v in vals],
      label=name,
      capsize=3,
    )
  ax.set_xticks(
    np.arange(len(groups)) + w * (len(series) - 1) / 2, list(groups)
  )
  ax.set(ylabel=ylabel, title=title)
  ax.legend()
  return fig, ax
