"""Experiment 5: synchronized BN recovers the large-batch result at tiny per-device batches.

Claim: with 8 devices and 2 examples per device, BN with local statistics
fails as in exp 4, while BN synchronized over the 8 devices (``axis_name``)
behaves like one device with the global batch of 16.
Source: Wu & He 2018 (Sec. 2: "synchronized BN" as the remedy they set
aside), and PyTorch's SyncBatchNorm; no JAX library ships this demonstration.
Setup: exp 4's model (BN after three stride-2 convolutions and in a Dense
layer: per device, local BN averages 40, 20, 10 and 2 values per channel at
2 per device; synced BN 320, 160, 80 and 16, the global batch's) on
MNIST-1D, 8 host CPU devices under ``jax.shard_map``, data parallel
(gradients averaged with ``pmean``), SGD momentum 0.9, lr = 0.05 x global
batch / 32 with a linear warm-up over the first 10% of steps, 8 epochs, as
exp 4. Running statistics are averaged over devices after each step (the
usual practice for local BN, so all three evaluate the same way). The
one-device run uses the same code on a 1-device mesh. 4 per device is
reported too.
Criterion (set before the full run), at 2 per device: (matches) |synced -
global| < 1 point of error; (local fails) local - synced >= 3 points.
Command: ``python -m experiments run sync [--quick]``.
Time on 2 CPU cores (measured): quick about 20 s, full about 6 minutes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from experiments import e4_batch_size as e4
from experiments._common import data, plots, results, train
from experiments._common.claims import Claim, points

NAME = 'sync'
BASE_LR = 0.05


CHUNK = 250  # steps per jitted call (a lax.scan inside shard_map)

CLAIMS = (
  Claim(
    'synced BN recovers the global-batch result at 2 per device',
    'Wu & He 2018, Sec. 2; PyTorch SyncBatchNorm',
    'holds_synced_matches_global',
    lambda s: (
      '8 CPU devices, 2 per device: synced '
      f'{points(s["error[synced | 2/device]"])}, one device with the '
      f'global batch {points(s["error[global | 2/device]"])}'
    ),
  ),
  Claim(
    'local BN fails at 2 per device',
    'Wu & He 2018, Table 2',
    'holds_local_fails',
    lambda s: (
      f'local {points(s["error[local | 2/device]"])} against '
      f'synced {points(s["error[synced | 2/device]"])}'
      + (
        f'; at 4 per device local {points(s["error[local | 4/device]"])}'
        f', synced {points(s["error[synced | 4/device]"])}'
        if 'error[local | 4/device]' in s
        else ''
      )
    ),
  ),
)


@functools.cache
def _builder(mode: str, per_device: int, epochs: float):
  """Model, optimizer, mesh and the jitted data-parallel chunk (compiled once)."""
  n_dev = 1 if mode == 'global' else 8
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ('d',))
  gb = 8 * per_device
  model = e4.model('bn', axis_name='d' if mode == 'synced' else None)
  (xtr, ytr), _ = data.mnist1d()
  steps = int(epochs * len(ytr)) // gb
  tx = train.warmup_sgd(max(1, steps // 10))(BASE_LR * gb / 32)

  def step(carry, ib):
    params, stats, opt = carry
    xb, yb = jnp.asarray(xtr)[ib], jnp.asarray(ytr)[ib]

    def loss(p):  # this device's share of the global-batch mean
      out, new = model.apply(
        {'params': p, 'batch_stats': stats},
        xb,
        train=True,
        mutable=['batch_stats'],
      )
      return train.xent(out, yb) / n_dev, new['batch_stats']

    # The params are replicated, so under shard_map's type checking their
    # gradient is already summed over devices: the global mean's gradient.
    # (Regression: a pmean of per-device mean losses' gradients gave 8x it.)
    (_, new), g = jax.value_and_grad(loss, has_aux=True)(params)
    new = jax.lax.pmean(new, 'd')
    upd, opt = tx.update(g, opt, params)
    return (optax.apply_updates(params, upd), new, opt), None

  def chunk(params, stats, opt, idx):  # idx: (steps, local batch) per device
    return jax.lax.scan(step, (params, stats, opt), idx)[0]

  sharded = jax.jit(
    jax.shard_map(
      chunk,
      mesh=mesh,
      in_specs=(P(), P(), P(), P(None, 'd')),
      out_specs=(P(), P(), P()),
    )
  )
  return model, tx, mesh, gb, sharded


def train_dp(mode: str, per_device: int, epochs: float, seed: int) -> float:
  """Test error of data-parallel training; mode: local, synced or global."""
  (xtr, ytr), (xte, yte) = data.mnist1d()
  model, tx, mesh, gb, sharded = _builder(mode, per_device, epochs)
  v = model.init(jax.random.key(seed), jnp.asarray(xtr[:gb]), train=False)
  params, stats = v['params'], v['batch_stats']
  opt = tx.init(params)
  idx = train.epoch_sampler(
    np.random.default_rng(1000 + seed), int(epochs * len(ytr)) // gb, gb, ytr
  )
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, 'd')))
  for i in tqdm(
    range(0, len(idx), CHUNK),
    desc=f'{mode} b={per_device}',
    leave=False,
    disable=None,
  ):
    params, stats, opt = sharded(params, stats, opt, put(idx[i : i + CHUNK]))
  logits = model.apply(
    {'params': params, 'batch_stats': stats}, jnp.asarray(xte), train=False
  )
  return float(1 - jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(yte)))


def run(quick: bool, seeds):
  per_devices = [2] if quick else [2, 4]
  epochs = 0.1 if quick else e4.EPOCHS
  out = {}
  for b in per_devices:
    for mode in ('local', 'synced', 'global'):
      out[f'{mode} | {b}/device'] = np.array(
        [train_dp(mode, b, epochs, s) for s in seeds]
      )
  summary = {f'error[{k}]': results.mean_std(v) for k, v in out.items()}
  m = lambda k: out[k].mean()
  summary['synced_minus_global_points[2]'] = float(
    100 * (m('synced | 2/device') - m('global | 2/device'))
  )
  summary['local_minus_synced_points[2]'] = float(
    100 * (m('local | 2/device') - m('synced | 2/device'))
  )
  summary['holds_synced_matches_global'] = bool(
    abs(summary['synced_minus_global_points[2]']) < 1
  )
  summary['holds_local_fails'] = bool(
    summary['local_minus_synced_points[2]'] >= 3
  )
  config = dict(
    devices=8,
    per_device=per_devices,
    epochs=epochs,
    base_lr=BASE_LR,
    model='exp 4 (strides 2, 2, 2; dense 64)',
    lr_rule='base_lr * global_batch / 32, warm-up 10% of steps',
  )
  return results.save(
    NAME, quick, config, seeds, out, summary, _figure(out, per_devices)
  ), summary


def _figure(out, per_devices):
  groups = [f'{b} per device (x8)' for b in per_devices]
  names = {
    'local': 'local BN',
    'synced': 'synced BN',
    'global': '1 device, global batch',
  }
  series = {
    names[m]: [out[f'{m} | {b}/device'] for b in per_devices] for m in names
  }
  return plots.bars(
    groups,
    series,
    ylabel='test error (%)',
    scale=100,
    title='Synchronized BN on 8 CPU devices',
  )[0]
