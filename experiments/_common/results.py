"""Result JSON (config, seeds, every run, versions, commit) and figures."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import numpy as np

# BNJAX_RESULTS redirects the output (the CI smoke test writes to a tmp dir).
RESULTS = pathlib.Path(
  os.environ.get(
    'BNJAX_RESULTS', pathlib.Path(__file__).resolve().parents[1] / 'results'
  )
)


def _commit() -> str:
  """The short commit, with "+dirty" when the code differs from it.

  Results and READMEs, which the runs themselves rewrite, do not count.
  """
  here = pathlib.Path(__file__).parent
  try:
    git = lambda *a: (
      subprocess.run(
        ['git', *a], capture_output=True, text=True, cwd=here, timeout=10
      ).stdout
    )
    head = git('rev-parse', '--short', 'HEAD').strip() or 'unknown'
    changed = [
      line[3:]
      for line in git(
        'status', '--porcelain', '--untracked-files=no'
      ).splitlines()
    ]
    dirty = any(
      not (f.startswith('experiments/results/') or f.endswith('.md'))
      for f in changed
    )
    return head + ('+dirty' if dirty else '')
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def _plain(v):
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, '__array__'):
    a = np.asarray(v)
    return _plain(a.item() if a.ndim == 0 else a.tolist())
  if isinstance(v, float) and not np.isfinite(v):
    return None  # strict JSON has no NaN: a diverged run's value is null
  return v


def save(
  name: str,
  quick: bool,
  config: dict,
  seeds,
  runs: dict,
  summary: dict,
  fig=None,
) -> pathlib.Path:
  """Writes results/<name>[_quick].json (and .png); returns the JSON path."""
  import jax

  RESULTS.mkdir(exist_ok=True)
  stem = name + ('_quick' if quick else '')
  out = dict(
    experiment=name,
    quick=quick,
    config=config,
    seeds=list(seeds),
    summary=summary,
    runs=runs,
    jax=jax.__version__,
    commit=_commit(),
  )
  path = RESULTS / f'{stem}.json'
  path.write_text(json.dumps(_plain(out), indent=1, allow_nan=False))
  if fig is not None:
    check_axes_hold_data(fig, name)
    fig.savefig(RESULTS / f'{stem}.png', dpi=110, bbox_inches='tight')
    import matplotlib.pyplot as plt

    plt.close(fig)
  return path


def check_axes_hold_data(fig, name: str = '') -> None:
  """Raises if any plotted line has finite points outside its axes' limits.

  A fixed ylim once hid experiment 1's whole no-BN curve; every figure goes
  through this before it is written.
  """
  from matplotlib.collections import PathCollection
  from matplotlib.patches import Rectangle

  for ax in fig.get_axes():
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    marks = [
      (line.get_label(), line.get_xdata(), line.get_ydata())
      for line in ax.get_lines()
    ]
    marks += [
      (c.get_label(), *np.asarray(c.get_offsets(), float).T)
      for c in ax.collections
      if isinstance(c, PathCollection) and len(c.get_offsets())
    ]
    marks += [
      (
        p.get_label(),
        [p.get_x() + p.get_width() / 2],
        [p.get_y() + p.get_height()],
      )  # a bar's top
      for p in ax.patches
      if isinstance(p, Rectangle)
    ]
    for label, x, y in marks:
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      ok = np.isfinite(x) & np.isfinite(y)
      inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
      if np.any(ok & ~inside):
        raise ValueError(
          f'{name}: {label!r} in the axes {ax.get_title()!r} has points '
          f'outside its limits x [{x0:g}, {x1:g}], y [{y0:g}, {y1:g}] '
          f'(data y in [{np.nanmin(y):g}, {np.nanmax(y):g}]); choose the '
          'limits from the data'
        )


def mean_std(a) -> str:
  a = np.asarray(a, np.float64)
  return f'{a.mean():.4f} ± {a.std():.4f} (n={a.size})'
