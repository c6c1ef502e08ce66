"""Layer benchmark: bnjax.batch_norm vs flax.linen.BatchNorm, one process.

Question: how fast is one BN layer, forward, fwd+bwd and full train step, and
how long does it compile, relative to flax.linen.BatchNorm on the same
machine? Timings are interleaved (A B A B) after warm-up, medians of rounds,
with the allocator setting ``_timing.MALLOC`` (benchmarks/README.md states
it; the script re-executes itself with it). Modes:

- ``fwd``: training-mode forward, returns y and the new running stats;
- ``grad``: gradients of <y, ct> for x, scale and bias;
- ``step``: forward and backward together: y, new stats and the gradients.

Run: ``python -m benchmarks run layer`` (about 3 minutes on 2 cores) or
``--smoke`` (seconds; CI keeps the script working). Writes
``benchmarks/results/layer.json`` (not in smoke mode).
"""

from __future__ import annotations

import json

from benchmarks import _readme, _timing

SHAPES = [
  (64, 32, 32, 64),
  (128, 16, 16, 128),
  (32, 56, 56, 64),
  (1024, 512),
  (256, 32),
]
MODES = ('fwd', 'grad', 'step')


def build(shape, mode, impl):
  """Returns (jittable fn, args) for one shape, mode and implementation."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import bnjax

  c = shape[-1]
  x = jax.random.normal(jax.random.key(0), shape)
  ct = jax.random.normal(jax.random.key(1), shape)
  g, b = jnp.ones(c), jnp.zeros(c)
  if impl == 'flax':
    mod = nn.BatchNorm(use_running_average=False)
    stats = mod.init(jax.random.key(0), x)['batch_stats']

    def layer(g, b, x, stats):
      return mod.apply(
        {'params': {'scale': g, 'bias': b}, 'batch_stats': stats},
        x,
        mutable=['batch_stats'],
      )
  else:
    stats = bnjax.init_batch_stats(c)

    def layer(g, b, x, stats):
      return bnjax.batch_norm(x, stats, g, b, use_running_average=False)

  if mode == 'fwd':
    fn = lambda g, b, x, stats, ct: layer(g, b, x, stats)
  elif mode == 'grad':
    fn = lambda g, b, x, stats, ct: jax.grad(
      lambda g, b, x: jnp.vdot(layer(g, b, x, stats)[0], ct), (0, 1, 2)
    )(g, b, x)
  else:

    def fn(g, b, x, stats, ct):
      (y, new), vjp = jax.vjp(lambda g, b, x: layer(g, b, x, stats), g, b, x)
      return y, new, vjp((ct, jax.tree.map(jnp.zeros_like, new)))

  return fn, (g, b, x, stats, ct)


def residuals(shape, impl):
  """Full-size arrays saved between forward and backward."""
  from jax._src.ad_checkpoint import saved_residuals

  fn, (g, b, x, stats, _) = build(shape, 'fwd', impl)
  res = saved_residuals(lambda g, b, x: fn(g, b, x, stats, None)[0], g, b, x)
  return sum(1 for aval, _ in res if tuple(aval.shape) == tuple(shape))


def run(shapes, rounds, inner, compile_repeats):
  import jax

  rows = []
  for shape in shapes:
    for mode in MODES:
      fns, args = {}, {}
      for impl in ('flax', 'bnjax'):
        fn, a = build(shape, mode, impl)
        fns[impl], args[impl] = jax.jit(fn), a
      samples = _timing.interleaved_samples(fns, args, rounds, inner)
      comp = {
        impl: _timing.compile_seconds(
          lambda impl=impl: jax.jit(build(shape, mode, impl)[0]),
          args[impl],
          compile_repeats,
        )
        for impl in ('flax', 'bnjax')
      }
      row = dict(
        shape=list(shape),
        mode=mode,
        **_timing.ratio_columns(samples),
        flax_compile_s=comp['flax'],
        bnjax_compile_s=comp['bnjax'],
        compile_ratio=comp['bnjax'] / comp['flax'],
      )
      if mode == 'step':
        row['flax_residuals'] = residuals(shape, 'flax')
        row['bnjax_residuals'] = residuals(shape, 'bnjax')
      rows.append(row)
      print(
        json.dumps(
          {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in row.items()
          }
        ),
        flush=True,
      )
  return rows


# Minimum bytes moved, in units of x's size: fwd reads x and writes y; grad
# reads x and ct and writes dx; step reads x and ct and writes y and dx.
MIN_PASSES = {'fwd': 2, 'grad': 3, 'step': 4}


def streaming_gbs(rounds: int = 10) -> float:
  """This machine's streaming bandwidth: a jitted out-of-place x*2+1, 256 MB."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((64 * 2**20,), jnp.float32)
  f = jax.jit(lambda x: x * 2 + 1)
  t = _timing.interleaved({'s': f}, {'s': (x,)}, rounds, 3)['s']
  return 2 * x.nbytes / t / 1e9


def add_bandwidth(rows, stream_gbs):
  import math

  for r in rows:
    nbytes = 4 * math.prod(r['shape']) * MIN_PASSES[r['mode']]
    r['bnjax_gbs'] = nbytes / (r['bnjax_ms'] * 1e-3) / 1e9
    r['bandwidth_fraction'] = r['bnjax_gbs'] / stream_gbs


def add_torch(rows):
  """bnjax / PyTorch's best layout, from results/torch_layer.json if present."""
  if not _timing.runs('torch_layer'):
    return
  best = {
    (tuple(r['shape']), r['mode']): r['best_ms']
    for r in _timing.latest('torch_layer')['rows']
  }
  for r in rows:
    t = best.get((tuple(r['shape']), r['mode']))
    if t:
      r['torch_best_ms'] = t
      r['torch_ratio'] = r['bnjax_ms'] / t


def _ms(v: float) -> str:
  """Four significant digits from 1 ms up (the table's columns stay narrow)."""
  return f'{v:.3f}' if v < 10 else f'{v:.2f}'


def table(rows) -> str:
  lines = [
    '| shape | mode | flax ms | bnjax ms | vs flax | compile ratio | '
    'torch best ms | vs torch | GB/s (of peak) | '
    'full-size residuals (flax / bnjax) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    res = (
      f'{r["flax_residuals"]} / {r["bnjax_residuals"]}'
      if 'bnjax_residuals' in r
      else ''
    )
    torch = (
      f'{r["torch_best_ms"]:.3f} | {r["torch_ratio"]:.2f}'
      if 'torch_ratio' in r
      else ' | '
    )
    bw = (
      f'{r["bnjax_gbs"]:.1f} ({r["bandwidth_fraction"]:.2f})'
      if 'bnjax_gbs' in r
      else ''
    )
    lines.append(
      f'| {"x".join(map(str, r["shape"]))} | {r["mode"]} | '
      f'{_ms(r["flax_ms"])} | {_ms(r["bnjax_ms"])} | '
      f'**{r["ratio"]:.2f}** ({r["ratio_q25"]:.2f}-'
      f'{r["ratio_q75"]:.2f}) | {r["compile_ratio"]:.2f} | {torch} | '
      f'{bw} | {res} |'
    )
  return '\n'.join(lines)


def _machine_block(out) -> str:
  """The README's layer block for one run: machine, method, table."""
  e = out['env']
  return (
    f'Machine: {e["machine"]} ({e["backend"]}), jax '
    f'{e["jax"]}, flax {e["flax"]}, Python {e["python"]}, {e["date"]}, '
    f'commit {e["commit"]}; medians of {out["rounds"]} interleaved '
    f'rounds of {out["inner"]} calls. Streaming bandwidth (jitted '
    f'x*2+1 on 256 MB, the higher of before and after the run): '
    f'{out["streaming_gbs"]:.1f} GB/s '
    f'({out["streaming_gbs_before_after"][0]:.1f} before, '
    f'{out["streaming_gbs_before_after"][1]:.1f} after). '
    f'PyTorch: benchmarks/torch_layer.py, its own process, 2 threads, '
    f'best of NCHW and channels_last.\n\n{table(out["rows"])}'
  )


def main(argv=None):
  def extra(p):
    p.add_argument('--rounds', type=int, default=25)
    p.add_argument('--inner', type=int, default=5)

  args = _timing.parse_args(__doc__, argv, extra)
  if args.smoke:
    rows = run([(8, 4, 4, 8)], rounds=2, inner=1, compile_repeats=1)
    add_bandwidth(rows, streaming_gbs(rounds=1))
    assert all(r['bnjax_ms'] > 0 and r['bnjax_gbs'] > 0 for r in rows)
    table(rows)
    return rows
  # The machine's bandwidth drifts during a run (8 to 24 GB/s seen here):
  # measured before and after, the fractions use the higher figure.
  stream_before = streaming_gbs()
  rows = run(SHAPES, args.rounds, args.inner, compile_repeats=3)
  stream_after = streaming_gbs()
  stream = max(stream_before, stream_after)
  add_bandwidth(rows, stream)
  add_torch(rows)
  out = dict(
    env=_timing.environment(),
    rounds=args.rounds,
    inner=args.inner,
    streaming_gbs=stream,
    streaming_gbs_before_after=[stream_before, stream_after],
    rows=rows,
  )
  _timing.write_result('layer', out)
  print(table(rows))
  return rows


def layer_values(run: dict, mode: str, key: str) -> list:
  rows = {(tuple(r['shape']), r['mode']): r for r in run['rows']}
  return [rows.get((tuple(s), mode), {}).get(key) for s in SHAPES[:3]]


def layer_range(mode: str, key: str = 'ratio', last: int = 2) -> tuple:
  """(min, max) of a layer figure over the 4-D shapes of the last runs."""
  values = [
    v
    for run in _timing.runs('layer')[-last:]
    for v in layer_values(run, mode, key)
    if v is not None
  ]
  return min(values), max(values)


def layer_runs_table(runs: list) -> str:
  lines = [
    '| date | commit | train step vs flax | forward vs flax | '
    'step compile vs flax | step vs PyTorch best |',
    '|---|---|---|---|---|---|',
  ]
  for run in runs:
    e = run['env']
    lines.append(
      f'| {e["date"]} | {_readme.commit(e)} | '
      f'{_readme.span(layer_values(run, "step", "ratio"))} | '
      f'{_readme.span(layer_values(run, "fwd", "ratio"))} | '
      f'{_readme.span(layer_values(run, "step", "compile_ratio"))} | '
      f'{_readme.span(layer_values(run, "step", "torch_ratio"))} |'
    )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  return {
    'layer': _machine_block(_timing.latest('layer')),
    'layer-runs': layer_runs_table(_timing.runs('layer')),
  }
