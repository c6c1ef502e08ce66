"""Why the forward reads x twice: every way to get sum(x) and sum(x*x), timed.

The question behind the layer benchmark's pass count: can one read of x give
both per-channel sums faster than two plain reductions on XLA:CPU? Times,
interleaved after warm-up, at 65536x64 float32 (16 MB, 64 channels), of:
two plain ``jnp.sum``s (what bnjax's forward runs); ``sum(x - s)`` with a
per-channel ``s`` fused in (the shifted and two-pass forms); one variadic
``lax.reduce`` of both; one reduction over ``stack([x, x*x])``; a dot with a
ones vector; one complex sum of ``x + i x*x``; and an L2-sized chunk loop
(``lax.scan``). Also the compile time of a chain of reduce-and-normalize
layers without and with a ``lax.cond`` per layer (branches that pass
through, hold one kernel, or hold bnjax's exact fallback): the price of
the CPU path's fallback at compile time.

Run: ``python -m benchmarks run reductions`` (about 1 minute) or ``--smoke``.
Appends a run to ``results/reductions.json``; the README's table is filled
from it by ``python -m benchmarks report``.
"""

from __future__ import annotations

import numpy as np

from benchmarks import _readme, _timing

SHAPE = (65536, 64)


def forms():
  import jax
  import jax.numpy as jnp
  from jax import lax

  def two_sums(x, s):
    return jnp.sum(x, 0), jnp.sum(x * x, 0)

  def shifted_sums(x, s):
    d = x - s
    return jnp.sum(d, 0), jnp.sum(d * d, 0)

  def variadic(x, s):
    z = jnp.zeros((), x.dtype)
    return lax.reduce(
      (x, x * x), (z, z), lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,)
    )

  def stacked(x, s):
    both = jnp.sum(jnp.stack([x, x * x]), 1)
    return both[0], both[1]

  def dot_ones(x, s):
    both = jnp.ones((x.shape[0],), x.dtype) @ jnp.concatenate([x, x * x], 1)
    return both[: x.shape[1]], both[x.shape[1] :]

  def complex_sum(x, s):
    c = jnp.sum(lax.complex(x, x * x), 0)
    return c.real, c.imag

  def chunk_loop(x, s):
    chunks = x.reshape(-1, 4096, x.shape[1])

    def body(acc, c):
      return (acc[0] + jnp.sum(c, 0), acc[1] + jnp.sum(c * c, 0)), None

    z = jnp.zeros(x.shape[1], x.dtype)
    return lax.scan(body, (z, z), chunks)[0]

  return {
    k: jax.jit(f)
    for k, f in dict(
      two_sums=two_sums,
      shifted_sums=shifted_sums,
      variadic_reduce=variadic,
      stacked_reduce=stacked,
      dot_with_ones=dot_ones,
      complex_sum=complex_sum,
      scan_chunks=chunk_loop,
    ).items()
  }


LAYERS = 20


def cond_compile(repeats: int, layers: int = LAYERS) -> dict:
  """Compile seconds of a chain of reduce-and-normalize layers, each with:
  no conditional (``plain``); a ``lax.cond`` whose taken branch passes its
  operands through (``cond_pass``); one whose branch doubles a vector, one
  kernel (``cond_kernel``); and one whose branch is bnjax's exact fallback
  (``cond_exact``, ``local.exact_sums``). The difference over ``plain``,
  divided by ``layers``, is what one conditional costs to compile.

  Each compile is of a freshly made function, so JAX's caches never answer.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from bnjax._moments import local
  from bnjax._types import Layout

  x = jnp.ones((64, 8, 8, 16))
  red = (0, 1, 2)
  lay = Layout(4, (3,), red, (16,), 64 * 8 * 8, x.shape)
  branches = dict(
    cond_pass=lambda x, s1: s1,
    cond_kernel=lambda x, s1: 2 * s1,
    cond_exact=lambda x, s1: sum(local.exact_sums(x, lay, split=True)[1:]),
  )

  def layer(x, branch):
    s1, s2 = jnp.sum(x, red), jnp.sum(x * x, red)
    if branch is not None:
      pred = jnp.any(s1 > 1e30)
      s1 = lax.cond(pred, lambda: branch(x, s1), lambda: s1)
    m = s1 / lay.count
    return (x - m) * lax.rsqrt(s2 / lay.count - m * m + 1e-5)

  def make(branch):
    def f(x):
      for _ in range(layers):
        x = layer(x, branch)
      return x

    return jax.jit(f)

  # Round robin over the variants (A B C D A B C D ...), so that the
  # machine's drift touches each alike; medians of ``repeats`` rounds.
  variants = dict(plain=None, **branches)
  times: dict[str, list[float]] = {k: [] for k in variants}
  for _ in range(repeats):
    for name, branch in variants.items():
      times[name].append(_timing.compile_seconds(lambda: make(branch), (x,), 1))
  return {
    'layers': layers,
    **{k: float(np.median(v)) for k, v in times.items()},
  }


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  import jax
  import jax.numpy as jnp

  shape = (4096, 8) if args.smoke else SHAPE
  x = jax.random.normal(jax.random.key(0), shape)
  s = jnp.zeros(shape[1])
  fns = forms()
  ref = fns['two_sums'](x, s)
  for name, f in fns.items():  # every form computes the same two sums
    got = f(x, s)
    for a, b in zip(got, ref, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2, err_msg=name)
  rounds, inner = (2, 1) if args.smoke else (15, 5)
  samples = _timing.interleaved_samples(
    fns, {k: (x, s) for k in fns}, rounds, inner
  )
  base = samples['two_sums']
  rows = []
  for name, t in samples.items():
    q25, q75 = _timing.ratio_quartiles(t, base)
    rows.append(
      dict(
        form=name,
        ms=float(np.median(t)) * 1e3,
        vs_two_sums=float(np.median(t) / np.median(base)),
        vs_q25=q25,
        vs_q75=q75,
      )
    )
  compile_s = cond_compile(1, layers=2) if args.smoke else cond_compile(15)
  out = dict(
    env=_timing.environment(),
    shape=list(shape),
    rounds=rounds,
    inner=inner,
    rows=rows,
    compile_s=compile_s,
  )
  for r in rows:
    print(f'{r["form"]:16s} {r["ms"]:8.3f} ms  {r["vs_two_sums"]:.2f}x')
  print('compile s:', compile_s)
  if not args.smoke:
    _timing.write_result('reductions', out)
  return out


def reductions_table(run: dict) -> str:
  e = run['env']
  shape = 'x'.join(map(str, run['shape']))
  lines = [
    f'{shape} float32, {e["machine"]}, jax {e["jax"]}, {e["date"]}, commit '
    f'{_readme.commit(e)}; medians of {run["rounds"]} interleaved rounds, the '
    "paired per-round ratio's quartiles in brackets.\n",
    '| form | ms | vs two plain sums |',
    '|---|---|---|',
  ]
  for r in run['rows']:
    lines.append(
      f'| `{r["form"]}` | {r["ms"]:.2f} | {r["vs_two_sums"]:.2f} '
      f'({r["vs_q25"]:.2f}-{r["vs_q75"]:.2f}) |'
    )
  c = run['compile_s']
  if 'cond_exact' in c:
    per = {k: (c[k] - c['plain']) / c['layers'] * 1e3 for k in c if 'cond' in k}
    lines.append(
      f'\nCompile of {c["layers"]} reduce-and-normalize layers: '
      f"{c['plain'] * 1e3:.0f} ms; each layer's `lax.cond` adds "
      f'{per["cond_pass"]:.1f} ms when its branch passes its operands '
      f'through, {per["cond_kernel"]:.1f} ms when the branch holds one '
      f"kernel, and {per['cond_exact']:.1f} ms when it holds bnjax's "
      'exact fallback.'
    )
  else:  # runs from before the chain
    lines.append(
      f'\nCompile of a toy reduce-and-normalize: {c["plain"] * 1e3:.0f}'
      f' ms, and {c["with_cond"] * 1e3:.0f} ms with a `lax.cond` whose '
      'branch only doubles a vector.'
    )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  return {'reductions': reductions_table(_timing.latest('reductions'))}
