"""Device benchmark: bnjax against flax.linen.BatchNorm on one accelerator.

Question: on a GPU (or TPU), what does bnjax's branch-free exact statistics
path cost and give, next to flax's BatchNorm? In one process, interleaved
(A B A B) after warm-up:

- the layer: forward and train step (forward, backward, new statistics) at
  the three 4-D NHWC shapes of ``layer.py`` and one bandwidth-bound one;
- a ResNet-50 train step (batch 64, 224 x 224 by default, SGD momentum):
  step time, compile time, XLA's peak-memory estimate, and the number of
  conditionals in the compiled program (each would copy its predicate to
  the host and drain the stream, per step);
- the variance error against float64 at |mean|/std 1e2 to 1e6 of random and
  sorted data, 2-D and 4-D, on this device's own summation order;
- the statistics alone at the bandwidth-bound shape, by each path (flax's
  one-pass formula, bnjax's exact partial in two reads, and the one-read
  variant of ``_tiled.py``), in GB/s.

Run on the device: ``python -m benchmarks run device`` (about 4 minutes on one
H100, most of it compiling ResNet-50 twice); ``--smoke`` runs seconds-long
sizes on any backend (CI runs it on the CPU). Writes
``benchmarks/results/device.json`` (a new run appended) unless ``--smoke``;
``--out PATH`` writes the run to PATH too.
"""

from __future__ import annotations

import functools
import json
import time

import jax.numpy as jnp

from benchmarks import _models, _readme, _tiled, _timing, inplace_abn, layer

# The layer benchmark's three 4-D shapes (16 MB each: on an H200 a pass over
# one takes about 4 us, so their times are mostly dispatch) and a ResNet-50
# stem activation at batch 128 (411 MB: about 0.1 ms a pass, so its ratio
# is the memory traffic's).
SHAPES = [*layer.SHAPES[:3], (128, 112, 112, 64)]
RATIOS = (1e2, 1e4, 1e6)


# HBM peak bandwidth by device name (bytes/s): the fraction of it that a
# pass reaches says how close to the limit a shape is.
HBM_PEAK = {'H100': 3.35e12, 'H200': 4.8e12}


def hbm_peak() -> float | None:
  import jax

  kind = jax.devices()[0].device_kind
  return next((v for k, v in HBM_PEAK.items() if k in kind), None)


def with_kernel(fn, args):
  """``fn`` compiled with the one-read Pallas statistics kernel selected
  (as ``BNJAX_STATS_KERNEL=pallas``; bnjax/_moments/kernel.py)."""
  import jax

  from bnjax._moments import kernel

  selected, kernel.SELECTED = kernel.SELECTED, True
  try:
    return jax.jit(fn).lower(*args).compile()
  finally:
    kernel.SELECTED = selected


def layer_rows(shapes, rounds, inner, dtypes=('float32',)):
  """flax, bnjax and bnjax with the Pallas kernel ('kernel_*'), per shape,
  mode and dtype of x (bfloat16: x cast)."""
  import jax

  rows = []
  for shape in shapes:
    for dtype in dtypes:
      for mode in ('fwd', 'step'):
        fns, args = {}, {}
        for impl in ('flax', 'bnjax', 'kernel'):
          fn, a = layer.build(
            shape, mode, 'bnjax' if impl == 'kernel' else impl
          )
          g, b, x, stats, ct = a
          # The cotangent in the output's dtype: flax promotes x with its
          # float32 scale, bnjax keeps x's dtype.
          ct = ct if impl == 'flax' else ct.astype(dtype)
          a = (g, b, x.astype(dtype), stats, ct)
          fns[impl], args[impl] = jax.jit(fn), a
          if impl == 'kernel':
            fns[impl] = with_kernel(fn, a)
        samples = _timing.interleaved_samples(fns, args, rounds, inner)
        rows.append(
          {
            'shape': list(shape),
            'dtype': dtype,
            'mode': mode,
            **_timing.ratio_columns(samples),
            # kernel_ms, kernel_ratio and its quartiles (flax_ms again)
            **_timing.ratio_columns(samples, 'kernel', prefix='kernel_'),
          }
        )
        print(json.dumps(rows[-1]), flush=True)
  return rows


def stats_rows(shape, rounds, inner, tiles=(16, 32), dtype='float32'):
  """The statistics alone (mean and variance, no normalize) at one shape,
  by each path: flax's one-pass formula (one read of x), bnjax's exact
  partial in two reads (local.py: the path bnjax takes on accelerators),
  the one-read Pallas kernel (kernel.py, opt-in) and the one-read variant
  of ``benchmarks/_tiled.py`` (tried and dropped), at each tile size with a
  tile's values strided or adjacent. GB/s = x's bytes over the time, and
  its fraction of the device's HBM peak. bfloat16 x: reduced in float32
  (the paths' names say bf16)."""
  import jax

  from bnjax import _checks
  from bnjax._moments import kernel, local

  x = (jax.random.normal(jax.random.key(0), shape) + 3.0).astype(dtype)
  lay = _checks.layout('device', x, -1)
  red = lay.reduction_axes
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731  # fuses into the reads

  def flax_formula(x):
    x = f32(x)
    mean = jnp.mean(x, red)
    return mean, jnp.maximum(0.0, jnp.mean(x * x, red) - mean * mean)

  fns = {
    'flax one-pass': flax_formula,
    'bnjax two reads': lambda x: local.finalize(
      local.exact_partial(f32(x), lay)
    ),
    'bnjax one read, Pallas kernel': lambda x: kernel.moments(x, lay)[1:3],
  }
  for b in tiles if dtype == 'float32' else ():
    for strided in (True, False):
      name = f'bnjax one read, tile {b}' + ('' if strided else ' adjacent')
      fns[name] = lambda x, b=b, s=strided: local.finalize(
        _tiled.tiled_partial(x, lay, tile=b, strided=s)
      )
  fns = {k: jax.jit(f) for k, f in fns.items()}
  samples = _timing.interleaved_samples(
    fns, {k: (x,) for k in fns}, rounds, inner
  )
  t = _timing.medians(samples)
  rows, peak = [], hbm_peak()
  for k in fns:
    q25, q75 = _timing.ratio_quartiles(samples[k], samples['flax one-pass'])
    gbs = x.size * x.dtype.itemsize / t[k] / 1e9
    rows.append(
      dict(
        shape=list(shape),
        dtype=dtype,
        path=k if dtype == 'float32' else f'{k}, bf16',
        ms=t[k] * 1e3,
        gbs=gbs,
        hbm_fraction=None if peak is None else gbs * 1e9 / peak,
        vs_flax=t[k] / t['flax one-pass'],
        vs_flax_q25=q25,
        vs_flax_q75=q75,
      )
    )
    print(json.dumps(rows[-1]), flush=True)
  return rows


def cond_cost(layers=50, size=256, rounds=21, inner=20):
  """Microseconds per lax.cond on a device-computed predicate: a chain of
  ``layers`` steps with a cond each (a matmul in each branch, so XLA keeps
  the conditionals instead of turning them into selects), against the same
  chain choosing the weight with a select (no conditional)."""
  import jax

  def chain(use_cond):
    def f(x, w1, w2):
      for _ in range(layers):
        p = jnp.sum(x) > 0
        if use_cond:
          x = jax.lax.cond(
            p, lambda v: jnp.tanh(v @ w1), lambda v: jnp.tanh(v @ w2), x
          )
        else:
          x = jnp.tanh(x @ jnp.where(p, w1, w2))
      return x

    return jax.jit(f)

  x = jnp.ones((size, size))
  args = (x, 0.5 * jnp.eye(size), -0.5 * jnp.eye(size))
  fns = {'cond': chain(True), 'select': chain(False)}
  compiled = fns['cond'].lower(*args).compile().as_text()
  t = _timing.interleaved(fns, {k: args for k in fns}, rounds, inner)
  row = dict(
    layers=layers,
    cond_us=t['cond'] * 1e6,
    select_us=t['select'] * 1e6,
    per_cond_us=(t['cond'] - t['select']) * 1e6 / layers,
    conditionals_compiled=compiled.count(' conditional('),
  )
  print(json.dumps(row), flush=True)
  return row


def model_row(build, batch, size, rounds, inner, classes=1000, dtype='float32'):
  """A train step of ``build(norm_cls)`` with each BatchNorm, interleaved:
  flax, bnjax, and bnjax with the Pallas kernel ('kernel_step_*').
  ``dtype``: the activations' (bfloat16: the layers compute in it,
  parameters float32)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  import bnjax.linen

  act = None if dtype == 'float32' else jnp.dtype(dtype)
  fns, fargs, out, steps = {}, {}, {}, {}
  impls = (
    ('flax', nn.BatchNorm),
    ('bnjax', bnjax.linen.BatchNorm),
    ('kernel', bnjax.linen.BatchNorm),
  )
  for impl, cls in impls:
    model = build(cls, dtype=act)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, classes)
    v = jax.jit(lambda x, m=model: m.init(jax.random.key(2), x, False))(x)
    tx = optax.sgd(0.1, momentum=0.9)
    opt = tx.init(v['params'])
    step, _ = _models.train_step(model, v, tx)
    args = (v['params'], v['batch_stats'], opt, x, y)
    steps[impl] = step
    if impl == 'kernel':
      fns[impl], fargs[impl] = with_kernel(step, args), args
      continue
    compiled = jax.jit(step).lower(*args).compile()
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    fns[impl], fargs[impl] = compiled, args
    out[impl] = dict(
      peak_mb=None
      if mem is None
      else (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
      )
      / 2**20,
      conditionals=text.count(' conditional('),
      host_callbacks=text.count('xla_python_'),
    )
  # Compile time, A B A B after the compiles above (the first compile of
  # a program pays the backend's autotuning, which later ones reuse).
  for _ in range(2):
    for impl in ('flax', 'bnjax'):
      t0 = time.perf_counter()
      fresh = lambda *a, s=steps[impl]: s(*a)  # noqa: E731  # defeats jit's cache
      jax.jit(fresh).lower(*fargs[impl]).compile()
      out[impl]['compile_s'] = time.perf_counter() - t0
  samples = _timing.interleaved_samples(fns, fargs, rounds, inner)
  row = dict(
    batch=batch,
    size=size,
    dtype=dtype,
    **{
      **_timing.ratio_columns(samples, prefix='step_'),
      # kernel_ms, kernel_step_ratio and its quartiles (flax_ms again)
      **_timing.ratio_columns(samples, 'kernel', prefix='kernel_step_'),
    },
    compile_ratio=out['bnjax']['compile_s'] / out['flax']['compile_s'],
    flax=out['flax'],
    bnjax=out['bnjax'],
  )
  print(json.dumps(row), flush=True)
  return row


def numerics_rows(seeds=(0, 1)):
  """Largest relative variance error over channels and seeds, per case."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  import bnjax

  def flax_var(x):
    m = nn.BatchNorm(use_running_average=False, momentum=0.0)
    v = m.init(jax.random.key(0), x)
    return m.apply(v, x, mutable=['batch_stats'])[1]['batch_stats']['var']

  def bnjax_var(x):
    s = bnjax.init_batch_stats(x.shape[-1])
    return bnjax.batch_norm(x, s, use_running_average=False, momentum=0.0)[
      1
    ].var

  fns = {
    'bnjax batch_norm': jax.jit(bnjax_var),
    'bnjax moments': jax.jit(lambda x: bnjax.moments(x)[1]),
    'flax': jax.jit(flax_var),
  }
  rows = []
  for shape in ((4096, 16), (64, 8, 8, 16)):
    for order in ('random', 'sorted'):
      for ratio in RATIOS:
        errs = {k: 0.0 for k in fns}
        for seed in seeds:
          rng = np.random.default_rng(seed)
          x = (ratio + rng.standard_normal((4096, 16))).astype(np.float32)
          if order == 'sorted':
            x = np.sort(x, axis=0)
          x = x.reshape(shape)
          want = x.reshape(-1, 16).astype(np.float64).var(0)
          for k, f in fns.items():
            got = np.asarray(f(jnp.asarray(x)), np.float64)
            err = float(np.max(np.abs(got - want) / want))
            errs[k] = max(errs[k], err if np.isfinite(err) else float('inf'))
        for k, err in errs.items():
          rows.append(
            dict(impl=k, shape=list(shape), order=order, ratio=ratio, err=err)
          )
  worst = max(r['err'] for r in rows if r['impl'].startswith('bnjax'))
  print(json.dumps(dict(worst_bnjax_variance_error=worst)), flush=True)
  return rows


def main(argv=None):
  def extra(p):
    p.add_argument('--out', help='also write the run to this JSON file')

  args = _timing.parse_args(__doc__, argv, extra)
  import jax

  out = dict(env=_timing.environment())
  print(json.dumps(out['env']), flush=True)
  if args.smoke:  # a one-block ResNet stands in for ResNet-50: same code
    tiny = functools.partial(_models.resnet20, widths=(4,), blocks=1)
    plan = dict(
      layer=lambda: layer_rows(
        [(8, 4, 4, 8)], rounds=2, inner=1, dtypes=('float32', 'bfloat16')
      ),
      resnet50=lambda: model_row(
        tiny, batch=2, size=8, rounds=1, inner=1, classes=10
      ),
      resnet50_bf16=lambda: model_row(
        tiny,
        batch=2,
        size=8,
        rounds=1,
        inner=1,
        classes=10,
        dtype='bfloat16',
      ),
      numerics=lambda: numerics_rows(seeds=(0,)),
      stats=lambda: [
        *stats_rows((8, 4, 4, 8), rounds=2, inner=1),
        *stats_rows((64, 4, 4, 128), rounds=2, inner=1, dtype='bfloat16'),
      ],
      cond=lambda: cond_cost(layers=4, rounds=2, inner=1),
      inplace_abn=lambda: inplace_abn.resnet_rows(
        (2, 4), 16, 10, (1,), budget_gib=80
      )[0],
    )
  else:
    plan = dict(
      stats=lambda: [
        *stats_rows(SHAPES[-1], rounds=21, inner=10),
        *stats_rows(SHAPES[-1], rounds=21, inner=10, dtype='bfloat16'),
      ],
      layer=lambda: layer_rows(
        SHAPES, rounds=21, inner=10, dtypes=('float32', 'bfloat16')
      ),
      numerics=numerics_rows,
      cond=cond_cost,
      resnet50=lambda: model_row(
        _models.resnet50, batch=64, size=224, rounds=9, inner=5
      ),
      resnet50_bf16=lambda: model_row(
        _models.resnet50,
        batch=64,
        size=224,
        rounds=9,
        inner=5,
        dtype='bfloat16',
      ),
      # BN + leaky ReLU with each BN, and batch_norm_act: compiled peak at
      # two batches, and the largest batch that fits 80 GB (linear).
      inplace_abn=lambda: inplace_abn.resnet_rows(
        (32, 64), 224, 1000, (3, 4, 6, 3), budget_gib=80
      )[0],
    )
  for name, run in plan.items():
    try:  # each part on its own: one failure keeps the others' figures
      out[name] = run()
    except Exception as e:  # noqa: BLE001  # recorded, and raised in smoke
      if args.smoke:
        raise
      out[name] = dict(error=f'{type(e).__name__}: {e}')
      print(json.dumps({name: out[name]}), flush=True)
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(out, f, indent=1)
  if not args.smoke:
    _timing.write_result('device', out)
  assert all(r['bnjax_ms'] > 0 for r in out['layer'])
  if jax.default_backend() != 'cpu':
    assert out['resnet50']['bnjax']['conditionals'] == 0, out['resnet50']
  return out


def device_table(run: dict) -> str:
  env = run['env']
  lines = [
    f'Run of {env.get("date")} at {_readme.commit(env)} on {env.get("devices")} '
    f'(jax {env.get("jax")}, flax {env.get("flax")}):',
    '',
    '| what | flax ms | bnjax ms | vs flax (quartiles) |',
    '|---|---|---|---|',
  ]
  for r in run['layer']:
    shape = 'x'.join(map(str, r['shape']))
    if r.get('dtype', 'float32') != 'float32':
      shape += f' {r["dtype"]}'
    lines.append(
      f'| layer {shape} {r["mode"]} | {r["flax_ms"]:.3f} | {r["bnjax_ms"]:.3f}'
      f' | **{r["ratio"]:.2f}** ({r["ratio_q25"]:.2f}-{r["ratio_q75"]:.2f}) |'
    )
  m = run['resnet50']
  for r in (m, run.get('resnet50_bf16')):
    if not r or 'flax_ms' not in r:  # an older run, or a part that failed
      continue
    what = f'ResNet-50 step, batch {r["batch"]} of {r["size"]}x{r["size"]}'
    if r.get('dtype', 'float32') != 'float32':
      what += f' {r["dtype"]}'
    lines.append(
      f'| {what} | {r["flax_ms"]:.2f} | {r["bnjax_ms"]:.2f} | '
      f'**{r["step_ratio"]:.2f}** ({r["step_ratio_q25"]:.2f}-'
      f'{r["step_ratio_q75"]:.2f}) |'
    )
    if 'kernel_ms' in r:
      lines.append(
        f'| {what}, Pallas kernel | {r["flax_ms"]:.2f} | {r["kernel_ms"]:.2f}'
        f' | **{r["kernel_step_ratio"]:.2f}** ({r["kernel_step_ratio_q25"]:.2f}'
        f'-{r["kernel_step_ratio_q75"]:.2f}) |'
      )
  worst = max(
    r['err'] for r in run['numerics'] if r['impl'].startswith('bnjax')
  )
  lines += [
    '',
    f'ResNet-50 compile time vs flax: {m["compile_ratio"]:.2f}; conditionals '
    f"in bnjax's compiled step: {m['bnjax']['conditionals']}; bnjax's worst "
    f'variance error against float64 at |mean|/std 1e2 to 1e6 on this device: '
    f'{worst:.1e}.',
  ]
  if 'per_cond_us' in run.get('cond', {}):
    lines[-1] += (
      f' A `lax.cond` on a predicate computed on the device costs '
      f'{run["cond"]["per_cond_us"]:.1f} µs over a select (the predicate '
      f'copied to the host and the stream drained; a chain of '
      f'{run["cond"]["layers"]}).'
    )
  return '\n'.join(lines)


def stats_table(run: dict) -> str:
  env, shape = run['env'], 'x'.join(map(str, run['stats'][0]['shape']))
  lines = [
    f'Run of {env.get("date")} at {_readme.commit(env)} on {env.get("devices")} '
    f'(jax {env.get("jax")}), mean and variance of a {shape} float32 input:',
    '',
    '| path | ms | GB/s | vs flax (quartiles) |',
    '|---|---|---|---|',
  ]
  for r in run['stats']:
    lines.append(
      f'| {r["path"]} | {r["ms"]:.3f} | {r["gbs"]:.0f} | **{r["vs_flax"]:.2f}**'
      f' ({r["vs_flax_q25"]:.2f}-{r["vs_flax_q75"]:.2f}) |'
    )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  # The statistics rows of the last run that has them (the runs with the
  # one-read variant as bnjax's path are kept apart, in device_tiled.json).
  tried = _timing.runs('device_tiled')
  with_stats = [r for r in tried + _timing.runs('device') if 'stats' in r]
  steps = ' and '.join(
    f'{r["resnet50"]["step_ratio"]:.2f}x ({r["resnet50"]["bnjax_ms"]:.1f} ms)'
    for r in tried
  )
  two = _timing.latest('device')['resnet50']['bnjax_ms']
  return {
    'device': device_table(_timing.latest('device')),
    'device-stats': stats_table(with_stats[-1])
    + f"\n\nWith the one-read variant as bnjax's path "
    f'(`results/device_tiled.json`), the ResNet-50 step was {steps} of '
    f"flax's; with the two reads, bnjax's step took {two:.1f} ms.",
  }
