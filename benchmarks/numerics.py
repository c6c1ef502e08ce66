"""Numerics benchmark: variance error against float64 at |mean|/std 1e2 to 1e6.

Question: how far from the float64 variance of the same float32 input are
the statistics of bnjax, flax.linen.BatchNorm and PyTorch, on one device and
synced over 8 CPU devices, when the data sit far from zero? Data: 4096 x 16
float32 values ``x = loc + N(0, 1)`` (so |mean|/std = loc), split over 8
shards of 512 rows, in five layouts:

- ``identical``: every shard draws from the same distribution;
- ``means 0.1% apart``: shard d has ``loc * (1 + 0.001 d)``;
- ``uneven masks``: per-entry masks keeping a fraction (d + 1) / 8 on shard d;
- ``empty shard``: shard 0 fully masked out, the others fully in;
- ``sorted``: each channel's values in ascending order, so the first
  shard, and the first slices of every reduction, hold the lowest values;
- ``outlier first``: ``identical`` with the first value of each channel
  moved 1000 std up.

Each layout comes as a 2-D ``(4096, 16)`` array and as the same values in a
4-D NHWC ``(64, 8, 8, 16)`` one.

Each layout runs on one device (one call on all 4096 rows) and synced
(``jax.shard_map`` over 8 devices with ``axis_name``), by bnjax's two sync
paths: ``sync='gather'`` from a zero running mean (step 0), and
``sync='psum'`` with the running mean at ``loc`` (the steady state: where
the shift is within sqrt(8) std of every channel's mean the psum's result is
used, elsewhere, as in ``means 0.1% apart`` from 1e4, the exact gather runs
in the same step). Reported: the largest
relative error over channels, shards and seeds (0, 1, 2) of the variance each
function returns: ``moments``; the new running variance of ``batch_norm``
(momentum 0) in the forward and in a differentiated train step; the running
std of ``batch_renorm`` (as ``std**2 - eps``); the running variance of ghost
BN (``virtual_batch_size=128``, the mean of chunk variances). Peers: flax's
BatchNorm with ``use_fast_variance`` True and False (masks and ``axis_name``
as flax takes them: per-shard means averaged with ``pmean``), and PyTorch's
``F.batch_norm`` (one device, no mask; skipped without torch).

Run: ``python -m benchmarks run numerics`` (about 4 minutes) or ``--smoke``.
Appends a run to ``results/numerics.json`` and fills the table of
docs/guides/numerics.md from it; ``--table`` prints the table.
"""

from __future__ import annotations

import functools

from benchmarks import _timing

RATIOS = (1e2, 1e3, 1e4, 1e5, 1e6)
LAYOUTS = (
  'identical',
  'means 0.1% apart',
  'uneven masks',
  'empty shard',
  'sorted',
  'outlier first',
)
ROWS, C, D, VBS, EPS = 4096, 16, 8, 128, 1e-5
# 2-D: (rows, C). 4-D: the same values as (images, 8, 8, C), NHWC, so a
# shard holds 8 images and a ghost chunk (VBS rows) is 2 images.
SHAPES = {'2-D': (ROWS, C), '4-D': (ROWS // 64, 8, 8, C)}
BNJAX_FNS = (
  'moments',
  'batch_norm',
  'batch_norm (grad)',
  'batch_renorm',
  'ghost',
)


def make_data(ratio: float, layout: str, seed: int, shape: str = '2-D'):
  """(x float32, mask bool or None) for one layout, in SHAPES[shape]."""
  import numpy as np

  rng = np.random.default_rng(seed)
  shard = np.repeat(np.arange(D), ROWS // D)[:, None]
  loc = ratio * (1 + 0.001 * shard) if layout == 'means 0.1% apart' else ratio
  x = (loc + rng.standard_normal((ROWS, C))).astype(np.float32)
  mask = None
  if layout == 'uneven masks':
    mask = rng.random((ROWS, C)) < (shard + 1) / D
  elif layout == 'empty shard':
    mask = np.broadcast_to(shard > 0, (ROWS, C))
  elif layout == 'sorted':
    x = np.sort(x, axis=0)
  elif layout == 'outlier first':
    x[0] += np.float32(1e3)
  if mask is not None:
    mask = np.ascontiguousarray(mask).reshape(SHAPES[shape])
  return x.reshape(SHAPES[shape]), mask


def _moments64(x, mask):
  """float64 per-channel mean, biased variance and count of (rows, C) x.

  The truth every error is measured against, computed here so that the
  benchmark needs nothing from tests/ (tests/core/test_exactness.py holds it
  equal to the suite's oracle, tests/reference.py).
  """
  import numpy as np

  m = np.ones(x.shape, bool) if mask is None else mask
  n = m.sum(0)
  safe = np.maximum(n, 1)
  mean = np.where(m, x, 0).sum(0) / safe
  var = (np.where(m, x - mean, 0) ** 2).sum(0) / safe
  return mean, var, n


def oracle_var(x, mask, fn: str):
  """float64 variance of what ``fn`` reports, over all shards."""
  import numpy as np

  x64 = np.asarray(x, np.float64).reshape(ROWS, C)
  if mask is not None:
    mask = np.asarray(mask).reshape(ROWS, C)
  if fn != 'ghost':
    return _moments64(x64, mask)[1]
  m = np.ones(x64.shape, bool) if mask is None else mask
  vs, ws = [], []
  for c in range(0, ROWS, VBS):  # chunks lie within shards: 512 = 4 * 128
    _, v, n = _moments64(x64[c : c + VBS], m[c : c + VBS])
    vs.append(v)
    ws.append(n > 0)
  vs, ws = np.array(vs), np.array(ws)
  return (vs * ws).sum(0) / np.maximum(ws.sum(0), 1)


def bnjax_var(fn: str, x, mask, axis_name, running_mean=0.0, sync='gather'):
  """The variance that one bnjax function reports (traceable), starting
  from running statistics (running_mean, 1)."""
  import jax
  import jax.numpy as jnp

  import bnjax

  kw = dict(mask=mask, axis_name=axis_name, sync=sync)
  mean0 = jnp.full(C, running_mean, jnp.float32)
  if fn == 'moments':
    return bnjax.moments(x, **kw)[1]
  if fn == 'batch_renorm':
    s = bnjax.batch_renorm(
      x,
      bnjax.RenormStats(mean0, jnp.ones(C)),
      use_running_average=False,
      r_max=3.0,
      d_max=5.0,
      momentum=0.0,
      epsilon=EPS,
      **kw,
    )[1]
    return s.std
  stats = bnjax.BatchStats(mean0, jnp.ones(C))
  vbs = VBS if x.ndim == 2 else VBS // 64
  bn = lambda x: bnjax.batch_norm(
    x,
    stats,
    use_running_average=False,
    momentum=0.0,
    epsilon=EPS,
    virtual_batch_size=vbs if fn == 'ghost' else None,
    **kw,
  )
  if fn == 'batch_norm (grad)':
    w = jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)
    (_, new), _ = jax.value_and_grad(
      lambda x: (jnp.sum(bn(x)[0] * w), bn(x)[1]), has_aux=True
    )(x)
    return new.var
  return bn(x)[1].var


def flax_var(fast: bool, x, mask, axis_name, mean0=None):
  """flax.linen.BatchNorm's new running variance (from mean 0, var 1)."""
  import flax.linen as nn
  import jax.numpy as jnp

  m = nn.BatchNorm(
    use_running_average=False,
    momentum=0.0,
    epsilon=EPS,
    use_scale=False,
    use_bias=False,
    axis_name=axis_name,
    use_fast_variance=fast,
  )
  variables = {'batch_stats': {'mean': jnp.zeros(C), 'var': jnp.ones(C)}}
  _, new = m.apply(variables, x, mask=mask, mutable=['batch_stats'])
  return new['batch_stats']['var']


def torch_var(x):
  import numpy as np
  import torch

  t = torch.from_numpy(np.array(x))
  rm, rv = torch.zeros(C), torch.ones(C)
  torch.nn.functional.batch_norm(
    t, rm, rv, training=True, momentum=1.0, eps=EPS
  )
  return rv.numpy() * (ROWS - 1) / ROWS  # torch stores the unbiased variance


def compile_run(fn_var, synced: bool, mesh):
  """jit of fn_var(x, m, axis_name, mean0) on one device, or over the mesh's
  8 shards with axis_name; mean0 (the running mean) is traced, so one
  compilation serves every ratio and seed."""
  import jax
  from jax.sharding import PartitionSpec as P

  if not synced:
    return jax.jit(lambda x, m, mean0: fn_var(x, m, None, mean0))

  # Every shard's result comes back (D, C): they must all be right.
  def f(x, m, mean0):
    specs = (P('d'), None if m is None else P('d'), P())
    g = jax.shard_map(
      lambda x, m, k: fn_var(x, m, 'd', k)[None],
      mesh=mesh,
      in_specs=specs,
      out_specs=P('d'),
      check_vma=False,
    )
    return g(x, m, mean0)

  return jax.jit(f)


def rel_err(got, want, fn: str):
  import numpy as np

  got = np.asarray(got, np.float64)
  if fn == 'batch_renorm':  # running std of sqrt(var + eps)
    got = got * got - EPS
  return float(np.max(np.abs(got - want) / want))


def measure(
  ratios=RATIOS,
  layouts=LAYOUTS,
  seeds=(0, 1, 2),
  peers=True,
  shapes=tuple(SHAPES),
):
  """Rows of {impl, fn, shape, layout, synced, ratio, rel_err (worst over
  seeds)}."""

  import jax
  import numpy as np
  from jax.sharding import Mesh

  mesh = Mesh(np.array(jax.devices()[:D]), ('d',))
  impls = [('bnjax', fn) for fn in BNJAX_FNS]
  if peers:
    impls += [('flax', f'fast_variance={fast}') for fast in (True, False)]
  rows = []
  for shape in shapes:
    rows += _measure_shape(shape, ratios, layouts, seeds, impls, mesh)
  if peers:
    rows += _torch_rows(ratios, seeds)
  return rows


@functools.cache
def _jitted(impl, fn, synced, mesh):
  """One jitted function per (implementation, function, sync mode), kept
  for the process: jit's own cache then compiles once per input shape and
  mask kind, so layouts, ratios and seeds (and calls of measure) share it."""
  if impl == 'bnjax':
    sync = 'psum' if synced == 'psum' else 'gather'
    fv = functools.partial(bnjax_var, fn, sync=sync)
  else:
    fv = functools.partial(flax_var, fn == 'fast_variance=True')
  return compile_run(fv, bool(synced), mesh)


def _measure_shape(shape, ratios, layouts, seeds, impls, mesh):
  import numpy as np

  rows = []
  for layout in layouts:
    for synced in (False, True, 'psum'):
      for impl, fn in impls:
        if synced == 'psum' and impl != 'bnjax':
          continue
        f = _jitted(impl, fn, synced, mesh)
        for ratio in ratios:
          errs = []
          # psum: the running mean at loc (steady state); else from 0.
          mean0 = np.float32(ratio if synced == 'psum' else 0.0)
          for seed in seeds:
            x, mask = make_data(ratio, layout, seed, shape)
            want = oracle_var(x, mask, fn)
            errs.append(rel_err(f(x, mask, mean0), want, fn))
          rows.append(
            dict(
              impl=impl,
              fn=fn,
              shape=shape,
              layout=layout,
              synced=synced,
              ratio=ratio,
              rel_err=_worst(errs),
            )
          )
  return rows


def _worst(errs):
  """The largest error, or None (strict JSON's null) if any is NaN or inf."""
  import math

  return max(errs) if all(math.isfinite(e) for e in errs) else None


def _torch_rows(ratios, seeds):
  try:
    import torch  # noqa: F401
  except ImportError:
    return []
  rows = []
  for ratio in ratios:
    errs = []
    for seed in seeds:
      x, _ = make_data(ratio, 'identical', seed)
      errs.append(rel_err(torch_var(x), oracle_var(x, None, 'torch'), 'torch'))
    rows.append(
      dict(
        impl='torch',
        fn='F.batch_norm',
        shape='2-D',
        layout='identical',
        synced=False,
        ratio=ratio,
        rel_err=_worst(errs),
      )
    )
  return rows


_LABELS = {
  'fast_variance=True': '(fast variance, the default)',
  'fast_variance=False': '(two-pass variance)',
}


def table(rows) -> str:
  """Markdown: worst error per (impl, layout, synced) over functions."""
  keys = []
  for r in rows:
    k = (
      r['impl'],
      r['fn'] if r['impl'] != 'bnjax' else 'all 5 functions',
      r.get('shape', '2-D'),
      r['layout'],
      r['synced'],
    )
    if k not in keys:
      keys.append(k)
  ratios = sorted({r['ratio'] for r in rows})
  head = (
    '| implementation | shape | layout | devices | '
    + ' | '.join(f'{q:.0e}' for q in ratios)
    + ' |'
  )
  lines = [head, '|' + '---|' * (4 + len(ratios))]
  for impl, fn, shape, layout, synced in keys:
    cells = []
    for q in ratios:
      errs = [
        r['rel_err']
        for r in rows
        if r['ratio'] == q
        and r['impl'] == impl
        and r['layout'] == layout
        and r.get('shape', '2-D') == shape
        and r['synced'] == synced
        and (impl == 'bnjax' or r['fn'] == fn)
      ]
      cells.append('NaN' if None in errs else f'{max(errs):.1e}')
    devices = {False: '1', True: '8 synced', 'psum': '8, psum'}[synced]
    # flax's argument, in words that wrap (the table fits the docs' page)
    label = _LABELS.get(fn, fn)
    lines.append(
      f'| {impl} {label} | {shape} | {layout} | {devices} | '
      + ' | '.join(cells)
      + ' |'
    )
  return '\n'.join(lines)


def _cli(p):
  p.add_argument('--table', action='store_true', help='print the docs table')


def main(argv=None):
  args = _timing.parse_args(__doc__, argv, extra=_cli)
  import jax

  try:  # must precede the first JAX operation
    jax.config.update('jax_num_cpu_devices', D)
  except RuntimeError:  # already initialized (e.g. inside the test suite)
    if jax.device_count() < D:
      raise
  if args.smoke:
    rows = measure(
      ratios=(1e4,), layouts=('uneven masks',), seeds=(0,), shapes=('4-D',)
    )
  else:
    rows = measure()
    _timing.write_result(
      'numerics', dict(env=_timing.environment(), rows=rows), allow_nan=False
    )
  if args.table or not args.smoke:
    print(table(rows))
  return rows


def numerics_before_after() -> str:
  """bnjax's worst variance error before the corrected two-pass (commit
  a451d20) and now, per |mean|/std, one device and synced."""
  before = _timing.latest('numerics_before_a451d20')['rows']
  after = _timing.latest('numerics')['rows']

  def worst(rows, synced, ratio):
    v = [
      r['rel_err']
      for r in rows
      if r['impl'] == 'bnjax' and r['synced'] == synced and r['ratio'] == ratio
    ]
    return f'{max(v):.1e}' if v else 'n/a'

  ratios = sorted({r['ratio'] for r in after})
  lines = [
    '| bnjax, worst of every function and layout | '
    + ' | '.join(f'{q:.0e}' for q in ratios)
    + ' |',
    '|---' * (len(ratios) + 1) + '|',
  ]
  for label, rows, synced in [
    ('before a451d20, 1 device', before, False),
    ('before a451d20, 8 synced', before, True),
    ('now, 1 device', after, False),
    ('now, 8 synced', after, True),
    ('now, 8, psum', after, 'psum'),
  ]:
    lines.append(
      f'| {label} | '
      + ' | '.join(worst(rows, synced, q) for q in ratios)
      + ' |'
    )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  return {
    'numerics-before-after': numerics_before_after(),
    'numerics': table(_timing.latest('numerics')['rows']),
  }
