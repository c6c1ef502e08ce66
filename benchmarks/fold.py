"""Inference speedup of bnjax.fold on a ResNet-18 (examples/resnet18.py).

Question: how much faster is ResNet-18 inference (jit, eval mode) with every
BatchNorm folded into the convolution before it (``bnjax.fold``), and do the
logits stay within 1e-4 (relative to the largest logit) of the unfolded
model's? Timed in one process, interleaved (A B A B) after warm-up, with the
allocator setting of ``_timing``. Batches of 8 and 1 of 3x112x112 NHWC
images, 10 classes. ``python -m benchmarks run fold`` (about 1 minute) writes
``results/fold.json``; ``--smoke`` runs a seconds-long check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _timing
from examples import resnet18 as R


def _variables(num_classes, key):
  """Random init, with non-trivial BN state in every layer."""
  v = R.ResNet18(num_classes).init(key, jnp.ones((1, 32, 32, 3)), train=False)
  paths, tree = jax.tree.flatten_with_path(v['batch_stats'])
  keys = jax.random.split(key, len(paths))
  stats = [
    0.2 * jax.random.normal(k, a.shape)
    if path[-1].key == 'mean'
    else jax.random.uniform(k, a.shape, a.dtype, 0.5, 2.0)
    for k, (path, a) in zip(keys, paths, strict=True)
  ]
  return {'params': v['params'], 'batch_stats': jax.tree.unflatten(tree, stats)}


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  configs = [(2, 32)] if args.smoke else [(8, 112), (1, 112)]
  rounds, inner = (3, 2) if args.smoke else (15, 5)
  v = _variables(10, jax.random.key(0))
  folded = R.fold_variables(v)
  plain = jax.jit(lambda v, x: R.ResNet18(10).apply(v, x, train=False))
  fused = jax.jit(
    lambda v, x: R.ResNet18(10, fold=True).apply(v, x, train=False)
  )
  rows = []
  for batch, size in configs:
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    y, y_f = plain(v, x), fused(folded, x)
    rel = float(jnp.abs(y - y_f).max() / jnp.abs(y).max())
    samples = _timing.interleaved_samples(
      {'bn': plain, 'folded': fused},
      {'bn': (v, x), 'folded': (folded, x)},
      rounds,
      inner,
    )
    med = _timing.medians(samples)
    q25, q75 = _timing.ratio_quartiles(samples['bn'], samples['folded'])
    row = dict(
      input=[batch, size, size, 3],
      bn_ms=med['bn'] * 1e3,
      folded_ms=med['folded'] * 1e3,
      speedup=med['bn'] / med['folded'],
      speedup_q25=q25,
      speedup_q75=q75,
      max_rel_logit_diff=rel,
    )
    rows.append(row)
    print(
      f'ResNet-18 eval, {batch}x{size}x{size}x3: BN {row["bn_ms"]:.1f} '
      f'ms, folded {row["folded_ms"]:.1f} ms, speedup '
      f'{row["speedup"]:.2f}x (quartiles {q25:.2f} to {q75:.2f}); '
      f'logits within {rel:.1e}'
    )
    assert np.isfinite(rel) and rel < 1e-4, rel
  out = dict(env=_timing.environment(), rows=rows)
  if not args.smoke:
    _timing.write_result('fold', out)
  return out
