"""Experiment 6: running statistics converge to the population's; precise BN is steadier.

Claims: (a) the EMA running mean and variance of a BN layer converge to the
population moments of the layer's input, faster for smaller momentum and
with less noise for larger; the cumulative average and the zero-debiased EMA
(bnjax variants) are unbiased from the first step. (b) With large batches
and few steps, the EMA lags behind the weights, and precise BN (recomputing
population statistics of the final model) gives higher and steadier test
accuracy.
Sources: (a) Ioffe & Szegedy 2015, Sec. 3.1 (inference uses the
population statistics); (b) Wu & Johnson 2021, "Rethinking Batch in
BatchNorm", Sec. 3 (Fig. 2-3).
Setup (a): a fixed random 784->64 Dense layer on MNIST 5k; BN's training-mode
update over 1000 random batches of 60, momentum {0.9, 0.99, 0.999}; error =
mean over channels of |running - population| / population std.
Setup (b): exp 1's sigmoid MLP with BN (momentum 0.99, flax's default),
batch 500, 60 steps of SGD at lr 2.0; test accuracy with the EMA statistics
and after precise BN (``bnjax.training.recalibrate``) over 8 training
batches.
Criterion: (a) after 1000 steps the mean error of EMA 0.99 is below EMA
0.9's (less noise) and EMA 0.999's (less lag), and the debiased EMA and the
cumulative average are within sampling error (< 0.15) from step 1;
(b) precise BN's mean accuracy is higher than the EMA's.
Command: ``python -m experiments run running_stats [--quick]``.
Time on 2 CPU cores (measured): quick about 15 s, full about 20 s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
import bnjax.training
from experiments._common import data, results, train
from experiments._common.claims import Claim, mean
from experiments._common.models import MLP

NAME = 'running_stats'
MOMENTA = [0.9, 0.99, 0.999]


def convergence(steps: int, seed: int):
  (x, _), _ = data.mnist()
  w = np.random.default_rng(seed).normal(0, 784**-0.5, (784, 64))
  h = x.astype(np.float64) @ w
  pop_m, pop_s = h.mean(0), h.std(0)
  hj = jnp.asarray(h, jnp.float32)
  idx = np.random.default_rng(100 + seed).integers(0, len(h), (steps, 60))
  states = {f'EMA {m}': bnjax.init_batch_stats(64) for m in MOMENTA}
  states['cumulative'] = bnjax.init_cumulative_stats(64)
  states['debiased EMA 0.99'] = bnjax.init_debiased_stats(64)

  def upd(state, ib, momentum):
    return bnjax.batch_norm(
      hj[ib], state, use_running_average=False, momentum=momentum
    )[1]

  def errors(state):
    p = bnjax.population_stats(state)
    return (
      np.mean(np.abs(np.asarray(p.mean) - pop_m) / pop_s),
      np.mean(np.abs(np.sqrt(np.asarray(p.var)) - pop_s) / pop_s),
    )

  curves = {k: [] for k in states}
  for name, s in states.items():
    mom = float(name.split()[-1]) if 'EMA' in name else 0.0
    f = jax.jit(lambda s, ib, mom=mom: upd(s, ib, mom))
    for t in range(steps):
      s = f(s, idx[t])
      curves[name].append(errors(s))
  return {k: np.asarray(v) for k, v in curves.items()}


CLAIMS = (
  Claim(
    "running statistics converge to the population's",
    'Ioffe & Szegedy 2015, Sec. 3.1',
    'holds_convergence',
    lambda s: (
      'error of the running mean after 1000 batches (in '
      f'population std): EMA 0.9 {mean(s["final_mean_error[EMA 0.9]"])}, '
      f'0.99 {mean(s["final_mean_error[EMA 0.99]"])}, 0.999 '
      f'{mean(s["final_mean_error[EMA 0.999]"])}; cumulative '
      f'{mean(s["final_mean_error[cumulative]"])}; after one step: '
      f'debiased EMA {mean(s["step1_mean_error[debiased EMA 0.99]"])}, '
      f'plain EMA {mean(s["step1_mean_error[EMA 0.99]"])}'
    ),
  ),
  Claim(
    'precise BN beats the EMA at large batch and few steps',
    'Wu & Johnson 2021, Sec. 3',
    'holds_precise',
    lambda s: (
      f'batch 500, 60 steps: test accuracy '
      f'{mean(s["test_acc[precise BN]"])} with precise BN, '
      f'{mean(s["test_acc[EMA]"])} with the EMA (momentum 0.99)'
    ),
  ),
)


def run(quick: bool, seeds):
  steps_a = 50 if quick else 1000
  conv = [convergence(steps_a, s) for s in seeds]
  curves = {k: np.stack([c[k] for c in conv]) for k in conv[0]}
  summary = {}
  for k, v in curves.items():
    summary[f'final_mean_error[{k}]'] = results.mean_std(v[:, -1, 0])
    summary[f'step1_mean_error[{k}]'] = results.mean_std(v[:, 0, 0])
  fin = lambda k: curves[k][:, -1, 0].mean()
  ok_a = (
    fin('EMA 0.99') < min(fin('EMA 0.9'), fin('EMA 0.999'))
    and curves['debiased EMA 0.99'][:, 0, 0].mean() < 0.15
    and curves['cumulative'][:, 0, 0].mean() < 0.15
  )

  (xtr, ytr), (xte, yte) = data.mnist()
  model = MLP(norm='bn', bn_momentum=0.99)
  steps_b = 20 if quick else 60
  setup = train.Setup(
    model, data.mnist(), steps=steps_b, batch=500, eval_every=steps_b
  )
  r = train.run(setup, seeds, [2.0], desc='large batch')
  params, state = r['final_state'][0], r['final_state'][1]
  ema_acc, precise_acc = [], []
  batches = jnp.asarray(xtr[:4000].reshape(8, 500, -1))
  for i in range(len(seeds)):
    v = {
      'params': jax.tree.map(lambda a: a[i], params),
      **jax.tree.map(lambda a: a[i], state),
    }
    acc = lambda v: float(
      jnp.mean(
        jnp.argmax(model.apply(v, jnp.asarray(xte), train=False), -1)
        == jnp.asarray(yte)
      )
    )
    ema_acc.append(acc(v))
    precise_acc.append(
      acc(bnjax.training.recalibrate(model, batches, train=True, variables=v))
    )
  summary['test_acc[EMA]'] = results.mean_std(ema_acc)
  summary['test_acc[precise BN]'] = results.mean_std(precise_acc)
  ok_b = np.mean(precise_acc) > np.mean(ema_acc)
  summary['holds_convergence'] = bool(ok_a)
  summary['holds_precise'] = bool(ok_b)
  config = dict(
    a=dict(
      steps=steps_a,
      batch=60,
      momenta=MOMENTA,
      layer='fixed random Dense 784->64',
    ),
    b=dict(
      steps=steps_b, batch=500, lr=2.0, momentum=0.99, precise_batches='8 x 500'
    ),
  )
  runs = dict(convergence=curves, ema_acc=ema_acc, precise_acc=precise_acc)
  return results.save(
    NAME, quick, config, seeds, runs, summary, _figure(curves)
  ), summary


def _figure(curves):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for k, v in curves.items():
    for j in range(2):  # mean, std
      ax[j].plot(np.arange(1, v.shape[1] + 1), v[:, :, j].mean(0), label=k)
  for j, what in enumerate(('mean', 'std')):
    ax[j].set(
      xlabel='step',
      ylabel=f'|running {what} - population| / std',
      yscale='log',
      title=f'Running {what} vs population',
    )
  ax[0].legend()
  return fig
