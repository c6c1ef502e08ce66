"""Mutation check: plant known bugs one at a time; the tests must catch each.

Run: ``python tests/mutate.py`` (about 9 minutes on 2 cores), or
``python tests/mutate.py NAME ...`` for some. Each mutant replaces one exact
snippet of a library file, runs the test files that should catch it (``-x``,
quick hypothesis profile), and restores the file whatever happens. Exits 1
if any mutant survives. Every bug fixed or audited goes in this list.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name: (file, exact snippet, replacement, test selection)
MUTANTS = {
  # Issue 19's audit: four the suite caught, one it missed.
  'unbiased running variance': (
    'bnjax/_moments/local.py',
    'return mean, p.m2 / safe_n',
    'return mean, p.m2 / jnp.maximum(p.count - 1.0, 1.0)',
    ['tests/core/test_oracle.py'],
  ),
  'flipped momentum': (
    'bnjax/_running.py',
    'new = keep * old.astype(batch.dtype) + (1 - keep) * batch',
    'new = (1 - keep) * old.astype(batch.dtype) + keep * batch',
    ['tests/core/test_oracle.py'],
  ),
  'unweighted sync mean': (
    'bnjax/_moments/combine.py',
    'sa + (sb + nb * (kb - ka))',
    'sa + (sb + (kb - ka))',
    ['tests/core/test_sync.py', 'tests/core/test_exactness.py'],
  ),
  'mask dropped in the backward': (
    'bnjax/_train.py',
    'dxm = dxf if m is None else jnp.where(m, dxf, 0.0)',
    'dxm = dxf',
    ['tests/core/test_grad.py', 'tests/core/test_sync.py'],
  ),
  'group row as idx % d': (
    'bnjax/_moments/axes.py',
    'return jnp.asarray(pos)[idx], max(len(g) for g in groups)',
    'return idx % max(len(g) for g in groups), max(len(g) for g in groups)',
    ['tests/core/test_exactness.py', 'tests/core/test_sync.py'],
  ),
  # Issue 12's bugs.
  'merge drops each shard mean low bits': (
    'bnjax/_moments/combine.py',
    '(sa / jnp.maximum(na, 1.0) - sb / jnp.maximum(nb, 1.0))',
    '0.0',
    ['tests/core/test_exactness.py'],
  ),
  'merge drops the between-shard term': (
    'bnjax/_moments/combine.py',
    'ma + mb + w * dmu * dmu',
    'ma + mb',
    ['tests/core/test_sync.py'],
  ),
  'merge derivative drops the between-shard term': (
    'bnjax/_moments/combine.py',
    'dm2 + 2.0 * dev * nd',
    'dm2',
    ['tests/core/test_exactness.py', 'tests/core/test_sync.py'],
  ),
  'uncorrected two-pass': (
    'bnjax/_moments/local.py',
    '- s1 * s1 / jnp.maximum(n, 1.0)',
    '- 0 * s1',
    ['tests/core/test_exactness.py'],
  ),
  'empty channel normalized with x / sqrt(eps)': (
    'bnjax/_train.py',
    'norm_mean = jnp.where(empty, fb_mean, mean)',
    'norm_mean = mean',
    ['tests/core/test_exactness.py'],
  ),
  'ghost sync count stays local': (
    'bnjax/_ghost.py',
    'sums[1] / n, sums[2]',
    'sums[1] / n, jnp.sum(w, 0)',
    ['tests/core/test_exactness.py'],
  ),
  # Issue 29's defects.
  'masked-out NaN reaches the output and gradients': (
    'bnjax/_train.py',
    'return jnp.where(m, x, lay.broadcast(mean).astype(x.dtype))',
    'return x',
    ['tests/core/test_grad.py'],
  ),
  'float group index truncated': (
    'bnjax/_moments/axes.py',
    'if isinstance(i, (bool, np.bool_)) or not '
    'isinstance(\n        i, (int, np.integer)\n      ):\n        raise bad',
    'pass',
    ['tests/core/test_errors.py', 'tests/core/test_sync.py'],
  ),
  'epsilon underflow accepted': (
    'bnjax/_scalar_checks.py',
    'tiny = float(jnp.finfo(dtype or jnp.float32).tiny)',
    'tiny = 0.0',
    ['tests/core/test_errors.py'],
  ),
  'negative running variance accepted in inference': (
    'bnjax/_core.py',
    '_checks.check_running_values(fn, state)',
    'pass',
    ['tests/core/test_errors.py'],
  ),
  # Issue 27's: accumulation and freezing.
  'pool drops the micro-batch means low bits': (
    'bnjax/_running.py',
    'count * p.mean_lo.astype(f)',
    '0 * p.mean_lo.astype(f)',
    ['tests/core/test_accumulate.py'],
  ),
  'psum sums around the largest shift, not the mean': (
    'bnjax/_moments/psum.py',
    'shift = lax.stop_gradient(ref + first[0] / safe_n)',
    'shift = ref',
    ['tests/core/test_sync_program.py'],
  ),
  'synced path drops the mean low bits': (
    'bnjax/_moments/dispatch.py',
    'return _counted(_sync_merge(partial(xf, lay, m, pallas=pallas), sync))',
    'return (lambda r: (*r[:3], 0 * r[3]))('
    '_counted(_sync_merge(partial(xf, lay, m, pallas=pallas), sync)))',
    ['tests/core/test_accumulate.py'],
  ),
  'pool ignores the micro-batch count': (
    'bnjax/_running.py',
    'n = jnp.broadcast_to(lax.stop_gradient(count), mean.shape).astype(f)',
    'n = jnp.ones_like(mean)',
    ['tests/core/test_accumulate.py'],
  ),
  'frozen (momentum 1) still mixes the batch in': (
    'bnjax/_running.py',
    'if rules.ema and _is_one(momentum):',
    'if False:',
    ['tests/modules/test_training.py'],
  ),
  'linen apply_pooled ignores when': (
    'bnjax/_pooled.py',
    'keep = lambda a, b: jnp.where(when, a, b).astype(a.dtype)',
    'keep = lambda a, b: a',
    ['tests/modules/test_training.py'],
  ),
  # Issue 44's (part A): pooling, averaging and recalibration.
  'apply_pooled takes any momentum': (
    'bnjax/_pooled.py',
    '_checks.check_momentum(fn, momentum)',
    'pass',
    ['tests/core/test_accumulate.py'],
  ),
  'ghost pool merges the chunk averages with their spread': (
    'bnjax/_core.py',
    'spread=virtual_batch_size is None',
    'spread=True',
    ['tests/core/test_accumulate.py'],
  ),
  'ghost chunks of one value per channel train': (
    'bnjax/_ghost.py',
    'if not single_value_ok:',
    'if False:',
    ['tests/core/test_errors.py'],
  ),
  'average_stats averages pools field by field': (
    'bnjax/training/_averaging.py',
    '_running.merge_pools(v)',
    'jax.tree.map(lambda a: jnp.mean(a, 0), v)',
    ['tests/modules/test_training_rigour.py'],
  ),
  'average_stats takes weights summing to 0': (
    'bnjax/training/_averaging.py',
    '  total = jnp.sum(w)\n  _check_total(fn, total)',
    '  total = jnp.sum(w)',
    [
      'tests/modules/test_training_rigour.py',
      'tests/badinput/test_training.py',
    ],
  ),
  'recalibrate resets layers it does not train': (
    'bnjax/training/_recalibration.py',
    'jnp.where(pool.count > 0, v, o).astype(',
    'v.astype(',
    ['tests/modules/test_training_rigour.py'],
  ),
  'nnx recalibration merges without the batch means low bits': (
    'bnjax/_running.py',
    'batch = PooledStats(n, mean, lo, n * var)',
    'batch = PooledStats(n, mean, 0 * lo, n * var)',
    ['tests/modules/test_training_rigour.py', '-k', 'nnx_recalibration'],
  ),
  # Issue 42: one pooling rule (by count) for every recalibration entry.
  'recalibration pools each batch with weight 1': (
    'bnjax/_running.py',
    'n = jnp.broadcast_to(lax.stop_gradient(count), mean.shape).astype(f)',
    'n = jnp.ones_like(mean)',
    ['tests/modules/test_training_rigour.py', '-k', 'every_entry'],
  ),
  'frozen flax BatchNorm mixes a NaN batch in': (
    'bnjax/training/_modes.py',
    "_FrozenFlaxBatchNorm if mode == 'frozen' else _nnx.BatchNorm",
    '_nnx.BatchNorm',
    ['tests/modules/test_training_rigour.py'],
  ),
  # Issue 44, part B.
  'equinox trains on one example with no batch': (
    'bnjax/equinox.py',
    'if not inference and self.axis_name is None and self.batch_axis is None:',
    'if False:',
    ['tests/modules/test_equinox_swap.py'],
  ),
  'equinox to_torch exports the hidden EMA': (
    'bnjax/_equinox_torch.py',
    'pop = _running.population_stats_as(fn, stats, check=False)',
    'pop = stats',
    ['tests/modules/test_equinox_swap.py'],
  ),
  'converters take non-finite values': (
    'bnjax/_values.py',
    "problems.append(f'{k!r} has non-finite values at channels {_at(bad)}')",
    'pass',
    ['tests/modules/test_equinox_swap.py', 'tests/interop/test_haiku.py'],
  ),
  # Issue 42: jnp.asarray of an aligned NumPy array aliases it on CPU.
  'from_torch aliases a NumPy state dict': (
    'bnjax/_torch_io.py',
    'n: np.array(sd[keys[n]], copy=True)',
    'n: sd[keys[n]]',
    ['tests/interop/test_interop.py', 'tests/modules/test_equinox_swap.py'],
  ),
  'to_torch exports views of the JAX arrays': (
    'bnjax/_torch_io.py',
    'np.array(v, np.float32, copy=True)',
    'np.asarray(v, np.float32)',
    ['tests/interop/test_interop.py', 'tests/modules/test_equinox_swap.py'],
  ),
  'equinox from_torch drops weights of a non-affine layer': (
    'bnjax/_torch_io.py',
    'elif affine is not None and bool(have) != affine:',
    'elif False:',
    ['tests/modules/test_equinox_swap.py'],
  ),
  'to_haiku ignores the DebiasedStats': (
    'bnjax/_haiku.py',
    "if 'stats' not in layer:\n    return {",
    'if True:\n    return {',
    ['tests/interop/test_haiku.py'],
  ),
  'nnx NCHW error names num_features': (
    'bnjax/_nnx_base.py',
    'other = _checks.other_axis(lay, (num_features,))',
    'other = None',
    ['tests/modules/test_modules.py'],
  ),
  # Issue 39: the gather merge without the count.
  # The merge has no reference shift since Chan's update (this session's
  # merge): an empty part's s1 is what could leak in instead.
  'merge lets an empty part s1 in': (
    'bnjax/_moments/combine.py',
    's1_i = jnp.where(n_i > 0, s1_i, 0.0)',
    's1_i = s1_i + 0.0',
    ['tests/core/test_exactness.py'],
  ),
  'unequal groups leave the count home': (
    'bnjax/_moments/gather.py',
    'send_count = p.count.ndim > 0 or axes.uniform_shards(name, groups) is None',
    'send_count = p.count.ndim > 0',
    ['tests/core/test_sync_program.py'],
  ),
}


def run(name: str) -> bool:
  """True if the tests catch the mutant (fail), False if it survives."""
  file, old, new, tests = MUTANTS[name]
  path = ROOT / file
  text = path.read_text()
  if text.count(old) != 1:
    raise SystemExit(
      f'{name}: the snippet occurs {text.count(old)} times in '
      f'{file}; update the mutant'
    )
  path.write_text(text.replace(old, new))
  try:
    env = dict(os.environ, BNJAX_HYPOTHESIS='dev')
    r = subprocess.run(
      [
        sys.executable,
        '-m',
        'pytest',
        '-x',
        '-q',
        '-p',
        'no:cacheprovider',
        '-o',
        "addopts=-m 'not slow'",
        *tests,
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
    )
  finally:
    path.write_text(text)
  return r.returncode != 0


def main(argv=None) -> int:
  names = (argv if argv is not None else sys.argv[1:]) or list(MUTANTS)
  survived = []
  for name in names:
    caught = run(name)
    print(f'{"caught  " if caught else "SURVIVED"}  {name}', flush=True)
    if not caught:
      survived.append(name)
  print(f'{len(names) - len(survived)} of {len(names)} planted bugs caught')
  return 1 if survived else 0


if __name__ == '__main__':
  sys.exit(main())
