"""Model benchmark: ResNet-20 train step with flax's BatchNorm vs bnjax's.

Question: what does swapping ``flax.linen.BatchNorm`` for
``bnjax.linen.BatchNorm`` buy in a whole model? A CIFAR-style ResNet-20
(``_models.resnet20``: 3 stages x 3 basic blocks, 16/32/64 channels, 21 BN
layers: the stem, 18 in the blocks, 2 on projected shortcuts) on 32x32x3
inputs, batch 128, one SGD-momentum train step with ``mutable=['batch_stats']``.
Reports the step time (interleaved medians, allocator setting applied), XLA's
memory analysis of the compiled step (temporaries, and the peak estimate
arguments + outputs + temporaries), and the residuals saved between forward
and backward (count and bytes), and, after the timing, XLA op time by kind
(convolution, BN, other) from a profiler trace (``benchmarks/_profile.py``).
Run: ``python -m benchmarks run model`` (about 4 minutes on 2 cores) or
``--smoke``. Writes ``results/model.json``.
"""

from __future__ import annotations

import json

from benchmarks import _models, _profile, _readme, _timing


def build(impl: str, batch: int, size: int, blocks: int = 3):
  import flax.linen as nn
  import jax
  import optax

  import bnjax.linen

  norm = nn.BatchNorm if impl == 'flax' else bnjax.linen.BatchNorm
  model = _models.resnet20(norm, blocks=blocks)
  x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  v = model.init(jax.random.key(2), x, train=False)
  tx = optax.sgd(0.1, momentum=0.9)
  opt = tx.init(v['params'])
  step, loss = _models.train_step(model, v, tx)
  args = (v['params'], v['batch_stats'], opt, x, y)
  return step, loss, args


def memory(compiled, loss, args) -> dict:
  from jax._src.ad_checkpoint import saved_residuals

  m = compiled.memory_analysis()
  res = saved_residuals(lambda p: loss(p, *args[1:2], *args[3:])[0], args[0])
  nbytes = sum(a.size * a.dtype.itemsize for a, _ in res)
  return dict(
    temp_mb=m.temp_size_in_bytes / 2**20,
    peak_mb=(
      m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    )
    / 2**20,
    residuals=len(res),
    residual_mb=nbytes / 2**20,
  )


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  import jax

  # The smoke run: a ResNet-8 (one block per stage), seconds to compile.
  batch, size, blocks = (8, 8, 1) if args.smoke else (128, 32, 3)
  fns, fargs, mem = {}, {}, {}
  for impl in ('flax', 'bnjax'):
    step, loss, a = build(impl, batch, size, blocks)
    # One compile serves the memory analysis, the timing and the profile.
    fns[impl], fargs[impl] = jax.jit(step).lower(*a).compile(), a
    mem[impl] = memory(fns[impl], loss, a)
  samples = _timing.interleaved_samples(
    fns, fargs, rounds=2 if args.smoke else 15, inner=1 if args.smoke else 3
  )
  # After the timing: the profiler's own overhead must not touch it.
  prof = {
    impl: _profile.op_time_breakdown(
      fns[impl], fargs[impl], calls=1 if args.smoke else 3
    )
    for impl in ('flax', 'bnjax')
  }
  comp = {
    impl: 0.0
    if args.smoke
    else _timing.compile_seconds(
      lambda impl=impl: jax.jit(build(impl, batch, size)[0]), fargs[impl], 3
    )
    for impl in ('flax', 'bnjax')
  }
  row = dict(
    batch=batch,
    size=size,
    **_timing.ratio_columns(samples, prefix='step_'),
    flax_profile=prof['flax'],
    bnjax_profile=prof['bnjax'],
    bn_op_ratio=(prof['bnjax']['op_ms']['bn'] / prof['flax']['op_ms']['bn']),
    flax_mem=mem['flax'],
    bnjax_mem=mem['bnjax'],
    peak_ratio=mem['bnjax']['peak_mb'] / mem['flax']['peak_mb'],
    temp_ratio=mem['bnjax']['temp_mb'] / mem['flax']['temp_mb'],
    flax_compile_s=comp['flax'],
    bnjax_compile_s=comp['bnjax'],
    **{
      f'{impl}_{k}': v
      for impl in ('flax', 'bnjax')
      for k, v in _profile.program_counts(fns[impl].as_text()).items()
    },
  )
  print(json.dumps(row, indent=1))
  if not args.smoke:
    _timing.write_result('model', dict(env=_timing.environment(), row=row))
  return row


def model_table(run: dict) -> str:
  r = run['row']
  fm, bm = r['flax_mem'], r['bnjax_mem']
  fp, bp = r['flax_profile'], r['bnjax_profile']
  e = run['env']

  def op(p, k):
    return f'{p["op_ms"][k]:.0f} ({p["share"][k]:.0%})'

  rows = [
    (
      'train step (ms)',
      f'{r["flax_ms"]:.1f}',
      f'{r["bnjax_ms"]:.1f}',
      f'**{r["step_ratio"]:.2f}** ({r["step_ratio_q25"]:.2f}-'
      f'{r["step_ratio_q75"]:.2f})',
    ),
    (
      'peak memory estimate (args + outputs + temps, MB)',
      f'{fm["peak_mb"]:.1f}',
      f'{bm["peak_mb"]:.1f}',
      f'**{r["peak_ratio"]:.2f}**',
    ),
    (
      'temporaries (MB)',
      f'{fm["temp_mb"]:.1f}',
      f'{bm["temp_mb"]:.1f}',
      f'{r["temp_ratio"]:.2f}',
    ),
    (
      'residuals kept for the backward (count / MB)',
      f'{fm["residuals"]} / {fm["residual_mb"]:.1f}',
      f'{bm["residuals"]} / {bm["residual_mb"]:.1f}',
      f'{bm["residual_mb"] / fm["residual_mb"]:.2f} (MB)',
    ),
    (
      'compile (s)',
      f'{r["flax_compile_s"]:.2f}',
      f'{r["bnjax_compile_s"]:.2f}',
      f'{r["bnjax_compile_s"] / r["flax_compile_s"]:.2f}',
    ),
    *(
      [
        (
          'fusions / conditionals in the compiled step',
          f'{r["flax_fusions"]} / {r["flax_conditionals"]}',
          f'{r["bnjax_fusions"]} / {r["bnjax_conditionals"]}',
          f'{r["bnjax_fusions"] / r["flax_fusions"]:.2f} (fusions)',
        )
      ]
      if 'bnjax_fusions' in r
      else []
    ),
    (
      'op time in conv fusions (ms per step)',
      op(fp, 'conv'),
      op(bp, 'conv'),
      f'{bp["op_ms"]["conv"] / fp["op_ms"]["conv"]:.2f}',
    ),
    (
      'op time in BN fusions (ms per step)',
      op(fp, 'bn'),
      op(bp, 'bn'),
      f'{r["bn_op_ratio"]:.2f}',
    ),
  ]
  head = (
    f'ResNet-20, batch {r["batch"]} of {r["size"]}x{r["size"]}x3; '
    f'{e["machine"]}, jax {e["jax"]}, flax {e["flax"]}, {e["date"]}, '
    f'commit {_readme.commit(e)}.\n\n'
  )
  return head + '\n'.join(
    ['| | flax | bnjax | ratio |', '|---|---|---|---|']
    + [f'| {a} | {b} | {c} | {d} |' for a, b, c, d in rows]
  )


def model_runs_table(runs: list) -> str:
  lines = [
    '| date | commit | step vs flax | peak memory vs flax | '
    'BN op time vs flax |',
    '|---|---|---|---|---|',
  ]
  for run in runs:
    r, e = run['row'], run['env']
    bn = f'{r["bn_op_ratio"]:.2f}' if 'bn_op_ratio' in r else 'n/a'
    lines.append(
      f'| {e["date"]} | {_readme.commit(e)} | {r["step_ratio"]:.2f} | '
      f'{r["peak_ratio"]:.2f} | {bn} |'
    )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  return {
    'model': model_table(_timing.latest('model')),
    'model-runs': model_runs_table(_timing.runs('model')),
  }
