"""Experiment 3: BN makes training insensitive to the initialization scale.

Claim: multiplying every initial weight matrix by a factor from 0.01 to 100
wrecks training without BN but barely changes the final accuracy with BN,
since BN undoes the scale of its input.
Source: Ioffe & Szegedy 2015,
Sec. 3.3 ("BN ... makes training more resilient to the parameter scale").
Setup: exp 1's sigmoid MLP on MNIST 5k, plain SGD at lr 0.5, batch 60;
scales fixed in advance.
Criterion: across scales, the spread (max - min) of
the mean final accuracy is below 0.05 with BN and above 0.2 without.
Command: ``python -m experiments run init [--quick]``.
Time on 2 CPU cores (measured): quick about 20 s, full about 2 minutes.
"""

from __future__ import annotations

import numpy as np

from experiments._common import data, plots, results, train
from experiments._common.claims import Claim, mean
from experiments._common.models import MLP

NAME = 'init'
SCALES = [0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0]
LR = 0.5


CLAIMS = (
  Claim(
    'BN is insensitive to the initialization scale',
    'Ioffe & Szegedy 2015, Sec. 3.3',
    'holds',
    lambda s: (
      'spread (max - min) of the mean final accuracy over scales '
      f'0.01 to 100: {s["spread[BN]"]:.3f} with BN (criterion < 0.05), '
      f'{s["spread[no BN]"]:.3f} without (criterion > 0.2); with BN '
      f'{mean(s["final_acc[BN, x1.0]"])} at x1 and '
      f'{mean(s["final_acc[BN, x100.0]"])} at x100'
    ),
  ),
)


def run(quick: bool, seeds):
  steps, every = (200, 200) if quick else (3000, 500)
  scales = [0.01, 1.0, 100.0] if quick else SCALES
  out, summary = {}, {}
  for name, norm in (('no BN', 'none'), ('BN', 'bn')):
    setup = train.Setup(
      MLP(norm=norm), data.mnist(), steps=steps, batch=60, eval_every=every
    )
    r = train.run(
      setup, seeds, [LR] * len(scales), init_scales=scales, desc=name
    )
    final = np.nan_to_num(r['test_acc'][:, :, -1])  # (scale, seed)
    out[name] = dict(final_test_acc=final)
    for s, f in zip(scales, final, strict=True):
      summary[f'final_acc[{name}, x{s}]'] = results.mean_std(f)
    m = final.mean(1)
    summary[f'spread[{name}]'] = float(m.max() - m.min())
  summary['holds'] = bool(
    summary['spread[BN]'] < 0.05 < 0.2 < summary['spread[no BN]']
  )
  config = dict(steps=steps, batch=60, lr=LR, scales=scales)
  return results.save(
    NAME, quick, config, seeds, out, summary, _figure(out, scales)
  ), summary


def _figure(out, scales):
  series = {n: r['final_test_acc'] for n, r in out.items()}
  return plots.errorbars(
    scales,
    series,
    xlabel='initial weight scale (x LeCun normal)',
    ylabel='final test accuracy',
    title='Initialization sensitivity',
  )[0]
