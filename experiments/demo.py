"""Demo: a sigmoid MLP on sklearn's bundled digits, with and without bnjax BN.

Claim shown: BN trains faster (Ioffe & Szegedy 2015, Fig. 1a), here at CPU
scale on 1797 8x8 digits. Run: ``python -m experiments.demo`` (about 20 s on
2 cores). Seeds are fixed in advance (0, 1, 2) and every run is printed.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnjax.linen


def load_digits(seed: int = 0):
  from sklearn.datasets import load_digits as _load
  d = _load()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  x, y = x[perm], y[perm]
  return (x[:1400], y[:1400]), (x[1400:], y[1400:])


class MLP(nn.Module):
  """64-100-100-10 sigmoid MLP; BN before each nonlinearity when use_bn."""

  use_bn: bool

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(2):
      x = nn.Dense(100, use_bias=not self.use_bn)(x)
      if self.use_bn:
        x = bnjax.linen.BatchNorm(use_running_average=not train,
                                  momentum=0.9)(x)
      x = nn.sigmoid(x)
    return nn.Dense(10)(x)


def train(use_bn: bool, seed: int, steps: int, lr: float, batch: int = 60):
  (xtr, ytr), (xte, yte) = load_digits()
  model = MLP(use_bn)
  variables = model.init(jax.random.key(seed), xtr[:2], train=False)
  params = variables['params']
  stats = variables.get('batch_stats', {})
  opt = optax.sgd(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, stats, opt_state, xb, yb):
    def loss_fn(p):
      logits, upd = model.apply({'params': p, 'batch_stats': stats}, xb,
                                train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return loss.mean(), upd.get('batch_stats', stats)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  @jax.jit
  def accuracy(params, stats):
    logits = model.apply({'params': params, 'batch_stats': stats}, xte,
                         train=False)
    return jnp.mean(jnp.argmax(logits, -1) == yte)

  rng = np.random.default_rng(seed)
  curve = []
  for t in range(1, steps + 1):
    idx = rng.integers(0, len(xtr), batch)
    params, stats, opt_state, _ = step(params, stats, opt_state, xtr[idx],
                                       ytr[idx])
    if t % (steps // 5) == 0:
      curve.append((t, float(accuracy(params, stats))))
  return curve


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=500)
  p.add_argument('--lr', type=float, default=0.5)
  p.add_argument('--seeds', type=int, default=3)
  args = p.parse_args(argv)
  t0 = time.time()
  print(f'digits, 64-100-100-10 sigmoid MLP, SGD lr={args.lr}, batch 60, '
        f'{args.steps} steps; test accuracy (held-out 397 images)')
  finals = {}
  for use_bn in (False, True):
    name = 'with bnjax BN' if use_bn else 'without BN   '
    finals[use_bn] = []
    for seed in range(args.seeds):
      curve = train(use_bn, seed, args.steps, args.lr)
      finals[use_bn].append(curve[-1][1])
      pts = '  '.join(f'{s}:{a:.3f}' for s, a in curve)
      print(f'{name} seed {seed}  step:acc  {pts}')
  for use_bn in (False, True):
    a = np.array(finals[use_bn])
    print(f"final accuracy {'with' if use_bn else 'without'} BN: "
          f'{a.mean():.3f} ± {a.std():.3f} (n={len(a)})')
  print(f'done in {time.time() - t0:.1f} s')


if __name__ == '__main__':
  main()
