"""Experiment 2: BN tolerates much higher learning rates.

Claim: with BN the largest learning rate that still trains is 5 to 10x (the
paper: 5x and 30x, "BN-x5", "BN-x30") that of the same network without BN,
and at its best rate BN reaches the no-BN model's best accuracy in far fewer
steps.
Source: Ioffe & Szegedy 2015, Sec. 4.2.2 and Fig. 2-3.
Setup: exp 1's 784-100-100-100-10 sigmoid MLP on MNIST 5k, plain SGD, batch
60, learning rates 0.03 to 300 (log grid fixed in advance), every rate and
seed trained side by side under one jitted vmap. "Stable" means the final
test accuracy is at least 90% of the best final accuracy of that model over
all rates, with a finite loss.
Criterion: (rate) the largest stable rate with BN is at least 5x that
without; (speed) at its best rate, BN's mean test accuracy reaches the no-BN
model's best final accuracy in at most half the steps no-BN takes. The speed
criterion was written down on 2026-11-22, after an earlier full run; it
restates the claim's "far fewer steps".
Command: ``python -m experiments run lr_tolerance [--quick]``.
Time on 2 CPU cores (measured): quick about 20 s, full about 3 minutes (167 s).
"""

from __future__ import annotations

import numpy as np

from experiments._common import data, plots, results, train
from experiments._common.claims import Claim, mean
from experiments._common.models import MLP

NAME = 'lr_tolerance'
LRS = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]


CLAIMS = (
  Claim(
    'BN tolerates 5-10x higher learning rates',
    'Ioffe & Szegedy 2015, Sec. 4.2.2',
    'holds',
    lambda s: (
      f'largest stable SGD rate {s["largest_stable_lr[BN]"]:g} '
      f'with BN, {s["largest_stable_lr[no BN]"]:g} without (ratio '
      f'{s["largest_stable_lr_ratio"]:g})'
    ),
  ),
  Claim(
    'at its best rate BN reaches the no-BN best in far fewer steps',
    'Ioffe & Szegedy 2015, Fig. 2',
    'holds_faster_at_best_rate',
    lambda s: (
      f'best rates {s["best_lr[BN]"]:g} (BN) and '
      f'{s["best_lr[no BN]"]:g} (no BN); best final accuracy '
      f'{mean(s["best_final_acc[BN]"])} with BN, '
      f'{mean(s["best_final_acc[no BN]"])} without; steps to the no-BN '
      f'best: {mean(s["steps_to_no_bn_best[BN]"])} with BN, '
      f'{mean(s["steps_to_no_bn_best[no BN]"])} without'
    ),
  ),
)


def run(quick: bool, seeds):
  steps, every = (200, 50) if quick else (3000, 100)
  lrs = [0.1, 1.0, 10.0, 100.0] if quick else LRS
  out = {}
  for name, norm in (('no BN', 'none'), ('BN', 'bn')):
    setup = train.Setup(
      MLP(norm=norm), data.mnist(), steps=steps, batch=60, eval_every=every
    )
    r = train.run(setup, seeds, lrs, desc=name)
    out[name] = dict(test_acc=r['test_acc'], train_loss=r['train_loss'])
  step = r['step']
  summary = {}
  largest = {}
  for name, r in out.items():
    final = np.nan_to_num(r['test_acc'][:, :, -1])  # (lr, seed)
    loss_ok = np.isfinite(r['train_loss'][:, :, -1]).all(1)
    mean = final.mean(1)
    stable = (mean >= 0.9 * mean.max()) & loss_ok
    largest[name] = max(lr for lr, ok in zip(lrs, stable, strict=True) if ok)
    summary[f'largest_stable_lr[{name}]'] = largest[name]
    summary[f'best_lr[{name}]'] = lrs[int(np.argmax(mean))]
    summary[f'best_final_acc[{name}]'] = results.mean_std(
      final[int(np.argmax(mean))]
    )
  target = out['no BN']['test_acc'][:, :, -1].mean(1).max()
  bn = out['BN']['test_acc'][lrs.index(summary['best_lr[BN]'])].mean(0)
  nb = out['no BN']['test_acc'][lrs.index(summary['best_lr[no BN]'])].mean(0)
  first = lambda curve: next(
    (int(s) for s, a in zip(step, curve, strict=True) if a >= target), None
  )
  summary['steps_to_no_bn_best[BN]'] = first(bn)
  summary['steps_to_no_bn_best[no BN]'] = first(nb)
  ratio = largest['BN'] / largest['no BN']
  summary['largest_stable_lr_ratio'] = ratio
  summary['holds'] = bool(ratio >= 5)
  bn_steps = summary['steps_to_no_bn_best[BN]']
  summary['holds_faster_at_best_rate'] = bool(
    bn_steps is not None
    and bn_steps <= 0.5 * summary['steps_to_no_bn_best[no BN]']
  )
  config = dict(
    steps=steps,
    eval_every=every,
    batch=60,
    lrs=lrs,
    stable='final acc >= 0.9 x best final acc, finite loss',
  )
  return results.save(
    NAME, quick, config, seeds, out, summary, _figure(out, lrs)
  ), summary


def _figure(out, lrs):
  series = {n: np.nan_to_num(r['test_acc'][:, :, -1]) for n, r in out.items()}
  return plots.errorbars(
    lrs,
    series,
    xlabel='learning rate',
    ylabel='final test accuracy',
    title='Learning-rate tolerance',
  )[0]
