"""Experiment 7: BN smooths the loss landscape (and "noisy BN" still trains).

Claims: along the gradient direction, steps of 0.5x to 4x the learning rate
change the loss less with BN (smaller loss variation), the gradient changes
less (better gradient predictiveness) and the effective beta-smoothness is
smaller. BN with an extra random per-step shift and scale after it ("noisy
BN", n_mu = 0.5, n_sigma = 1.25, r = 0.1) trains about as well as BN, while
the same noise without BN breaks training.
Source: Santurkar, Tsipras, Ilyas & Madry 2018, Fig. 4 and Fig. 2/7.
Setup: a 784-100-100-100-10 ReLU MLP on MNIST 5k, SGD lr 0.1, batch 60.
Every 50 steps, on the current batch with g = grad L(w) and eta in
lr x linspace(0.5, 4, 8): variation = max - min of L(w - eta g),
predictiveness = max ||grad L(w - eta g) - g||, beta = max of that over
||eta g||. Noise: per unit, scale ~ U(1, n_sigma) and shift ~ U(-n_mu, n_mu)
redrawn every step, times (1 + r N(0,1)) and plus r N(0,1) per example (our
reading of their Sec. 2.1).
Depth (added 2026-11-22, after earlier runs found the noise harmless to the
3-layer MLP; Santurkar et al.'s VGG is much deeper, and the noise enters at
every layer): the same MLP with 8 hidden layers, no BN, with the noise and no
BN, and noisy BN, trained as above (no landscape probes).
Criterion: BN's mean variation, predictiveness
and beta are all below no-BN's; noisy BN's final test accuracy is within 3
points of BN's; noise without BN ends at least 10 points below no BN; (depth,
set before its first run) at 8 layers, noise without BN ends at least 10
points below no BN at 8 layers.
Command: ``python -m experiments run landscape [--quick]``.
Time on 2 CPU cores (measured): quick about 10 s, full about 4 minutes (226 s).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from experiments._common import data, results, train
from experiments._common.claims import Claim, mean
from experiments._common.models import MLP

NAME = 'landscape'
LR = 0.1
NOISE = (0.5, 1.25, 0.1)
VARIANTS = {
  'no BN': dict(norm='none'),
  'BN': dict(norm='bn'),
  'noisy BN': dict(norm='bn', noise=NOISE),
  'noise, no BN': dict(norm='none', noise=NOISE),
}


def _compiled(model):
  """The jitted step and landscape probe of one model (compiled once)."""
  tx = optax.sgd(LR)

  def loss(p, state, xb, yb, key):
    out, new = model.apply(
      {'params': p, **state},
      xb,
      train=True,
      mutable=list(state),
      rngs={'noise': key},
    )
    return train.xent(out, yb), new

  @jax.jit
  def step(params, state, opt, xb, yb, key):
    (l, new), g = jax.value_and_grad(loss, has_aux=True)(
      params, state, xb, yb, key
    )
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), {**state, **new}, opt

  @jax.jit
  def probe(params, state, xb, yb, key):
    gl = lambda p: jax.value_and_grad(loss, has_aux=True)(p, state, xb, yb, key)
    (l0, _), g = gl(params)
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])
    g0 = flat(g)
    etas = LR * jnp.linspace(0.5, 4.0, 8)

    def at(eta):
      (l, _), ge = gl(jax.tree.map(lambda p, d: p - eta * d, params, g))
      return l, jnp.linalg.norm(flat(ge) - g0)

    ls, dg = jax.vmap(at)(etas)
    return (
      jnp.max(ls) - jnp.min(ls),
      jnp.max(dg),
      jnp.max(dg / (etas * jnp.linalg.norm(g0))),
    )

  return tx, step, probe


def _one(model, fns, steps, every, seed):
  tx, step, probe = fns
  (xtr, ytr), (xte, yte) = data.mnist()
  xtr, ytr = jnp.asarray(xtr), jnp.asarray(ytr)
  v = model.init(jax.random.key(seed), xtr[:60], train=False)
  params, state = v['params'], {k: x for k, x in v.items() if k != 'params'}
  opt = tx.init(params)
  idx = train.epoch_sampler(
    np.random.default_rng(1000 + seed), steps, 60, np.asarray(ytr)
  )
  key = jax.random.key(10_000 + seed)
  rec = []
  for t in range(steps):
    key, k1, k2 = jax.random.split(key, 3)
    xb, yb = xtr[idx[t]], ytr[idx[t]]
    if t % every == 0:
      rec.append([float(a) for a in probe(params, state, xb, yb, k1)])
    params, state, opt = step(params, state, opt, xb, yb, k2)
  logits = model.apply(
    {'params': params, **state}, jnp.asarray(xte), train=False
  )
  acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(yte)))
  return np.asarray(rec), acc


SRC = 'Santurkar et al. 2018'
CLAIMS = (
  Claim(
    'BN smooths the loss landscape',
    f'{SRC}, Fig. 4',
    'holds_smoother',
    lambda s: (
      'along the gradient, BN vs no BN: loss variation '
      f'{mean(s["loss_variation[BN]"])} vs {mean(s["loss_variation[no BN]"])}'
      f', gradient change {mean(s["grad_predictiveness[BN]"])} vs '
      f'{mean(s["grad_predictiveness[no BN]"])}, beta-smoothness '
      f'{mean(s["beta_smoothness[BN]"])} vs '
      f'{mean(s["beta_smoothness[no BN]"])}'
    ),
  ),
  Claim(
    'noisy BN trains about as well as BN',
    f'{SRC}, Fig. 2',
    'holds_noisy_bn_trains',
    lambda s: (
      f'test accuracy {mean(s["test_acc[noisy BN]"])} noisy BN, '
      f'{mean(s["test_acc[BN]"])} BN'
    ),
  ),
  Claim(
    'the same noise without BN breaks training',
    f'{SRC}, Fig. 7',
    'holds_noise_without_bn_fails',
    lambda s: (
      f'test accuracy {mean(s["test_acc[noise, no BN]"])} with '
      f'noise, {mean(s["test_acc[no BN]"])} without'
    ),
  ),
  Claim(
    '... in a deeper network (8 hidden layers)',
    f'{SRC}, Fig. 7',
    'holds_noise_breaks_deep',
    lambda s: (
      'test accuracy at 8 layers: '
      f'{mean(s["test_acc[noise, no BN, 8 layers]"])} with noise, '
      f'{mean(s["test_acc[no BN, 8 layers]"])} without, '
      f'{mean(s["test_acc[noisy BN, 8 layers]"])} noisy BN'
    ),
  ),
)

DEEP = {
  'no BN, 8 layers': dict(norm='none'),
  'noise, no BN, 8 layers': dict(norm='none', noise=NOISE),
  'noisy BN, 8 layers': dict(norm='bn', noise=NOISE),
}


def deep(steps: int, seeds) -> dict:
  """Final test accuracy (seed,) of each 8-layer arm, trained side by side."""
  out = {}
  for name, kw in DEEP.items():
    setup = train.Setup(
      MLP(widths=(100,) * 8, act=nn.relu, **kw),
      data.mnist(),
      steps=steps,
      batch=60,
      eval_every=steps,
      optimizer=optax.sgd,
    )
    r = train.run(setup, seeds, [LR], desc=name)
    out[name] = np.nan_to_num(r['test_acc'][0, :, -1])
  return out


def run(quick: bool, seeds):
  steps, every = (60, 30) if quick else (2000, 50)
  variants = {k: VARIANTS[k] for k in ('no BN', 'BN')} if quick else VARIANTS
  out = {}
  for name, kw in variants.items():
    model = MLP(act=nn.relu, **kw)
    fns = _compiled(model)
    runs = [
      _one(model, fns, steps, every, s)
      for s in tqdm(seeds, desc=name, leave=False, disable=None)
    ]
    out[name] = dict(
      landscape=np.stack([r[0] for r in runs]),
      test_acc=np.array([r[1] for r in runs]),
    )
  summary = {}
  for name, r in out.items():
    for j, what in enumerate(
      ('loss_variation', 'grad_predictiveness', 'beta_smoothness')
    ):
      summary[f'{what}[{name}]'] = results.mean_std(
        r['landscape'][:, :, j].mean(1)
      )
    summary[f'test_acc[{name}]'] = results.mean_std(r['test_acc'])
  mean = lambda n, j: out[n]['landscape'][:, :, j].mean()
  acc = lambda n: out[n]['test_acc'].mean()
  summary['holds_smoother'] = bool(
    all(mean('BN', j) < mean('no BN', j) for j in range(3))
  )
  if 'noisy BN' in out:
    summary['holds_noisy_bn_trains'] = bool(
      abs(acc('noisy BN') - acc('BN')) < 0.03
    )
    summary['holds_noise_without_bn_fails'] = bool(
      acc('noise, no BN') < acc('no BN') - 0.10
    )
    deep_acc = deep(steps, seeds)
    for name, a in deep_acc.items():
      out[name] = dict(test_acc=a)
      summary[f'test_acc[{name}]'] = results.mean_std(a)
    summary['holds_noise_breaks_deep'] = bool(
      acc('noise, no BN, 8 layers') < acc('no BN, 8 layers') - 0.10
    )
  config = dict(
    steps=steps,
    probe_every=every,
    lr=LR,
    batch=60,
    etas='lr x linspace(0.5, 4, 8)',
    noise=NOISE,
    model='784-100-100-100-10 ReLU MLP; depth: 8 hidden layers of 100',
  )
  return results.save(
    NAME, quick, config, seeds, out, summary, _figure(out, every)
  ), summary


def _figure(out, every):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 3, figsize=(15, 4))
  titles = (
    'loss variation',
    'gradient predictiveness (l2 change)',
    'effective beta-smoothness',
  )
  for name in ('no BN', 'BN'):
    r = out[name]['landscape']
    t = np.arange(r.shape[1]) * every
    for j in range(3):
      m, s = r[:, :, j].mean(0), r[:, :, j].std(0)
      ax[j].plot(t, m, label=name)
      ax[j].fill_between(t, m - s, m + s, alpha=0.2)
  for j in range(3):
    ax[j].set(xlabel='step', title=titles[j], yscale='log')
  ax[0].legend()
  return fig
