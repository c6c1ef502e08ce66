"""Experiment 4: BN degrades at small batches; GN, LN and IN do not.

Claim: BN's error grows as the per-device batch falls from 32 to 2 (Wu & He:
ResNet-50 ImageNet error 23.6% at 32 to 34.7% at 2), while GroupNorm stays
flat (about 24.1%).
Source: Wu & He 2018, Table 2 and Fig. 1.
Setup: a 3-layer 1-D CNN (32 channels) on MNIST-1D (4000/1000), batch
{32, 16, 8, 4, 2}, SGD with momentum 0.9, lr = 0.05 x N/32 (the linear
scaling rule, as in the paper), the same number of epochs for every batch.
Norms: BN, GN (8 groups), LN, IN (flax), batch renorm (r_max 3, d_max 5, no
warm-up schedule) and ghost BN (virtual batch 8, i.e. BN at N <= 8).
Criterion: BN's error at N = 2 exceeds its error at N = 32 by more than 5
points, and GN's changes by less than 3.
Command: ``python -m experiments run batch_size [--quick]``.
Time on 2 CPU cores (measured): quick about 35 s, full about 7.5 minutes.
"""

from __future__ import annotations

import functools

import numpy as np
import optax

from experiments._common import data, plots, results, train
from experiments._common.models import CNN1D

NAME = 'batch_size'
BATCHES = [32, 16, 8, 4, 2]
NORMS = {'BN': ('bn', ()), 'GN': ('gn', ()), 'LN': ('ln', ()),
         'IN': ('in', ()), 'renorm': ('renorm', (('r_max', 3.0),
                                                 ('d_max', 5.0))),
         'ghost BN': ('ghost', ())}
BASE_LR = 0.05


def error_by_batch(norms, batches, epochs, seeds, axis_name=None):
  """{norm: (batch, seed) test error}, plus the configs."""
  out = {}
  d = data.mnist1d()
  n_train = len(d[0][1])
  for name in norms:
    kind, kw = NORMS[name]
    errs = []
    for b in batches:
      kw_b = kw + ((('virtual_batch_size', min(b, 8)),) if kind == 'ghost'
                   else ())
      steps = int(epochs * n_train) // b
      setup = train.Setup(
          CNN1D(norm=kind, norm_kw=kw_b), d, steps=steps, batch=b,
          eval_every=steps,
          optimizer=functools.partial(optax.sgd, momentum=0.9))
      r = train.run(setup, seeds, [BASE_LR * b / 32], desc=f'{name} N={b}')
      errs.append(1 - np.nan_to_num(r['test_acc'][0, :, -1]))
    out[name] = np.stack(errs)
  return out


def run(quick: bool, seeds):
  norms = ['BN', 'GN'] if quick else list(NORMS)
  batches = [32, 8] if quick else BATCHES
  epochs = 0.25 if quick else 6
  out = error_by_batch(norms, batches, epochs, seeds)
  summary = {f'error[{n}, N={b}]': results.mean_std(e)
             for n, es in out.items() for b, e in zip(batches, es)}
  bn, gn = out['BN'].mean(1), out['GN'].mean(1)
  summary['bn_increase_points'] = float(100 * (bn[-1] - bn[0]))
  summary['gn_change_points'] = float(100 * abs(gn[-1] - gn[0]))
  summary['holds'] = bool(summary['bn_increase_points'] > 5 and
                          summary['gn_change_points'] < 3)
  config = dict(batches=batches, epochs=epochs, base_lr=BASE_LR,
                lr_rule='base_lr * N / 32', optimizer='sgd momentum 0.9',
                norms={n: NORMS[n] for n in norms})
  return results.save(NAME, quick, config, seeds, {'test_error': out},
                      summary, _figure(out, batches)), summary


def _figure(out, batches):
  fig, ax = plots.errorbars(batches, out, xlabel='batch per device',
                            ylabel='test error (%)', scale=100,
                            title='Batch-size dependence (MNIST-1D)')
  ax.minorticks_off()
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.invert_xaxis()
  return fig
