"""Compile benchmark: how long a whole model's train step takes to compile.

Question: does swapping ``flax.linen.BatchNorm`` for ``bnjax.linen.BatchNorm``
make a real model compile slower? Models: flax's ImageNet example ResNet-50
(53 BN layers) and the CIFAR ResNet-20 that ``model.py`` times (21 BN
layers), both from ``benchmarks/_models.py``, each one SGD-momentum train step with
``mutable=['batch_stats']``, jitted from a fresh Python function each time
(so JAX's caches do not answer), trace + lower + compile timed, A B A B
after one warm-up compile of each. The input size does not change what is
compiled beyond the shapes (ResNet-50 at batch 8 of 64 x 64 here).

Run: ``python -m benchmarks run compile`` (about 5 minutes on 2 cores) or
``--smoke`` (a one-block ResNet at a tiny size, one repeat). Writes
``results/compile.json`` (not in smoke mode).
"""

from __future__ import annotations

import json
import time

from benchmarks import _models, _readme, _timing

MODELS = {
  'resnet50': (_models.resnet50, dict(batch=8, size=64, classes=1000)),
  'resnet20': (_models.resnet20, dict(batch=128, size=32, classes=10)),
}


def compile_row(name, build, batch, size, classes, repeats):
  import flax.linen as nn
  import jax
  import optax

  import bnjax.linen

  steps, args = {}, {}
  for impl, cls in (('flax', nn.BatchNorm), ('bnjax', bnjax.linen.BatchNorm)):
    model = build(cls)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, classes)
    v = jax.jit(lambda x, m=model: m.init(jax.random.key(2), x, False))(x)
    tx = optax.sgd(0.1, momentum=0.9)
    steps[impl], _ = _models.train_step(model, v, tx)
    args[impl] = (v['params'], v['batch_stats'], tx.init(v['params']), x, y)
  times: dict[str, list[float]] = {'flax': [], 'bnjax': []}
  for r in range(repeats + 1):  # the first round warms up, unrecorded
    for impl in ('flax', 'bnjax'):
      fresh = lambda *a, s=steps[impl]: s(*a)  # noqa: E731  # no cache hit
      t0 = time.perf_counter()
      jax.jit(fresh).lower(*args[impl]).compile()
      if r:
        times[impl].append(time.perf_counter() - t0)
  row = dict(
    model=name, batch=batch, size=size, **_timing.compile_columns(times)
  )
  print(json.dumps(row), flush=True)
  return row


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  if args.smoke:
    tiny = lambda cls: _models.resnet20(cls, widths=(4,), blocks=1)
    rows = [compile_row('tiny', tiny, batch=2, size=8, classes=10, repeats=1)]
  else:
    rows = [
      compile_row(name, build, repeats=5, **kw)
      for name, (build, kw) in MODELS.items()
    ]
  out = dict(env=_timing.environment(), rows=rows)
  if not args.smoke:
    _timing.write_result('compile', out)
  return out


def compile_table(run: dict) -> str:
  lines = [
    f'Run of {run["env"].get("date")} at {_readme.commit(run["env"])}, jax '
    f'{run["env"].get("jax")}, {run["env"].get("machine")}:',
    '',
    '| model | input | flax s | bnjax s | vs flax | pairs (A B A B) |',
    '|---|---|---|---|---|---|',
  ]
  for r in run['rows']:
    lines.append(
      f'| {r["model"]} | {r["batch"]}x{r["size"]}x{r["size"]}x3 | '
      f'{r["flax_s"]:.2f} | {r["bnjax_s"]:.2f} | **{r["ratio"]:.2f}** | '
      f'{_readme.span(r["pair_ratios"])} |'
    )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  return {'compile': compile_table(_timing.latest('compile'))}
