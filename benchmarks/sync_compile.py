"""Synced compile benchmark: a data-parallel ResNet-18 step, bnjax vs flax.

Question: does swapping ``flax.linen.BatchNorm`` for
``bnjax.linen.BatchNorm`` make a synced model compile slower? Model: flax's
ImageNet example ResNet-18 (``benchmarks/_models.py``, 20 BN layers) with
``axis_name='batch'``, one SGD-momentum train step with gradients averaged
over the batch axis, on 8 CPU devices, mapped two ways: ``jax.pmap`` and
``jax.shard_map`` (under ``jax.jit``). Each step is jitted from a fresh
Python function (no cache hit), trace + lower + compile timed, A B A B
after one warm-up compile of each; then the step itself, interleaved after
warm-up. Each ratio is the median of the interleaved pairs' ratios (the
ratio of the two medians is recorded beside it). The collectives in each
compiled program are counted.

Run: ``python -m benchmarks run sync_compile`` (about 4 minutes on 2 cores)
or ``--smoke`` (a one-block ResNet, one repeat). Writes
``results/sync_compile.json`` (not in smoke mode).
"""

from __future__ import annotations

import json
import re
import statistics
import time

from benchmarks import _models, _readme, _timing

D = 8


def _setup(impl, build, mapping, per_device, size):
  import flax.linen as nn
  import jax
  import optax
  from jax.sharding import PartitionSpec as P

  import bnjax.linen

  cls = {'flax': nn.BatchNorm, 'bnjax': bnjax.linen.BatchNorm}[impl]
  model = build(cls, axis_name='batch')
  x = jax.random.normal(jax.random.key(0), (D * per_device, size, size, 3))
  y = jax.random.randint(jax.random.key(1), (D * per_device,), 0, 1000)
  v = jax.jit(lambda x: build(cls).init(jax.random.key(2), x, False))(x[:2])
  tx = optax.sgd(0.1, momentum=0.9)
  step, _ = _models.train_step(model, v, tx, axis_name='batch')
  args = (v['params'], v['batch_stats'], tx.init(v['params']), x, y)
  devices = jax.devices()[:D]
  if mapping == 'pmap':
    rep = lambda t: jax.tree.map(lambda a: jax.numpy.stack([a] * D), t)
    args = (*map(rep, args[:3]), x.reshape(D, per_device, *x.shape[1:]))
    args += (y.reshape(D, per_device),)
    make = lambda: jax.pmap(
      lambda *a: step(*a), axis_name='batch', devices=devices
    )
    return make, args
  mesh = jax.sharding.Mesh(devices, ('batch',))
  specs = (P(), P(), P(), P('batch'), P('batch'))

  def make():
    def per_shard(*a):
      p, s, o, l = step(*a)
      return p, s, o, jax.lax.pmean(l, 'batch')

    return jax.jit(
      jax.shard_map(
        per_shard, mesh=mesh, in_specs=specs, out_specs=(P(), P(), P(), P())
      )
    )

  return make, args


def _collectives(make, args) -> dict:
  text = make().lower(*args).compile().as_text()
  ops = re.findall(
    r'= \S+ (all-reduce|all-gather|conditional)(?:-start)?\(', text
  )
  return {k: ops.count(k) for k in ('all-reduce', 'all-gather', 'conditional')}


def sync_row(mapping, build, per_device, size, repeats, step_rounds):
  import jax

  made = {
    impl: _setup(impl, build, mapping, per_device, size)
    for impl in ('flax', 'bnjax')
  }
  times: dict[str, list[float]] = {'flax': [], 'bnjax': []}
  for r in range(repeats + 1):  # the first round warms up, unrecorded
    for impl, (make, args) in made.items():
      t0 = time.perf_counter()
      make().lower(*args).compile()
      if r:
        times[impl].append(time.perf_counter() - t0)
  compiled = {impl: make() for impl, (make, _) in made.items()}
  steps = _timing.interleaved_samples(
    compiled, {k: a for k, (_, a) in made.items()}, step_rounds, 1
  )
  step = _timing.medians(steps)
  columns = _timing.compile_columns(times)
  columns['ratio_of_medians'] = columns.pop('ratio')
  step_pairs = [
    b / f for b, f in zip(steps['bnjax'], steps['flax'], strict=True)
  ]
  row = dict(
    mapping=mapping,
    devices=D,
    per_device=per_device,
    size=size,
    **columns,
    # The issue's statistic: the median of the interleaved pairs' ratios
    # (each pair ran back to back, under the same load); the ratio of the
    # two medians is kept beside it.
    ratio=float(statistics.median(columns['pair_ratios'])),
    step_ratio=float(statistics.median(step_pairs)),
    step_ratio_of_medians=step['bnjax'] / step['flax'],
    step_quartiles=_timing.ratio_quartiles(steps['bnjax'], steps['flax']),
    collectives={
      impl: _collectives(make, args) for impl, (make, args) in made.items()
    },
  )
  del jax
  print(json.dumps(row), flush=True)
  return row


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  import jax

  try:
    jax.config.update('jax_num_cpu_devices', D)
  except RuntimeError:  # pragma: no cover - JAX already started
    pass
  if args.smoke:
    tiny = lambda cls, axis_name=None: _models.resnet20(
      cls, widths=(4,), blocks=1, axis_name=axis_name
    )
    rows = [
      sync_row(m, tiny, per_device=2, size=8, repeats=1, step_rounds=2)
      for m in ('pmap', 'shard_map')
    ]
  else:
    rows = [
      sync_row(m, _models.resnet18, 2, 32, repeats=5, step_rounds=21)
      for m in ('pmap', 'shard_map')
    ]
  out = dict(env=_timing.environment(), rows=rows)
  if not args.smoke:
    _timing.write_result('sync_compile', out)
  return out


def sync_compile_table(run: dict) -> str:
  lines = [
    f'Run of {run["env"].get("date")} at {_readme.commit(run["env"])}, jax '
    f'{run["env"].get("jax")}, {run["env"].get("machine")}, 8 CPU devices:',
    '',
    '| mapping | flax compile s | bnjax compile s | vs flax | pairs '
    '| step vs flax (quartiles) | collectives flax / bnjax |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in run['rows']:
    c = r['collectives']
    fmt = lambda d: ', '.join(f'{v} {k}' for k, v in d.items() if v)
    lines.append(
      f'| {r["mapping"]} | {r["flax_s"]:.2f} | {r["bnjax_s"]:.2f} | '
      f'**{r["ratio"]:.2f}** | {_readme.span(r["pair_ratios"])} | '
      f'{r["step_ratio"]:.2f} ({r["step_quartiles"][0]:.2f}-'
      f'{r["step_quartiles"][1]:.2f}) | {fmt(c["flax"])} / {fmt(c["bnjax"])} |'
    )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  return {'sync-compile': sync_compile_table(_timing.latest('sync_compile'))}
